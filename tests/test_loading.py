"""Checkpoint loading: both expert layouts and sharded files load to the reference's logits; every malformed
checkpoint fails with one error that names the tensor, file or config field."""

from __future__ import annotations

import json
import re
import shutil
import socket
import struct
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from conftest import hf_config, hf_model, random_ids, save
from flax import nnx

import dots_jax
from dots_jax import CheckpointError, ConfigError
from dots_jax.weights.hf import resolve
from dots_jax.weights.safetensors_io import SafetensorsError, SafetensorsFile, save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
E, I_MOE, H = 8, 32, 64  # the tiny config of conftest: experts, expert width, hidden
PER_EXPERT = "model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"
FUSED_GATE_UP = "model.layers.{layer}.mlp.experts.gate_up_proj"
FUSED_DOWN = "model.layers.{layer}.mlp.experts.down_proj"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One reference model saved three ways: per-expert names, fused 5.x names, and in many small shards."""
    root = tmp_path_factory.mktemp("ckpt")
    ref = hf_model(hf_config(), seed=3, bias_std=0.05)
    paths = {"per_expert": save(ref, root / "per_expert"), "fused": save(ref, root / "fused", fused=True),
             "sharded": save(ref, root / "sharded", max_shard_size="20KB")}
    return ref, paths


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a single-file checkpoint, copied out of the memory map."""
    return {k: np.array(v) for k, v in SafetensorsFile(directory / SINGLE).items()}


def _copy(ckpts, tmp_path: Path, layout: str = "per_expert") -> Path:
    return Path(shutil.copytree(ckpts[1][layout], tmp_path / layout))


def _rewrite(directory: Path, edit) -> None:
    tensors = _tensors(directory)
    edit(tensors)
    save_file(tensors, directory / SINGLE, metadata={"format": "pt"})


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


_DROP = object()


def _load(path):
    return dots_jax.from_pretrained(path, dtype=jnp.float32, progress=False)


def _named_tensor(message: str) -> str:
    """The one tensor name an error message quotes first."""
    m = re.search(r"tensor '([^']+)'", message)
    assert m, f"the error names no tensor: {message}"
    return m.group(1)


# ------------------------------------------------------------------------------------------- good inputs
def test_checkpoint_layouts_on_disk(ckpts):
    """The fixtures really are what the other tests claim: fused 5.x names, per-expert names, many shards."""
    _, paths = ckpts
    fused = SafetensorsFile(paths["fused"] / SINGLE)
    for layer in (1, 2):
        assert fused.shape(FUSED_GATE_UP.format(layer=layer)) == (E, 2 * I_MOE, H)
        assert fused.shape(FUSED_DOWN.format(layer=layer)) == (E, H, I_MOE)
    assert not any(re.search(r"experts\.\d+\.", k) for k in fused)

    per = SafetensorsFile(paths["per_expert"] / SINGLE)
    assert per.shape(PER_EXPERT.format(layer=2, expert=E - 1, proj="gate")) == (I_MOE, H)
    assert per.shape(PER_EXPERT.format(layer=2, expert=E - 1, proj="down")) == (H, I_MOE)
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in per)

    index = json.loads((paths["sharded"] / INDEX).read_text())["weight_map"]
    shards = sorted(paths["sharded"].glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index.values()) == {p.name for p in shards}
    assert set(index) == set(per)


def test_layouts_load_to_identical_reference_logits(ckpts):
    ref, paths = ckpts
    ids = random_ids(ref.config.vocab_size, 2, 24, seed=5)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids).long()).logits.double().numpy()
    forward = nnx.jit(lambda model, x: model(x))  # one compile serves all three (same graph)
    logits = {name: np.asarray(forward(_load(path), jnp.asarray(ids))) for name, path in paths.items()}
    np.testing.assert_array_equal(logits["fused"], logits["per_expert"])
    np.testing.assert_array_equal(logits["sharded"], logits["per_expert"])
    got = logits["per_expert"].astype(np.float64)
    assert float(np.abs(got - expected).max() / np.abs(expected).max()) <= 1e-4


