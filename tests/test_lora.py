"""LoRA adapters (issue 20, dots_jax.model.lora) against independent computations.

The oracle is transformers' Dots1ForCausalLM in float64 with every linear weight replaced by W + scaling * A @ B,
A and B torch leaf tensors (torch.func.functional_call), and torch's autograd for the adapters' gradients: every
target kind (q/k/v/o, the dense MLP, the shared experts, the routed experts), through the reference gmm and the CPU
default backends, on a float base and on an int8 base (the oracle's base: the int8 weights dequantised in float64
here). The expert FFN with adapters on every gmm backend against the float64 numpy FFN on merged weights, with the
adapters' gradients by the chain rule. The trainable count recomputed by hand from the config.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY, hf_config, hf_model, random_ids, require_libtpu, save, torch_one_thread
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_grouped_matmul import oracle_ffn

import dots_jax
from dots_jax.model.lora import TARGETS, LoraConfig, attach_lora, lora_param_count, merge_lora
from dots_jax.model.modeling import RouterBias, abstract_model
from dots_jax.ops import gmm as grouped_matmul
from dots_jax.ops.quant import quantize_int8
from dots_jax.parallel.sharding import RULES, make_mesh

LORA = LoraConfig(rank=4, alpha=8.0)  # scaling 2: a scaling of 1 would hide a missing or doubled factor
BATCH, SEQ = 2, 12  # 48 token copies over 8 experts: "auto" is "loop" on CPU
GRAD_RTOL = 1e-5  # per adapter tensor, in the Frobenius norm (f32 against float64)
LOGIT_RTOL = 1e-4


def rel_fro(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def rel_max(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


# ------------------------------------------------------------------------------------------------ config
def test_config_validates_and_scales():
    assert LoraConfig(rank=8).scaling == 1.0 and LoraConfig(rank=8, alpha=32).scaling == 4.0
    assert LoraConfig(rank=2, targets=["experts", "attn"]).targets == ("attn", "experts")  # canonical order
    assert LoraConfig(rank=2, targets=("experts", "attn")) == LoraConfig(rank=2, targets=("attn", "experts"))
    for kwargs, field in [(dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(rank=4, dropout=1.0), "dropout"),
                          (dict(rank=4, dropout=-0.1), "dropout"), (dict(rank=4, targets=()), "targets"),
                          (dict(rank=4, targets=("attn", "lm_head")), "targets"), (dict(rank=4, alpha=0), "alpha")]:
        with pytest.raises(ValueError, match=f"LoraConfig.{field}"):
            LoraConfig(**kwargs)


def hand_count(cfg, rank: int, targets: tuple[str, ...]) -> int:
    """r * (in + out) summed over every adapted matrix, listed matrix by matrix."""
    h, i_dense, i_moe, e = cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shared = cfg.n_shared_experts * i_moe
    dense_layers, moe_layers = cfg.first_k_dense_replace, cfg.num_hidden_layers - cfg.first_k_dense_replace
    matrices: list[tuple[int, int, int]] = []  # (how many, in, out)
    if "attn" in targets:
        layers = dense_layers + moe_layers
        matrices += [(layers, h, q), (layers, h, kv), (layers, h, kv), (layers, q, h)]
    if "mlp" in targets:
        matrices += [(dense_layers, h, i_dense), (dense_layers, h, i_dense), (dense_layers, i_dense, h)]
    if "shared" in targets and shared:
        matrices += [(moe_layers, h, shared), (moe_layers, h, shared), (moe_layers, shared, h)]
    count = sum(n * rank * (a + b) for n, a, b in matrices)
    if "experts" in targets:  # one A [H, r] per expert shared by gate and up, a B [r, I] each; down [I, r], [r, H]
        count += moe_layers * e * (h * rank + 2 * rank * i_moe + i_moe * rank + rank * h)
    return count


@pytest.mark.parametrize("targets", [TARGETS, ("attn",), ("mlp", "experts"), ("shared",)])
def test_adapters_are_the_only_trainable_parameters_and_count_as_the_arithmetic(targets):
    cfg = dots_jax.Dots1Config.from_hf({**TINY, "model_type": "dots1", "num_key_value_heads": 2})
    lora = LoraConfig(rank=3, targets=targets)
    model = abstract_model(cfg, lora=lora, param_dtype=jnp.bfloat16)
    assert model.lora == lora
    _, adapters, base, bias = nnx.split(model, nnx.LoRAParam, nnx.Param, RouterBias)
    leaves = jax.tree.leaves(adapters)
    assert sum(x.size for x in leaves) == hand_count(cfg, 3, targets) == lora_param_count(cfg, lora)
    assert all(x.dtype == jnp.float32 for x in leaves)  # f32 adapters on a bf16 base
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(base))
    # Every adapter has the rank axis and logical axes the sharding table knows; the routed experts' keep "expert".
    for path, var in nnx.to_flat_state(adapters):
        axes = var.get_metadata()["out_sharding"]
        assert "lora_rank" in axes and all(a is None or a in RULES for a in axes), (path, axes)
        routed = path[:2] == ("moe_layers", "mlp") and len(path) == 3  # the shared experts' sit one level deeper
        assert ("expert" in axes) == routed, (path, axes)


# ------------------------------------------------------------------------------------- the float64 oracle
def _delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A @ B over the rank: A [..., r], B [r, ...] (one layer's, and for the experts one expert's)."""
    return torch.tensordot(a, b, dims=1)


