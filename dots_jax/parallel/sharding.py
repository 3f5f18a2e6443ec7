"""Meshes, the one logical-axis -> mesh-axis table, and what follows from it.

Mesh axes, always in this order (size 1 where a spec does not name them):
  data    pure data parallelism: batch split, weights replicated
  fsdp    batch split AND weights split along "embed" (gathered layer by layer by XLA)
  expert  routed experts split (expert parallelism); outside the MoE it splits the batch, like data
  tensor  attention heads, MLP widths and the vocabulary split (Megatron-style tensor parallelism)

Every nnx.Param carries logical axis names (model.py); RULES maps each name to mesh axes. Nothing else in the
project names a mesh axis for a weight. Activations are constrained at layer boundaries through the same table
(`constrain`), which is a no-op unless a mesh is set with `jax.set_mesh(mesh)`; the model reads that context.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dots_jax.config import Dots1Config

MESH_AXES = ("data", "fsdp", "expert", "tensor")
MeshAxes = str | tuple[str, ...] | None
PyTree = Any

# fmt: off
RULES: dict[str, MeshAxes] = {
    # ---- parameters
    "layers":   None,                         # the stacked-layer axis: scanned, never split
    "vocab":    "tensor",                     # embedding rows and lm_head columns
    "embed":    "fsdp",                       # hidden size: the FSDP split of every matrix
    "q_heads":  "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp":      "tensor",                     # dense SwiGLU width and the shared experts' width
    "expert":   "expert",                     # routed experts
    "moe_mlp":  None,                         # 1408 = 11 x 128: experts split whole, never inside
    "lora_rank": None,                        # LoRA adapters' rank (r = 8..64): tiny, kept whole
    # ---- activations and the KV cache (split where the size divides; see batch_axes)
    "batch":    ("data", "fsdp", "expert"),   # attention is data parallel over the expert axis too
    "seq":      None,
    "act_embed": None,
    "act_vocab": "tensor",
}
# fmt: on


def scale_axes(axes: Sequence[str | None], contracted: Sequence[int]) -> tuple[str | None, ...]:
    """The logical axes of an int8 weight's per-output-channel scale: the weight's `axes` without its contracted
    ones (dots_jax.ops.quant). The scale is then split by RULES exactly as its weight's output channels are."""
    dropped = {a % len(axes) for a in contracted}
    return tuple(name for dim, name in enumerate(axes) if dim not in dropped)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _check_rules(rules: Mapping[str, MeshAxes]) -> None:
    for name, axes in rules.items():
        unknown = [a for a in _as_tuple(axes) if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"RULES[{name!r}] names unknown mesh axes {unknown}; mesh axes are {MESH_AXES}")


_check_rules(RULES)


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, MeshAxes] = RULES) -> P:
    """PartitionSpec for logical axis names; a mesh axis used by two dimensions is an error (the collision
    check: a tensor cannot be split twice over one axis)."""
    spec, used = [], {}
    for dim, name in enumerate(axes):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no entry in the sharding RULES ({sorted(rules)})")
        mesh_axes = _as_tuple(None if name is None else rules[name])
        for a in mesh_axes:
            if a in used:
                raise ValueError(f"logical axes {tuple(axes)}: mesh axis {a!r} would split both dimension "
                                 f"{used[a]} and dimension {dim}; change RULES so they map to different axes")
            used[a] = dim
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