def test_loaded_weights_are_the_stored_ones(ckpts):
    """Spot checks of the layout conversion against the stored arrays (gate rows first in the fused file)."""
    _, paths = ckpts
    model = _load(paths["fused"])
    per = SafetensorsFile(paths["per_expert"] / SINGLE)
    moe = model.moe_layers.mlp  # layer 1 is moe_layers[0], layer 2 moe_layers[1]
    for proj in ("gate", "up", "down"):
        stored = np.asarray(per[PER_EXPERT.format(layer=2, expert=5, proj=proj)])
        np.testing.assert_array_equal(np.asarray(getattr(moe, f"{proj}_proj")[...])[1, 5], stored.T)
    np.testing.assert_array_equal(np.asarray(moe.correction_bias[...])[0],
                                  per["model.layers.1.mlp.gate.e_score_correction_bias"])


# -------------------------------------------------------------------------------------------- bad inputs
def test_missing_tensor(ckpts, tmp_path):
    d = _copy(ckpts, tmp_path)
    name = PER_EXPERT.format(layer=2, expert=5, proj="up")
    _rewrite(d, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as info:
        _load(d)
    assert name in str(info.value) and "missing" in str(info.value)
    assert not re.search(r"and \d+ more", str(info.value)), "only one tensor is missing"


@pytest.mark.parametrize("name", ["model.norm.weight", "lm_head.weight",
                                  "model.layers.0.mlp.down_proj.weight",
                                  "model.layers.1.self_attn.k_norm.weight",
                                  "model.layers.2.mlp.gate.e_score_correction_bias"])
def test_missing_non_expert_tensor(ckpts, tmp_path, name):
    d = _copy(ckpts, tmp_path)
    _rewrite(d, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as info:
        _load(d)
    assert name in str(info.value) and not re.search(r"and \d+ more", str(info.value))


def test_missing_fused_tensor(ckpts, tmp_path):
    d = _copy(ckpts, tmp_path, "fused")
    _rewrite(d, lambda t: t.pop(FUSED_DOWN.format(layer=2)))
    with pytest.raises(CheckpointError) as info:
        _load(d)
    assert "model.layers.2.mlp.experts." in str(info.value) and "down_proj" in str(info.value)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.extra_proj.weight",
                                  "model.layers.1.self_attn.rotary_emb.inv_freq",
                                  "model.layers.1.mlp.experts.3.gate_proj.bias", "lm_head.bias"])
def test_unknown_extra_tensor(ckpts, tmp_path, name):
    d = _copy(ckpts, tmp_path)
    _rewrite(d, lambda t: t.update({name: np.zeros((4,), np.float32)}))
    with pytest.raises(CheckpointError) as info:
        _load(d)
    assert _named_tensor(str(info.value)) == name


@pytest.mark.parametrize("name, shape", [
    ("model.layers.1.self_attn.k_proj.weight", (H - 1, H)),
    ("model.layers.2.mlp.shared_experts.down_proj.weight", (I_MOE, H)),  # transposed
    ("model.layers.1.mlp.experts.6.down_proj.weight", (I_MOE, H)),  # transposed
    ("model.layers.0.input_layernorm.weight", (H, 1)),
    ("model.embed_tokens.weight", (161, H)),
])
def test_wrong_shape(ckpts, tmp_path, name, shape):
    d = _copy(ckpts, tmp_path)
    _rewrite(d, lambda t: t.update({name: np.zeros(shape, np.float32)}))
    with pytest.raises(CheckpointError) as info:
        _load(d)
    assert _named_tensor(str(info.value)) == name and str(shape) in str(info.value)


def test_wrong_shape_fused(ckpts, tmp_path):
    d = _copy(ckpts, tmp_path, "fused")
    name = FUSED_GATE_UP.format(layer=1)
    _rewrite(d, lambda t: t.update({name: np.zeros((E, I_MOE, H), np.float32)}))  # gate only, no up
    with pytest.raises(CheckpointError) as info:
        _load(d)
    assert _named_tensor(str(info.value)) == name


