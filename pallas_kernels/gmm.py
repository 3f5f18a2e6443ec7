"""Grouped matmul for the MoE experts as Pallas kernels: TPU (Mosaic) here, GPU in gmm_mgpu.py (Mosaic GPU) and
gmm_gpu.py (Triton, deprecated).

    gmm(lhs [m, k], rhs [g_local, k, n], group_sizes [G]) -> [m, n]

Rows of lhs are sorted by group (rows [0, gs[0]) are group 0, the next gs[1] rows group 1, ...). With
group_offset o (default 0) this call owns groups o .. o + g_local - 1 and uses rhs[0 .. g_local): row i of a
group j it owns gets lhs[i] @ rhs[j - o]; every other row (other groups, rows past sum(group_sizes)) gets
zeros. An expert-parallel shard passes its first expert as o and its slice of rhs. Differentiable in lhs and
rhs through a custom VJP: d_lhs is the same kernel against rhs transposed, d_rhs the transposed product

    tgmm(lhs [m, k], d_out [m, n], group_sizes [G]) -> [g_local, k, n],  d_rhs[j] = lhs[rows of j]^T d_out[rows of j]

How the TPU kernels work. Rows are cut into tiles of tm (m is padded to a multiple of tm). The rows are then
split into "segments": the gap before our first group, each of our groups, the gap after our last group. A
grid step "visits" one (segment, row tile) pair; visits run in row order, so each output tile is visited in a
consecutive run (what lets Pallas keep it in VMEM), and a tile that straddles a group boundary is visited
once per group in it. The visit list (segment and tile of each step) is computed once in plain JAX and
scalar-prefetched into SMEM, where the BlockSpec index maps read it to choose which lhs, rhs and out blocks
to DMA. Each visit accumulates [tm, tk] @ [tk, tn] over the k grid axis in an f32 VMEM scratch and, at the
last k step, stores only the rows of its segment (a masked store). The segments partition all rows, so every
output row is written by the kernel itself, exactly once, gap rows as zeros (gap visits multiply nothing).
tgmm visits (group, tile) pairs the same way with the rows as its reduction axis, and visits an empty group
once so that its d_rhs is written (as zeros).

int8 rhs (gmm(..., rhs_scale=) with rhs_scale f32 [g_local, n], one scale per group and output column): the
kernels DMA the int8 blocks (a quarter of f32's bytes, half of bf16's) and convert each to lhs's dtype in VMEM
(on GPU: in registers) just before its dot; the f32 output is then multiplied per row by its group's scale and
rounded once, outside the kernel (x @ (q * s) = (x @ q) * s per column). The int8 rhs gets no gradient (tgmm
is not run); d_lhs is the transposed kernel on the int8 rhs, and the scale has its ordinary jnp gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.visits import make_visits

__all__ = ["choose_tiling", "gmm", "tgmm", "tgmm_tpu", "gmm_tpu"]

Tiling = tuple[int, int, int]  # (tm, tk, tn): row tile, contraction tile, output-column tile

# ------------------------------------------------------------------------------------------------ tiling
# Hand-picked for dots1 (hidden 4096, expert width 1408 = 11 x 128, shared width 2 x 1408 = 2816), sized so
# that the double-buffered blocks plus the f32 accumulator stay near 10 MiB, under the 16 MiB of VMEM Mosaic
# gives a kernel by default (v4/v5e/v5p). Every tile is a multiple of 128 or the whole dimension, in both the
# forward shapes and the swapped shapes of the backward pass (the table holds each (k, n) and its (n, k)).
# 1408 has no multiple-of-128 divisor other than 128 and itself, so n = 1408 is taken whole.
# "decode": few rows per group, so a small row tile wastes less on padding and the cost is reading rhs:
# take big k/n tiles. "prefill": enough rows per group that 512-row tiles keep the MXU busy.
_TILE_TABLE: dict[tuple[int, int], dict[str, Tiling]] = {
    (4096, 1408): {"prefill": (512, 512, 1408), "decode": (128, 1024, 1408)},   # gate / up projections
    (1408, 4096): {"prefill": (512, 1408, 512), "decode": (128, 1408, 1024)},   # down projection
    (4096, 2816): {"prefill": (512, 512, 1408), "decode": (128, 1024, 1408)},   # shared experts, gate / up
    (2816, 4096): {"prefill": (512, 1408, 512), "decode": (128, 1408, 1024)},   # shared experts, down
}
# Decode-sized when groups average fewer rows than this (a 512-row tile would then be mostly padding).
_DECODE_ROWS_PER_GROUP = 256


def _fit_tile(dim: int, preferred: int) -> int:
    """The largest multiple of 128 <= preferred that divides dim; the whole dim when there is none (a block
    equal to the full dimension is always legal for Mosaic)."""
    for tile in range(preferred - preferred % 128, 0, -128):
        if dim % tile == 0:
            return tile
    return dim


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def choose_tiling(m: int, k: int, n: int, num_groups: int = 1) -> Tiling:
    """(tm, tk, tn) for an [m, k] @ [g, k, n] grouped matmul: the table entry when (k, n) is one of dots1's
    shapes, else 512-ish k/n tiles that divide the dimension. tm is never larger than m rounded up to 16
    (16 rows is the smallest bf16 sublane tile), so tiny problems are not padded to 512 rows."""
    regime = "decode" if m < _DECODE_ROWS_PER_GROUP * max(num_groups, 1) else "prefill"
    if (k, n) in _TILE_TABLE:
        tm, tk, tn = _TILE_TABLE[(k, n)][regime]
    else:
        tm = 128 if regime == "decode" else 512
        tk, tn = _fit_tile(k, 512), _fit_tile(n, 512)
    return min(tm, _round_up(max(m, 1), 16)), tk, tn


def _check_tiling(tiling: Tiling, m: int, k: int, n: int) -> None:
    tm, tk, tn = tiling
    if tm <= 0 or tm % 8:
        raise ValueError(f"row tile tm={tm} must be a positive multiple of 8")
    for name, dim, tile in (("k", k, tk), ("n", n, tn)):
        if tile <= 0 or dim % tile:
            raise ValueError(f"tile {tile} must divide {name}={dim} (tiling {tiling} for m={m}, k={k}, n={n})")
        if tile != dim and tile % 128:
            raise ValueError(f"tile {tile} for {name}={dim} must be a multiple of 128 or the whole dimension "
                             "(Mosaic's block-shape rule)")


# ------------------------------------------------------------------------------------------------ gmm kernel


def _gmm_kernel(seg_start, seg_end, seg_id, tile_id, lhs_ref, rhs_ref, out_ref, acc_ref, *, tm: int,
                num_k_tiles: int, num_segments: int, transpose_rhs: bool) -> None:
    visit, k_step = pl.program_id(1), pl.program_id(2)
    seg = seg_id[visit]
    # Segment 0 and the last one are the gaps outside our groups: nothing to multiply, zeros to store.
    is_group = (seg > 0) & (seg < num_segments - 1)

    @pl.when(k_step == 0)
    def _zero_accumulator():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(is_group)
    def _accumulate():
        contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
        lhs, rhs = lhs_ref[...], rhs_ref[...]
        if rhs.dtype != lhs.dtype:  # an int8 rhs: dequantised (to lhs's dtype, exactly) one block at a time
            rhs = rhs.astype(jnp.float32).astype(lhs.dtype)
        acc_ref[...] += jax.lax.dot_general(lhs, rhs, (contract, ((), ())), preferred_element_type=jnp.float32)

    @pl.when(k_step == num_k_tiles - 1)
    def _store():
        rows = tile_id[visit] * tm + jax.lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
        in_segment = (rows >= seg_start[seg]) & (rows < seg_end[seg])
        # Masked store: the segments partition the rows, so each row of the tile is written by the visit of
        # its own segment (gap rows by a gap visit, as zeros) and no other visit may overwrite it.
        out_ref[...] = jnp.where(in_segment, acc_ref[...].astype(out_ref.dtype), out_ref[...])


def gmm_tpu(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array, *,
            tiling: Tiling | None, out_dtype: Any, transpose_rhs: bool = False, interpret: Any = False
            ) -> jax.Array:
    """The Mosaic gmm. transpose_rhs: rhs is [g_local, n, k] and used as its transpose (d_lhs = d_out rhs^T
    without materializing rhs^T). lhs and rhs share a float dtype, or rhs is int8 (converted per block);
    group_offset is an int32 scalar."""
    m, k = lhs.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling if tiling is not None else choose_tiling(m, k, n, group_sizes.shape[0])
    _check_tiling((tm, tk, tn), m, k, n)
    m_pad = _round_up(m, tm)
    lhs = jnp.pad(lhs, ((0, m_pad - m), (0, 0)))  # padding rows are in the "after" gap: never multiplied
    visits = make_visits(group_sizes, group_offset, num_local, m_pad, tm, gaps=True)
    num_segments = num_local + 2

    def is_group(seg):
        return (seg > 0) & (seg < num_segments - 1)

    # Gap visits pin the k block to 0, so their consecutive steps reuse the block already in VMEM instead
    # of streaming lhs and rhs they never read.
    def lhs_index(n_i, v, k_i, seg_start, seg_end, seg_id, tile_id):
        return tile_id[v], jnp.where(is_group(seg_id[v]), k_i, 0)

    def rhs_index(n_i, v, k_i, seg_start, seg_end, seg_id, tile_id):
        group = jnp.clip(seg_id[v] - 1, 0, num_local - 1)  # gaps borrow a neighbour's block: no extra DMA
        k_i = jnp.where(is_group(seg_id[v]), k_i, 0)
        return (group, n_i, k_i) if transpose_rhs else (group, k_i, n_i)

    def out_index(n_i, v, k_i, seg_start, seg_end, seg_id, tile_id):
        return tile_id[v], n_i

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    kernel = functools.partial(_gmm_kernel, tm=tm, num_k_tiles=k // tk, transpose_rhs=transpose_rhs,
                               num_segments=num_segments)
    cost = pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                           bytes_accessed=m * k * (n // tn) * lhs.dtype.itemsize
                           + num_local * k * n * rhs.dtype.itemsize + m * n * jnp.dtype(out_dtype).itemsize)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(n // tn, visits.num_visits, k // tk),
            in_specs=[pl.BlockSpec((tm, tk), lhs_index), pl.BlockSpec(rhs_block, rhs_index)],
            out_specs=pl.BlockSpec((tm, tn), out_index),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        # Column tiles are independent (megacore may split them); visits and k steps carry the accumulator
        # and revisit output tiles, so they run in order.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost,
        name="dots_gmm_t" if transpose_rhs else "dots_gmm",
    )(visits.seg_start, visits.seg_end, visits.seg_id, visits.tile_id, lhs, rhs)
    return out[:m]


# ------------------------------------------------------------------------------------------------ tgmm kernel


def _tgmm_kernel(seg_start, seg_end, seg_id, tile_id, lhs_ref, dout_ref, out_ref, acc_ref, *, tm: int) -> None:
    visit, last_visit = pl.program_id(2), pl.num_programs(2) - 1
    group = seg_id[visit]
    start, end = seg_start[group], seg_end[group]

    @pl.when((visit == 0) | (seg_id[jnp.maximum(visit - 1, 0)] != group))
    def _zero_accumulator():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(end > start)
    def _accumulate():
        def rows_of_group(block: jax.Array) -> jax.Array:
            # A select, not a multiply: rows of other groups (or garbage past the end) must add exactly 0.
            # Done in f32 because not every TPU generation has bf16 vector units.
            rows = tile_id[visit] * tm + jax.lax.broadcasted_iota(jnp.int32, block.shape, 0)
            keep = (rows >= start) & (rows < end)
            return jnp.where(keep, block.astype(jnp.float32), 0.0).astype(block.dtype)

        x, dy = rows_of_group(lhs_ref[...]), rows_of_group(dout_ref[...])
        acc_ref[...] += jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when((visit == last_visit) | (seg_id[jnp.minimum(visit + 1, last_visit)] != group))
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm_tpu(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, group_offset: jax.Array, *,
             num_local: int, tiling: Tiling | None, out_dtype: Any, interpret: Any = False) -> jax.Array:
    """The Mosaic tgmm: [g_local, k, n] with out[j] = lhs[rows of group o + j]^T @ dout[same rows]."""
    m, k = lhs.shape
    n = dout.shape[1]
    tm, tk, tn = tiling if tiling is not None else choose_tiling(m, k, n, group_sizes.shape[0])
    _check_tiling((tm, tk, tn), m, k, n)
    m_pad = _round_up(m, tm)
    lhs = jnp.pad(lhs, ((0, m_pad - m), (0, 0)))
    dout = jnp.pad(dout, ((0, m_pad - m), (0, 0)))
    visits = make_visits(group_sizes, group_offset, num_local, m_pad, tm, gaps=False)

    def lhs_index(k_i, n_i, v, seg_start, seg_end, seg_id, tile_id):
        return tile_id[v], k_i

    def dout_index(k_i, n_i, v, seg_start, seg_end, seg_id, tile_id):
        return tile_id[v], n_i

    def out_index(k_i, n_i, v, seg_start, seg_end, seg_id, tile_id):
        return seg_id[v], k_i, n_i

    itemsize = jnp.dtype(lhs.dtype).itemsize
    cost = pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                           bytes_accessed=(m * k * (n // tn) + m * n * (k // tk)) * itemsize
                           + num_local * k * n * jnp.dtype(out_dtype).itemsize)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        out_shape=jax.ShapeDtypeStruct((num_local, k, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(k // tk, n // tn, visits.num_visits),
            in_specs=[pl.BlockSpec((tm, tk), lhs_index), pl.BlockSpec((tm, tn), dout_index)],
            out_specs=pl.BlockSpec((None, tk, tn), out_index),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost,
        name="dots_tgmm",
    )(visits.seg_start, visits.seg_end, visits.seg_id, visits.tile_id, lhs, dout)


# ------------------------------------------------------------------------------------------------ public API


@dataclasses.dataclass(frozen=True)
class _Static:
    """The non-array arguments, fixed per compiled function (hashable: custom_vjp keys on them)."""

    tiling: Tiling | None
    out_dtype: np.dtype
    interpret: Any
    platform: str  # "tpu" (Mosaic; also what runs on CPU in interpret mode), "gpu" (Triton) or "mosaic_gpu"


def _kernels(platform: str):
    if platform == "gpu":
        from pallas_kernels import gmm_gpu  # imported lazily: it pulls in the Triton lowering

        return gmm_gpu.gmm_gpu, gmm_gpu.tgmm_gpu
    if platform == "mosaic_gpu":
        from pallas_kernels import gmm_mgpu  # imported lazily: it pulls in the Mosaic GPU lowering

        return gmm_mgpu.gmm_mgpu, gmm_mgpu.tgmm_mgpu
    return gmm_tpu, tgmm_tpu


def _swap(tiling: Tiling | None, platform: str) -> Tiling | None:
    """d_lhs = d_out @ rhs^T contracts over n and produces k: the forward's tn becomes its tk and back. The Mosaic GPU
    kernels keep theirs: tk is the pipeline's contraction step there (64, whatever the shape), tn the output tile."""
    if tiling is None or platform == "mosaic_gpu":
        return tiling
    return tiling[0], tiling[2], tiling[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array,
         static: _Static) -> jax.Array:
    gmm_kernel, _ = _kernels(static.platform)
    return gmm_kernel(lhs, rhs, group_sizes, group_offset, tiling=static.tiling, out_dtype=static.out_dtype,
                      interpret=static.interpret)


