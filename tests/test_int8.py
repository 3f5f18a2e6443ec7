"""int8 weights (issue 19), model and weights side: the int8 model against transformers run on the dequantised
weights (quantised here in float64), its greedy choices against the f32 model's, the demo model's held-out loss,
parameter bytes counted by hand from the config, and the converter's int8 format (round trip, jax_to_hf refusal,
restore onto 8 devices)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_config, hf_model, random_ids, run_cli, save, torch_one_thread
from flax import nnx
from test_convert import _cli_env
from test_parity import BATCH, CONFIGS, SEQ

import dots_jax
from convert import hf_to_jax, jax_to_hf
from dots_jax.config import CONFIGS_DIR, Dots1Config
from dots_jax.demo import DEMO_MODEL_DIR, held_out_windows
from dots_jax.model.modeling import abstract_model
from dots_jax.weights.hf import QuantizedExportError, export_hf

REPO = Path(__file__).resolve().parents[1]
# torch keeps every linear weight [..., out, in]: the oracle quantises over the last axis, whatever the layer.
TORCH_LINEAR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
                          r"|\.experts\.(gate_up_proj|down_proj)$")
# Our layout's contracted axes, as the spec states them (dots_jax/model/layers.py has its own table).
OUR_CONTRACTED = {"q_proj": (-3,), "k_proj": (-3,), "v_proj": (-3,), "o_proj": (-3, -2), "gate_proj": (-2,),
                  "up_proj": (-2,), "down_proj": (-2,), "lm_head": (-2,)}
# Half the parity configs run with the LM head quantised too, so both heads meet the oracle without more compiles.
HEAD_QUANTIZED = {"groups_bias", "sliding", "released_like"}


def quantize64(w: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: symmetric int8 over `axes` in float64 (scale = max|w| / 127, 1 for an all-zero channel;
    round half to even, clip to +-127). Returns (q as float64, scale with keepdims)."""
    w = np.asarray(w, np.float64)
    amax = np.abs(w).max(axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.round(w / scale), -127, 127), scale


def untie(model: torch.nn.Module) -> torch.nn.Module:
    """Move every linear weight lying within 1e-3 quanta of a rounding tie (|w| / scale = k + 1/2) a quarter
    quantum towards zero, in place. A tie is the one place where float32 and float64 quantisation may round apart
    (in one parity checkpoint w / scale = -64.5000023 in float64, so -65, and XLA's f32 quantisation gave -64:
    2e-4 on the logits); away from ties the oracle's int8 weights are unambiguous. No channel's max moves (it
    sits at 127)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if TORCH_LINEAR.search(name) or name == "lm_head.weight":
                w = p.double().numpy()
                _, scale = quantize64(w, (-1,))
                r = np.abs(w) / scale
                tie = np.abs(r - np.floor(r) - 0.5) < 1e-3
                p.copy_(torch.from_numpy(np.where(tie, w - np.sign(w) * 0.25 * scale, w)))
    return model


def parity_checkpoint(name: str, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """test_parity's random checkpoint for config `name` (same seed), untied, saved."""
    overrides = dict(CONFIGS[name])
    bias_std = overrides.pop("bias_std", 0.0)
    ref = untie(hf_model(hf_config(**overrides), seed=len(name), bias_std=bias_std))
    return ref, save(ref, tmp_path / name)


