"""Sharding: the rules table, mesh specs, rejections, tensor-parallel padding, and (on 8 simulated CPU devices)
sharded prefill, decode and training gradients, padded models and the expert-parallel exchanges against the
single-device model; the ragged exchange compiled for a TPU slice.

The rest of the suite runs on one device, and the device count is fixed when JAX starts, so the 8-device tests
run in a child pytest (test_eight_simulated_devices) with XLA_FLAGS set; in this process they are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_libtpu
from flax import nnx
from jax.sharding import PartitionSpec as P

from dots_jax.config import preset
from dots_jax.inference.generate import generate
from dots_jax.model.cache import KVCache
from dots_jax.model.modeling import Dots1ForCausalLM, random_model
from dots_jax.model.moe import expert_parallel, moe_experts
from dots_jax.model.padding import PaddedDots1ForCausalLM, pad_for_mesh, unpad
from dots_jax.parallel import sharding
from dots_jax.training.data import Batch
from dots_jax.training.step import TrainConfig, init_state, jit_train_step, loss_fn

MESHES = ["data=2,expert=4", "expert=8", "fsdp=2,expert=2,tensor=2", "data=8"]
NEEDS_8 = pytest.mark.skipif(jax.device_count() < 8, reason="runs in the 8-device child pytest")
TOL = 1e-5
BATCH, PROMPT, DECODE = 8, 16, 3


def tiny_cfg(**overrides):
    # 4 layers (1 dense + 3 MoE), weights at std 0.1 so that every block matters; group-limited routing.
    return dataclasses.replace(preset("tiny"), num_hidden_layers=4, layer_types=(), initializer_range=0.1,
                               **overrides)


def abstract_state(cfg) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: Dots1ForCausalLM(cfg, rngs=nnx.Rngs(0))))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# ----------------------------------------------------------------------------------------- one device
def test_rules_table_is_one_screen_and_collision_checked():
    assert set(sharding.MESH_AXES) == {"data", "fsdp", "expert", "tensor"}
    assert sharding.logical_to_spec(("layers", "expert", "embed", "moe_mlp")) == P(None, "expert", "fsdp", None)
    with pytest.raises(ValueError, match="mesh axis 'tensor' would split both dimension 0 and dimension 1"):
        sharding.logical_to_spec(("q_heads", "mlp"))
    with pytest.raises(ValueError, match="no entry in the sharding RULES"):
        sharding.logical_to_spec(("nonsense",))


@pytest.mark.parametrize("spec, message", [
    ("expert=3,foo=2", "unknown axis 'foo'"),
    ("expert=0", "needs a positive integer size"),
    ("expert", "is not axis=size"),
    ("expert=2,expert=2", "given twice"),
    ("expert=4", "covers 4 devices, but there are 1"),
])
def test_bad_mesh_specs_are_rejected(spec, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(spec, devices=jax.devices()[:1])


def test_mesh_axes_in_fixed_order():
    assert sharding.parse_mesh_spec("tensor=2, expert=16,fsdp=4") == {"data": 1, "fsdp": 4, "expert": 16,
                                                                       "tensor": 2}
    mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
    assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.shape == (1, 1, 1, 1)


@pytest.mark.parametrize("spec, message", [
    ("expert=3", "n_routed_experts=8 is not divisible by expert=3; use an expert axis of 1, 2, 4 or 8"),
    ("tensor=4", "num_key_value_heads=2 is not divisible by tensor=4; use a tensor axis of 1 or 2"),
    ("fsdp=3", "hidden_size=64 is not divisible by fsdp=3; use an fsdp axis of 1, 2, 4, 8, 16, 32 or 64"),
])
def test_unshardable_meshes_are_rejected_with_what_works(spec, message):
    with pytest.raises(ValueError, match="this mesh cannot shard the model") as info:
        sharding.check_shardable(tiny_cfg(), spec)
    assert message in str(info.value)


def test_released_model_meshes_and_padding_plan():
    cfg = preset("dots.llm1.base")
    sharding.check_shardable(cfg, "fsdp=4,expert=16")
    sharding.check_shardable(cfg, "data=2,expert=16,tensor=4")
    with pytest.raises(ValueError, match="use an expert axis of 1, 2, 4, 8, 16, 32, 64 or 128"):
        sharding.check_shardable(cfg, "expert=48")
    plan = sharding.padding_plan(cfg, "tensor=2")
    assert plan["intermediate_size"] == (10944, 11008)  # 10944 = 85.5 x 128: pad to 2 x 43 x 128
    assert "vocab_size" not in plan  # 152064 / 2 = 594 x 128 already
    assert sharding.padding_plan(cfg, "expert=16") == {}  # nothing is split over tensor


def padded_cfg():
    # Dense width and vocabulary that no tensor axis > 1 divides; 4 kv heads so that tensor=4 splits attention.
    return tiny_cfg(vocab_size=251, intermediate_size=97, num_key_value_heads=4)


def test_check_shardable_points_to_padding_where_it_applies():
    with pytest.raises(ValueError) as info:
        sharding.check_shardable(padded_cfg(), "tensor=2")
    message = str(info.value)
    assert "vocab_size=251 is not divisible by tensor=2" in message
    assert "intermediate_size=97 is not divisible by tensor=2" in message
    assert message.count("dots_jax.model.padding.pad_for_mesh(model, mesh)") == 2
    with pytest.raises(ValueError) as info:  # attention heads are not padded: no pointer
        sharding.check_shardable(tiny_cfg(), "tensor=4")
    assert "pad_for_mesh" not in str(info.value)


def test_padding_on_one_device_is_exact_and_undone_by_unpad():
    cfg = padded_cfg()
    model = random_model(cfg, seed=3, moe_backend="gather")
    padded = pad_for_mesh(model, "tensor=4")
    assert isinstance(padded, PaddedDots1ForCausalLM)
    plan = sharding.padding_plan(cfg, "tensor=4")
    assert (padded.cfg.vocab_size, padded.cfg.intermediate_size) == (512, 512)  # 4 x 128 each
    assert (plan["vocab_size"], plan["intermediate_size"]) == ((251, 512), (97, 512))
    assert padded.lm_head.shape == (64, 512) and padded.dense_layers.mlp.down_proj.shape == (1, 512, 64)
    sharding.check_shardable(padded.cfg, "tensor=4")
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12), dtype=np.int32)
    want = np.asarray(model(ids))
    assert np.asarray(padded(ids)).shape == want.shape  # cut back to the real vocabulary
    assert rel_err(padded(ids), want) <= TOL
    # generate's prefill applies the head to each row's last position only: still the real vocabulary
    prompts = [list(map(int, row)) for row in ids]
    assert generate(padded, prompts, max_new_tokens=3).tokens == generate(model, prompts, max_new_tokens=3).tokens
    back = unpad(padded)
    assert type(back) is Dots1ForCausalLM and back.cfg == cfg
    for got, original in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(model)), strict=True):
        np.testing.assert_array_equal(got, original)
    assert pad_for_mesh(model, "expert=8") is model  # nothing split over tensor: nothing to pad
    assert pad_for_mesh(padded, "tensor=4") is padded


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((2, 3, 4))
    assert sharding.constrain(x, ("batch", "seq", "act_embed")) is x


# --------------------------------------------------------------------------------- 8 simulated devices
def test_eight_simulated_devices():
    """Runs this file's 8-device tests in a child pytest (the device count is fixed at JAX start-up)."""
    if jax.device_count() >= 8:
        pytest.skip("already on 8 devices")
    # conftest's cheap-compile XLA flags are kept: compiling dominates these tests.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    # The child takes ~4 CPU-minutes (compiles mostly), up to twice that in wall time next to the other pytest-xdist
    # worker on 2 cores. The limit leaves room for a busier machine and still stops a hung child;
    # --durations shows which test ate the time; a timeout still reports how far the child got, and a single test
    # stuck for 240 s has its stack dumped by faulthandler.
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                 "--durations=5", "-o", "faulthandler_timeout=240", str(Path(__file__)),
                                 "-k", "eight_devices_"], env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        out, err = (x.decode() if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
        pytest.fail(f"the 8-device child pytest ran past {e.timeout} s; its output so far:\n{out[-4000:]}\n"
                    f"{err[-4000:]}")
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.split("\n")[-2]


@pytest.fixture(scope="module")
def model() -> Dots1ForCausalLM:
    # "gather": the gmm backend with the smallest program (compile time dominates these tests); the strategy
    # test below runs the default backend inside shard_map.
    return random_model(tiny_cfg(), seed=3, moe_backend="gather")


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    cfg = tiny_cfg()
    ids = rng.integers(0, cfg.vocab_size, (BATCH, PROMPT + DECODE), dtype=np.int32)
    lengths = rng.integers(PROMPT // 2, PROMPT + 1, BATCH)
    valid = np.arange(PROMPT)[None, :] < lengths[:, None]  # right-padded prompts of different lengths
    return ids, valid, lengths


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, positions: jax.Array, valid: jax.Array,
          cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One cached forward: the prefill (S = PROMPT), then each decode step (S = 1, the same compiled program)."""
    return nnx.merge(graphdef, state)(ids, positions=positions, attention_mask=valid, cache=cache)


def run_inference(model, inputs, mesh) -> tuple[np.ndarray, np.ndarray]:
    """Prefill logits [B, PROMPT, V] and the logits of DECODE teacher-forced decode steps [B, DECODE, V]."""
    ids, valid, lengths = inputs
    graphdef, state = nnx.split(model)
    cache = KVCache.create(model.cfg, BATCH, 2 * PROMPT, jnp.float32)
    if mesh is not None:
        sharding.check_shardable(model.cfg, mesh)
        state = sharding.shard_state(state, mesh)
        cache = jax.device_put(cache, sharding.cache_shardings(cache, mesh))
    positions = np.broadcast_to(np.arange(PROMPT, dtype=np.int32), (BATCH, PROMPT))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        prefill, cache = _step(graphdef, state, ids[:, :PROMPT], positions, valid, cache)
        steps = []
        for i in range(DECODE):
            logits, cache = _step(graphdef, state, ids[:, PROMPT + i, None], (lengths + i)[:, None].astype(np.int32),
                                  np.ones((BATCH, 1), bool), cache)
            steps.append(logits[:, 0])
    return jax.device_get((prefill, jnp.stack(steps, axis=1)))


def grads(model, inputs, mesh) -> nnx.State:
    ids, valid, _ = inputs
    graphdef, params, bias = nnx.split(model, nnx.Param, ...)
    batch = Batch(inputs=jnp.asarray(ids[:, :PROMPT]), targets=jnp.asarray(ids[:, 1:PROMPT + 1]),
                  loss_mask=jnp.asarray(valid, jnp.float32))
    if mesh is not None:
        params, bias = sharding.shard_state(params, mesh), sharding.shard_state(bias, mesh)
    grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True), static_argnums=(2, 4))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return jax.device_get(grad_fn(params, bias, graphdef, batch, 1e-2)[0])


@pytest.fixture(scope="module")
def reference(model, inputs):
    return run_inference(model, inputs, None), grads(model, inputs, None)


@NEEDS_8
@pytest.mark.parametrize("spec", MESHES)
def test_eight_devices_logits_and_gradients_match_one_device(spec, model, inputs, reference):
    mesh = sharding.make_mesh(spec)
    (want_prefill, want_decode), want_grads = reference
    prefill, decode = run_inference(model, inputs, mesh)
    valid = inputs[1]
    errors = {"prefill": rel_err(prefill[valid], want_prefill[valid]), "decode": rel_err(decode, want_decode)}
    got_grads = grads(model, inputs, mesh)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
        errors[jax.tree_util.keystr(path)] = rel_err(g, flat_want[path])
    print(spec, {k: f"{v:.1e}" for k, v in errors.items() if k in ("prefill", "decode")},
          f"worst gradient {max(v for k, v in errors.items() if k.startswith('[')):.1e}")
    assert max(errors.values()) <= TOL, {k: v for k, v in errors.items() if v > TOL}


@NEEDS_8
def test_eight_devices_every_parameter_follows_the_table():
    cfg = tiny_cfg()
    mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
    state = abstract_state(cfg)
    shardings = sharding.param_shardings(state, mesh)
    variables = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    specs = dict(jax.tree_util.tree_leaves_with_path(shardings))
    assert len(variables) == len(specs)
    for path, variable in variables:
        axes = variable.get_metadata()["out_sharding"]
        spec = specs[path].spec
        for name, mesh_axes in zip(axes, spec, strict=True):
            assert mesh_axes == (None if name is None else sharding.RULES[name]), (path, axes, spec)
    # Spot checks that the table means what the design says.
    key = jax.tree_util.keystr
    by_name = {key(p): s.spec for p, s in specs.items()}
    assert by_name["['moe_layers']['mlp']['gate_proj']"] == P(None, "expert", "fsdp", None)
    assert by_name["['moe_layers']['self_attn']['q_proj']"] == P(None, "fsdp", "tensor", None)
    assert by_name["['lm_head']"] == P("fsdp", "tensor")
    # The whole train state (optimizer moments included) is split the same way, scalars replicated.
    _, train_state = init_state(nnx.eval_shape(lambda: Dots1ForCausalLM(cfg, rngs=nnx.Rngs(0))),
                                TrainConfig(total_steps=4, warmup_steps=1, decay_steps=1))
    train_shardings = sharding.param_shardings(train_state, mesh)
    mu = train_shardings.opt_state[1][0].mu
    assert mu["moe_layers"]["mlp"]["gate_proj"].spec == P(None, "expert", "fsdp", None)
    assert train_shardings.step.spec == P()


@NEEDS_8
def test_eight_devices_cache_shardings():
    cfg = tiny_cfg()
    mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
    cache = jax.eval_shape(lambda: KVCache.create(cfg, 8, 32, jnp.float32))
    spec = sharding.cache_shardings(cache, mesh)
    assert spec.moe.k.spec == P(None, ("fsdp", "expert"), None, "tensor", None)
    assert spec.positions.spec == P(("fsdp", "expert"), None) and spec.index.spec == P()
    odd = sharding.cache_shardings(jax.eval_shape(lambda: KVCache.create(cfg, 3, 32, jnp.float32)), mesh)
    assert odd.moe.k.spec == P(None, None, None, "tensor", None)  # a batch of 3 stays whole


def ragged_all_to_all_by_the_docs(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                  axis_name, axis_index_groups=None):
    """jax.lax.ragged_all_to_all as its docstring defines it, one slice per destination, built from all_to_all
    and gathers: XLA:CPU has no ragged-all-to-all ("HLO opcode `ragged-all-to-all` is not supported by XLA:CPU
    ThunkEmitter"), so on CPU this stands in for it. Sender: slice d is operand[input_offsets[d] :
    input_offsets[d] + send_sizes[d]]; receiver: the slice from source s lands at (s's output_offsets[me]), its
    recv_sizes[s] rows."""
    assert axis_index_groups is None
    shards, rows = jax.lax.axis_size(axis_name), operand.shape[0]
    r = jnp.arange(rows)
    slices = operand[jnp.clip(input_offsets[:, None] + r, 0, rows - 1)]  # [dest, rows, ...]
    in_slice = (r < send_sizes[:, None]).reshape(shards, rows, *[1] * (operand.ndim - 1))
    received = jax.lax.all_to_all(jnp.where(in_slice, slices, 0), axis_name, 0, 0)  # [source, rows, ...]
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where source s writes here
    target = jnp.where(r < recv_sizes[:, None], offsets[:, None] + r, output.shape[0])  # outside: dropped
    return output.at[target.reshape(-1)].set(received.reshape(shards * rows, *operand.shape[1:]), mode="drop")


@NEEDS_8
@pytest.mark.parametrize("strategy, spec", [("psum", "data=2,expert=4"), ("all_to_all", "data=2,expert=4"),
                                            ("auto", "expert=8"), ("ragged_all_to_all", "data=2,expert=4"),
                                            ("ragged_all_to_all", "expert=8")])
def test_eight_devices_expert_parallel_strategies(strategy, spec, monkeypatch):
    rng = np.random.default_rng(1)
    e, h, i, t, k = 8, 16, 8, 128, 3  # 16 tokens per device: "auto" exchanges tokens
    x = jnp.asarray(rng.normal(size=(t, h)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
    w = jnp.asarray(rng.random((t, k)), jnp.float32)
    gate, up, down = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(e, h, i), (e, h, i), (e, i, h)])
    mesh = sharding.make_mesh(spec)
    if strategy == "ragged_all_to_all":  # numerically untested on the real collective: see the docstring above
        monkeypatch.setattr(jax.lax, "ragged_all_to_all", ragged_all_to_all_by_the_docs)

    def ep(x, gate):
        return expert_parallel(x, w, idx, gate, up, down, mesh=mesh, strategy=strategy)

    def loss(f):
        return lambda x, gate: (f(x, gate) ** 2).sum()

    with jax.set_mesh(mesh):
        compiled = jax.jit(ep).lower(x, gate).compile()
        got = compiled(x, gate)
        got_grads = jax.jit(jax.grad(loss(ep), argnums=(0, 1)))(x, gate)
    if strategy == "auto":  # the exchange, and on CPU the padded one (lowered for CPU only)
        assert "all-to-all" in compiled.as_text() and "ragged-all-to-all" not in compiled.as_text()
    single = lambda x, gate: moe_experts(x, w, idx, gate, up, down)  # noqa: E731
    assert rel_err(got, single(x, gate)) <= TOL
    for g, want in zip(got_grads, jax.grad(loss(single), argnums=(0, 1))(x, gate), strict=True):
        assert rel_err(g, want) <= TOL


@NEEDS_8
@pytest.mark.parametrize("strategy, int8", [("psum", False), ("all_to_all", True)])
def test_eight_devices_lora_adapters_split_with_their_experts(strategy, int8):
    """LoRA on the routed experts (issue 20) under expert parallelism: the adapters [E, ...] split over "expert"
    with their experts (beside int8 scales on one mesh); values and gradients (tokens, every adapter) equal the
    single-device experts', which tests/test_lora.py checks against float64."""
    from dots_jax.ops.gmm import ExpertLora
    from dots_jax.ops.quant import quantize_int8

    rng = np.random.default_rng(5)
    e, h, i, r, t, k = 8, 16, 8, 3, 128, 2  # 16 tokens per device
    x = jnp.asarray(rng.normal(size=(t, h)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
    w = jnp.asarray(rng.random((t, k)), jnp.float32)
    weights = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(e, h, i), (e, h, i), (e, i, h)]]
    scales = None
    if int8:
        quantised = [quantize_int8(v, (1,)) for v in weights]
        weights, scales = [q for q, _ in quantised], tuple(s for _, s in quantised)
    lora = ExpertLora(*(jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
                        for s in [(e, h, r), (e, r, i), (e, r, i), (e, i, r), (e, r, h)]))
    mesh = sharding.make_mesh("data=2,expert=4")

    def value_and_grads(experts):
        def loss(x, lora):
            out = experts(x, lora)
            return (out ** 2).sum(), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, lora)

    with jax.set_mesh(mesh):
        (_, got), got_grads = value_and_grads(lambda x, lora: expert_parallel(
            x, w, idx, *weights, mesh=mesh, strategy=strategy, scales=scales, lora=lora))
    (_, want), want_grads = value_and_grads(lambda x, lora: moe_experts(x, w, idx, *weights, scales=scales,
                                                                        lora=lora))
    assert rel_err(got, want) <= TOL
    for g, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert rel_err(g, want) <= TOL


@NEEDS_8
def test_eight_devices_attach_lora_places_the_adapters_by_the_table(model):
    """attach_lora on a base placed on a mesh creates the adapters on it, split as RULES says (the routed experts'
    over "expert" with their experts, "embed" over fsdp), never whole on one device."""
    from dots_jax.model.lora import LoraConfig, attach_lora

    mesh = sharding.make_mesh("fsdp=2,expert=4")
    graphdef, state = nnx.split(model)
    adapted = attach_lora(nnx.merge(graphdef, sharding.shard_state(state, mesh)), LoraConfig(rank=2))
    adapters = dict(nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam)))
    routed_a = adapters[("moe_layers", "mlp", "gate_up_proj_lora_a")].get_value().sharding
    assert routed_a.mesh.size == 8 and routed_a.spec == P(None, "expert", "fsdp", None)
    assert all(len(var.get_value().sharding.device_set) == 8 for var in adapters.values())


