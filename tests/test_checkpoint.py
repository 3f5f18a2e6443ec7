"""Orbax training checkpoints and the HF export.

- save -> restore gives back every array bit for bit (params, router bias, optimizer state, step) and the metadata;
- Acceptance 3: N steps, checkpoint, restore into a state built from nothing but shapes (as a new process would),
  N more steps == 2N uninterrupted steps, bit for bit, with the data position carried by the checkpoint;
- export_hf writes a checkpoint that transformers (the oracle) loads to the same logits, and that we load back to
  the same weights.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import hf_config, hf_model, random_ids, save, torch_one_thread
from flax import nnx

from dots_jax import from_pretrained
from dots_jax.config import preset
from dots_jax.model.modeling import Dots1ForCausalLM, RouterBias
from dots_jax.training import checkpoint
from dots_jax.training.data import TokenStream
from dots_jax.training.step import TrainConfig, TrainState, init_state, jit_train_step
from dots_jax.weights.hf import export_hf
from dots_jax.weights.safetensors_io import SafetensorsFile

N = 3  # steps before and after the interruption
CFG = preset("tiny")
TC = TrainConfig(learning_rate=1e-2, total_steps=2 * N, warmup_steps=1, decay_steps=2, bias_update_rate=1e-2)
BATCH, SEQ = 2, 16


def numpy_model(seed: int, std: float = 0.02, norm_range: tuple[float, float] = (1.0, 1.0),
                bias_std: float = 0.0) -> Dots1ForCausalLM:
    """CFG's model with weights drawn by numpy: no random-init compiles (seconds each shape on this CPU)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Dots1ForCausalLM(CFG, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if isinstance(var, RouterBias):
            value = rng.normal(0.0, bias_std, shape) if bias_std else np.zeros(shape)
        elif path[-1] == "weight":  # the RMSNorm weights, the only parameters named "weight"
            value = rng.uniform(*norm_range, shape)
        else:
            value = rng.normal(0.0, std, shape)
        var.set_value(jnp.asarray(value, dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def stream() -> TokenStream:
    text = np.random.default_rng(1).integers(0, 256, 4000).astype(np.int32)
    return TokenStream(text, BATCH, SEQ, seed=5)


@pytest.fixture(scope="module")
def initial() -> tuple[nnx.GraphDef, TrainState]:
    return init_state(numpy_model(0), TC)


def fresh_copy(state: TrainState) -> TrainState:
    """jit_train_step donates its state: every run starts from its own copy. Committed to the device, as restored
    arrays are: jit keys its cache on that, and a second compile of the step would cost ~20 s."""
    return jax.device_put(jax.tree.map(jnp.copy, state), jax.devices()[0])


def train(graphdef: nnx.GraphDef, state: TrainState, stream: TokenStream, position: int, steps: int
          ) -> tuple[TrainState, int, list[float]]:
    losses = []
    for _ in range(steps):
        state, metrics = jit_train_step(graphdef, TC, state, stream.batch_at(position))
        position += stream.batch_size
        losses.append(float(metrics["loss"]))
    return state, position, losses


def leaves(state: TrainState) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def assert_bit_identical(a: TrainState, b: TrainState) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for path_leaf, x, y in zip(jax.tree_util.tree_leaves_with_path(a), leaves(a), leaves(b), strict=True):
        name = jax.tree_util.keystr(path_leaf[0])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), f"{name} differs"


def test_save_restore_round_trip(initial, stream, tmp_path: Path):
    graphdef, state0 = initial
    state, position, _ = train(graphdef, fresh_copy(state0), stream, 0, 2)  # a non-trivial optimizer state
    assert np.abs(np.asarray(jax.tree.leaves(state.router_bias)[0])).max() > 0
    metadata = {"step": 2, "data": {"position": position}, "rng": {"seed": 5}, "model_config": CFG.to_hf(),
                "note": ["any", "json", 1.5, None]}
    checkpoint.save(tmp_path, 2, state, metadata)

    assert checkpoint.latest_step(tmp_path) == 2
    assert checkpoint.read_metadata(tmp_path) == metadata
    _, abstract = checkpoint.abstract_train_state(CFG, TC)
    restored, restored_meta = checkpoint.restore(tmp_path, abstract)
    assert restored_meta == metadata
    assert int(restored.step) == 2
    assert_bit_identical(restored, state)


def test_keeps_the_newest_checkpoints(initial, tmp_path: Path):
    _, state0 = initial
    assert checkpoint.latest_step(tmp_path / "none") is None
    for step in range(1, 5):
        checkpoint.save(tmp_path, step, state0, {"step": step}, max_to_keep=2)
    assert checkpoint.all_steps(tmp_path) == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
    _, abstract = checkpoint.abstract_train_state(CFG, TC)
    assert checkpoint.restore(tmp_path, abstract, step=3)[1] == {"step": 3}
    with pytest.raises(FileNotFoundError, match="step 1"):
        checkpoint.restore(tmp_path, abstract, step=1)


def test_resume_equals_uninterrupted_training(initial, stream, tmp_path: Path):
    """Acceptance 3, on CPU: bit for bit."""
    graphdef, state0 = initial
    straight, straight_position, straight_losses = train(graphdef, fresh_copy(state0), stream, 0, 2 * N)

    first, position, first_losses = train(graphdef, fresh_copy(state0), stream, 0, N)
    checkpoint.save(tmp_path, N, first, {"step": N, "data": {"position": position}})
    del first, position  # from here on, only what a new process would have: the checkpoint and the config

    graphdef2, abstract = checkpoint.abstract_train_state(CFG, TC)
    resumed, meta = checkpoint.restore(tmp_path, abstract)
    new_stream = TokenStream(stream.tokens, BATCH, SEQ, seed=stream.seed)
    resumed, resumed_position, resumed_losses = train(graphdef2, resumed, new_stream, meta["data"]["position"], N)

    assert first_losses + resumed_losses == straight_losses
    assert resumed_position == straight_position == 2 * N * BATCH
    assert int(resumed.step) == 2 * N
    assert_bit_identical(resumed, straight)


def test_resume_detects_a_wrong_data_position(initial, stream, tmp_path: Path):
    """The comparison above can fail: resuming at another data position gives other weights."""
    graphdef, state0 = initial
    straight, _, _ = train(graphdef, fresh_copy(state0), stream, 0, 2)
    first, _, _ = train(graphdef, fresh_copy(state0), stream, 0, 1)
    wrong, _, _ = train(graphdef, first, stream, 0, 1)  # the first batch again instead of the second
    assert not np.array_equal(leaves(wrong)[0], leaves(straight)[0])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Dots1ForCausalLM, Path]:
    # Weights with std 0.1, non-unit norms and a router bias that moves the choice: every tensor matters.
    model = numpy_model(7, std=0.1, norm_range=(0.5, 1.5), bias_std=0.05)
    extra = tmp_path_factory.mktemp("tok") / "tokenizer_config.json"
    extra.write_text("{}")
    return model, export_hf(model, tmp_path_factory.mktemp("export") / "hf", extra_files=[extra])


