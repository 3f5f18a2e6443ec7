"""Training checkpoints (Orbax) and export of a trained model as a Hugging Face checkpoint.

A checkpoint is one Orbax step directory under `<out>/checkpoints/<step>/` holding two items:
  state     the TrainState (f32 master params, router bias, optimizer state, step), saved array by array, so a
            restore gives back bit-identical arrays;
  metadata  a JSON dict: whatever the trainer needs to continue exactly (data position, seed, the model config as
            an HF dict, the TrainConfig).
Orbax writes each step to a temporary directory and renames it when complete, so a crash mid-save leaves the
previous checkpoints intact and `latest_step` never sees a half-written one.

export_hf() writes config.json + model.safetensors with transformers' per-expert tensor names: the inverse of
hf_weights.KEY_TABLE, checked tensor by tensor against the table's forward transforms.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dots_jax.config import Dots1Config
from dots_jax.model.modeling import Dots1ForCausalLM, RouterBias, abstract_model
from dots_jax.training.step import TrainConfig, TrainState, init_state
from dots_jax.weights.hf import (
    _ATTN,
    KEY_TABLE,
    SINGLE_FILE,
    Rule,
    _heads_bias,
    _heads_in,
    _heads_out,
    _linear,
    _Match,
    _target,
)
from dots_jax.weights.safetensors_io import save_file

CHECKPOINTS = "checkpoints"  # the subdirectory of a training run's output directory
DEFAULT_MAX_TO_KEEP = 3


def overlapping(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when local paths a and b, resolved (symlinks followed, ~ expanded), are the same path or one lies
    inside the other: writing or replacing one would change the other. Neither needs to exist."""
    ra, rb = (Path(os.path.realpath(os.path.expanduser(os.fspath(p)))) for p in (a, b))
    return ra == rb or ra in rb.parents or rb in ra.parents


# ------------------------------------------------------------------------------------------- Orbax side
def _manager(directory: str | os.PathLike, max_to_keep: int = DEFAULT_MAX_TO_KEEP) -> ocp.CheckpointManager:
    # Orbax wants an absolute path; item names fix the on-disk layout (<step>/state, <step>/metadata).
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=("state", "metadata"))


def save(directory: str | os.PathLike, step: int, state: TrainState, metadata: dict[str, Any], *,
         max_to_keep: int = DEFAULT_MAX_TO_KEEP) -> Path:
    """Write checkpoint `step` (state + JSON metadata) under `directory`, keeping the newest `max_to_keep`.

    Blocks until the checkpoint is complete on disk: training state is small next to a step's compute here, and
    a synchronous save means the caller may donate `state` to the next step right away.
    """
    json.dumps(metadata)  # fail now, with the offending value named, rather than inside Orbax's writer thread
    manager = _manager(directory, max_to_keep)
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   metadata=ocp.args.JsonSave(metadata)))
        manager.wait_until_finished()
    finally:
        manager.close()
    return Path(directory) / str(step)


def all_steps(directory: str | os.PathLike) -> list[int]:
    """The complete checkpoints under `directory`, oldest first ([] when there is none or no directory)."""
    if not Path(directory).is_dir():
        return []
    manager = _manager(directory)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def latest_step(directory: str | os.PathLike) -> int | None:
    steps = all_steps(directory)
    return steps[-1] if steps else None


def _step_or_latest(directory: str | os.PathLike, step: int | None) -> int:
    steps = all_steps(directory)
    if not steps:
        raise FileNotFoundError(f"{directory}: no checkpoint found")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"{directory}: no checkpoint for step {step} (have {steps})")
    return step


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The metadata dict of checkpoint `step` (default: the latest), without reading any array: the trainer
    needs the model config from it before it can build the abstract state that restore() fills."""
    step = _step_or_latest(directory, step)
    manager = _manager(directory)
    try:
        return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata
    finally:
        manager.close()


def restore(directory: str | os.PathLike, abstract_state: TrainState, step: int | None = None
            ) -> tuple[TrainState, dict[str, Any]]:
    """(state, metadata) of checkpoint `step` (default: the latest). `abstract_state` gives the tree structure,
    shapes and dtypes (see abstract_train_state); the restored arrays are bit for bit the saved ones."""
    step = _step_or_latest(directory, step)
    manager = _manager(directory)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 metadata=ocp.args.JsonRestore()))
    finally:
        manager.close()
    return restored.state, restored.metadata


def abstract_train_state(cfg: Dots1Config, tc: TrainConfig, *, dtype: Any = jnp.float32, moe_backend: str = "auto"
                         ) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, TrainState of ShapeDtypeStructs) for a model with f32 master weights and compute `dtype`:
    what restore() needs, built without computing a single weight (random init costs seconds of compiles)."""
    model = abstract_model(cfg, dtype=dtype, param_dtype=jnp.float32, moe_backend=moe_backend)
    graphdef, params, router_bias = nnx.split(model, nnx.Param, RouterBias)
    # init_state itself, traced: the optimizer state's structure is exactly what training creates.
    state = jax.eval_shape(lambda p, r: init_state(nnx.merge(graphdef, p, r), tc)[1], params, router_bias)
    return graphdef, state