def dequantised_reference(ref: torch.nn.Module, head: bool) -> torch.nn.Module:
    """transformers' model in float64 with every linear weight (and the LM head if `head`) replaced by its
    dequantised int8 approximation."""
    model = copy.deepcopy(ref).double()
    model.config._experts_implementation = "eager"  # torch's grouped matmul has no float64
    with torch.no_grad():
        for name, p in model.named_parameters():
            if TORCH_LINEAR.search(name) or (head and name == "lm_head.weight"):
                q, scale = quantize64(p.numpy(), (-1,))
                p.copy_(torch.from_numpy(q * scale))
    return model


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------------- 1, 2. against the oracle, per config
@pytest.mark.parametrize("name", list(CONFIGS))
def test_int8_model_is_the_dequantised_reference_and_keeps_the_greedy_choice(name, tmp_path):
    head = name in HEAD_QUANTIZED
    ref, path = parity_checkpoint(name, tmp_path)
    ids = random_ids(ref.config.vocab_size, BATCH, SEQ, seed=1)
    ours = dots_jax.from_pretrained(path, dtype=jnp.float32, quantize="int8", quantize_head=head, progress=False)
    assert ours.moe_layers.mlp.gate_proj[...].dtype == jnp.int8
    assert (ours.lm_head is None) or (ours.lm_head[...].dtype == (jnp.int8 if head else jnp.float32))
    got = np.asarray(ours(jnp.asarray(ids)))
    with torch_one_thread():
        expected = dequantised_reference(ref, head)(torch.from_numpy(ids).long()).logits.numpy()
        f32 = ref(torch.from_numpy(ids).long()).logits.double().numpy()
    error = _rel_err(got, expected)
    assert error <= 1e-5, f"int8 model vs transformers on the dequantised weights: relative error {error:.2e}"
    assert _rel_err(expected, f32) > 1e-3, "quantisation should visibly move the logits, or this tests nothing"
    agree = float((got.argmax(-1) == f32.argmax(-1)).mean())
    print(f"{name}: head {'int8' if head else 'f32'}: logits vs dequantised reference {error:.1e}, greedy choice "
          f"= f32 model's at {agree:.1%} of {got.shape[0] * got.shape[1]} positions")
    # Measured over 512 positions per config: 92.2% (two_dense_unnormed) to 96.5% (gqa), mean 94.8%, the same
    # with transformers on the dequantised weights: int8's own effect on these random models, whose top-2 logits
    # are close. The issue asks 95%, which the trained demo model meets (test below); this bound is a floor under
    # what was measured.
    assert agree >= 0.90


