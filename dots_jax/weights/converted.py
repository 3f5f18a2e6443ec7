"""The converted dots_jax checkpoint format, read and written here: layout, manifest, unit writing and the work
directory's resume bookkeeping (used by `python -m convert.hf_to_jax`), reading parameters back (convert.jax_to_hf)
and restoring the model straight onto a mesh (load_converted).

A converted checkpoint is a directory (local, or any path Orbax/tensorstore accepts, e.g. gs://):
  config.json, tokenizer files   copied verbatim from the HF checkpoint
  manifest.json                  the format, the source, the units written, and per parameter its shape, dtype,
                                 sha256 and the dtype the HF checkpoint stored it in; "quantize" ("int8" when
                                 converted with --quantize int8, else null)
  units/<unit>/<param>/          one Orbax item (StandardCheckpointHandler, tree {"value": array}) per parameter
Units are the conversion's steps: "top" (embed_tokens, norm, lm_head) and "layer_NNN" for each decoder layer
(HF numbering). <param> is the parameter's path inside its unit, in our layout ("self_attn.q_proj" [H, n, d],
"mlp.gate_proj" [E, in, out], ...), without the stacked layer axis: restore stacks the layers.

One item per parameter (not per layer) keeps the converter's peak memory at one parameter, which for the
released model is at most ~1.5 GB (128 experts x 4096 x 1408 in bf16), where a whole MoE layer is ~4.4 GB.

An int8 checkpoint (hf_to_jax --quantize int8) stores each linear weight as int8 under its usual name and its f32
per-output-channel scale beside it as "<param>_scale" (the model's own parameters, dots_jax.model.layers.linear).

Writing goes to <DST>.tmp-hf_to_jax, renamed to DST when complete, so DST never holds half a checkpoint. Each unit
is written to <unit>.partial, renamed, and then recorded in the manifest: a resumed conversion skips the recorded
units.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from dots_jax.config import Dots1Config
from dots_jax.errors import UserError
from dots_jax.model.layers import check_quantize, contracted_axes
from dots_jax.model.modeling import Dots1ForCausalLM, abstract_model
from dots_jax.ops.quant import quantize_int8
from dots_jax.parallel.sharding import param_shardings
from dots_jax.weights.hf import CheckpointError, scale_path
from dots_jax.weights.keys import STACKS, StatePath, stack_layers

FORMAT = "dots_jax.weights.converted"
VERSION = 1
MANIFEST = "manifest.json"
UNITS = "units"
TOP = "top"
WORK_SUFFIX = ".tmp-hf_to_jax"  # the work directory beside DST while a conversion runs
CHUNK_BYTES = 64 * 1024 * 1024  # Orbax chunk size: a host restoring its shard reads ~only its own chunks


class DestinationError(UserError):
    """DST (or an interrupted conversion beside it) is in the way; the message says which flag to pass."""


# ------------------------------------------------------------------------------------------------ layout
def unit_name(layer: int | None) -> str:
    return TOP if layer is None else f"layer_{layer:03d}"


def place(path: StatePath, layer: int | None) -> tuple[str, str]:
    """(unit, param name in the unit) of the slice of model-state parameter `path` that belongs to HF layer
    `layer` (None: a top-level parameter, stored whole)."""
    return unit_name(layer), ".".join(path if layer is None else path[1:])


def locate(path: StatePath, cfg: Dots1Config) -> list[tuple[str, str, int | None]]:
    """Where a model-state parameter lives on disk: [(unit, param name in the unit, index in its layer stack)],
    one entry per layer for stacked parameters, in stack order; [(TOP, name, None)] for the others."""
    if path[0] not in STACKS:
        return [(*place(path, None), None)]
    return [(*place(path, layer), i) for i, layer in enumerate(stack_layers(path[0], cfg))]


def item_path(root: epath.Path, unit: str, param: str) -> epath.Path:
    return root / UNITS / unit / param


def as_path(path: str | os.PathLike) -> epath.Path:
    text = os.path.expanduser(os.fspath(path))
    if "://" not in text:  # a local path: Orbax refuses relative ones ("Checkpoint path should be absolute")
        text = os.path.abspath(text)
    return epath.Path(text)


def is_converted(path: str | os.PathLike) -> bool:
    """True for a converted dots_jax checkpoint (it has a manifest.json); False for anything else, including
    an HF repo id that is not a local path."""
    try:
        return (as_path(path) / MANIFEST).exists()
    except Exception:  # a scheme no installed filesystem handles
        return False


def read_manifest(root: epath.Path) -> dict[str, Any]:
    """The manifest of a converted checkpoint, checked to be complete and of a known format."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{root}: no {MANIFEST}: not a converted dots_jax checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                              f"expected {FORMAT!r} version {VERSION}")
    if not manifest.get("complete"):
        raise CheckpointError(f"{path}: the conversion did not finish (rerun hf_to_jax with --resume)")
    return manifest


