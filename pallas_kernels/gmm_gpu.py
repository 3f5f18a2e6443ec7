"""GPU versions of gmm and tgmm (same arguments as gmm_tpu / tgmm_tpu in gmm.py), for Pallas' Triton lowering.

Run natively on an H100 (tests/test_gpu.py, benchmarks/gmm.py: 30 to 50% of the bf16 peak at dots1 shapes) and in
the Pallas interpreter on CPU (tests/test_pallas_gmm.py).

GPU grid programs run in parallel, so nothing may be accumulated across grid steps or written twice; the
design differs from the TPU kernel accordingly:
  gmm:  one program per output tile [tm, tn]. It loops over the groups that have rows in its row tile (a
        tile straddling a boundary computes once per group) and keeps, per row, the product with that
        row's group; rows in no group of ours stay zero. The k loop runs inside the program.
  tgmm: one program per (group, k tile, n tile) of d_rhs, looping over the row tiles of its group, masking
        rows of neighbouring groups; an empty group loops zero times and writes zeros.
Triton needs power-of-two block shapes (and dots of at least 16 x 16), hence the tiling rule below.
An int8 rhs (gmm.gmm with rhs_scale) is loaded as int8 and converted to lhs's dtype in registers before each dot;
gmm.gmm applies the scales to the f32 output.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.visits import local_bounds

__all__ = ["choose_tiling", "gmm_gpu", "tgmm_gpu"]

Tiling = tuple[int, int, int]


def _pow2_divisor(dim: int, preferred: int) -> int:
    """The largest power of two <= preferred that divides dim."""
    tile = preferred
    while dim % tile:
        tile //= 2
    return tile


def choose_tiling(m: int, k: int, n: int, num_groups: int = 1) -> Tiling:
    """(tm, tk, tn): 64 x 64 x 128 tiles (a common Triton matmul shape), each the largest power of two up to
    that which divides its dimension; tm shrinks for tiny m (but not below 16, Triton's smallest dot)."""
    del num_groups
    tm = 64
    while tm > 16 and tm // 2 >= m:
        tm //= 2
    return tm, _pow2_divisor(k, 64), _pow2_divisor(n, 128)


def _check_tiling(tiling: Tiling, k: int, n: int) -> None:
    for name, dim, tile in (("tm", None, tiling[0]), ("k", k, tiling[1]), ("n", n, tiling[2])):
        if tile <= 0 or tile & (tile - 1):
            raise ValueError(f"GPU tile {tile} ({name}) must be a power of two (Triton block shapes)")
        if dim is not None and dim % tile:
            raise ValueError(f"GPU tile {tile} must divide {name}={dim}")


def _pad_pow2(x: jax.Array) -> jax.Array:
    """Small metadata vectors are loaded whole: Triton wants power-of-two lengths."""
    size = 1 << max(0, (x.shape[0] - 1).bit_length())
    return jnp.pad(x, (0, size - x.shape[0]))


def _precision(x: jax.Array) -> jax.lax.Precision | None:
    """f32 operands in full f32 (Triton's default for them is TF32, a 1e-3 relative error); bf16 as is."""
    return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def _whole(shape: tuple[int, ...]) -> pl.BlockSpec:
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


# ------------------------------------------------------------------------------------------------ gmm


def _gmm_kernel(starts_ref, ends_ref, first_ref, last_ref, lhs_ref, rhs_ref, out_ref, *, tm: int, tk: int,
                tn: int, num_k_tiles: int, transpose_rhs: bool) -> None:
    t, j = pl.program_id(0), pl.program_id(1)
    rows = t * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)

    def product(group: jax.Array) -> jax.Array:
        def k_step(kk: jax.Array, acc: jax.Array) -> jax.Array:
            x = lhs_ref[pl.ds(t * tm, tm), pl.ds(kk * tk, tk)]
            if transpose_rhs:
                w = rhs_ref[group, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)]
            else:
                w = rhs_ref[group, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)]
            # An int8 rhs is converted in registers, one block per k step (exact in lhs's dtype).
            w = w.astype(x.dtype)
            return acc + plt.dot(x, w, trans_b=transpose_rhs, precision=_precision(x))

        return jax.lax.fori_loop(0, num_k_tiles, k_step, jnp.zeros((tm, tn), jnp.float32))

    def one_group(group: jax.Array, out: jax.Array) -> jax.Array:
        start, end = starts_ref[group], ends_ref[group]
        # Empty groups inside the tile's range own no rows: skip their matmul.
        return jax.lax.cond(end > start,
                            lambda: jnp.where((rows >= start) & (rows < end), product(group), out),
                            lambda: out)

    out = jax.lax.fori_loop(first_ref[t], last_ref[t] + 1, one_group, jnp.zeros((tm, tn), jnp.float32))
    out_ref[...] = out.astype(out_ref.dtype)