@NEEDS_8
@pytest.mark.parametrize("spec, check_grads", [("data=2,expert=2,tensor=2", False), ("fsdp=2,tensor=4", True)])
def test_eight_devices_padded_model_matches_the_unpadded_one_device_model(spec, check_grads, inputs):
    """Dense width 97 and vocabulary 251 on tensor axes of 2 and 4: padded, sharded logits (and on one mesh the
    gradients) equal the unpadded single-device model's; the padding's gradients are exactly zero."""
    model = random_model(padded_cfg(), seed=3, moe_backend="gather")
    mesh = sharding.make_mesh(spec)
    with pytest.raises(ValueError, match="pad_for_mesh"):
        sharding.check_shardable(model.cfg, mesh)
    padded = pad_for_mesh(model, mesh)
    ids, valid, _ = inputs
    ids = ids % model.cfg.vocab_size
    forward = jax.jit(lambda graphdef, state, ids: nnx.merge(graphdef, state)(ids), static_argnums=0)
    want = forward(*nnx.split(model), ids[:, :PROMPT])
    graphdef, state = nnx.split(padded)
    with jax.set_mesh(mesh):
        got = forward(graphdef, sharding.shard_state(state, mesh), ids[:, :PROMPT])
    assert got.shape == want.shape and rel_err(got, want) <= TOL, rel_err(got, want)
    if not check_grads:  # each gradient check compiles two more programs
        return
    want_grads = dict(jax.tree_util.tree_leaves_with_path(grads(model, (ids, valid, None), None)))
    for path, g in jax.tree_util.tree_leaves_with_path(grads(padded, (ids, valid, None), mesh)):
        real = tuple(slice(0, n) for n in want_grads[path].shape)
        assert rel_err(g[real], want_grads[path]) <= TOL, jax.tree_util.keystr(path)
        padding = np.ones(g.shape, bool)
        padding[real] = False
        assert not np.any(g[padding]), jax.tree_util.keystr(path)


