"""Grouped matrix multiplication ("gmm") for the MoE layer, with swappable backends.

    gmm(lhs [m, k], rhs [g, k, n], group_sizes int32 [g]) -> [m, n]

The rows of `lhs` are sorted by group: rows [0, gs[0]) use rhs[0], the next gs[1] rows use rhs[1], and so
on. Rows at or past sum(group_sizes) belong to no group and produce zeros (their lhs gradient is zero too).
The caller promises sum(group_sizes) <= m; nothing checks it because group_sizes is usually a traced value.
If the promise is broken, rows past m simply do not exist and the last groups are cut short.

Backends (all take the same arguments and agree to float rounding):
  "ragged_dot"  jax.lax.ragged_dot. Native on GPU/TPU; XLA:CPU lowers it to a masked dense product in which
                every row meets every group (g times the work), so it is slow on CPU.
  "dense"       the obviously-correct reference: every row times every group, then a one-hot select.
                Slow and memory hungry ([g, m, n] intermediate); for tests and small problems.
  "loop"        the fast one on CPU: pads each group to a multiple of a row tile, then loops over the tiles
                that hold real rows, one small [T, k] @ [k, n] matmul each, with a hand-written backward.
  "gather"      one weight matrix gathered per row: reads only the chosen groups; best for decode (2m <= g).
  "pallas"      our Pallas kernels (pallas_kernels/gmm.py): Mosaic on TPU, Triton-lowered on GPU; on CPU the
                TPU kernel runs in the Pallas interpreter (slow: for tests, never picked by "auto" on CPU).
"auto" picks default_backend(m, g): "pallas" on TPU, "ragged_dot" on GPU (until the Triton kernel has run on a
GPU: ask for "pallas" to use it), on CPU "gather" when 2m <= g, else "loop".

expert_ffn_loop() is the whole SwiGLU expert FFN (gate, up, SiLU, down) on the "loop" layout, in one loop forward
and one backward instead of three gmm loops each; moe.expert_ffn uses it whenever the backend resolves to "loop".

register_backend() adds a backend (for example a Pallas kernel) without touching any caller.
All backends accumulate in f32 and cast once to the output dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BACKENDS", "default_backend", "expert_ffn_loop", "gmm", "gmm_dense", "gmm_gather", "gmm_loop", "gmm_pallas",
           "gmm_ragged_dot", "loop_row_tile", "register_backend", "round_to", "silu"]

# A backend is fn(lhs, rhs, group_sizes, preferred_element_type) -> [m, n] array of dtype
# preferred_element_type. gmm() always passes a concrete dtype there (never None), and it has already
# checked shapes, cast lhs and rhs to one dtype and cast group_sizes to int32.
Backend = Callable[[jax.Array, jax.Array, jax.Array, jnp.dtype], jax.Array]


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, backend: str = "auto",
        preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """Grouped matmul: lhs [m, k], rhs [g, k, n], group_sizes int [g] -> [m, n].

    Rows of lhs are sorted by group: rows [0, gs[0]) use rhs[0], the next gs[1] rows use rhs[1], and so on.
    Rows at or past sum(group_sizes) produce zeros. Assumes sum(group_sizes) <= m (not checked: group_sizes
    is usually traced). Works under jax.jit (shapes static, group_sizes traced) and is differentiable with
    respect to lhs and rhs. The output dtype is preferred_element_type if given, else lhs.dtype; products
    are accumulated in f32 and cast once.
    """
    if backend == "auto":
        backend = default_backend(lhs.shape[0], rhs.shape[0])
    if backend not in BACKENDS:
        raise ValueError(f"unknown gmm backend {backend!r}; known backends: {sorted(BACKENDS)} (or 'auto')")
    lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
    _check_shapes(lhs, rhs, group_sizes)
    out_dtype = jnp.dtype(preferred_element_type if preferred_element_type is not None else lhs.dtype)
    # One compute dtype for both operands, so that no backend meets a mixed-dtype dot; promotion never loses
    # precision (bf16 with f32 computes in f32).
    compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    lhs, rhs = lhs.astype(compute_dtype), rhs.astype(compute_dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    m, n = lhs.shape[0], rhs.shape[2]
    if m == 0 or rhs.shape[0] == 0:
        # No rows, or no groups (then every row is past the end): the answer is all zeros.
        return jnp.zeros((m, n), out_dtype)
    return BACKENDS[backend](lhs, rhs, group_sizes, out_dtype)


def register_backend(name: str, fn: Backend) -> None:
    """Add (or replace) a gmm backend: fn(lhs, rhs, group_sizes, preferred_element_type) -> [m, n].

    See the `Backend` comment above for what fn may assume about its arguments.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"backend name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(fn):
        raise TypeError(f"backend {name!r} must be callable, got {type(fn).__name__}")
    BACKENDS[name] = fn