def gmm_gpu(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array, *,
            tiling: Tiling | None, out_dtype: Any, transpose_rhs: bool = False, interpret: Any = False
            ) -> jax.Array:
    m, k = lhs.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling if tiling is not None else choose_tiling(m, k, n)
    _check_tiling((tm, tk, tn), k, n)
    m_pad = -(-m // tm) * tm
    lhs = jnp.pad(lhs, ((0, m_pad - m), (0, 0)))
    starts, ends = local_bounds(group_sizes, group_offset, num_local)
    tile_start = jnp.arange(m_pad // tm, dtype=jnp.int32) * tm
    # Our groups with rows in each tile: from the first ending after its start to the last starting before
    # its end (an empty range, first > last, for tiles outside our groups: they are written as zeros).
    first = jnp.searchsorted(ends, tile_start, side="right").astype(jnp.int32)
    last = (jnp.searchsorted(starts, tile_start + tm, side="left") - 1).astype(jnp.int32)
    meta = [_pad_pow2(a) for a in (starts, ends, first, last)]
    kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, num_k_tiles=k // tk, transpose_rhs=transpose_rhs)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
        grid=(m_pad // tm, n // tn),
        in_specs=[*(_whole(a.shape) for a in meta), _whole(lhs.shape), _whole(rhs.shape)],
        out_specs=pl.BlockSpec((tm, tn), lambda t, j: (t, j)),
        interpret=interpret,
        name="dots_gmm_gpu_t" if transpose_rhs else "dots_gmm_gpu",
    )(*meta, lhs, rhs)
    return out[:m]


# ------------------------------------------------------------------------------------------------ tgmm


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, dout_ref, out_ref, *, tm: int, tk: int, tn: int) -> None:
    group, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[group], ends_ref[group]

    def rows_of_group(block: jax.Array, row0: jax.Array) -> jax.Array:
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, block.shape, 0)
        return jnp.where((rows >= start) & (rows < end), block, jnp.zeros_like(block))  # select: 0 * NaN

    def row_tile(t: jax.Array, acc: jax.Array) -> jax.Array:
        x = rows_of_group(lhs_ref[pl.ds(t * tm, tm), pl.ds(i * tk, tk)], t * tm)
        dy = rows_of_group(dout_ref[pl.ds(t * tm, tm), pl.ds(j * tn, tn)], t * tm)
        return acc + plt.dot(x, dy, trans_a=True, precision=_precision(x))

    first_tile = start // tm
    end_tile = jnp.where(end > start, (end + tm - 1) // tm, first_tile)  # empty group: no iterations
    acc = jax.lax.fori_loop(first_tile, end_tile, row_tile, jnp.zeros((tk, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def tgmm_gpu(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, group_offset: jax.Array, *,
             num_local: int, tiling: Tiling | None, out_dtype: Any, interpret: Any = False) -> jax.Array:
    m, k = lhs.shape
    n = dout.shape[1]
    tm, tk, tn = tiling if tiling is not None else choose_tiling(m, k, n)
    _check_tiling((tm, tk, tn), k, n)
    m_pad = -(-m // tm) * tm
    lhs = jnp.pad(lhs, ((0, m_pad - m), (0, 0)))
    dout = jnp.pad(dout, ((0, m_pad - m), (0, 0)))
    meta = [_pad_pow2(a) for a in local_bounds(group_sizes, group_offset, num_local)]
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn),
        out_shape=jax.ShapeDtypeStruct((num_local, k, n), out_dtype),
        grid=(num_local, k // tk, n // tn),
        in_specs=[*(_whole(a.shape) for a in meta), _whole(lhs.shape), _whole(dout.shape)],
        out_specs=pl.BlockSpec((None, tk, tn), lambda g, i, j: (g, i, j)),
        interpret=interpret,
        name="dots_tgmm_gpu",
    )(*meta, lhs, dout)
