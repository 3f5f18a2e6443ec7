"""Training checkpoints (Orbax). (A trained model is exported as an HF checkpoint by weights.hf.export_hf.)

A checkpoint is one Orbax step directory under `<out>/checkpoints/<step>/` holding two items:
  state     the TrainState (f32 master params, router bias, optimizer state, step), saved array by array, so a
            restore gives back bit-identical arrays; for LoRA the adapters and their optimizer state, not the frozen
            base (TrainState.frozen), which the trainer reads again from the base model and checks (base_checksum);
  metadata  a JSON dict: whatever the trainer needs to continue exactly (data position, seed, the model config as
            an HF dict, the TrainConfig).
Orbax writes each step to a temporary directory and renames it when complete, so a crash mid-save leaves the
previous checkpoints intact and `latest_step` never sees a half-written one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from dots_jax.config import Dots1Config
from dots_jax.model.lora import LoraConfig
from dots_jax.model.modeling import abstract_model
from dots_jax.training.step import TrainConfig, TrainState, init_state, is_lora

CHECKPOINTS = "checkpoints"  # the subdirectory of a training run's output directory
DEFAULT_MAX_TO_KEEP = 3


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
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_without_base(state)),
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


def restore(directory: str | os.PathLike, abstract_state: TrainState, step: int | None = None, *,
            frozen: nnx.State | None = None) -> tuple[TrainState, dict[str, Any]]:
    """(state, metadata) of checkpoint `step` (default: the latest). `abstract_state` gives the tree structure,
    shapes and dtypes (see abstract_train_state); the restored arrays are bit for bit the saved ones. A LoRA
    checkpoint holds no base: `frozen` is the base model's nnx.Params (TrainState.frozen of init_state on it)."""
    if is_lora(abstract_state) and frozen is None:
        raise ValueError("a LoRA training checkpoint holds the adapters only: pass frozen=, the base's parameters")
    step = _step_or_latest(directory, step)
    manager = _manager(directory)
    try:
        target = ocp.args.StandardRestore(_without_base(abstract_state))
        restored = manager.restore(step, args=ocp.args.Composite(state=target, metadata=ocp.args.JsonRestore()))
    finally:
        manager.close()
    return dataclasses.replace(restored.state, frozen=nnx.State({}) if frozen is None else frozen), restored.metadata


def _without_base(state: TrainState) -> TrainState:
    return dataclasses.replace(state, frozen=nnx.State({}))


def base_checksum(frozen: nnx.State) -> str:
    """A fingerprint of the base weights a LoRA run trains on: per array the sum of its bits as unsigned integers,
    modulo 2**32 (exact, so independent of the order of summation, the devices and the mesh), then hashed with the
    arrays' paths, shapes and dtypes. Cheap beside loading the model; it tells another base, or other values."""
    digest = hashlib.sha256()
    flat = sorted(nnx.to_flat_state(frozen), key=lambda kv: tuple(map(str, kv[0])))
    sums = _bit_sums([var.get_value() for _, var in flat])
    for (path, var), total in zip(flat, sums, strict=True):
        value = var.get_value()
        digest.update(f"{'.'.join(map(str, path))} {value.shape} {value.dtype} {int(total)};".encode())
    return digest.hexdigest()[:16]


@jax.jit
def _bit_sums(arrays: list[jax.Array]) -> list[jax.Array]:
    def bits(x: jax.Array) -> jax.Array:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    return [bits(x).sum(dtype=jnp.uint32) for x in arrays]


def abstract_train_state(cfg: Dots1Config, tc: TrainConfig, *, dtype: Any = jnp.float32, moe_backend: str = "auto",
                         attention_backend: str = "auto", lora: LoraConfig | None = None,
                         quantize: str | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, TrainState of ShapeDtypeStructs) for a model with f32 master weights and compute `dtype`:
    what restore() needs, built without computing a single weight (random init costs seconds of compiles). With
    `lora`: f32 adapters over a frozen base held in `dtype` (int8 with `quantize`), as a LoRA run trains it."""
    model = abstract_model(cfg, dtype=dtype, param_dtype=jnp.float32 if lora is None else dtype,
                           moe_backend=moe_backend, attention_backend=attention_backend, quantize=quantize, lora=lora)
    graphdef, weights = nnx.split(model)
    # init_state itself, traced: the optimizer state's structure is exactly what training creates.
    state = jax.eval_shape(lambda w: init_state(nnx.merge(graphdef, w), tc)[1], weights)
    return graphdef, state