# --------------------------------------------------------------------------------- 3. the demo model's quality
def _loss_and_greedy(model: nnx.Module, inputs: np.ndarray, targets: np.ndarray, batch: int = 16
                     ) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of targets after inputs (f32, as dots_jax.demo.evaluate scores it) and the greedy
    choice at every position."""
    @jax.jit
    def step(ids: jax.Array, tgt: jax.Array) -> tuple[jax.Array, jax.Array]:
        logp = jax.nn.log_softmax(model(ids).astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0].sum(axis=-1), logp.argmax(-1)

    total, greedy = 0.0, []
    for i in range(0, len(inputs), batch):
        ids, tgt = inputs[i:i + batch], targets[i:i + batch]
        pad = ((0, batch - len(ids)), (0, 0))  # one compiled shape: pad the last batch, drop the padded rows
        nll, choice = step(np.pad(ids, pad), np.pad(tgt, pad))
        total += float(np.asarray(nll)[:len(ids)].sum())
        greedy.append(np.asarray(choice)[:len(ids)])
    return total / targets.size, np.concatenate(greedy)


HELD_OUT_WINDOWS = 32  # of the 274 (70,144 tokens): the whole set takes ~45 s per model on a busy 2-core machine


def test_demo_held_out_loss_with_int8_weights_within_1_percent():
    """The held-out set dots_jax.demo evaluates on (what training held out), its first HELD_OUT_WINDOWS windows of
    256 tokens; the demo model stores bf16 weights, run with f32 activations as they are, then as int8. (On all
    70,144 tokens: 3.1092 nats with the bf16 weights, 3.1090 int8, 3.1090 with the LM head int8 too.)"""
    inputs, targets, _ = held_out_windows(DEMO_MODEL_DIR)
    inputs, targets = inputs[:HELD_OUT_WINDOWS], targets[:HELD_OUT_WINDOWS]
    losses, greedy = {}, {}
    for label, kwargs in [("bf16 weights", {}), ("int8", {"quantize": "int8"})]:
        model = dots_jax.from_pretrained(DEMO_MODEL_DIR, dtype=jnp.float32, progress=False, **kwargs)
        losses[label], greedy[label] = _loss_and_greedy(model, inputs, targets)
    base = losses["bf16 weights"]
    agree = {k: float((v == greedy["bf16 weights"]).mean()) for k, v in greedy.items()}
    print(f"demo held-out cross-entropy over {targets.size} tokens: "
          + ", ".join(f"{k} {v:.4f} ({(v / base - 1):+.2%}, greedy choice as bf16's at {agree[k]:.2%})"
                      for k, v in losses.items()))
    assert abs(losses["int8"] - base) <= 0.01 * base
    assert agree["int8"] >= 0.95


# ---------------------------------------------------------------------------------------- 4. parameter bytes
def param_bytes(cfg: Dots1Config, int8: bool, head: bool = False) -> int:
    """Every parameter's bytes, counted by hand from the config: weights in bf16, the correction bias in f32;
    with int8, every linear weight (and the LM head if `head`) one byte per element plus an f32 scale per output
    channel."""
    h, v, n, kv, d = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def linear(inputs: int, outputs: int, quantized: bool = int8) -> int:
        return inputs * outputs + 4 * outputs if quantized else 2 * inputs * outputs

    attention = linear(h, n * d) + 2 * linear(h, kv * d) + linear(n * d, h) + 2 * 2 * d  # + q/k norms
    if cfg.attention_bias:
        attention += 2 * (n * d + 2 * kv * d + h)
    layer = attention + 2 * 2 * h  # input and post-attention norms
    dense = 2 * linear(h, cfg.intermediate_size) + linear(cfg.intermediate_size, h)
    e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
    shared = cfg.n_shared_experts * i
    moe = e * (2 * linear(h, i) + linear(i, h)) + 2 * h * e + 4 * e  # experts, router, f32 correction bias
    if shared:
        moe += 2 * linear(h, shared) + linear(shared, h)
    dense_layers = cfg.first_k_dense_replace
    moe_layers = cfg.num_hidden_layers - dense_layers
    total = cfg.num_hidden_layers * layer + dense_layers * dense + moe_layers * moe + 2 * v * h + 2 * h
    if not cfg.tie_word_embeddings:
        total += linear(h, v, int8 and head)
    return total


def _state_bytes(model: nnx.Module) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))


def _item_bytes(directory: Path) -> int:
    """The bytes of a converted checkpoint's parameter items on disk (Orbax's files, metadata included)."""
    return sum(f.stat().st_size for f in (directory / "units").rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny f32 HF checkpoint (untied) and its conversions: "f32" as stored, "bf16" (--dtype bfloat16) and
    "int8" (--dtype bfloat16 --quantize int8: linear weights quantised from the f32 values, the rest bf16)."""
    root = tmp_path_factory.mktemp("int8")
    paths = {"hf": save(untie(hf_model(hf_config(), seed=5, bias_std=0.05)), root / "hf")}
    for name, extra in [("f32", []), ("bf16", ["--dtype", "bfloat16"]),
                        ("int8", ["--dtype", "bfloat16", "--quantize", "int8"])]:
        paths[name] = root / name
        code, _, err = run_cli(hf_to_jax.main, ["--src", str(paths["hf"]), "--dst", str(paths[name]), "--no-progress",
                                                *extra])
        assert code == 0, err
    return paths