# ------------------------------------------------------------------------------------------------- meshes
def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """"expert=16,fsdp=4" (or a mapping) -> sizes of all four axes, 1 where not given."""
    if isinstance(spec, str):
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, size = part.partition("=")
            if not sep or not size.strip().lstrip("-").isdigit():
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not axis=size (e.g. 'expert=4,data=2')")
            items.append((name.strip(), int(size)))
    else:
        items = list(spec.items())
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for name, size in items:
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}")
        if name in seen:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        if not isinstance(size, int | np.integer) or isinstance(size, bool) or size < 1:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} needs a positive integer size, got {size!r}")
        seen.add(name)
        sizes[name] = int(size)
    return sizes


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, expert, tensor) from "expert=4,data=2"; the sizes must multiply to the
    number of devices (default: all of jax.devices()). Axis types are Auto: XLA propagates shardings."""
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        given = ", ".join(f"{a}={s}" for a, s in sizes.items() if s > 1) or "all axes 1"
        raise ValueError(f"mesh spec {spec!r} ({given}) covers {math.prod(shape)} devices, but there are "
                         f"{len(devices)}: the axis sizes must multiply to {len(devices)}")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_size(mesh: Mesh | jax.sharding.AbstractMesh | Mapping[str, int], axes: MeshAxes) -> int:
    """How many devices `axes` spans on a mesh (or on a {axis: size} mapping)."""
    shape = mesh if isinstance(mesh, Mapping) else mesh.shape
    return math.prod(shape[a] for a in _as_tuple(axes))


# ------------------------------------------------------------------------------------ what a mesh can split
def _split_sizes(cfg: Dots1Config) -> list[tuple[str, int, str]]:
    """(config field, size, logical axis) of every dimension the table may split."""
    sizes = [("vocab_size", cfg.vocab_size, "vocab"), ("hidden_size", cfg.hidden_size, "embed"),
             ("num_attention_heads", cfg.num_attention_heads, "q_heads"),
             ("num_key_value_heads", cfg.num_key_value_heads, "kv_heads"),
             ("head_dim", cfg.head_dim, "head_dim"), ("moe_intermediate_size", cfg.moe_intermediate_size, "moe_mlp")]
    if cfg.num_dense_layers:
        sizes.append(("intermediate_size", cfg.intermediate_size, "mlp"))
    if cfg.num_moe_layers:
        sizes.append(("n_routed_experts", cfg.n_routed_experts, "expert"))
        if cfg.n_shared_experts:
            sizes.append(("n_shared_experts x moe_intermediate_size", cfg.shared_intermediate_size, "mlp"))
    return sizes


def _mesh_shape(mesh: Mesh | jax.sharding.AbstractMesh | str | Mapping[str, int]) -> dict[str, int]:
    return parse_mesh_spec(mesh) if isinstance(mesh, str | Mapping) else dict(mesh.shape)


# The widths dots_jax.model.padding.pad_for_mesh can zero-pad (exactly: the padded model computes the same logits).
PADDABLE = ("intermediate_size", "vocab_size")


def check_shardable(cfg: Dots1Config, mesh: Mesh | str | Mapping[str, int]) -> None:
    """Raise one ValueError naming every dimension the mesh cannot split evenly, and the axis sizes that
    would work (the divisors of all sizes split over that axis), or, for the dense width and the vocabulary,
    the padding that makes the mesh work. Runs before anything is compiled."""
    shape = _mesh_shape(mesh)
    sizes_on: dict[str, list[int]] = {}
    for _, size, logical in _split_sizes(cfg):
        for a in _as_tuple(RULES[logical]):
            sizes_on.setdefault(a, []).append(size)
    problems = []
    for field, size, logical in _split_sizes(cfg):
        axes = _as_tuple(RULES[logical])
        n = math.prod(shape[a] for a in axes)
        if size % n:
            common = math.gcd(*(s for a in axes for s in sizes_on[a]))
            works = [d for d in range(1, common + 1) if common % d == 0]
            listed = ", ".join(map(str, works[:-1])) + (" or " if len(works) > 1 else "") + str(works[-1])
            axis = "x".join(axes)
            article = "an" if axis[0] in "aefx" else "a"  # an expert, an fsdp; a tensor, a data
            problem = f"{field}={size} is not divisible by {axis}={n}; use {article} {axis} axis of {listed}"
            if field in PADDABLE:
                problem += " or zero-pad it for this mesh: model = dots_jax.model.padding.pad_for_mesh(model, mesh)"
            problems.append(problem)
    if problems:
        raise ValueError("this mesh cannot shard the model: " + "; ".join(problems))


def padding_plan(cfg: Dots1Config, mesh: Mesh | str | Mapping[str, int], lane: int = 128) -> dict[str, tuple[int, int]]:
    """{config field: (size, padded size)} for the tensor-split widths that the tensor axis does not divide, or
    whose per-device slice is not a multiple of the TPU lane width (128): the released dense width 10944
    (85.5 x 128) always, the vocabulary at tensor >= 8. `dots_jax.model.padding.pad_for_mesh` pads the fields in
    PADDABLE exactly (zero columns/rows; the extra logits are cut off). Lane-misaligned shapes still compile and
    run, a little slower; undivided ones do not (`check_shardable`)."""
    shape = _mesh_shape(mesh)
    plan = {}
    for field, size, logical in _split_sizes(cfg):
        n = mesh_size(shape, RULES[logical])
        if logical in ("mlp", "vocab") and n > 1 and (size % n or (size // n) % lane):
            plan[field] = (size, -(-size // (n * lane)) * n * lane)
    return plan


# ------------------------------------------------------------------------------------ parameter shardings
def _logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("out_sharding")
    if axes is None:
        raise ValueError(f"{type(variable).__name__} of shape {variable.shape} carries no logical axes "
                         "(out_sharding metadata): declare it with axis names as model.py does")
    return tuple(axes)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, what: str = "array") -> P:
    """logical_to_spec, checked against the shape: a dimension the mesh cannot split evenly is an error."""
    spec = logical_to_spec(axes)
    if len(spec) != len(shape):
        raise ValueError(f"{what}: logical axes {tuple(axes)} do not match its shape {tuple(shape)}")
    for dim, (size, mesh_axes) in enumerate(zip(shape, spec, strict=True)):
        n = mesh_size(mesh, mesh_axes)
        if size % n:
            raise ValueError(f"{what}: dimension {dim} ({axes[dim]}, size {size}) is not divisible by "
                             f"{mesh_axes}={n}")
    return spec


def param_shardings(state: PyTree, mesh: Mesh) -> PyTree:
    """NamedSharding for every leaf of `state` (abstract or concrete; an nnx.State, or a TrainState whose
    optimizer moments are Variables too), with the same pytree structure: a Variable's from its logical axes
    and RULES; any other array (a step count, a load sum) replicated."""
    def one(path: tuple, leaf: nnx.Variable | jax.Array) -> NamedSharding:
        if not isinstance(leaf, nnx.Variable):
            return NamedSharding(mesh, P())
        what = jax.tree_util.keystr(path)
        return NamedSharding(mesh, spec_for(_logical_axes(leaf), leaf.shape, mesh, what))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: PyTree, mesh: Mesh) -> PyTree:
    """`state` (model state or TrainState) placed on the mesh by the table."""
    return jax.device_put(state, param_shardings(state, mesh))


# --------------------------------------------------------------------------------- activations and the cache
def with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (a tree with one sharding, or a
    jax.experimental.layout.Format, per leaf): the abstract arguments of an ahead-of-time lower or a restore."""
    leaves, treedef = jax.tree.flatten(tree)
    shard_leaves = jax.tree.leaves(shardings)  # NamedSharding and Format are leaves
    if len(leaves) != len(shard_leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(shard_leaves)} shardings")
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                              for x, s in zip(leaves, shard_leaves, strict=True)])