def torch_reference(ref64, base: dict[tuple, np.ndarray], adapters: dict[tuple, np.ndarray], scaling: float,
                    ids: np.ndarray) -> tuple[float, np.ndarray, dict[tuple, np.ndarray]]:
    """(loss, logits, adapter gradients) of transformers' model in float64 with each linear weight of every layer
    replaced by base + scaling * A @ B (base in our layout, by our state path; A and B torch leaves)."""
    cfg = ref64.config
    h, k = cfg.hidden_size, cfg.first_k_dense_replace
    leaves = {p: torch.tensor(v, dtype=torch.float64, requires_grad=True) for p, v in adapters.items()}

    def weight(stack: str, i: int, *module: str, name: str) -> torch.Tensor:
        w = torch.tensor(base[(stack, *module, name)][i], dtype=torch.float64)
        prefix = (stack, *module)
        if prefix + (name + "_lora_b",) not in leaves:
            return w
        b = leaves[prefix + (name + "_lora_b",)][i]
        a = leaves.get(prefix + (name + "_lora_a",), leaves.get(prefix + ("gate_up_proj_lora_a",)))[i]
        if a.ndim == 3 and b.ndim == 3:  # routed experts [E, in, r] @ [E, r, out], expert by expert
            return w + scaling * torch.stack([_delta(a[e], b[e]) for e in range(a.shape[0])])
        return w + scaling * _delta(a, b)

    overrides = {}
    for layer in range(cfg.num_hidden_layers):
        stack, i = ("dense_layers", layer) if layer < k else ("moe_layers", layer - k)
        prefix = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj"):  # ours [H, n, d], torch [n*d, H]
            overrides[f"{prefix}.self_attn.{proj}.weight"] = weight(stack, i, "self_attn", name=proj).reshape(h, -1).T
        overrides[f"{prefix}.self_attn.o_proj.weight"] = weight(stack, i, "self_attn", name="o_proj").reshape(-1, h).T
        mlps = [("mlp",)] if layer < k else [("mlp", "shared_experts")]
        for module in mlps:  # ours [in, out], torch [out, in]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                overrides[f"{prefix}.{'.'.join(module)}.{proj}.weight"] = weight(stack, i, *module, name=proj).T
        if layer >= k:  # routed experts: torch's fused gate_up_proj [E, 2I, H] (gate rows first), down [E, H, I]
            gate, up, down = (weight(stack, i, "mlp", name=p) for p in ("gate_proj", "up_proj", "down_proj"))
            overrides[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat([gate.transpose(1, 2), up.transpose(1, 2)], 1)
            overrides[f"{prefix}.mlp.experts.down_proj"] = down.transpose(1, 2)
    ids_t = torch.from_numpy(ids).long()
    with torch_one_thread(grad=True):
        logits = torch.func.functional_call(ref64, overrides, (ids_t,)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids_t[:, 1:].reshape(-1))
        loss.backward()
    return loss.item(), logits.detach().numpy(), {p: leaf.grad.numpy() for p, leaf in leaves.items()}


# ------------------------------------------------------------------------------------------------ ours
def flat(state) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


def with_random_b(model, seed: int):
    """The model with every B random (B = 0 would make A's gradient 0 and the adapters invisible)."""
    graphdef, state = nnx.split(model)
    variables = dict(nnx.to_flat_state(state))
    rng = np.random.default_rng(seed)
    for path, var in variables.items():
        if path[-1].endswith("_lora_b"):
            var.set_value(jnp.asarray(rng.normal(0.0, 0.05, var.get_value().shape), jnp.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(variables))


def with_backend(model, backend: str):
    """The same state under a model built for another gmm backend."""
    options = {**model.options(), "moe_backend": backend}
    graphdef, _ = nnx.split(abstract_model(model.cfg, **options))
    return nnx.merge(graphdef, nnx.state(model))


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(graphdef, adapters, rest, ids):
    def loss(adapters):
        logits = nnx.merge(graphdef, adapters, rest)(ids)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean(), logits

    return jax.value_and_grad(loss, has_aux=True)(adapters)


def loss_and_grads(model, ids):
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    (loss, logits), grads = _loss_and_grads(graphdef, adapters, rest, jnp.asarray(ids))
    return float(loss), np.asarray(logits), flat(grads)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The checkpoint, our float model with adapters (random B), the ids and the oracle's answer."""
    ref = hf_model(hf_config(num_key_value_heads=2), seed=3, bias_std=0.05)
    path = save(ref, tmp_path_factory.mktemp("lora") / "tiny")
    base = dots_jax.from_pretrained(path, dtype=jnp.float32, moe_backend="dense", progress=False)
    model = with_random_b(attach_lora(base, LORA, seed=1), seed=2)
    ids = random_ids(ref.config.vocab_size, BATCH, SEQ, seed=4)
    ref64 = copy.deepcopy(ref).double()
    ref64.config._experts_implementation = "eager"  # the per-expert loop: torch's grouped_mm takes no float64
    adapters = flat(nnx.state(model, nnx.LoRAParam))
    want = torch_reference(ref64, flat(nnx.state(base, nnx.Param)), adapters, LORA.scaling, ids)
    # Ours through the reference gmm ("dense"): its logits serve the merge test too.
    dense = loss_and_grads(model, ids)
    return dict(path=path, base=base, model=model, ids=ids, ref64=ref64, adapters=adapters, want=want, dense=dense)


def one_device_mesh() -> jax.sharding.Mesh:
    """attach_lora and merge_lora build models: under a mesh too (nnx would read logical axes as mesh axes)."""
    return make_mesh("data=1", devices=jax.devices()[:1])


def test_attach_lora_keeps_the_base_and_initialises_as_peft(case):
    base = case["base"]
    with jax.set_mesh(one_device_mesh()):
        model = attach_lora(base, LORA, seed=1)
    ours = dict(nnx.to_flat_state(nnx.state(model)))
    base_state = dict(nnx.to_flat_state(nnx.state(base)))
    for path, var in base_state.items():  # the same arrays, not copies
        assert ours[path].get_value() is var.get_value(), path
    adapters = flat(nnx.state(model, nnx.LoRAParam))
    assert len(ours) == len(base_state) + len(adapters)
    cfg = base.cfg

    def fan_in(path: tuple) -> int:  # the adapted weight's input size
        if path[-1] == "o_proj_lora_a":
            return cfg.num_attention_heads * cfg.head_dim
        if path[-1] != "down_proj_lora_a":
            return cfg.hidden_size
        if path[0] == "dense_layers":
            return cfg.intermediate_size
        return cfg.shared_intermediate_size if "shared_experts" in path else cfg.moe_intermediate_size

    for path, value in adapters.items():
        if path[-1].endswith("_lora_b"):
            assert not value.any(), path  # B = 0: the adapted model starts as the base
            continue
        bound = 1 / np.sqrt(fan_in(path))  # PEFT: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert bound >= np.abs(value).max() > 0.8 * bound, path
    with pytest.raises(ValueError, match="merge_lora"):
        attach_lora(model, LORA)


@pytest.mark.parametrize("backend", ["dense", "loop"])  # the reference gmm; the CPU default at these sizes
def test_adapter_gradients_match_float64_torch(case, backend):
    """Every adapter's gradient (every target kind) against autograd through transformers on merged weights."""
    want_loss, want_logits, want = case["want"]
    if backend == "dense":
        loss, logits, got = case["dense"]
    else:
        loss, logits, got = loss_and_grads(with_backend(case["model"], backend), case["ids"])
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    assert rel_max(logits, want_logits) <= LOGIT_RTOL
    assert got.keys() == want.keys()
    kinds = {path[1:] for path in want}
    assert {("self_attn", "q_proj_lora_a"), ("self_attn", "o_proj_lora_b"), ("mlp", "down_proj_lora_a"),
            ("mlp", "shared_experts", "gate_proj_lora_b"), ("mlp", "gate_up_proj_lora_a"),
            ("mlp", "up_proj_lora_b")} <= kinds
    for path in want:
        assert np.linalg.norm(want[path]) > 0, path  # every adapter matters
        assert rel_fro(got[path], want[path]) <= GRAD_RTOL, (path, rel_fro(got[path], want[path]))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, key):
    return nnx.merge(graphdef, state).forward(ids, lora_key=key)[0]


def logits_of(model, ids, key=None) -> np.ndarray:
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(ids), key))