def test_parameter_bytes_in_memory_and_on_disk(checkpoints):
    # The released model, from its config alone: the abstract model (no array) against the count by hand.
    released = Dots1Config.from_hf(json.loads((CONFIGS_DIR / "dots.llm1.base.json").read_text()))
    abstract = abstract_model(released, param_dtype=jnp.bfloat16, quantize="int8")
    assert _state_bytes(abstract) == param_bytes(released, int8=True)
    ratios = {"142B": param_bytes(released, True) / param_bytes(released, False),
              "142B + head": param_bytes(released, True, head=True) / param_bytes(released, False)}
    assert ratios["142B"] <= 0.56

    # The tiny checkpoint, converted and restored for real.
    tiny = Dots1Config.from_hf(checkpoints["hf"])
    bf16 = dots_jax.from_pretrained(checkpoints["bf16"], dtype=jnp.bfloat16, progress=False)
    int8 = dots_jax.from_pretrained(checkpoints["int8"], dtype=jnp.bfloat16, progress=False)
    assert _state_bytes(bf16) == param_bytes(tiny, int8=False)
    assert _state_bytes(int8) == param_bytes(tiny, int8=True)
    manifests = {name: json.loads((checkpoints[name] / "manifest.json").read_text()) for name in ("bf16", "int8")}
    payload = {name: sum(int(np.prod(p["shape"], dtype=np.int64)) * np.dtype(jnp.dtype(p["dtype"])).itemsize
                         for unit in m["units"].values() for p in unit["params"].values())
               for name, m in manifests.items()}
    assert payload == {"bf16": param_bytes(tiny, int8=False), "int8": param_bytes(tiny, int8=True)}
    disk = {name: _item_bytes(checkpoints[name]) for name in ("bf16", "int8")}
    demo = Dots1Config.from_hf(DEMO_MODEL_DIR)
    ratios.update({"tiny": _state_bytes(int8) / _state_bytes(bf16), "tiny on disk": disk["int8"] / disk["bf16"],
                   "demo": param_bytes(demo, True) / param_bytes(demo, False),
                   "demo + head": param_bytes(demo, True, head=True) / param_bytes(demo, False)})
    print("int8 / bf16 parameter bytes: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
          + f"; tiny on disk {disk['int8']} / {disk['bf16']} bytes (payload {payload['int8']} / {payload['bf16']})")
    # The tiny model's files are mostly Orbax's per-item metadata: the int8 checkpoint holds more items (the
    # scales) yet is smaller.
    assert disk["int8"] < disk["bf16"]


