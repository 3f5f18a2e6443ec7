"""LoRA adapters in PEFT's layout (issue 20, acceptance 2), against the oracle's tiny checkpoint (a dense layer,
shared and routed experts) with adapters of random values on every target:

- the adapter directory holds the targets PEFT applies (attention, routed experts); peft 0.21.2's
  PeftModel.from_pretrained(transformers' model, OUR adapter/) loads every tensor we write (its own state dict of
  the adapter equals the file) and gives the logits of our model with those adapters, as from_pretrained(base,
  lora=adapter/) does; PEFT still turns dense/shared MLP targets into routed-expert ones (why we leave them out);
- the merged export (export_hf(merge_lora(model))) loaded by transformers gives the whole adapted model's logits;
- an adapter written by PEFT itself (q_proj/v_proj only, the common default) loads here with the other targets' adapters
  zero; bad adapters are one clear error.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import hf_config, hf_model, random_ids, save, torch_one_thread
from flax import nnx

from dots_jax import from_pretrained
from dots_jax.config import Dots1Config
from dots_jax.model.lora import LoraConfig, attach_lora, merge_lora
from dots_jax.weights.hf import export_hf
from dots_jax.weights.peft import WEIGHTS_FILE, AdapterError, load_adapter, save_adapter
from dots_jax.weights.safetensors_io import SafetensorsFile, save_file

BATCH, SEQ = 2, 12
RANK, ALPHA = 2, 5.0


def random_adapters(model: nnx.Module, seed: int, std: float = 0.1) -> nnx.Module:
    """`model` with every adapter random (B too, which starts at zero): each one changes the logits."""
    rng = np.random.default_rng(seed)
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    flat = nnx.to_flat_state(adapters)
    for _, var in flat:
        var.set_value(jnp.asarray(rng.normal(0.0, std, var.get_value().shape), jnp.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), base)


def without(model: nnx.Module, targets: tuple[str, ...]) -> nnx.Module:
    """`model` with the adapters of the dense MLP ("mlp") and shared experts ("shared") zero, as `targets` says."""
    prefixes = {"mlp": ("dense_layers", "mlp"), "shared": ("moe_layers", "mlp", "shared_experts")}
    graphdef, adapters, base = nnx.split(nnx.clone(model), nnx.LoRAParam, ...)  # split shares the Variables
    flat = nnx.to_flat_state(adapters)
    for path, var in flat:
        if any(tuple(path[:len(prefixes[t])]) == prefixes[t] and len(path) == len(prefixes[t]) + 1
               for t in targets):
            var.set_value(jnp.zeros_like(var.get_value()))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), base)


def logits_of(model: nnx.Module, ids: np.ndarray) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)), np.float64)


def torch_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch_one_thread():
        return model(torch.from_numpy(ids).long()).logits.double().numpy()


def assert_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rel, f"max error {err:.2e} of the largest logit"


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nnx.Module, Path, np.ndarray]:
    """(base checkpoint, our adapted model, its adapter directory, token ids)."""
    root = tmp_path_factory.mktemp("peft")
    base = save(hf_model(hf_config(), bias_std=0.05), root / "base")
    model = attach_lora(from_pretrained(base, progress=False), LoraConfig(rank=RANK, alpha=ALPHA), seed=1)
    model = random_adapters(model, seed=2)
    adapter = save_adapter(model, root / "adapter", base_model_name_or_path=str(base))
    ids = random_ids(hf_config().vocab_size, BATCH, SEQ, seed=4)
    return base, model, adapter, ids


def test_adapter_files(adapted):
    base, model, adapter, _ = adapted
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", WEIGHTS_FILE]
    assert sorted(p.name for p in adapter.parent.iterdir()) == ["adapter", "base"]  # no temporary left
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and config["base_model_name_or_path"] == str(base)
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert config["target_modules"] == [f"self_attn.{n}_proj" for n in "qkvo"]
    tensors = SafetensorsFile(adapter / WEIGHTS_FILE)
    assert not [k for k in tensors if "_proj.lora" in k and "self_attn" not in k]  # no dense/shared MLP
    assert len(tensors) == 2 * (4 * cfg_layers() + 2 * (cfg_layers() - 1))
    # transformers' shapes: q_proj [heads*head_dim, H] gets A [r, H], B [heads*head_dim, r]; the routed experts'
    # fused gate_up_proj [E, 2I, H] A [E*r, H], B [2I, r*E].
    cfg = hf_config()
    e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert tensors.shape("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") == (RANK, h)
    assert tensors.shape("base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight") == (RANK, h)
    assert tensors.shape("base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight") == (2 * i, RANK * e)
    assert tensors.shape("base_model.model.model.layers.2.mlp.experts.lora_A.weight") == (RANK * e, i)
    # Read back: the same arrays, bit for bit.
    lora, arrays = load_adapter(adapter, model.cfg)
    assert (lora.rank, lora.alpha, lora.targets) == (RANK, ALPHA, ("attn", "experts"))
    ours = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert arrays.keys() < ours.keys()
    for path, value in arrays.items():
        assert np.array_equal(value, ours[path]), path


def cfg_layers() -> int:
    return hf_config().num_hidden_layers


def test_peft_applies_our_adapter_to_transformers(adapted):
    """Acceptance 2: PEFT's own reading of the file gives our adapted model's logits, every tensor applied."""
    base, model, adapter, ids = adapted
    ref = transformers.Dots1ForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = peft.PeftModel.from_pretrained(ref, adapter).eval()
    # PEFT warns of adapter keys it expected but did not find, or found but could not place.
    assert not [w for w in caught if "keys" in str(w.message).lower()], [str(w.message) for w in caught]
    applied = peft.get_peft_model_state_dict(tuned)
    written = SafetensorsFile(adapter / WEIGHTS_FILE)
    assert sorted(applied) == sorted(written)
    for key in written:
        assert np.array_equal(applied[key].numpy(), written[key]), key
    want = torch_logits(tuned, ids)
    written_part = without(model, ("mlp", "shared"))
    assert_close(logits_of(written_part, ids), want)
    assert_close(logits_of(from_pretrained(base, lora=adapter, progress=False), ids), want)
    with tuned.disable_adapter():  # the adapters matter: without them the logits are another model's
        assert np.abs(torch_logits(tuned, ids) - want).max() > 1e-2 * np.abs(want).max()


def test_merged_export_gives_the_adapted_logits(adapted, tmp_path: Path):
    _, model, _, ids = adapted
    ours = logits_of(model, ids)
    merged = export_hf(merge_lora(model), tmp_path / "hf")
    ref = transformers.Dots1ForCausalLM.from_pretrained(merged, dtype=torch.float32, attn_implementation="eager")
    assert_close(ours, torch_logits(ref.eval(), ids))
    # Every target matters: without the dense and shared MLPs' adapters the logits move.
    assert np.abs(logits_of(without(model, ("mlp", "shared")), ids) - ours).max() > 1e-3 * np.abs(ours).max()


def test_from_pretrained_lora_quantizes_the_merged_model(adapted, tmp_path: Path):
    """lora= with quantize="int8": the int8 model the loader makes of the merged export (test_int8 checks it
    against float64), bit for bit."""
    base, model, adapter, _ = adapted
    merged = export_hf(merge_lora(without(model, ("mlp", "shared"))), tmp_path / "hf")
    got = from_pretrained(base, lora=adapter, quantize="int8", progress=False)
    want = from_pretrained(merged, quantize="int8", progress=False)
    got, want = nnx.to_flat_state(nnx.state(got)), nnx.to_flat_state(nnx.state(want))
    assert [p for p, _ in got] == [p for p, _ in want]
    assert any(v.get_value().dtype == jnp.int8 for _, v in got)
    for (path, a), (_, b) in zip(got, want, strict=True):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), path


def test_peft_cannot_adapt_the_dense_and_shared_mlps(adapted):
    """Why adapter/ leaves them out: PEFT (0.21.2) maps a dots1 target named *gate_proj/up_proj/down_proj onto the
    routed experts' fused parameters. Should PEFT change this, this test fails: write those targets then."""
    base = adapted[0]
    ref = transformers.Dots1ForCausalLM.from_pretrained(base, dtype=torch.float32)
    tuned = peft.get_peft_model(ref, peft.LoraConfig(r=2, target_modules=["mlp.gate_proj", "mlp.up_proj",
                                                                          "shared_experts.down_proj"]))
    names = set(tuned.base_model.targeted_module_names) | set(tuned.base_model.targeted_parameter_names)
    assert not any(n.endswith(("mlp.gate_proj", "shared_experts.down_proj")) for n in names), names
    assert any(n.endswith("experts.gate_up_proj") for n in names), names