def read_config(root: epath.Path) -> Dots1Config:
    return Dots1Config.from_hf(json.loads((root / "config.json").read_text()))


def checkpointer() -> ocp.Checkpointer:
    # Synchronous: the converter frees each array as soon as it is on disk, and restore needs the arrays now.
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


# ------------------------------------------------------------------------------------------------ restore
def _layer_sharding(sharding: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
    """The sharding of one layer's slice of a stacked [L, ...] parameter: the stacked one minus the layer axis."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, P(*spec[1:]))
    return sharding


@functools.cache
def _stacker(sharding: jax.sharding.Sharding, count: int) -> Callable[..., jax.Array]:
    # Stacking under jit with out_shardings puts each device's slice of [L, ...] together from the per-layer
    # slices it already holds: no host ever sees the whole parameter.
    del count  # part of the cache key only: one compile per (sharding, layer count)
    return jax.jit(lambda *layers: jnp.stack(layers), out_shardings=sharding)


def _restore_item(ckptr: ocp.Checkpointer, item: epath.Path, shape: tuple[int, ...], dtype: np.dtype,
                  sharding: jax.sharding.Sharding) -> jax.Array:
    target = {"value": jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)}
    try:
        return ckptr.restore(item, args=ocp.args.StandardRestore(target))["value"]
    except FileNotFoundError as e:
        raise CheckpointError(f"{item}: missing from the converted checkpoint ({e})") from None


def _check_manifest(manifest: dict[str, Any], flat: dict[StatePath, Any], cfg: Dots1Config) -> None:
    """Every parameter the model needs is in the manifest with the shape the config implies, and nothing else."""
    units = manifest["units"]
    expected = set()
    for path, var in flat.items():
        shape = tuple(var.get_value().shape)
        for unit, param, index in locate(path, cfg):
            expected.add((unit, param))
            entry = units.get(unit, {}).get("params", {}).get(param)
            if entry is None:
                raise CheckpointError(f"converted checkpoint lacks {unit}/{param}, which config.json implies")
            want = shape if index is None else shape[1:]
            if tuple(entry["shape"]) != want:
                raise CheckpointError(f"{unit}/{param} has shape {tuple(entry['shape'])} in the manifest, but "
                                      f"config.json implies {want}")
    extra = sorted(f"{u}/{p}" for u, body in units.items() for p in body["params"] if (u, p) not in expected)
    if extra:
        raise CheckpointError(f"converted checkpoint holds parameters config.json does not: {', '.join(extra[:5])}")


def shardings_for(state: nnx.State, mesh: Mesh | None) -> dict[StatePath, jax.sharding.Sharding]:
    """path -> sharding of every parameter: the sharding table's NamedShardings on `mesh`, or the first local
    device when there is no mesh."""
    flat = dict(nnx.to_flat_state(state))
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        return dict.fromkeys(flat, device)
    shardings = param_shardings(state, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    by_key = {tuple(str(getattr(k, "key", k)) for k in path): s for path, s in leaves}
    return {path: by_key[tuple(str(p) for p in path)] for path in flat}


def stored_quantization(manifest: dict[str, Any]) -> tuple[str | None, bool]:
    """(quantize, quantize_head) of the weights a converted checkpoint stores: (None, False) for float ones."""
    return manifest.get("quantize"), bool(manifest.get("quantize_head", False))


def load_converted(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: Any = jnp.float32,
                   param_dtype: Any = None, moe_backend: str = "auto", attention_backend: str = "auto",
                   progress: bool = True, quantize: str | None = None, quantize_head: bool = False
                   ) -> Dots1ForCausalLM:
    """Restore a converted checkpoint with every parameter placed straight into its sharding on `mesh`.

    Each layer's item is restored into its device slices (Orbax/tensorstore read only the chunks a host's
    devices need), then the layers are stacked on the devices. dtype is the activation dtype, param_dtype
    (default: dtype) the weights'; the router's correction bias stays f32.

    Weights stored int8 are restored int8 (and their scales f32) whatever `quantize` says; quantize="int8" (and
    quantize_head) quantises float-stored linear weights on the devices, layer by layer as they are restored.
    """
    root = as_path(path)
    manifest = read_manifest(root)
    cfg = read_config(root)
    stored, stored_head = stored_quantization(manifest)
    quantize = check_quantize(quantize) or stored
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend, attention_backend=attention_backend)
    on_disk = dict(nnx.to_flat_state(nnx.state(abstract_model(cfg, quantize=stored, quantize_head=stored_head,
                                                              **kwargs))))
    _check_manifest(manifest, on_disk, cfg)
    graphdef, state = nnx.split(abstract_model(cfg, quantize=quantize, quantize_head=quantize_head or stored_head,
                                               **kwargs))
    flat = dict(nnx.to_flat_state(state))
    shardings = shardings_for(state, mesh)
    ckptr = checkpointer()
    for state_path in tqdm(on_disk, desc="restoring", unit="param", disable=not progress):
        scale = scale_path(state_path)
        if scale in flat and scale not in on_disk:  # stored float, wanted int8
            q, s = _restore_quantized(ckptr, root, state_path, flat[state_path].get_value().shape,
                                      (shardings[state_path], shardings[scale]), cfg)
            flat[state_path].set_value(q)
            flat[scale].set_value(s)
        else:
            var = flat[state_path]
            var.set_value(_restore_param(ckptr, root, state_path, var.get_value(), shardings[state_path], cfg))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@functools.cache
def _quantizer(axes: tuple[int, ...], q_sharding: jax.sharding.Sharding, scale_sharding: jax.sharding.Sharding
               ) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    return jax.jit(lambda w: quantize_int8(w, axes), out_shardings=(q_sharding, scale_sharding))


def _restore_quantized(ckptr: ocp.Checkpointer, root: epath.Path, path: StatePath, shape: tuple[int, ...],
                       shardings: tuple[jax.sharding.Sharding, jax.sharding.Sharding], cfg: Dots1Config
                       ) -> tuple[jax.Array, jax.Array]:
    """A float-stored linear weight restored in f32 and quantised on its devices, one layer at a time (so that
    at most one layer's f32 copy exists beside the int8 stack): (int8 weight, scale) in `shardings`."""
    places = locate(path, cfg)
    if places[0][2] is None:
        w = _restore_item(ckptr, item_path(root, *places[0][:2]), shape, np.dtype(np.float32), shardings[0])
        q, s = _quantizer(contracted_axes(path[-1], len(shape)), *shardings)(w)
        w.delete()
        return q, s
    axes = contracted_axes(path[-1], len(shape) - 1)
    q_layer = _layer_sharding(shardings[0], len(shape))
    s_layer = _layer_sharding(shardings[1], len(shape) - len(axes))
    qs, ss = [], []
    for unit, param, _ in places:
        w = _restore_item(ckptr, item_path(root, unit, param), shape[1:], np.dtype(np.float32), q_layer)
        q, s = _quantizer(axes, q_layer, s_layer)(w)
        w.delete()
        qs.append(q)
        ss.append(s)
    return _stack(qs, shardings[0]), _stack(ss, shardings[1])


def _stack(layers: list[jax.Array], sharding: jax.sharding.Sharding) -> jax.Array:
    stacked = _stacker(sharding, len(layers))(*layers)
    for layer in layers:  # the per-layer copies go now: peak is one stacked parameter twice, per device
        layer.delete()
    return stacked


def _restore_param(ckptr: ocp.Checkpointer, root: epath.Path, path: StatePath, abstract: jax.ShapeDtypeStruct,
                   sharding: jax.sharding.Sharding, cfg: Dots1Config) -> jax.Array:
    shape, dtype = tuple(abstract.shape), abstract.dtype
    places = locate(path, cfg)
    if places[0][2] is None:
        return _restore_item(ckptr, item_path(root, *places[0][:2]), shape, dtype, sharding)
    per_layer = _layer_sharding(sharding, len(shape))
    layers = [_restore_item(ckptr, item_path(root, unit, param), shape[1:], dtype, per_layer)
              for unit, param, _ in places]
    return _stack(layers, sharding)


# ------------------------------------------------------------------------------------------------- reading
def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))).hexdigest()