# ------------------------------------------------------------------------------ 5. the converter's int8 format
def _flat(model: nnx.Module) -> dict[tuple[str, ...], np.ndarray]:
    return {tuple(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_converter_round_trip_restores_the_oracle_int8_weights(checkpoints, tmp_path):
    int8 = checkpoints["int8"]
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert manifest["quantize"] == "int8"
    assert manifest["units"]["layer_001"]["params"]["mlp.gate_proj"]["dtype"] == "int8"
    assert manifest["units"]["layer_001"]["params"]["mlp.gate_proj_scale"]["shape"] == [8, 32]  # [E, I]
    assert manifest["units"]["top"]["params"]["lm_head"]["dtype"] == "bfloat16"  # the head stays float

    restored = _flat(dots_jax.from_pretrained(int8, progress=False))  # int8 as stored, without asking
    floats = _flat(dots_jax.from_pretrained(checkpoints["hf"], progress=False))
    scales = [p for p in restored if p[-1].endswith("_scale")]
    assert len(scales) == 2 * 4 + 3 + 3 + 3  # attention (both stacks), dense MLP, routed and shared experts
    for path, value in floats.items():
        scale_path = (*path[:-1], path[-1] + "_scale")
        if scale_path not in restored:  # stored bf16 (the correction bias f32), restored in the f32 asked for
            stored = value if path[-1] == "correction_bias" else value.astype(jnp.bfloat16).astype(value.dtype)
            np.testing.assert_array_equal(restored[path], stored, err_msg=str(path))
            continue
        q, scale = quantize64(value, OUR_CONTRACTED[path[-1]])
        assert restored[path].dtype == np.int8 and restored[scale_path].dtype == np.float32
        np.testing.assert_array_equal(restored[path], q, err_msg=str(path))
        np.testing.assert_allclose(restored[scale_path], np.squeeze(scale, OUR_CONTRACTED[path[-1]]), rtol=1e-7)

    # The same int8 weights whichever way they were made: from HF directly, or from a float conversion.
    direct = _flat(dots_jax.from_pretrained(checkpoints["hf"], quantize="int8", progress=False))
    on_load = _flat(dots_jax.from_pretrained(checkpoints["f32"], quantize="int8", progress=False))
    for path in scales + [(*p[:-1], p[-1].removesuffix("_scale")) for p in scales]:
        np.testing.assert_array_equal(direct[path], restored[path], err_msg=str(path))
        np.testing.assert_array_equal(on_load[path], restored[path], err_msg=str(path))

    # Back to HF: refused with one line, nothing written.
    code, out, err = run_cli(jax_to_hf.main, ["--src", str(int8), "--dst", str(tmp_path / "back"), "--no-progress"])
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and "int8" in err, err
    assert not (tmp_path / "back").exists()
    with pytest.raises(QuantizedExportError):
        export_hf(dots_jax.from_pretrained(int8, progress=False), tmp_path / "exported")


EIGHT_DEVICES = textwrap.dedent("""
    import functools, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    import dots_jax
    from dots_jax.model.moe import expert_parallel, moe_experts
    from dots_jax.ops.quant import quantize_int8
    from dots_jax.parallel.sharding import make_mesh, param_shardings

    assert jax.device_count() == 8
    mesh = make_mesh("fsdp=2,expert=2,tensor=2")
    sharded = nnx.state(dots_jax.from_pretrained(sys.argv[1], mesh=mesh, progress=False))
    single = dict(nnx.to_flat_state(nnx.state(dots_jax.from_pretrained(sys.argv[1], progress=False))))
    expected = dict(nnx.to_flat_state(param_shardings(sharded, mesh)))
    for path, var in nnx.to_flat_state(sharded):
        assert var.get_value().sharding == expected[path], (path, var.get_value().sharding, expected[path])
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(single[path].get_value()))
    specs = {".".join(map(str, p)): s.spec for p, s in expected.items()}
    assert specs["moe_layers.mlp.gate_proj_scale"] == P(None, "expert", None)  # [L, E, I]
    assert specs["moe_layers.mlp.down_proj_scale"] == P(None, "expert", "fsdp")  # [L, E, H]
    assert specs["moe_layers.self_attn.q_proj_scale"] == P(None, "tensor", None)  # [L, n, d]
    assert specs["moe_layers.self_attn.o_proj_scale"] == P(None, "fsdp")  # [L, H]

    # The routed experts' int8 path under each expert-parallel strategy, against one device.
    rng = np.random.default_rng(1)
    e, h, i, t, k = 8, 16, 8, 128, 3
    x = jnp.asarray(rng.normal(size=(t, h)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
    w = jnp.asarray(rng.random((t, k)), jnp.float32)
    quantized = [quantize_int8(rng.normal(size=s), (1,)) for s in [(e, h, i), (e, h, i), (e, i, h)]]
    (gate, gs), (up, us), (down, ds) = quantized
    want = np.asarray(moe_experts(x, w, idx, gate, up, down, scales=(gs, us, ds)))
    for strategy in ("psum", "all_to_all"):
        ep_mesh = make_mesh("data=2,expert=4")
        run = jax.jit(functools.partial(expert_parallel, mesh=ep_mesh, strategy=strategy))
        with jax.set_mesh(ep_mesh):
            got = np.asarray(run(x, w, idx, gate, up, down, scales=(gs, us, ds)))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=strategy)
    print("OK")
""")


def test_int8_checkpoint_restores_onto_8_devices(checkpoints):
    """Every int8 weight and scale restored straight into the sharding the table gives its logical axes (a scale:
    its weight's without the contracted ones), and the int8 experts under expert parallelism equal one device."""
    env = {**_cli_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(checkpoints["int8"])], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=480)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ the CLIs
def test_sample_and_serve_take_quantize_int8(monkeypatch):
    from test_cli_options import sample

    from dots_jax import sample as sample_cli
    from dots_jax import serve

    model = sample(monkeypatch, DEMO_MODEL_DIR, "--quantize", "int8", run=False)["model"]
    assert model.quantize == "int8" and model.moe_layers.mlp.gate_proj[...].dtype == jnp.int8
    assert model.lm_head[...].dtype == jnp.float32
    assert serve.build_parser().parse_args(["--quantize", "int8"]).quantize == "int8"
    code, out, err = run_cli(sample_cli.main, ["--quantize", "int4"])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--quantize" in err, err