def _gmm_fwd(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array,
             static: _Static) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    return _gmm(lhs, rhs, group_sizes, group_offset, static), (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(static: _Static, residuals: tuple[jax.Array, ...], d_out: jax.Array
             ) -> tuple[jax.Array, jax.Array, None, None]:
    lhs, rhs, group_sizes, group_offset = residuals
    gmm_kernel, tgmm_kernel = _kernels(static.platform)
    # The kernels take one input dtype; the cotangent arrives in the output dtype.
    d_out = d_out.astype(lhs.dtype)
    # Rows outside our groups did not touch rhs: the gap visits give them a zero d_lhs, as they should.
    d_lhs = gmm_kernel(d_out, rhs, group_sizes, group_offset, tiling=_swap(static.tiling, static.platform),
                       out_dtype=lhs.dtype, transpose_rhs=True, interpret=static.interpret)
    if jnp.issubdtype(rhs.dtype, jnp.integer):  # an int8 rhs has no gradient
        return d_lhs, None, None, None
    d_rhs = tgmm_kernel(lhs, d_out, group_sizes, group_offset, num_local=rhs.shape[0], tiling=static.tiling,
                        out_dtype=rhs.dtype, interpret=static.interpret)
    return d_lhs, d_rhs, None, None  # integer inputs: no cotangent


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _platform(interpret: Any, platform: str | None) -> str:
    """Which kernels: the caller's choice, else the GPU ones on a GPU and the Mosaic ones elsewhere."""
    if platform is not None:
        if platform not in ("tpu", "gpu", "mosaic_gpu"):
            raise ValueError(f"platform must be 'tpu', 'gpu', 'mosaic_gpu' or None, got {platform!r}")
        return platform
    backend = jax.default_backend()
    if backend == "gpu":
        return "gpu"
    if backend != "tpu" and not interpret:
        raise ValueError(f"the Pallas gmm kernels run on TPU or GPU; on {backend!r} pass interpret=True")
    return "tpu"


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, group_offset: jax.Array | int | None = None,
        tiling: Tiling | None = None, preferred_element_type: Any = None, interpret: Any = False,
        platform: str | None = None, rhs_scale: jax.Array | None = None) -> jax.Array:
    """Grouped matmul lhs [m, k] x rhs [g_local, k, n] -> [m, n] (see the module docstring).

    group_sizes: int [G] over all groups (G >= g_local); group_offset: the first group this call owns
    (default 0). tiling: (tm, tk, tn), default choose_tiling(m, k, n, G). The output dtype is
    preferred_element_type, else lhs.dtype; products accumulate in f32. interpret: True (or a
    pltpu.InterpretParams) runs the TPU kernel in the Pallas interpreter, on any platform; on a GPU the
    Triton-lowered kernel of gmm_gpu.py is used; platform ("tpu" / "gpu" / "mosaic_gpu") forces one kernel family (tests
    run the GPU kernels in the interpreter this way). Differentiable in lhs and rhs.
    rhs_scale f32 [g_local, n]: rhs is int8 and the product is lhs @ (rhs * rhs_scale[:, None, :]) (see the
    module docstring); differentiable in lhs and rhs_scale.
    """
    lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes, jnp.int32)
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"gmm expects lhs [m, k], rhs [g, k, n], group_sizes [G]; got {lhs.shape}, "
                         f"{rhs.shape}, {group_sizes.shape}")
    if rhs.shape[0] > group_sizes.shape[0]:
        raise ValueError(f"rhs holds {rhs.shape[0]} groups but group_sizes only {group_sizes.shape[0]}")
    out_dtype = np.dtype(preferred_element_type if preferred_element_type is not None else lhs.dtype)
    if (rhs_scale is not None) != (rhs.dtype == jnp.int8):
        raise ValueError(f"an int8 rhs goes with its rhs_scale and only it: rhs {rhs.dtype}, rhs_scale "
                         f"{None if rhs_scale is None else rhs_scale.shape}")
    if rhs_scale is not None and tuple(rhs_scale.shape) != (rhs.shape[0], rhs.shape[2]):
        raise ValueError(f"rhs_scale {tuple(rhs_scale.shape)} does not fit rhs {tuple(rhs.shape)}: expected "
                         f"{(rhs.shape[0], rhs.shape[2])}")
    if lhs.shape[0] == 0 or rhs.shape[0] == 0:
        return jnp.zeros((lhs.shape[0], rhs.shape[2]), out_dtype)
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32).reshape(())
    platform = _platform(interpret, platform)
    tiling = None if tiling is None else tuple(tiling)
    if rhs_scale is None:
        dtype = jnp.promote_types(lhs.dtype, rhs.dtype)  # one input dtype for the kernel's dot
        return _gmm(lhs.astype(dtype), rhs.astype(dtype), group_sizes, offset,
                    _Static(tiling, out_dtype, interpret, platform))
    if not jnp.issubdtype(lhs.dtype, jnp.floating):
        lhs = lhs.astype(jnp.float32)
    out = _gmm(lhs, rhs, group_sizes, offset, _Static(tiling, np.dtype(np.float32), interpret, platform))
    return (out * _row_scales(rhs_scale, group_sizes, offset, lhs.shape[0])).astype(out_dtype)