def test_merge_lora_gives_the_adapted_models_logits(case):
    model, ids = case["model"], case["ids"]
    with jax.set_mesh(one_device_mesh()):
        merged = merge_lora(model)
    assert merged.lora is None and not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(merged))} == {jnp.dtype(jnp.float32)}
    got = logits_of(merged, ids)
    _, want_logits, _ = case["want"]  # transformers on the merged weights
    assert rel_max(got, want_logits) <= LOGIT_RTOL
    assert rel_max(got, case["dense"][1]) <= LOGIT_RTOL  # our forward with the adapters
    # Every adapted weight moved (the adapters matter); the others are the same arrays.
    merged_state, base_state = flat(nnx.state(merged)), dict(nnx.to_flat_state(nnx.state(case["base"])))
    for path, var in nnx.to_flat_state(nnx.state(merged)):
        adapted = path[:-1] + (path[-1] + "_lora_b",) in case["adapters"]
        assert adapted == (var.get_value() is not base_state[path].get_value()), path
        if adapted:
            assert rel_max(merged_state[path], base_state[path].get_value()) > 1e-2, path


def dequantised(model) -> dict[tuple, np.ndarray]:
    """Our int8 model's base weights in float64: q * scale over the output channels (numpy, here)."""
    contracted = {"q_proj": (-3,), "k_proj": (-3,), "v_proj": (-3,), "o_proj": (-3, -2), "gate_proj": (-2,),
                  "up_proj": (-2,), "down_proj": (-2,)}
    values = flat(nnx.state(model, nnx.Param))
    out = {}
    for path, value in values.items():
        if value.dtype == np.int8:
            scale = values[path[:-1] + (path[-1] + "_scale",)].astype(np.float64)
            out[path] = value.astype(np.float64) * np.expand_dims(scale, contracted[path[-1]])
        else:
            out[path] = value
    return out