def test_export_layout(exported):
    _, directory = exported
    assert sorted(p.name for p in directory.parent.iterdir()) == ["hf"]  # the temporary directory is gone
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors",
                                                             "tokenizer_config.json"]
    names = set(SafetensorsFile(directory / "model.safetensors"))
    last = CFG.num_hidden_layers - 1
    assert f"model.layers.{last}.mlp.experts.{CFG.n_routed_experts - 1}.down_proj.weight" in names
    assert f"model.layers.{last}.mlp.gate.e_score_correction_bias" in names
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)


def test_export_loads_in_transformers_with_our_logits(exported):
    model, directory = exported
    ids = random_ids(CFG.vocab_size, 2, 24, seed=3)
    ref = transformers.Dots1ForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    with torch_one_thread():
        expected = ref(torch.from_numpy(ids).long()).logits.double().numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_export_loads_back_to_the_same_weights(exported):
    model, directory = exported
    loaded = from_pretrained(directory, progress=False)
    assert loaded.cfg == model.cfg
    original, reloaded = nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))
    assert [p for p, _ in original] == [p for p, _ in reloaded]
    for (path, a), (_, b) in zip(original, reloaded, strict=True):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), path


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "tie_word_embeddings": True}],
                         ids=["plain", "bias_tied"])
def test_export_writes_what_transformers_writes(overrides: dict, tmp_path: Path):
    """A checkpoint saved by transformers (per-expert layout), loaded and exported again: the same tensor names and
    the same bytes, for the optional attention biases and tied embeddings too."""
    reference = save(hf_model(hf_config(**overrides), bias_std=0.05), tmp_path / "ref")
    exported = export_hf(from_pretrained(reference, progress=False), tmp_path / "ours")
    theirs, ours = SafetensorsFile(reference / "model.safetensors"), SafetensorsFile(exported / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours.dtype(name) == theirs.dtype(name) and np.array_equal(ours[name], theirs[name]), name