@pytest.mark.parametrize("changes, field", [
    (dict(hidden_size=128), "hidden_size"),
    (dict(vocab_size=161), "vocab_size"),
    (dict(moe_intermediate_size=16), "moe_intermediate_size"),
    (dict(head_dim=8), "head_dim"),
    (dict(n_routed_experts=4), "n_routed_experts"),
    (dict(n_routed_experts=16), "n_routed_experts"),
    (dict(first_k_dense_replace=2), "first_k_dense_replace"),  # layer 1's MoE tensors on a dense layer
    (dict(first_k_dense_replace=0), "first_k_dense_replace"),  # layer 0's dense tensors on a MoE layer
    (dict(num_hidden_layers=2, layer_types=_DROP), "num_hidden_layers"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(attention_bias=True), "attention_bias"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_config_contradicting_tensors(ckpts, tmp_path, changes, field):
    d = _copy(ckpts, tmp_path)
    _edit_config(d, **changes)
    names = set(SafetensorsFile(d / SINGLE))
    with pytest.raises(CheckpointError) as info:
        _load(d)
    message = str(info.value)
    if field == "attention_bias":  # no bias tensor is stored, so the error names a missing one
        assert re.search(r"self_attn\.[qkvo]_proj\.bias", message) and "missing" in message
    else:
        assert field in message and _named_tensor(message) in names


def test_config_with_more_layers_than_tensors(ckpts, tmp_path):
    d = _copy(ckpts, tmp_path)
    _edit_config(d, num_hidden_layers=4, layer_types=_DROP)
    with pytest.raises(CheckpointError, match=re.escape("model.layers.3.")):
        _load(d)


def test_config_contradicting_itself(ckpts, tmp_path):
    # num_hidden_layers edited but the saved layer_types left at 3 entries: a config error, before any tensor.
    d = _copy(ckpts, tmp_path)
    _edit_config(d, num_hidden_layers=2)
    with pytest.raises(ConfigError, match="layer_types"):
        _load(d)


def test_mixed_expert_layouts(ckpts, tmp_path):
    d = _copy(ckpts, tmp_path)
    fused = SafetensorsFile(ckpts[1]["fused"] / SINGLE)
    name = FUSED_DOWN.format(layer=1)
    _rewrite(d, lambda t: t.update({name: np.array(fused[name])}))
    with pytest.raises(CheckpointError) as info:
        _load(d)
    message = str(info.value)
    assert name in message and re.search(r"experts\.\d+\.down_proj\.weight", message)


def test_missing_shard(ckpts, tmp_path):
    d = _copy(ckpts, tmp_path, "sharded")
    shard = sorted(d.glob("model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        _load(d)


def test_index_points_at_wrong_shard(ckpts, tmp_path):
    d = _copy(ckpts, tmp_path, "sharded")
    index = json.loads((d / INDEX).read_text())
    name = "model.layers.2.self_attn.o_proj.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (d / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as info:
        _load(d)
    assert _named_tensor(str(info.value)) == name and other in str(info.value)


def test_corrupt_index(ckpts, tmp_path):
    d = _copy(ckpts, tmp_path, "sharded")
    (d / INDEX).write_text('{"metadata": {}}')  # no weight_map
    with pytest.raises(CheckpointError, match=re.escape(INDEX)):
        _load(d)


@pytest.mark.parametrize("layout", ["per_expert", "sharded"])
def test_truncated_file(ckpts, tmp_path, layout):
    d = _copy(ckpts, tmp_path, layout)
    victim = d / SINGLE if layout == "per_expert" else sorted(d.glob("model-*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError) as info:
        _load(d)
    assert victim.name in str(info.value) and "truncated" in str(info.value)


@pytest.mark.parametrize("damage",
                         ["garbage_json", "huge_length", "too_short", "not_an_object", "bad_offsets"])
def test_corrupt_header(ckpts, tmp_path, damage):
    d = _copy(ckpts, tmp_path)
    victim = d / SINGLE
    data = bytearray(victim.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    if damage == "garbage_json":
        data[8:24] = b"\xff{garbage!!\x00\x01\x02\x03\x04"
    elif damage == "huge_length":
        data[:8] = struct.pack("<Q", 1 << 40)
    elif damage == "too_short":
        data = data[:5]
    elif damage == "not_an_object":
        data = bytearray(struct.pack("<Q", 8) + b"[1,2,3] " + data[8 + n:])
    else:  # a tensor whose offsets do not match its shape
        header = json.loads(data[8:8 + n])
        name = "model.layers.1.self_attn.v_proj.weight"
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin, end - 4]
        blob = json.dumps(header).encode()
        data = bytearray(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
    victim.write_bytes(bytes(data))
    with pytest.raises(SafetensorsError) as info:
        _load(d)
    assert SINGLE in str(info.value)
    if damage == "bad_offsets":
        assert "model.layers.1.self_attn.v_proj.weight" in str(info.value)


def test_directory_without_safetensors(ckpts, tmp_path):
    d = _copy(ckpts, tmp_path)
    (d / SINGLE).unlink()
    with pytest.raises(CheckpointError) as info:
        _load(d)
    assert SINGLE in str(info.value) and INDEX in str(info.value)


def test_directory_without_config(ckpts, tmp_path):
    d = _copy(ckpts, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        _load(d)


@pytest.mark.parametrize("path", ["/nonexistent/dots/checkpoint", "a/b/c", "./no_such_dir", "no_such_name",
                                  "file"])
def test_path_neither_directory_nor_repo_id(tmp_path, path):
    if path == "file":
        path = tmp_path / "config.json"
        path.write_text("{}")
    with pytest.raises(CheckpointError) as info:
        _load(path)
    assert str(path).lstrip("./") in str(info.value)


# ---------------------------------------------------------------------------------------------- resolve
def test_resolve_local_directory_unchanged(tmp_path):
    assert resolve(tmp_path) == tmp_path
    assert resolve(str(tmp_path)) == tmp_path


def test_resolve_repo_id_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE when imported (transformers imported it already): set both.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    attempts = []

    def no_network(self, *args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(CheckpointError) as info:  # one line naming the repo and why, not huggingface_hub's text
        resolve("dots-jax-tests/no-such-model")
    message = str(info.value)
    assert message.startswith("dots-jax-tests/no-such-model: ") and "\n" not in message, message
    assert "HF_HUB_OFFLINE" in message and "not in the Hugging Face cache" in message, message
    assert not attempts



def test_resolve_repo_id_without_network(monkeypatch, tmp_path):
    """Online mode but no network (every connection refused): the same one line, saying the Hub is unreachable."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(self, *args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(CheckpointError) as info:
        resolve("dots-jax-tests/no-such-model")
    message = str(info.value)
    assert message.startswith("dots-jax-tests/no-such-model: ") and "\n" not in message, message
    assert "cannot be reached" in message and "not in the Hugging Face cache" in message, message

# ------------------------------------------------------------------------------------------ safetensors
def _round_trip_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "bf16": rng.standard_normal((4, 7)).astype(ml_dtypes.bfloat16),
        "i32": rng.integers(-(2**31), 2**31 - 1, size=(6,), dtype=np.int32),
        "empty": np.zeros((0, 4), np.float32),
        "scalar_like": np.array([1.5], np.float64),
        "f16": rng.standard_normal((2, 2, 2)).astype(np.float16),
    }


def test_safetensors_round_trip(tmp_path):
    tensors = _round_trip_cases()
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    back = SafetensorsFile(tmp_path / "x.safetensors")
    assert set(back) == set(tensors) and back.metadata == {"format": "pt"}
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        assert back[name].tobytes() == value.tobytes(), name
    assert not list(tmp_path.glob("*.tmp"))


def test_safetensors_reads_reference_writer(tmp_path):
    # The safetensors package (the format's reference implementation) writes; we read.
    tensors = {k: v for k, v in _round_trip_cases().items() if k != "bf16"}
    safetensors.numpy.save_file(tensors, tmp_path / "ref.safetensors", metadata={"k": "v"})
    back = SafetensorsFile(tmp_path / "ref.safetensors")
    assert set(back) == set(tensors) and back.metadata == {"k": "v"}
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        assert back[name].tobytes() == value.tobytes(), name

    # bf16 through torch (numpy has no bf16): compare the values as torch widens them to f32.
    t = torch.randn(5, 3).to(torch.bfloat16)
    safetensors.torch.save_file({"w": t, "b": torch.arange(4, dtype=torch.int64)},
                                tmp_path / "bf16.safetensors")
    back = SafetensorsFile(tmp_path / "bf16.safetensors")
    assert back.dtype("w") == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(back["w"].astype(np.float32), t.float().numpy())
    np.testing.assert_array_equal(back["b"], np.arange(4))


def test_reference_reader_reads_ours(tmp_path):
    tensors = {k: v for k, v in _round_trip_cases().items() if k != "bf16"}
    save_file(tensors, tmp_path / "ours.safetensors")
    back = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and back[name].tobytes() == value.tobytes(), name
    # bf16 through torch's reader.
    w = _round_trip_cases()["bf16"]
    save_file({"w": w}, tmp_path / "bf16.safetensors")
    t = safetensors.torch.load_file(tmp_path / "bf16.safetensors")["w"]
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), w.astype(np.float32))


def test_safetensors_missing_file(tmp_path):
    with pytest.raises(SafetensorsError, match="nothing.safetensors"):
        SafetensorsFile(tmp_path / "nothing.safetensors")