def test_int8_base_with_adapters_matches_the_dequantised_base(case):
    int8 = dots_jax.from_pretrained(case["path"], dtype=jnp.float32, moe_backend="loop", quantize="int8",
                                    progress=False)
    graphdef, _ = nnx.split(abstract_model(int8.cfg, **{**int8.options(), "lora": LORA}))
    model = nnx.merge(graphdef, nnx.state(int8), nnx.state(case["model"], nnx.LoRAParam))  # the float case's adapters
    want_loss, want_logits, want = torch_reference(case["ref64"], dequantised(int8), case["adapters"],
                                                   LORA.scaling, case["ids"])
    loss, logits, got = loss_and_grads(model, case["ids"])
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    assert rel_max(logits, want_logits) <= LOGIT_RTOL
    for path in want:
        assert rel_fro(got[path], want[path]) <= GRAD_RTOL, (path, rel_fro(got[path], want[path]))
    # merge_lora of an int8 base: a float model (the embedding's dtype) whose weights are the dequantised ones plus
    # scaling * A @ B (against float64 numpy; the merged float model's logits are checked above).
    merged = merge_lora(model)
    assert merged.quantize is None and {x.dtype for x in jax.tree.leaves(nnx.state(merged))} == {jnp.dtype("float32")}
    base, adapters, got = dequantised(int8), case["adapters"], flat(nnx.state(merged))
    products = {"q_proj": "lhr,lrnd->lhnd", "k_proj": "lhr,lrnd->lhnd", "v_proj": "lhr,lrnd->lhnd",
                "o_proj": "lndr,lrh->lndh"}  # else MLPs "lir,lro->lio", routed experts "leir,lero->leio"
    adapted = 0
    for path, value in base.items():
        *parent, name = path
        b = adapters.get((*parent, name + "_lora_b"))
        if b is None:
            continue
        a = adapters.get((*parent, name + "_lora_a"), adapters.get((*parent, "gate_up_proj_lora_a")))
        equation = products.get(name, "leir,lero->leio" if a.ndim == 4 else "lir,lro->lio")
        want_w = value + LORA.scaling * np.einsum(equation, a.astype(np.float64), b.astype(np.float64))
        assert rel_max(got[path], want_w) <= 1e-6, path
        adapted += 1
    assert adapted == 2 * 4 + 3 + 3 + 3  # q/k/v/o of both layer stacks; dense MLP; shared and routed experts