def read_param(root: epath.Path, unit: str, param: str, info: dict[str, Any]) -> np.ndarray:
    """One per-layer parameter as numpy on the host, checked against its manifest entry `info` (shape, dtype,
    sha256)."""
    item = item_path(root, unit, param)
    try:
        array = np.asarray(checkpointer().restore(item)["value"])
    except FileNotFoundError:
        raise CheckpointError(f"{item}: missing from the converted checkpoint") from None
    if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"] or sha256(array) != info["sha256"]:
        raise CheckpointError(f"{item}: does not match its manifest entry (shape, dtype or sha256): corrupt")
    return array


# ------------------------------------------------------------------------------------------------- writing
def new_manifest(source: dict[str, Any], dtype: str | None, unit_order: list[str], quantize: str | None = None
                 ) -> dict[str, Any]:
    """The manifest of a conversion about to start: no unit written yet, not complete."""
    return {"format": FORMAT, "version": VERSION, "complete": False, "source": source, "dtype": dtype,
            "quantize": quantize, "unit_order": unit_order, "units": {}, "extra_files": []}


def write_manifest(root: epath.Path, manifest: dict[str, Any]) -> None:
    """Atomically (temporary name, then rename; epath, so remote DSTs too): an interruption never leaves half a
    manifest."""
    path = root / MANIFEST
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)