def default_backend(m: int | None = None, g: int | None = None) -> str:
    """'pallas' on TPU and GPU (on an H100 our Triton kernel ran 3.5x to 7x faster than XLA's ragged_dot at dots1
    shapes, and ragged_dot's gradient ran out of memory on a 1.3B model; benchmarks/gmm.py). On CPU, where ragged_dot is
    a g-times-too-much masked product and Pallas only interprets: 'gather' for decode-sized problems (2m <= g
    rows: it reads only the chosen experts' weights; measured, it loses to 'loop' from about m = g on, see
    benchmarks/gmm_cpu.py), else 'loop'."""
    if jax.default_backend() != "cpu":
        return "pallas"
    return "gather" if m is not None and g is not None and 2 * m <= g else "loop"


def _check_shapes(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"gmm expects lhs [m, k], rhs [g, k, n], group_sizes [g]; got lhs {lhs.shape}, "
                         f"rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    if lhs.shape[1] != rhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(f"gmm shape mismatch: lhs {lhs.shape}, rhs {rhs.shape}, group_sizes "
                         f"{group_sizes.shape} (need lhs [m, k], rhs [g, k, n], group_sizes [g])")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}")


def _row_groups(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """Group id of each of the m rows (clamped into [0, g)) and whether the row belongs to any group."""
    ends = jnp.cumsum(group_sizes)
    rows = jnp.arange(m, dtype=jnp.int32)
    # The number of groups ending at or before row i is row i's group. Empty groups end where the previous
    # one did, so they are counted and skipped correctly.
    group = jnp.searchsorted(ends, rows, side="right", method="compare_all").astype(jnp.int32)
    valid = rows < ends[-1]
    return jnp.minimum(group, group_sizes.shape[0] - 1), valid


def round_to(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x cast to dtype with a rounding XLA keeps. With its default --xla_allow_excess_precision, XLA may drop an
    f32 -> bf16 cast whose result is upcast again by the next fused op (an add, an RMSNorm's f32 statistics, the
    SiLU after a gmm), so that op sees more bits than transformers' bf16 tensor holds: measured p99 20 bf16 ulps
    per element after one decoder layer, and the "gather" and "dense" models' bf16 logits 0.4 of bf16's own error
    away from transformers' in median (tests/test_bf16_blocks.py, tests/test_backend_parity.py).
    reduce_precision is not elided and rounds to nearest even, as the cast does."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < jnp.finfo(x.dtype).bits:
        info = jnp.finfo(dtype)
        x = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return x.astype(dtype)


# ---------------------------------------------------------------------------------------------------------
# "ragged_dot"


def gmm_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                   preferred_element_type: jnp.dtype) -> jax.Array:
    """jax.lax.ragged_dot, accumulating in f32, with rows past sum(group_sizes) masked to zero."""
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    # XLA:CPU's lowering already zeroes rows past the last group (checked in the tests), but native GPU/TPU
    # kernels may leave them unwritten, and the select is cheap next to the matmul.
    _, valid = _row_groups(group_sizes, lhs.shape[0])
    return round_to(jnp.where(valid[:, None], out, 0.0), preferred_element_type)


# ---------------------------------------------------------------------------------------------------------
# "dense"


def gmm_dense(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
              preferred_element_type: jnp.dtype) -> jax.Array:
    """Reference: out[i] = sum_g [row i is in group g] * (lhs @ rhs[g])[i]. Clarity over speed."""
    num_groups = rhs.shape[0]
    group, valid = _row_groups(group_sizes, lhs.shape[0])
    one_hot = (group[None, :] == jnp.arange(num_groups, dtype=jnp.int32)[:, None]) & valid[None, :]  # [g, m]
    every_product = jnp.einsum("mk,gkn->gmn", lhs, rhs, preferred_element_type=jnp.float32)
    # A select, not a multiply by the mask: a non-finite row past the end must still give exactly zero.
    out = jnp.where(one_hot[:, :, None], every_product, 0.0).sum(axis=0)
    return round_to(out, preferred_element_type)


# ---------------------------------------------------------------------------------------------------------
# "loop"
#
# Layout: each group is padded up to a multiple of the row tile T, so that every tile of T rows belongs to
# exactly one group. At most num_tiles = (m + g * (T - 1)) // T tiles are needed (each group wastes at most
# T - 1 padding rows). The real rows are gathered into that padded layout, a fori_loop runs over the tiles
# that hold real rows (a traced trip count, so no time is spent on tiles that are all padding) doing
# [T, k] @ rhs[group of tile], and the results are gathered back. Padding slots hold zeros, so they add
# nothing to any gradient.


class _TileLayout(NamedTuple):
    tile: int                # T, static
    num_tiles: int           # static upper bound on the number of tiles
    num_used_tiles: jax.Array  # int32 scalar: tiles holding at least one real row (the loop's trip count)
    tile_group: jax.Array    # int32 [num_tiles]: group of each tile (unused tiles clamped to g - 1)
    slot_row: jax.Array      # int32 [num_tiles * T]: the lhs row held by each padded slot (0 for padding)
    slot_valid: jax.Array    # bool [num_tiles * T]: whether the slot holds a real row
    row_slot: jax.Array      # int32 [m]: the padded slot of each lhs row (0 for rows past the end)
    row_valid: jax.Array     # bool [m]: whether the row belongs to a group


def loop_row_tile(m: int, g: int) -> int:
    """Row tile T for the "loop" backend: next_pow2(ceil(mean group size / 2)), clamped to [16, 64].

    Chosen by measurement on XLA:CPU (2 cores; benchmarks/gmm_cpu.py --tile-sweep 8 16 32 64 128). Two costs
    pull against each other: padding (each group wastes up to T - 1 rows, so T far above the mean group size
    multiplies the work) and per-tile cost (loop step, copying rhs[g], small-matmul inefficiency, so tiny T
    is slow). About half the mean group size was best or within noise of best at every shape tried; T = 8
    never beat 16, and T = 128 never beat 64, even with groups of ~200 rows.
    """
    mean_group = -(-m // max(g, 1))
    half_mean = max(1, -(-mean_group // 2))
    tile = 1 << (half_mean - 1).bit_length()  # the smallest power of two >= half_mean
    return int(min(max(tile, 16), 64))


def _tile_layout(group_sizes: jax.Array, m: int, tile: int) -> _TileLayout:
    num_groups = group_sizes.shape[0]
    num_tiles = (m + num_groups * (tile - 1)) // tile
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    tiles_per_group = (group_sizes + tile - 1) // tile
    tile_ends = jnp.cumsum(tiles_per_group)
    tile_starts = tile_ends - tiles_per_group

    # Group of each tile: the number of groups whose tiles all end at or before it (empty groups own no tile
    # and are skipped by the same count). Tiles past the last used one count g; clamp them to a real group
    # so every index stays in range, and mark their slots as padding.
    tiles = jnp.arange(num_tiles, dtype=jnp.int32)
    raw_group = jnp.searchsorted(tile_ends, tiles, side="right", method="compare_all").astype(jnp.int32)
    tile_group = jnp.minimum(raw_group, num_groups - 1)
    # Offset of each slot inside its group's padded block; the slot is real when the offset is < group size.
    offset = (tiles - tile_starts[tile_group])[:, None] * tile + jnp.arange(tile, dtype=jnp.int32)[None, :]
    slot_valid = (raw_group < num_groups)[:, None] & (offset < group_sizes[tile_group][:, None])
    slot_row = jnp.where(slot_valid, starts[tile_group][:, None] + offset, 0)

    row_group, row_valid = _row_groups(group_sizes, m)
    rows = jnp.arange(m, dtype=jnp.int32)
    row_slot = jnp.where(row_valid, tile_starts[row_group] * tile + (rows - starts[row_group]), 0)
    return _TileLayout(tile=tile, num_tiles=num_tiles, num_used_tiles=tile_ends[-1], tile_group=tile_group,
                       slot_row=slot_row.reshape(-1), slot_valid=slot_valid.reshape(-1), row_slot=row_slot,
                       row_valid=row_valid)


def _to_slots(rows: jax.Array, layout: _TileLayout) -> jax.Array:
    """[m, d] rows -> [num_tiles * T, d] padded layout, zeros in padding slots."""
    gathered = jnp.take(rows, layout.slot_row, axis=0, mode="clip")
    return jnp.where(layout.slot_valid[:, None], gathered, jnp.zeros((), rows.dtype))


def _from_slots(slots: jax.Array, layout: _TileLayout) -> jax.Array:
    """[num_tiles * T, d] padded layout -> [m, d] rows, zeros for rows past the last group."""
    gathered = jnp.take(slots, layout.row_slot, axis=0, mode="clip")
    return jnp.where(layout.row_valid[:, None], gathered, jnp.zeros((), slots.dtype))


def _loop_forward(lhs: jax.Array, rhs: jax.Array, layout: _TileLayout) -> jax.Array:
    """f32 [m, n] = grouped lhs @ rhs, by one [T, k] @ [k, n] matmul per used tile."""
    tile = layout.tile
    lhs_slots = _to_slots(lhs, layout)

    def one_tile(t: jax.Array, out_slots: jax.Array) -> jax.Array:
        x = jax.lax.dynamic_slice_in_dim(lhs_slots, t * tile, tile, axis=0)
        w = jax.lax.dynamic_index_in_dim(rhs, layout.tile_group[t], axis=0, keepdims=False)  # [k, n]
        y = jnp.dot(x, w, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(out_slots, y, t * tile, axis=0)

    out_slots = jnp.zeros((layout.num_tiles * tile, rhs.shape[2]), jnp.float32)
    out_slots = jax.lax.fori_loop(0, layout.num_used_tiles, one_tile, out_slots)
    return _from_slots(out_slots, layout)


def transposed(a: jax.Array) -> jax.Array:
    """a.T as a materialised row-major array, for weight gradients a^T @ dy. Left to itself XLA:CPU fuses the
    transpose into the dot and contracts over the leading dimension of both operands, a slow GEMM layout:
    measured 2x slower for one [64, 256]^T @ [64, 128] row tile (0.29 vs 0.14 ms), the loops' weight gradient."""
    return jax.lax.optimization_barrier(a.T)


def _loop_backward(lhs: jax.Array, rhs: jax.Array, d_out: jax.Array,
                   layout: _TileLayout) -> tuple[jax.Array, jax.Array]:
    """f32 (d_lhs [m, k], d_rhs [g, k, n]) in one pass over the used tiles.

    Per tile t of group g: d_x_t = d_y_t @ rhs[g]^T, and d_rhs[g] += x_t^T @ d_y_t, accumulated in place in
    a [g, k, n] carry (read-add-write of one [k, n] slice, never a full-size temporary). Padding slots hold
    zeros in both x and d_y, so they add nothing; tiles past the used ones are never visited.
    """
    tile = layout.tile
    lhs_slots = _to_slots(lhs, layout)
    d_out_slots = _to_slots(d_out, layout)

    def one_tile(t: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        d_lhs_slots, d_rhs = carry
        group = layout.tile_group[t]
        x = jax.lax.dynamic_slice_in_dim(lhs_slots, t * tile, tile, axis=0)  # [T, k]
        dy = jax.lax.dynamic_slice_in_dim(d_out_slots, t * tile, tile, axis=0)  # [T, n]
        w = jax.lax.dynamic_index_in_dim(rhs, group, axis=0, keepdims=False)  # [k, n]
        # Contract over n directly. Materializing rhs^T ([g, n, k]) up front measured slower on XLA:CPU:
        # the full transpose costs more than the per-tile transposed-operand matmuls it saves.
        dx = jnp.einsum("tn,kn->tk", dy, w, preferred_element_type=jnp.float32)
        d_lhs_slots = jax.lax.dynamic_update_slice_in_dim(d_lhs_slots, dx, t * tile, axis=0)
        dw = jnp.dot(transposed(x), dy, preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_index_in_dim(d_rhs, group, axis=0, keepdims=True)  # [1, k, n]
        d_rhs = jax.lax.dynamic_update_index_in_dim(d_rhs, old + dw[None], group, axis=0)
        return d_lhs_slots, d_rhs

    d_lhs_slots = jnp.zeros((layout.num_tiles * tile, lhs.shape[1]), jnp.float32)
    d_rhs = jnp.zeros(rhs.shape, jnp.float32)
    d_lhs_slots, d_rhs = jax.lax.fori_loop(0, layout.num_used_tiles, one_tile, (d_lhs_slots, d_rhs))
    return _from_slots(d_lhs_slots, layout), d_rhs


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_loop(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, out_dtype: np.dtype,
              tile: int) -> jax.Array:
    layout = _tile_layout(group_sizes, lhs.shape[0], tile)
    return round_to(_loop_forward(lhs, rhs, layout), out_dtype)


def _gmm_loop_fwd(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, out_dtype: np.dtype,
                  tile: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    # Keep only the inputs: the layout is a few cheap integer ops to rebuild, and the padded copies of lhs
    # would cost more memory than lhs itself.
    return _gmm_loop(lhs, rhs, group_sizes, out_dtype, tile), (lhs, rhs, group_sizes)


def _gmm_loop_bwd(out_dtype: np.dtype, tile: int, residuals: tuple[jax.Array, jax.Array, jax.Array],
                  d_out: jax.Array) -> tuple[jax.Array, jax.Array, None]:
    del out_dtype  # the cotangent already has the output dtype
    lhs, rhs, group_sizes = residuals
    layout = _tile_layout(group_sizes, lhs.shape[0], tile)
    d_lhs, d_rhs = _loop_backward(lhs, rhs, d_out, layout)
    # group_sizes is integer: no cotangent (None means zero).
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype), None


_gmm_loop.defvjp(_gmm_loop_fwd, _gmm_loop_bwd)


def gmm_loop(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, preferred_element_type: jnp.dtype,
             *, tile: int | None = None) -> jax.Array:
    """Tiled loop backend. `tile` overrides loop_row_tile(m, g) (tests and benchmarks use it).

    Differentiable once (custom VJP; its backward is itself a loop with a traced trip count, so there is no
    second derivative).
    """
    if tile is None:
        tile = loop_row_tile(lhs.shape[0], rhs.shape[0])
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    return _gmm_loop(lhs, rhs, group_sizes, np.dtype(preferred_element_type), int(tile))


# ---------------------------------------------------------------------------------------------------------
# Fused SwiGLU expert FFN on the "loop" layout
#
# expert_ffn = three gmm calls (gate, up, down) with the SwiGLU between them. With the "loop" backend that is
# three forward and three backward loops, each gathering into and out of the padded layout, and the SwiGLU and
# its gradient materialised at full size in between. On CPU, at the shapes we train, each loop step is a few
# tiny matmuls and per-step overhead dominates, so one loop that does all of a tile's work (forward: 3 matmuls;
# backward: 6) is cheaper. The numerics follow the unfused path: products accumulate in f32 and are cast to
# the activation dtype where gmm casts; SiLU and its derivative are computed in f32 (as silu below does).


def silu(x: jax.Array) -> jax.Array:
    """SiLU computed in f32 and cast back, as torch does for bf16 inputs. Lives here, not in moe (which imports
    this module), so that the fused expert loop and the unfused path share it."""
    return round_to(jax.nn.silu(x.astype(jnp.float32)), x.dtype)


def expert_ffn_loop(rows: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, group_sizes: jax.Array,
                    *, tile: int | None = None) -> jax.Array:
    """SwiGLU experts on grouped rows: out = (silu(rows @ gate[g]) * (rows @ up[g])) @ down[g] per group g.

    rows [m, H] sorted by group, gate/up [g, H, I], down [g, I, H], group_sizes int [g] (sum <= m, not
    checked). Rows at or past sum(group_sizes) give zeros (and a zero row gradient). Returns [m, H] in
    rows.dtype; the weights are cast to rows.dtype first, as moe.expert_ffn does for gmm. Equal to
    gmm(silu(gmm(rows, gate)) * gmm(rows, up), down) with the "loop" backend, in one loop over the row tiles
    forward and one backward (custom VJP; differentiable once). `tile` overrides loop_row_tile(m, g).
    """
    rows, group_sizes = jnp.asarray(rows), jnp.asarray(group_sizes)
    dtype = rows.dtype
    gate, up, down = (jnp.asarray(w).astype(dtype) for w in (gate, up, down))
    _check_shapes(rows, gate, group_sizes)
    if up.shape != gate.shape or down.shape != (gate.shape[0], gate.shape[2], rows.shape[1]):
        raise ValueError(f"expert_ffn_loop expects gate/up [g, H, I] and down [g, I, H]; got gate {gate.shape}, "
                         f"up {up.shape}, down {down.shape}, rows {rows.shape}")
    m, num_groups = rows.shape[0], gate.shape[0]
    if tile is None:
        tile = loop_row_tile(m, num_groups)
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    if m == 0 or num_groups == 0:
        return jnp.zeros(rows.shape, dtype)
    return _ffn_loop(rows, gate, up, down, group_sizes.astype(jnp.int32), int(tile))


def _ffn_loop_forward(rows: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, layout: _TileLayout,
                      keep_activations: bool) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(out [m, H], h_gate slots, h_up slots), in rows.dtype. The slots ([num_tiles * T, I], the backward's
    residuals) are written only when keep_activations (under differentiation); else they are None."""
    tile, dtype = layout.tile, rows.dtype
    x_slots = _to_slots(rows, layout)

    def one_tile(t: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        group = layout.tile_group[t]
        x = jax.lax.dynamic_slice_in_dim(x_slots, t * tile, tile, axis=0)  # [T, H]
        w_gate = jax.lax.dynamic_index_in_dim(gate, group, axis=0, keepdims=False)  # [H, I]
        w_up = jax.lax.dynamic_index_in_dim(up, group, axis=0, keepdims=False)
        w_down = jax.lax.dynamic_index_in_dim(down, group, axis=0, keepdims=False)  # [I, H]
        h_gate = jnp.dot(x, w_gate, preferred_element_type=jnp.float32).astype(dtype)
        h_up = jnp.dot(x, w_up, preferred_element_type=jnp.float32).astype(dtype)
        y = jnp.dot(silu(h_gate) * h_up, w_down, preferred_element_type=jnp.float32).astype(dtype)
        written = (y, h_gate, h_up) if keep_activations else (y,)
        return tuple(jax.lax.dynamic_update_slice_in_dim(slots, value, t * tile, axis=0)
                     for slots, value in zip(carry, written, strict=True))

    num_slots, inner = layout.num_tiles * tile, gate.shape[2]
    init = (jnp.zeros((num_slots, rows.shape[1]), dtype),)
    if keep_activations:
        init += (jnp.zeros((num_slots, inner), dtype), jnp.zeros((num_slots, inner), dtype))
    out_slots, *activations = jax.lax.fori_loop(0, layout.num_used_tiles, one_tile, init)
    gate_slots, up_slots = activations if keep_activations else (None, None)
    return _from_slots(out_slots, layout), gate_slots, up_slots


def _ffn_loop_backward(rows: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, gate_slots: jax.Array,
                       up_slots: jax.Array, d_out: jax.Array, layout: _TileLayout
                       ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(d_rows [m, H], d_gate, d_up, d_down), all f32, in one pass over the used tiles.

    Per tile of group g, with h_gate and h_up saved by the forward and s = silu(h_gate):
      dh = dy @ down[g]^T;  d_down[g] += h^T @ dy  where h = s * h_up
      dh_up = dh * s;  dh_gate = dh * h_up * silu'(h_gate)
      dx = dh_gate @ gate[g]^T + dh_up @ up[g]^T;  d_gate[g] += x^T @ dh_gate;  d_up[g] += x^T @ dh_up
    dh, dh_up and dh_gate are rounded to the activation dtype where autodiff of the unfused path rounds them
    (dx is summed in f32 and rounded once, where the unfused path rounds both terms first). The weight
    gradients accumulate in place in f32 carries, as in _loop_backward. Padding slots hold zeros in x and dy,
    so they add nothing.
    """
    tile, dtype = layout.tile, rows.dtype
    # The rows are gathered again rather than saved padded: the padded copy is up to g * (T - 1) rows larger,
    # and saving it measured no faster (a 1.28x vs 1.27x CPU-time gain over the unfused path at the small config).
    x_slots = _to_slots(rows, layout)
    dy_slots = _to_slots(d_out.astype(dtype), layout)

    def accumulate(acc: jax.Array, group: jax.Array, update: jax.Array) -> jax.Array:
        old = jax.lax.dynamic_index_in_dim(acc, group, axis=0, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(acc, old + update[None], group, axis=0)

    def one_tile(t: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        dx_slots, d_gate, d_up, d_down = carry
        group = layout.tile_group[t]
        x = jax.lax.dynamic_slice_in_dim(x_slots, t * tile, tile, axis=0)  # [T, H]
        dy = jax.lax.dynamic_slice_in_dim(dy_slots, t * tile, tile, axis=0)  # [T, H]
        h_gate = jax.lax.dynamic_slice_in_dim(gate_slots, t * tile, tile, axis=0)  # [T, I]
        h_up = jax.lax.dynamic_slice_in_dim(up_slots, t * tile, tile, axis=0)
        w_gate = jax.lax.dynamic_index_in_dim(gate, group, axis=0, keepdims=False)  # [H, I]
        w_up = jax.lax.dynamic_index_in_dim(up, group, axis=0, keepdims=False)
        w_down = jax.lax.dynamic_index_in_dim(down, group, axis=0, keepdims=False)  # [I, H]

        gate_f32 = h_gate.astype(jnp.float32)
        sigmoid = jax.nn.sigmoid(gate_f32)
        s = (gate_f32 * sigmoid).astype(dtype)  # silu(h_gate), rounded as the forward rounded it
        dh = jnp.einsum("th,ih->ti", dy, w_down, preferred_element_type=jnp.float32).astype(dtype)
        d_down = accumulate(d_down, group, jnp.dot(transposed(s * h_up), dy, preferred_element_type=jnp.float32))
        dh_up = dh * s
        # silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z))), in f32 like the forward SiLU.
        silu_grad = sigmoid * (1.0 + gate_f32 * (1.0 - sigmoid))
        dh_gate = ((dh * h_up).astype(jnp.float32) * silu_grad).astype(dtype)
        dx = (jnp.einsum("ti,hi->th", dh_gate, w_gate, preferred_element_type=jnp.float32)
              + jnp.einsum("ti,hi->th", dh_up, w_up, preferred_element_type=jnp.float32))
        dx_slots = jax.lax.dynamic_update_slice_in_dim(dx_slots, dx, t * tile, axis=0)
        x_t = transposed(x)
        d_gate = accumulate(d_gate, group, jnp.dot(x_t, dh_gate, preferred_element_type=jnp.float32))
        d_up = accumulate(d_up, group, jnp.dot(x_t, dh_up, preferred_element_type=jnp.float32))
        return dx_slots, d_gate, d_up, d_down

    init = (jnp.zeros((layout.num_tiles * tile, rows.shape[1]), jnp.float32), jnp.zeros(gate.shape, jnp.float32),
            jnp.zeros(up.shape, jnp.float32), jnp.zeros(down.shape, jnp.float32))
    dx_slots, d_gate, d_up, d_down = jax.lax.fori_loop(0, layout.num_used_tiles, one_tile, init)
    return _from_slots(dx_slots, layout), d_gate, d_up, d_down


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ffn_loop(rows: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, group_sizes: jax.Array,
              tile: int) -> jax.Array:
    layout = _tile_layout(group_sizes, rows.shape[0], tile)
    return _ffn_loop_forward(rows, gate, up, down, layout, keep_activations=False)[0]


def _ffn_loop_fwd(rows: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, group_sizes: jax.Array,
                  tile: int) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    # h_gate and h_up are kept (padded layout, activation dtype) rather than recomputed in the backward:
    # recomputing them costs two more matmuls per tile, and measured slower (fwd+bwd of moe_experts vs the
    # unfused path: 1.20x instead of 1.30x at the small config, 0.94x instead of 1.11x at the medium one).
    layout = _tile_layout(group_sizes, rows.shape[0], tile)
    out, gate_slots, up_slots = _ffn_loop_forward(rows, gate, up, down, layout, keep_activations=True)
    return out, (rows, gate, up, down, group_sizes, gate_slots, up_slots)


def _ffn_loop_bwd(tile: int, residuals: tuple[jax.Array, ...], d_out: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, None]:
    rows, gate, up, down, group_sizes, gate_slots, up_slots = residuals
    layout = _tile_layout(group_sizes, rows.shape[0], tile)
    d_rows, d_gate, d_up, d_down = _ffn_loop_backward(rows, gate, up, down, gate_slots, up_slots, d_out, layout)
    # group_sizes is integer: no cotangent (None means zero).
    return (d_rows.astype(rows.dtype), d_gate.astype(gate.dtype), d_up.astype(up.dtype), d_down.astype(down.dtype),
            None)


_ffn_loop.defvjp(_ffn_loop_fwd, _ffn_loop_bwd)


# ---------------------------------------------------------------------------------------------------------
# "gather"


def gmm_gather(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
               preferred_element_type: jnp.dtype) -> jax.Array:
    """out[i] = lhs[i] @ rhs[group of row i]: gathers one weight matrix per row, so it reads only the experts
    some row chose. For decode-sized m (a few rows per step, m <= g) that is the least memory traffic of all
    backends, and it is one batched matmul with no loop; for large m it copies m matrices: use "loop"."""
    group, valid = _row_groups(group_sizes, lhs.shape[0])
    # The weights are gathered in f32: the gather's gradient scatter-adds one [k, n] product per row into rhs's
    # gradient, and in bf16 each addition rounds (a bf16 d_rhs entry measured 4x off its float64 value); in f32 it
    # is rounded once. XLA converts only the gathered rows, and a product of bf16 values is exact in f32.
    out = jnp.einsum("mk,mkn->mn", lhs, rhs.astype(jnp.float32)[group], preferred_element_type=jnp.float32)
    return round_to(jnp.where(valid[:, None], out, 0.0), preferred_element_type)


# ---------------------------------------------------------------------------------------------------------
# "pallas"


def gmm_pallas(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
               preferred_element_type: jnp.dtype) -> jax.Array:
    """pallas_kernels.gmm: the Mosaic kernel on TPU, the Triton one on GPU, the interpreted Mosaic kernel on
    CPU. Tiles come from its per-shape table; rows past sum(group_sizes) are written as zeros by the kernel."""
    # Imported here: Pallas (and on GPU its Triton lowering) is only loaded by those who use this backend.
    from pallas_kernels import gmm as pallas_gmm

    def kernel(platform: str, interpret: bool) -> Callable[..., jax.Array]:
        return functools.partial(pallas_gmm.gmm, preferred_element_type=preferred_element_type,
                                 platform=platform, interpret=interpret)

    # Chosen when lowering, not from jax.default_backend(): a CPU host compiling ahead of time for a TPU
    # (jax.jit(...).lower(...) on TPU devices) must get the Mosaic kernel, not the interpreter.
    return jax.lax.platform_dependent(lhs, rhs, group_sizes, tpu=kernel("tpu", False), cuda=kernel("gpu", False),
                                      rocm=kernel("gpu", False), default=kernel("tpu", True))


BACKENDS: dict[str, Backend] = {
    "ragged_dot": gmm_ragged_dot,
    "dense": gmm_dense,
    "loop": gmm_loop,
    "gather": gmm_gather,
    "pallas": gmm_pallas,
}