def test_dropout_draws_from_the_key(case):
    """Training's dropout (a key given) changes the logits, the same for the same key; without a key (eval) the
    model is the one whose logits the tests above check."""
    model = case["model"]
    options = {**model.options(), "lora": dataclasses.replace(LORA, dropout=0.5), "moe_backend": "dense"}
    graphdef, _ = nnx.split(abstract_model(model.cfg, **options))
    state, ids = nnx.state(model), jnp.asarray(case["ids"])
    _, want_logits, _ = case["want"]
    one, two = (np.asarray(_forward(graphdef, state, ids, jax.random.key(seed))) for seed in (1, 2))
    assert np.array_equal(one, _forward(graphdef, state, ids, jax.random.key(1)))
    assert rel_max(one, want_logits) > 1e-3 and rel_max(one, two) > 1e-3


# -------------------------------------------------------------------------------------- expert FFN, op level
OP_GROUPS = np.array([7, 0, 9, 5])  # an empty group, and 3 rows past the last group
OP_M, OP_H, OP_I, OP_R = 24, 32, 16, 4


def op_inputs(int8: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = len(OP_GROUPS)
    rows = rng.standard_normal((OP_M, OP_H)).astype(np.float32)
    weights = [rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((g, OP_H, OP_I), (g, OP_H, OP_I),
                                                                          (g, OP_I, OP_H))]
    scales = None
    if int8:
        quantised = [quantize_int8(w, (1,)) for w in weights]
        weights = [np.asarray(q) for q, _ in quantised]
        scales = tuple(np.asarray(s) for _, s in quantised)
    lora = grouped_matmul.ExpertLora(*(rng.standard_normal(s).astype(np.float32) * 0.3 for s in (
        (g, OP_H, OP_R), (g, OP_R, OP_I), (g, OP_R, OP_I), (g, OP_I, OP_R), (g, OP_R, OP_H))))
    d_out = rng.standard_normal((OP_M, OP_H)).astype(np.float32)
    return rows, weights, scales, lora, d_out


@pytest.mark.parametrize("backend,int8", [("dense", False), ("ragged_dot", False), ("gather", False),
                                          ("loop", False), ("pallas", False), ("loop", True), ("dense", True)])
def test_expert_ffn_with_adapters_on_every_backend(backend, int8):
    """Values and gradients (rows, every adapter) against the float64 FFN on merged weights W + A @ B, whose
    adapter gradients follow from the merged weights' by the chain rule."""
    rows, weights, scales, lora, d_out = op_inputs(int8)
    base = [np.asarray(w, np.float64) for w in weights]
    if int8:
        base = [w * np.asarray(s, np.float64)[:, None, :] for w, s in zip(base, scales, strict=True)]
    a, bg, bu, ad, bd = (np.asarray(x, np.float64) for x in lora)
    merged = (base[0] + a @ bg, base[1] + a @ bu, base[2] + ad @ bd)
    out, d_rows, d_gate, d_up, d_down = oracle_ffn(rows, *merged, OP_GROUPS, d_out)
    want = grouped_matmul.ExpertLora(
        d_gate @ bg.transpose(0, 2, 1) + d_up @ bu.transpose(0, 2, 1), a.transpose(0, 2, 1) @ d_gate,
        a.transpose(0, 2, 1) @ d_up, d_down @ bd.transpose(0, 2, 1), ad.transpose(0, 2, 1) @ d_down)

    def f(rows, lora):
        return grouped_matmul.expert_ffn(rows, *weights, jnp.asarray(OP_GROUPS), backend=backend, scales=scales,
                                         lora=lora)

    got, vjp = jax.vjp(jax.jit(f), jnp.asarray(rows), grouped_matmul.ExpertLora(*map(jnp.asarray, lora)))
    got_rows, got_lora = vjp(jnp.asarray(d_out))
    assert rel_max(got, out) <= 1e-5
    assert rel_fro(got_rows, d_rows) <= 1e-5
    for name, g, w in zip(grouped_matmul.ExpertLora._fields, got_lora, want, strict=True):
        assert rel_fro(g, w) <= 1e-5, (name, rel_fro(g, w))


def test_expert_dropout_draws_from_the_key_and_the_fused_loop_applies_the_same_masks():
    """Dropout on the expert adapters' inputs: it changes the output, the same for the same key, and rate 0 is no
    dropout. "loop" runs the adapters inside the fused expert loop: with the same key (the same masks) its values
    and gradients equal three-gmm "dense"'s."""
    rows, weights, _, lora, d_out = op_inputs(int8=False, seed=1)
    lora = grouped_matmul.ExpertLora(*map(jnp.asarray, lora))

    @functools.partial(jax.jit, static_argnums=0)
    def run(backend: str, rows, lora, dropout):
        def f(rows, lora):
            return grouped_matmul.expert_ffn(rows, *weights, jnp.asarray(OP_GROUPS), backend=backend, lora=lora,
                                             dropout=dropout)

        out, vjp = jax.vjp(f, rows, lora)
        return out, vjp(jnp.asarray(d_out))

    def dropout(seed: int, rate: float) -> grouped_matmul.Dropout:
        return grouped_matmul.Dropout(jax.random.key(seed), jnp.float32(rate))

    plain = run("dense", rows, lora, None)[0]
    (one, (d_rows, d_lora)), two = run("dense", rows, lora, dropout(1, 0.3)), run("dense", rows, lora, dropout(2, 0.3))
    assert rel_max(one, plain) > 1e-2 and rel_max(two[0], one) > 1e-2
    assert np.array_equal(one, run("dense", rows, lora, dropout(1, 0.3))[0])
    np.testing.assert_allclose(run("dense", rows, lora, dropout(1, 0.0))[0], plain, rtol=0, atol=1e-6)
    assert not np.asarray(one)[sum(OP_GROUPS):].any()  # rows past the last group stay zero
    fused, (fused_rows, fused_lora) = run("loop", rows, lora, dropout(1, 0.3))
    assert rel_max(fused, one) <= 1e-5 and rel_fro(fused_rows, d_rows) <= 1e-5
    for name, g, w in zip(grouped_matmul.ExpertLora._fields, fused_lora, d_lora, strict=True):
        assert rel_fro(g, w) <= 1e-5, name


# ------------------------------------------------------------------------------------------ TPU, ahead of time
def test_expert_adapters_compile_for_tpu_with_the_pallas_kernels():
    """The routed experts with adapters (rank 8, padded to 16 for the kernels) and their gradients through the
    "pallas" backend, compiled by the real TPU compiler (libtpu) for a v5p:2x2x2 slice, tokens split over the chips:
    Mosaic takes the rank-wide blocks (forward, d_lhs and tgmm kernels)."""
    require_libtpu()
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-16")  # quiets libtpu's start-up probing
    from jax.experimental import topologies

    from dots_jax.model.moe import moe_experts

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
    mesh = jax.sharding.Mesh(np.asarray(devices), ("x",))
    e, h, i, r, k, tokens = 8, 256, 128, 8, 2, 64 * len(devices)

    def shard(x, idx, w, gate, up, down, lora):
        def loss(x, lora):
            out = moe_experts(x, w, idx, gate, up, down, backend="pallas", lora=lora)
            return (out.astype(jnp.float32) ** 2).sum()

        d_x, d_lora = jax.grad(loss, argnums=(0, 1))(x, lora)
        return d_x, jax.tree.map(lambda g: jax.lax.psum(g, "x"), d_lora)

    def spec(shape, dtype, split: bool = False):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, P("x" if split else None)))

    lora = grouped_matmul.ExpertLora(*(spec(s, jnp.float32) for s in [(e, h, r), (e, r, i), (e, r, i), (e, i, r),
                                                                        (e, r, h)]))
    args = (spec((tokens, h), jnp.bfloat16, True), spec((tokens, k), jnp.int32, True),
            spec((tokens, k), jnp.float32, True), spec((e, h, i), jnp.bfloat16), spec((e, h, i), jnp.bfloat16),
            spec((e, i, h), jnp.bfloat16), lora)
    fn = jax.shard_map(shard, mesh=mesh, in_specs=(P("x"), P("x"), P("x"), P(), P(), P(), P()),
                       out_specs=(P("x"), P()), check_vma=False)
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert "tpu_custom_call" in text and all(name in text for name in ("dots_gmm", "dots_tgmm"))