def _row_scales(rhs_scale: jax.Array, group_sizes: jax.Array, group_offset: jax.Array, m: int) -> jax.Array:
    """f32 [m, n]: each row's group's scale (rows outside our groups borrow a neighbour's: their output is 0)."""
    ends = jnp.cumsum(group_sizes)
    group = jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)
    local = jnp.clip(group - group_offset, 0, rhs_scale.shape[0] - 1)
    return rhs_scale.astype(jnp.float32)[local]


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, group_offset: jax.Array | int | None = None,
         num_local: int | None = None, tiling: Tiling | None = None, preferred_element_type: Any = None,
         interpret: Any = False, platform: str | None = None) -> jax.Array:
    """The weight-gradient product: [num_local, k, n] with out[j] = lhs[rows of group o + j]^T dout[same rows].

    num_local defaults to all G groups. Not differentiable (it is the backward pass of gmm)."""
    lhs, dout, group_sizes = jnp.asarray(lhs), jnp.asarray(dout), jnp.asarray(group_sizes, jnp.int32)
    num_local = group_sizes.shape[0] if num_local is None else num_local
    out_dtype = np.dtype(preferred_element_type if preferred_element_type is not None else lhs.dtype)
    dtype = jnp.promote_types(lhs.dtype, dout.dtype)
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32).reshape(())
    _, tgmm_kernel = _kernels(_platform(interpret, platform))
    return tgmm_kernel(lhs.astype(dtype), dout.astype(dtype), group_sizes, offset, num_local=num_local,
                       tiling=None if tiling is None else tuple(tiling), out_dtype=out_dtype, interpret=interpret)