def batch_axes(batch: int, mesh: Mesh | jax.sharding.AbstractMesh) -> MeshAxes:
    """The longest prefix of RULES["batch"] whose sizes divide `batch` (a batch of 1 in decode stays whole,
    a batch of 8 on data=2, expert=8 splits over data only)."""
    chosen: list[str] = []
    for a in _as_tuple(RULES["batch"]):
        if batch % (mesh_size(mesh, tuple(chosen)) * mesh.shape[a]):
            break
        if mesh.shape[a] > 1:  # size-1 axes change nothing; leaving them out keeps specs readable
            chosen.append(a)
    return tuple(chosen) or None


def _divisible_or_none(size: int, axes: MeshAxes, mesh: Mesh | jax.sharding.AbstractMesh) -> MeshAxes:
    return axes if size % mesh_size(mesh, axes) == 0 else None


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
    """NamedShardings for a KVCache (dots_jax.model.cache), by the rank of each array: k/v [L, B, T, KV, D] (and an
    int8 cache's scales [L, B, T, KV]) split over the batch axes and the kv heads over tensor (each where it
    divides); positions/valid [B, T] over the batch axes; the scalar index replicated."""
    rows = batch_axes(cache.positions.shape[0], mesh)

    def leaf(x: Any) -> NamedSharding:
        if x.ndim in (4, 5):
            heads = _divisible_or_none(x.shape[3], RULES["kv_heads"], mesh)
            return NamedSharding(mesh, P(None, rows, None, heads, *[None] * (x.ndim - 4)))
        if x.ndim == 2:
            return NamedSharding(mesh, P(rows, None))
        return NamedSharding(mesh, P())

    return jax.tree.map(leaf, cache)


def current_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set with jax.set_mesh (None without one): how the model learns it runs sharded."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(f"the model runs under a mesh with axes {MESH_AXES} (dots_jax.parallel.sharding.make_mesh); "
                         f"the current mesh has axes {tuple(mesh.axis_names)}")
    return mesh


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical axes under the current mesh; a no-op without one. "batch" splits
    only over the axes that divide the batch; other dimensions the mesh cannot divide stay whole."""
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = []
    for size, name in zip(x.shape, axes, strict=True):
        mesh_axes = batch_axes(size, mesh) if name == "batch" else None if name is None else RULES[name]
        spec.append(_divisible_or_none(size, mesh_axes, mesh))
    return jax.lax.with_sharding_constraint(x, P(*spec))