# --------------------------------------------------------------------------------------------- HF export
_RULE_IDENTITY = next(f.default for f in dataclasses.fields(Rule) if f.name == "to_jax")  # Rule's default

# The inverse of each forward transform that the per-expert layout uses (the fused 5.x rules are never written).
_INVERSE = {
    _RULE_IDENTITY: lambda x, cfg: x,
    _linear: lambda x, cfg: x.T,  # [in, out] -> torch [out, in]
    _heads_in: lambda x, cfg: x.reshape(x.shape[0], -1).T,  # [H, n, d] -> [n*d, H]
    _heads_out: lambda x, cfg: x.reshape(-1, x.shape[-1]).T,  # [n, d, H] -> [H, n*d]
    _heads_bias: lambda x, cfg: x.reshape(-1),  # [n, d] -> [n*d]
}


def _rule_applies(rule: Rule, cfg: Dots1Config) -> bool:
    if len(rule.targets) != 1 or (".experts." in rule.hf and "{expert}" not in rule.hf):
        return False  # the fused 5.x expert tensors: we write the per-expert layout only
    if rule.hf == "lm_head.weight" and cfg.tie_word_embeddings:
        return False
    if ".bias" in rule.hf and _ATTN in rule.hf and not cfg.attention_bias:
        return False
    return True


def _rule_layers(rule: Rule, cfg: Dots1Config) -> Sequence[int | None]:
    k = cfg.first_k_dense_replace
    return {"none": [None], "all": range(cfg.num_hidden_layers), "dense": range(k),
            "moe": range(k, cfg.num_hidden_layers)}[rule.layers]


@dataclasses.dataclass(frozen=True)
class ExportEntry:
    """One tensor of an HF export (per-expert layout): its HF name and where it lives in our model state."""
    name: str
    path: tuple[str, ...]  # our parameter in the model state
    index: tuple[int, ...]  # leading index into that parameter: (), (layer-in-stack,) or (layer-in-stack, expert)
    layer: int | None  # the HF layer index (None for the top-level tensors)
    rule: Rule

    def to_hf(self, ours: np.ndarray, cfg: Dots1Config) -> np.ndarray:
        """Our slice -> the HF tensor, pushed back through KEY_TABLE's forward transform, which must give back
        our array exactly: a table change that _INVERSE misses fails here rather than exporting garbage."""
        tensor = np.ascontiguousarray(_INVERSE[self.rule.to_jax](ours, cfg))
        if not np.array_equal(np.asarray(self.rule.to_jax(tensor, cfg)), ours):
            raise AssertionError(f"export of {self.name!r} does not invert KEY_TABLE's transform")
        return tensor


def export_entries(cfg: Dots1Config) -> list[ExportEntry]:
    """Every tensor an HF export of a model with `cfg` holds, in KEY_TABLE order: the one inverse of the table,
    shared by export_hf and the converter (convert.jax_to_hf)."""
    entries = []
    for rule in KEY_TABLE:
        if not _rule_applies(rule, cfg):
            continue
        if rule.to_jax not in _INVERSE:
            raise NotImplementedError(f"no inverse transform for the KEY_TABLE rule {rule.hf!r}")
        experts = range(cfg.n_routed_experts) if "{expert}" in rule.hf else [None]
        for layer in _rule_layers(rule, cfg):
            for expert in experts:
                path, index = _target(_Match(rule, layer, expert), rule.targets[0], cfg)
                entries.append(ExportEntry(rule.hf.format(layer=layer, expert=expert), path, index, layer, rule))
    return entries


def hf_tensors(model: Dots1ForCausalLM) -> dict[str, np.ndarray]:
    """Every parameter of `model` under its HF name (per-expert layout) in torch's layout and the params' dtype.

    Each tensor is checked against KEY_TABLE's forward transform (ExportEntry.to_hf), and every element of the
    model must be written exactly once.
    """
    cfg = model.cfg
    flat = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}
    tensors: dict[str, np.ndarray] = {}
    written = 0
    for entry in export_entries(cfg):
        ours = flat[entry.path][entry.index] if entry.index else flat[entry.path]
        tensors[entry.name] = entry.to_hf(ours, cfg)
        written += ours.size
    total = sum(value.size for value in flat.values())
    if written != total:
        raise AssertionError(f"exported {written} of the model's {total} parameter elements")
    return tensors


def export_hf(model: Dots1ForCausalLM, directory: str | os.PathLike, *,
              extra_files: Sequence[str | os.PathLike] = ()) -> Path:
    """Write `model` as an HF dots1 checkpoint directory: config.json + model.safetensors (per-expert names), plus
    copies of `extra_files` (e.g. the tokenizer's). Loadable by from_pretrained and by transformers.

    Written to `<directory>.tmp` first and renamed into place, so `directory` never holds half an export; an
    existing `directory` is replaced.
    """
    directory = Path(directory)
    tensors = hf_tensors(model)
    dtypes = {str(t.dtype) for t in tensors.values()}
    config = model.cfg.to_hf()
    # The dtype the weights are stored in (f32 master weights when trained here), as transformers expects.
    config["torch_dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"

    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, tmp / SINGLE_FILE, metadata={"format": "pt"})
    for extra in extra_files:
        shutil.copy2(extra, tmp / Path(extra).name)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