def test_ragged_exchange_compiles_for_tpu():
    """"auto" picks ragged_all_to_all when lowering for TPU (on a CPU host, ahead of time): the forward and the
    gradient compile for a v5p:2x2x2 slice with XLA's ragged-all-to-all in them. This is the only check of the
    real collective: nothing here runs it (XLA:CPU lacks it)."""
    require_libtpu()
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-16")  # quiets libtpu's start-up probing
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
    mesh = sharding.make_mesh("data=2,expert=4", devices=devices)
    e, h, i, t, k = 16, 256, 128, 8 * 64, 4
    tokens, experts = P(("data", "expert")), P("expert")

    def arg(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

    args = (arg((t, h), jnp.bfloat16, tokens), arg((t, k), jnp.float32, tokens), arg((t, k), jnp.int32, tokens),
            arg((e, h, i), jnp.bfloat16, experts), arg((e, h, i), jnp.bfloat16, experts),
            arg((e, i, h), jnp.bfloat16, experts))

    def ep(*args):
        return expert_parallel(*args, mesh=mesh, backend="ragged_dot")

    def loss(*args):
        return (ep(*args).astype(jnp.float32) ** 2).sum()

    with jax.set_mesh(mesh):
        forward = jax.jit(ep).lower(*args).compile().as_text()
        backward = jax.jit(jax.grad(loss, argnums=(0, 3))).lower(*args).compile().as_text()
    assert "ragged-all-to-all" in forward and "ragged-all-to-all" in backward


@NEEDS_8
def test_eight_devices_generate_and_train_step_with_a_mesh(model):
    from dots_jax.inference.generate import generate

    mesh = sharding.make_mesh("data=2,expert=4")
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3], [4] * 7, [10, 11]] * 2
    want = generate(model, prompts, max_new_tokens=4).tokens
    assert generate(model, prompts, max_new_tokens=4, mesh=mesh).tokens == want
    with pytest.raises(ValueError, match="use an expert axis of 1, 2, 4 or 8"):
        generate(model, prompts, mesh=_bad_mesh())

    tc = TrainConfig(total_steps=4, warmup_steps=1, decay_steps=1, learning_rate=1e-2)
    graphdef, state = init_state(model, tc)
    ids = np.random.default_rng(2).integers(0, model.cfg.vocab_size, (BATCH, PROMPT + 1), dtype=np.int32)
    batch = Batch(inputs=jnp.asarray(ids[:, :-1]), targets=jnp.asarray(ids[:, 1:]),
                  loss_mask=jnp.ones((BATCH, PROMPT), jnp.float32))
    want_state, want_metrics = jit_train_step(graphdef, tc, jax.tree.map(jnp.copy, state), batch)
    with jax.set_mesh(mesh):
        got_state, got_metrics = jit_train_step(graphdef, tc, sharding.shard_state(state, mesh), batch)
    assert rel_err(got_metrics["loss"], want_metrics["loss"]) <= TOL
    assert rel_err(got_metrics["grad_norm"], want_metrics["grad_norm"]) <= TOL
    for got, want in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params), strict=True):
        assert rel_err(got, want) <= TOL


def _bad_mesh():
    # 3 x ... is impossible on 8 devices, so build the rejected mesh from 6 of them.
    return sharding.make_mesh("data=2,expert=3", devices=jax.devices()[:6])