class UnitWriter:
    """Saves one unit's parameters, one Orbax item each, and collects the unit's manifest entry."""

    def __init__(self, directory: epath.Path) -> None:
        self.directory = directory
        self.entry: dict[str, Any] = {"params": {}}
        self._checkpointer = checkpointer()

    def save(self, name: str, array: np.ndarray, **info: Any) -> None:
        """Write parameter `name` of the unit; `info` (e.g. the HF dtype) goes into its manifest entry."""
        self.entry["params"][name] = {"shape": list(array.shape), "dtype": str(array.dtype), "sha256": sha256(array),
                                      **info}
        args = ocp.args.StandardSave({"value": array}, save_args={"value": ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES)})
        self._checkpointer.save(self.directory / name, args=args)


@contextlib.contextmanager
def write_unit(work: epath.Path, unit: str) -> Iterator[UnitWriter]:
    """A UnitWriter into <unit>.partial, renamed to <unit> when the block completes. A leftover .partial (or an
    unrecorded <unit>) from an interrupted run is discarded first. The unit counts as done only once
    record_unit has put it in the manifest."""
    partial = work / UNITS / f"{unit}.partial"
    final = work / UNITS / unit
    for stale in (partial, final):
        if stale.exists():
            stale.rmtree()
    partial.mkdir(parents=True)
    yield UnitWriter(partial)
    partial.rename(final)


def record_unit(work: epath.Path, manifest: dict[str, Any], unit: str, entry: dict[str, Any]) -> None:
    """Put a written unit in the manifest on disk: from here on a resumed conversion skips it."""
    manifest["units"][unit] = entry
    write_manifest(work, manifest)


def work_dir(dst: epath.Path) -> epath.Path:
    return dst.parent / (dst.name + WORK_SUFFIX)


def _is_nonempty(path: epath.Path) -> bool:
    return path.exists() and (not path.is_dir() or any(True for _ in path.iterdir()))


def check_destination(dst: epath.Path, resume: bool, overwrite: bool) -> bool:
    """Raise DestinationError when DST or an interrupted conversion is in the way; False when --resume finds DST
    already complete (nothing to do)."""
    work = work_dir(dst)
    if _is_nonempty(dst) and not overwrite:
        if resume and (dst / MANIFEST).exists() and not work.exists():
            read_manifest(dst)  # complete? (raises if not)
            return False
        raise DestinationError(f"destination {dst} exists and is not empty: pass --overwrite to replace it"
                               + (" (--resume only continues an interrupted conversion)" if resume else ""))
    if work.exists() and not (resume or overwrite):
        raise DestinationError(f"{work} holds an interrupted conversion: pass --resume to continue it, or "
                               "--overwrite to start again")
    return True


def start_or_resume(work: epath.Path, manifest: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The manifest to continue from: the interrupted one under --resume (if it is the same conversion), else
    `manifest` in a fresh work directory."""
    if work.exists() and resume and (work / MANIFEST).exists():
        old = json.loads((work / MANIFEST).read_text())
        for field in ("source", "dtype", "quantize", "quantize_head", "unit_order"):
            if old.get(field) != manifest.get(field):
                raise DestinationError(f"{work} holds an interrupted conversion with a different {field} "
                                       f"({old.get(field)!r}); pass --overwrite to start again")
        return old
    if work.exists():
        work.rmtree()
    work.mkdir(parents=True)
    write_manifest(work, manifest)
    return manifest


def finish(work: epath.Path, dst: epath.Path, manifest: dict[str, Any]) -> None:
    """Mark the manifest complete and move the work directory to DST (replacing an empty or --overwrite DST)."""
    manifest["complete"] = True
    write_manifest(work, manifest)
    if dst.exists():
        dst.rmtree() if dst.is_dir() else dst.unlink()
    work.rename(dst)