def test_adapters_written_by_peft_load(adapted, tmp_path: Path):
    """An adapter PEFT trains and saves itself gives, loaded here, PEFT's logits: the usual q_proj/v_proj (k and o
    get zero adapters) with "gate_proj, up_proj, down_proj", which PEFT puts on the routed experts with
    rank_pattern/alpha_pattern (gate_up_proj rank 2r): ranks padded to the largest, scalings folded into B."""
    base, _, _, ids = adapted
    ref = transformers.Dots1ForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(0)
    tuned = peft.get_peft_model(ref, peft.LoraConfig(r=3, lora_alpha=6, init_lora_weights=False, target_modules=[
        "q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]))
    tuned.save_pretrained(tmp_path / "theirs")
    config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {r".*\.gate_up_proj": 6}  # PEFT's doing: the case this test is about
    lora, _ = load_adapter(tmp_path / "theirs", Dots1Config.from_hf(base))
    assert (lora.rank, lora.scaling, lora.targets) == (6, 1.0, ("attn", "experts"))
    ours = from_pretrained(base, lora=tmp_path / "theirs", progress=False)
    assert_close(logits_of(ours, ids), torch_logits(tuned.eval(), ids))


def test_bad_adapters_are_clear_errors(adapted, tmp_path: Path):
    base, model, adapter, _ = adapted
    with pytest.raises(AdapterError, match="no such adapter directory"):
        load_adapter(tmp_path / "missing", model.cfg)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(tmp_path / "dora", model.cfg)
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.lm_head.lora_A.weight": np.zeros((RANK, 64), np.float32)},
              tmp_path / "head" / WEIGHTS_FILE)
    with pytest.raises(AdapterError, match="lm_head"):
        load_adapter(tmp_path / "head", model.cfg)
    written = SafetensorsFile(adapter / WEIGHTS_FILE)
    (tmp_path / "rank").mkdir()
    (tmp_path / "rank" / "adapter_config.json").write_text(json.dumps({**config, "r": RANK + 1}))
    save_file({k: np.asarray(written[k]) for k in written}, tmp_path / "rank" / WEIGHTS_FILE)
    with pytest.raises(AdapterError, match="has shape"):
        load_adapter(tmp_path / "rank", model.cfg)
