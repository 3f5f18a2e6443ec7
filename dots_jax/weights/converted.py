"""Converted dots_jax checkpoints (written by `python -m convert.hf_to_jax`): layout, manifest, restore on a mesh.

A converted checkpoint is a directory (local, or any path Orbax/tensorstore accepts, e.g. gs://):
  config.json, tokenizer files   copied verbatim from the HF checkpoint
  manifest.json                  the format, the source, the units written, and per parameter its shape, dtype,
                                 sha256 and the dtype the HF checkpoint stored it in
  units/<unit>/<param>/          one Orbax item (StandardCheckpointHandler, tree {"value": array}) per parameter
Units are the conversion's steps: "top" (embed_tokens, norm, lm_head) and "layer_NNN" for each decoder layer
(HF numbering). <param> is the parameter's path inside its unit, in our layout ("self_attn.q_proj" [H, n, d],
"mlp.gate_proj" [E, in, out], ...), without the stacked layer axis: restore stacks the layers.

One item per parameter (not per layer) keeps the converter's peak memory at one parameter, which for the
released model is at most ~1.5 GB (128 experts x 4096 x 1408 in bf16), where a whole MoE layer is ~4.4 GB.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
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
from dots_jax.model.modeling import Dots1ForCausalLM, abstract_model
from dots_jax.weights.hf import CheckpointError

FORMAT = "dots_jax.weights.converted"
VERSION = 1
MANIFEST = "manifest.json"
UNITS = "units"
TOP = "top"
STACKS = ("dense_layers", "moe_layers")

StatePath = tuple[str, ...]


# ------------------------------------------------------------------------------------------------ layout
def unit_name(layer: int | None) -> str:
    return TOP if layer is None else f"layer_{layer:03d}"


def locate(path: StatePath, cfg: Dots1Config) -> list[tuple[str, str, int | None]]:
    """Where a model-state parameter lives on disk: [(unit, param name in the unit, index in its layer stack)],
    one entry per layer for stacked parameters, in stack order; [(TOP, name, None)] for the others."""
    if path[0] not in STACKS:
        return [(TOP, ".".join(path), None)]
    first, count = (0, cfg.num_dense_layers) if path[0] == "dense_layers" else (cfg.first_k_dense_replace,
                                                                               cfg.num_moe_layers)
    return [(unit_name(first + i), ".".join(path[1:]), i) for i in range(count)]


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
    from dots_jax.parallel.sharding import param_shardings

    shardings = param_shardings(state, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    by_key = {tuple(str(getattr(k, "key", k)) for k in path): s for path, s in leaves}
    return {path: by_key[tuple(str(p) for p in path)] for path in flat}


def load(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: Any = jnp.float32,
         param_dtype: Any = None, moe_backend: str = "auto", progress: bool = True) -> Dots1ForCausalLM:
    """Restore a converted checkpoint with every parameter placed straight into its sharding on `mesh`.

    Each layer's item is restored into its device slices (Orbax/tensorstore read only the chunks a host's
    devices need), then the layers are stacked on the devices. dtype is the activation dtype, param_dtype
    (default: dtype) the weights'; the router's correction bias stays f32.
    """
    root = as_path(path)
    manifest = read_manifest(root)
    cfg = Dots1Config.from_hf(json.loads((root / "config.json").read_text()))
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend)
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    _check_manifest(manifest, flat, cfg)
    shardings = shardings_for(state, mesh)
    ckptr = checkpointer()
    for state_path, var in tqdm(flat.items(), desc="restoring", unit="param", disable=not progress):
        var.set_value(_restore_param(ckptr, root, state_path, var.get_value(), shardings[state_path], cfg))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _restore_param(ckptr: ocp.Checkpointer, root: epath.Path, path: StatePath, abstract: jax.ShapeDtypeStruct,
                   sharding: jax.sharding.Sharding, cfg: Dots1Config) -> jax.Array:
    shape, dtype = tuple(abstract.shape), abstract.dtype
    places = locate(path, cfg)
    if places[0][2] is None:
        return _restore_item(ckptr, item_path(root, *places[0][:2]), shape, dtype, sharding)
    per_layer = _layer_sharding(sharding, len(shape))
    layers = [_restore_item(ckptr, item_path(root, unit, param), shape[1:], dtype, per_layer)
              for unit, param, _ in places]
    stacked = _stacker(sharding, len(layers))(*layers)
    for layer in layers:  # the per-layer copies go now: peak is one stacked parameter twice, per device
        layer.delete()
    return stacked


# ---------------------------------------------------------------------------------------- the one entry
def from_pretrained(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: Any = jnp.float32,
                    param_dtype: Any = None, moe_backend: str = "auto", progress: bool = True) -> Dots1ForCausalLM:
    """Load dots.llm1 from a converted dots_jax checkpoint (a directory with manifest.json, restored straight
    into its shardings), or from an HF checkpoint (local directory or repo id; see hf_weights.from_pretrained).

    mesh: place every parameter by the sharding table (dots_jax.parallel.sharding); None = one device. An HF checkpoint
    is read on the host and then placed, so a whole-model host copy exists there: convert it first for meshes.
    """
    if is_converted(path):
        return load(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend,
                    progress=progress)
    from dots_jax.weights import hf as hf_weights

    model = hf_weights.from_pretrained(path, dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend,
                                       progress=progress)
    if mesh is not None:
        from dots_jax.parallel.sharding import shard_state

        nnx.update(model, shard_state(nnx.state(model), mesh))
    return model

