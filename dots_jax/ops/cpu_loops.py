"""CPU kernels for the grouped matmul: tiled loops over row tiles, each with a hand-written backward (custom VJP).

gmm_loop() is the gmm registry's "loop" backend (ops/gmm.py): each group padded to a multiple of a row tile, one
small [T, k] @ [k, n] matmul per tile that holds real rows. expert_ffn_loop() is the whole SwiGLU expert FFN (gate,
up, SiLU, down) on the same layout, in one loop forward and one backward instead of three gmm loops each;
ops.gmm.expert_ffn runs it whenever the backend resolves to "loop".
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dots_jax.ops.common import check_shapes, round_to, row_groups, silu
from dots_jax.ops.quant import scale_rows

__all__ = ["LoopLora", "expert_ffn_loop", "gmm_loop", "int8_row_tile", "loop_row_tile"]

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


def int8_row_tile(m: int, g: int) -> int:
    """Row tile T with int8 weights: 1 at decode sizes (m <= g rows, about one row per group), else loop_row_tile.
    Each tile converts its group's int8 block, so with groups of a row or two a 16-row tile is nearly all padding
    multiplied at f32 cost; one row per tile measured 2x faster than the gathered f32 product at one token (6 rows,
    64 experts) and 2x faster than 16-row tiles at 8 tokens (benchmarks/quant_cpu.py)."""
    return 1 if m <= g else loop_row_tile(m, g)


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

    row_group, row_valid = row_groups(group_sizes, m)
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
        if jnp.issubdtype(w.dtype, jnp.integer):
            w = w.astype(x.dtype)  # an int8 rhs is converted one tile's block at a time
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
                   layout: _TileLayout) -> tuple[jax.Array, jax.Array | None]:
    """f32 (d_lhs [m, k], d_rhs [g, k, n]) in one pass over the used tiles; d_rhs is None for an integer (int8)
    rhs, which has no gradient.

    Per tile t of group g: d_x_t = d_y_t @ rhs[g]^T, and d_rhs[g] += x_t^T @ d_y_t, accumulated in place in
    a [g, k, n] carry (read-add-write of one [k, n] slice, never a full-size temporary). Padding slots hold
    zeros in both x and d_y, so they add nothing; tiles past the used ones are never visited.
    """
    want_rhs = jnp.issubdtype(rhs.dtype, jnp.floating)
    tile = layout.tile
    lhs_slots = _to_slots(lhs, layout)
    d_out_slots = _to_slots(d_out, layout)

    def one_tile(t: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        d_lhs_slots, *d_rhs = carry
        group = layout.tile_group[t]
        x = jax.lax.dynamic_slice_in_dim(lhs_slots, t * tile, tile, axis=0)  # [T, k]
        dy = jax.lax.dynamic_slice_in_dim(d_out_slots, t * tile, tile, axis=0)  # [T, n]
        w = jax.lax.dynamic_index_in_dim(rhs, group, axis=0, keepdims=False)  # [k, n]
        if not want_rhs:
            w = w.astype(dy.dtype)
        # Contract over n directly. Materializing rhs^T ([g, n, k]) up front measured slower on XLA:CPU:
        # the full transpose costs more than the per-tile transposed-operand matmuls it saves.
        dx = jnp.einsum("tn,kn->tk", dy, w, preferred_element_type=jnp.float32)
        d_lhs_slots = jax.lax.dynamic_update_slice_in_dim(d_lhs_slots, dx, t * tile, axis=0)
        if not want_rhs:
            return (d_lhs_slots,)
        dw = jnp.dot(transposed(x), dy, preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_index_in_dim(d_rhs[0], group, axis=0, keepdims=True)  # [1, k, n]
        return d_lhs_slots, jax.lax.dynamic_update_index_in_dim(d_rhs[0], old + dw[None], group, axis=0)

    init = (jnp.zeros((layout.num_tiles * tile, lhs.shape[1]), jnp.float32),)
    if want_rhs:
        init += (jnp.zeros(rhs.shape, jnp.float32),)
    d_lhs_slots, *d_rhs = jax.lax.fori_loop(0, layout.num_used_tiles, one_tile, init)
    return _from_slots(d_lhs_slots, layout), d_rhs[0] if want_rhs else None


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
    # Integer inputs (group_sizes, an int8 rhs): no cotangent (None means zero).
    return d_lhs.astype(lhs.dtype), None if d_rhs is None else d_rhs.astype(rhs.dtype), None


_gmm_loop.defvjp(_gmm_loop_fwd, _gmm_loop_bwd)


def gmm_loop(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, preferred_element_type: jnp.dtype,
             *, tile: int | None = None, rhs_scale: jax.Array | None = None) -> jax.Array:
    """Tiled loop backend. `tile` overrides loop_row_tile(m, g) (tests and benchmarks use it).

    With rhs_scale [g, n], rhs is int8: each tile converts its group's int8 [k, n] block to f32 for its
    matmul, the f32 output is scaled per row by its group's scale, and rounded once; the default tile is then
    int8_row_tile(m, g). The int8 rhs gets no gradient; the scale gets its ordinary one (the scaling is plain jnp,
    outside the loop).

    Differentiable once (custom VJP; its backward is itself a loop with a traced trip count, so there is no
    second derivative).
    """
    if tile is None:
        tile = (loop_row_tile if rhs_scale is None else int8_row_tile)(lhs.shape[0], rhs.shape[0])
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    if rhs_scale is None:
        return _gmm_loop(lhs, rhs, group_sizes, np.dtype(preferred_element_type), int(tile))
    # f32 rows: products of int8 and bf16 values are exact in f32, so nothing is lost against a bf16 dot.
    unscaled = _gmm_loop(lhs.astype(jnp.float32), rhs, group_sizes, np.dtype(np.float32), int(tile))
    return round_to(scale_rows(unscaled, rhs_scale, group_sizes), preferred_element_type)



# ---------------------------------------------------------------------------------------------------------
# Fused SwiGLU expert FFN on the "loop" layout
#
# ops.gmm.expert_ffn = three gmm calls (gate, up, down) with the SwiGLU between them. With the "loop" backend that is
# three forward and three backward loops, each gathering into and out of the padded layout, and the SwiGLU and
# its gradient materialised at full size in between. On CPU, at the shapes we train, each loop step is a few
# tiny matmuls and per-step overhead dominates, so one loop that does all of a tile's work (forward: 3 matmuls;
# backward: 6) is cheaper. The numerics follow the unfused path: products accumulate in f32 and are cast to
# the activation dtype where gmm casts; SiLU and its derivative are computed in f32 (as common.silu does).


# With int8 weights (scales given) each tile converts its group's int8 blocks to the activation dtype (exact) and
# multiplies the f32 products by the per-column scales before rounding, as ops.gmm does for an int8 rhs; in the
# backward the cotangent is scaled before it meets an int8 block (d(x @ q * s) = (dy * s) @ q^T).

Scales = tuple[jax.Array, jax.Array, jax.Array]  # (gate [g, I], up [g, I], down [g, H]), f32


class LoopLora(NamedTuple):
    """LoRA adapters inside the fused loop (ops.gmm.expert_ffn with lora= on "loop"), per group: gate_up_a [g, H, r],
    gate_b and up_b [g, r, I], down_a [g, I, r], down_b [g, r, H], the B factors times LoRA's scaling. Each tile adds
    (x_in @ gate_up_a[g]) @ gate_b[g] to its gate product (up: up_b) and ((h * h_mask) @ down_a[g]) @ down_b[g] to its
    down product. x_in [m, H]: the gate/up adapters' input (the rows after dropout), None for the rows themselves;
    h_mask [m, I]: dropout's scaled keep mask on the down adapter's input, or None."""

    gate_up_a: jax.Array
    gate_b: jax.Array
    up_b: jax.Array
    down_a: jax.Array
    down_b: jax.Array
    x_in: jax.Array | None = None
    h_mask: jax.Array | None = None


def expert_ffn_loop(rows: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, group_sizes: jax.Array,
                    *, tile: int | None = None, scales: Scales | None = None,
                    lora: LoopLora | None = None) -> jax.Array:
    """SwiGLU experts on grouped rows: out = (silu(rows @ gate[g]) * (rows @ up[g])) @ down[g] per group g.

    rows [m, H] sorted by group, gate/up [g, H, I], down [g, I, H], group_sizes int [g] (sum <= m, not
    checked). Rows at or past sum(group_sizes) give zeros (and a zero row gradient). Returns [m, H] in
    rows.dtype; the weights are cast to rows.dtype first, as ops.gmm.expert_ffn does for gmm. Equal to
    gmm(silu(gmm(rows, gate)) * gmm(rows, up), down) with the "loop" backend, in one loop over the row tiles
    forward and one backward (custom VJP; differentiable once). `tile` overrides loop_row_tile(m, g) (with scales:
    int8_row_tile(m, g)).

    scales = (gate_scale [g, I], up_scale [g, I], down_scale [g, H]): the weights are int8 and each product is
    scaled per output column (ops.quant's per-channel scheme). The int8 weights get no gradient and the scales a
    zero one: both are constants of a quantised model (LoRA trains adapters beside them).

    lora: LoRA adapters added inside the loop (LoopLora; cast to rows.dtype), differentiable with the rows whether
    the weights are float or int8.
    """
    rows, group_sizes = jnp.asarray(rows), jnp.asarray(group_sizes)
    dtype = rows.dtype
    if scales is None:
        gate, up, down = (jnp.asarray(w).astype(dtype) for w in (gate, up, down))
    else:
        gate, up, down = (jnp.asarray(w) for w in (gate, up, down))
        if any(w.dtype != jnp.int8 for w in (gate, up, down)):
            raise ValueError(f"expert_ffn_loop with scales expects int8 weights, got {gate.dtype}, {up.dtype}, "
                             f"{down.dtype}")
        scales = tuple(jnp.asarray(scale, jnp.float32) for scale in scales)
    check_shapes(rows, gate, group_sizes)
    if up.shape != gate.shape or down.shape != (gate.shape[0], gate.shape[2], rows.shape[1]):
        raise ValueError(f"expert_ffn_loop expects gate/up [g, H, I] and down [g, I, H]; got gate {gate.shape}, "
                         f"up {up.shape}, down {down.shape}, rows {rows.shape}")
    if scales is not None:
        g, _, inner = gate.shape
        expected = ((g, inner), (g, inner), (g, rows.shape[1]))
        if tuple(tuple(scale.shape) for scale in scales) != expected:
            raise ValueError(f"expert_ffn_loop expects scales shaped {expected} (gate, up, down: the weights' "
                             f"output axes), got {[tuple(scale.shape) for scale in scales]}")
    if lora is not None:
        lora = LoopLora(*(None if x is None else jnp.asarray(x).astype(dtype) for x in lora))
        g, inner, rank = gate.shape[0], gate.shape[2], lora.gate_up_a.shape[-1]
        m, h = rows.shape
        expected = ((g, h, rank), (g, rank, inner), (g, rank, inner), (g, inner, rank), (g, rank, h),
                    None if lora.x_in is None else (m, h), None if lora.h_mask is None else (m, inner))
        shapes = tuple(None if x is None else tuple(x.shape) for x in lora)
        if shapes != expected:
            raise ValueError(f"expert_ffn_loop expects lora shaped {expected} ({', '.join(LoopLora._fields)}), "
                             f"got {shapes}")
    m, num_groups = rows.shape[0], gate.shape[0]
    if tile is None:
        tile = (loop_row_tile if scales is None else int8_row_tile)(m, num_groups)
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    if m == 0 or num_groups == 0:
        return jnp.zeros(rows.shape, dtype)
    return _ffn_loop(rows, gate, up, down, group_sizes.astype(jnp.int32), scales, lora, int(tile))


def _block(weights: jax.Array, group: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """One group's weight block in the activation dtype (for int8 weights: the per-tile conversion)."""
    return jax.lax.dynamic_index_in_dim(weights, group, axis=0, keepdims=False).astype(dtype)


def _scaled(y: jax.Array, scale: jax.Array | None, group: jax.Array) -> jax.Array:
    """y [T, n] times one group's scale [n] (in f32), or y itself when the weights are not quantised."""
    if scale is None:
        return y
    return y.astype(jnp.float32) * jax.lax.dynamic_index_in_dim(scale, group, axis=0, keepdims=False)


def _lora_slots(lora: LoopLora | None, layout: _TileLayout) -> tuple[jax.Array | None, jax.Array | None]:
    """x_in and h_mask in the padded layout (None where absent)."""
    if lora is None:
        return None, None
    return tuple(None if x is None else _to_slots(x, layout) for x in (lora.x_in, lora.h_mask))


def _tile_rows(slots: jax.Array | None, t: jax.Array, tile: int) -> jax.Array | None:
    return None if slots is None else jax.lax.dynamic_slice_in_dim(slots, t * tile, tile, axis=0)


def _ffn_loop_forward(rows: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, scales: Scales | None,
                      lora: LoopLora | None, layout: _TileLayout, keep_activations: bool
                      ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(out [m, H], h_gate slots, h_up slots), in rows.dtype. The slots ([num_tiles * T, I], the backward's
    residuals) are written only when keep_activations (under differentiation); else they are None. With lora, each
    tile's three products get their adapters' updates, summed in f32 with them before the one rounding."""
    tile, dtype = layout.tile, rows.dtype
    s_gate, s_up, s_down = (None, None, None) if scales is None else scales
    x_slots = _to_slots(rows, layout)
    in_slots, mask_slots = _lora_slots(lora, layout)

    def one_tile(t: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        group = layout.tile_group[t]
        x = jax.lax.dynamic_slice_in_dim(x_slots, t * tile, tile, axis=0)  # [T, H]
        w_gate, w_up, w_down = (_block(w, group, dtype) for w in (gate, up, down))  # [H, I], [H, I], [I, H]
        gate_f32 = _scaled(jnp.dot(x, w_gate, preferred_element_type=jnp.float32), s_gate, group)
        up_f32 = _scaled(jnp.dot(x, w_up, preferred_element_type=jnp.float32), s_up, group)
        if lora is not None:
            x_in = x if in_slots is None else _tile_rows(in_slots, t, tile)
            x_low = _low(x_in, None, _block(lora.gate_up_a, group, dtype))  # [T, r]
            gate_f32 = gate_f32 + jnp.dot(x_low, _block(lora.gate_b, group, dtype), preferred_element_type=jnp.float32)
            up_f32 = up_f32 + jnp.dot(x_low, _block(lora.up_b, group, dtype), preferred_element_type=jnp.float32)
        h_gate, h_up = gate_f32.astype(dtype), up_f32.astype(dtype)
        h = silu(h_gate) * h_up
        y = _scaled(jnp.dot(h, w_down, preferred_element_type=jnp.float32), s_down, group)
        if lora is not None:
            h_low = _low(h, _tile_rows(mask_slots, t, tile), _block(lora.down_a, group, dtype))
            y = y + jnp.dot(h_low, _block(lora.down_b, group, dtype), preferred_element_type=jnp.float32)
        written = (y.astype(dtype), h_gate, h_up) if keep_activations else (y.astype(dtype),)
        return tuple(jax.lax.dynamic_update_slice_in_dim(slots, value, t * tile, axis=0)
                     for slots, value in zip(carry, written, strict=True))

    num_slots, inner = layout.num_tiles * tile, gate.shape[2]
    init = (jnp.zeros((num_slots, rows.shape[1]), dtype),)
    if keep_activations:
        init += (jnp.zeros((num_slots, inner), dtype), jnp.zeros((num_slots, inner), dtype))
    out_slots, *activations = jax.lax.fori_loop(0, layout.num_used_tiles, one_tile, init)
    gate_slots, up_slots = activations if keep_activations else (None, None)
    return _from_slots(out_slots, layout), gate_slots, up_slots


def _low(x: jax.Array, mask: jax.Array | None, a: jax.Array) -> jax.Array:
    """An adapter's first product (x * mask) @ a [T, r], rounded to x's dtype as a gmm would."""
    x = x if mask is None else x * mask
    return jnp.dot(x, a, preferred_element_type=jnp.float32).astype(x.dtype)


def _ffn_loop_backward(rows: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, scales: Scales | None,
                       lora: LoopLora | None, gate_slots: jax.Array, up_slots: jax.Array, d_out: jax.Array,
                       layout: _TileLayout
                       ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array] | None, tuple | None]:
    """(d_rows [m, H], (d_gate, d_up, d_down), d_lora), all f32, in one pass over the used tiles; the weight
    gradients are None for int8 weights (scales given), which have none; d_lora (d_gate_up_a, d_gate_b, d_up_b,
    d_down_a, d_down_b, d_x_in or None) is None without adapters.

    Per tile of group g, with h_gate and h_up saved by the forward and s = silu(h_gate):
      dh = dy @ down[g]^T;  d_down[g] += h^T @ dy  where h = s * h_up
      dh_up = dh * s;  dh_gate = dh * h_up * silu'(h_gate)
      dx = dh_gate @ gate[g]^T + dh_up @ up[g]^T;  d_gate[g] += x^T @ dh_gate;  d_up[g] += x^T @ dh_up
    (with int8 weights, dy, dh_gate and dh_up are first multiplied by the scales of down, gate and up).
    dh, dh_up and dh_gate are rounded to the activation dtype where autodiff of the unfused path rounds them
    (dx is summed in f32 and rounded once, where the unfused path rounds both terms first). The weight
    gradients accumulate in place in f32 carries, as in _loop_backward. Padding slots hold zeros in x and dy,
    so they add nothing.

    With adapters, per tile, x_low = x_in @ gate_up_a[g] and h_low = (h * m) @ down_a[g] recomputed (m the mask):
      d_down_b[g] += h_low^T @ dy;  d_low = dy @ down_b[g]^T;  d_down_a[g] += (h * m)^T @ d_low
      dh += (d_low @ down_a[g]^T) * m;  d_gate_b[g] += x_low^T @ dh_gate;  d_up_b[g] += x_low^T @ dh_up
      d_x_low = dh_gate @ gate_b[g]^T + dh_up @ up_b[g]^T;  d_gate_up_a[g] += x_in^T @ d_x_low
      d_x_in = d_x_low @ gate_up_a[g]^T, added to dx when x_in is the rows themselves
    """
    tile, dtype = layout.tile, rows.dtype
    s_gate, s_up, s_down = (None, None, None) if scales is None else scales
    want_weights = scales is None
    in_slots, mask_slots = _lora_slots(lora, layout)
    # The rows are gathered again rather than saved padded: the padded copy is up to g * (T - 1) rows larger,
    # and saving it measured no faster (a 1.28x vs 1.27x CPU-time gain over the unfused path at the small config).
    x_slots = _to_slots(rows, layout)
    dy_slots = _to_slots(d_out.astype(dtype), layout)

    def accumulate(acc: jax.Array, group: jax.Array, update: jax.Array) -> jax.Array:
        old = jax.lax.dynamic_index_in_dim(acc, group, axis=0, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(acc, old + update[None], group, axis=0)

    def one_tile(t: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        dx_slots, *d_weights = carry
        group = layout.tile_group[t]
        x = jax.lax.dynamic_slice_in_dim(x_slots, t * tile, tile, axis=0)  # [T, H]
        dy = jax.lax.dynamic_slice_in_dim(dy_slots, t * tile, tile, axis=0)  # [T, H]
        h_gate = jax.lax.dynamic_slice_in_dim(gate_slots, t * tile, tile, axis=0)  # [T, I]
        h_up = jax.lax.dynamic_slice_in_dim(up_slots, t * tile, tile, axis=0)
        w_gate, w_up, w_down = (_block(w, group, dtype) for w in (gate, up, down))  # [H, I], [H, I], [I, H]

        gate_f32 = h_gate.astype(jnp.float32)
        sigmoid = jax.nn.sigmoid(gate_f32)
        s = (gate_f32 * sigmoid).astype(dtype)  # silu(h_gate), rounded as the forward rounded it
        dh = jnp.einsum("th,ih->ti", _scaled(dy, s_down, group), w_down, preferred_element_type=jnp.float32)
        if lora is not None:
            mask = _tile_rows(mask_slots, t, tile)
            a_gate_up, b_gate, b_up, a_down, b_down = (_block(w, group, dtype) for w in lora[:5])
            h = s * h_up
            h_in = h if mask is None else h * mask  # the down adapter's input
            h_low = _low(h, mask, a_down)
            d_low = jnp.einsum("th,rh->tr", dy, b_down, preferred_element_type=jnp.float32).astype(dtype)
            d_h_in = jnp.einsum("tr,ir->ti", d_low, a_down, preferred_element_type=jnp.float32)
            dh = dh + (d_h_in if mask is None else d_h_in * mask.astype(jnp.float32))
        dh = dh.astype(dtype)
        dh_up = dh * s
        # silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z))), in f32 like the forward SiLU.
        silu_grad = sigmoid * (1.0 + gate_f32 * (1.0 - sigmoid))
        dh_gate = ((dh * h_up).astype(jnp.float32) * silu_grad).astype(dtype)
        dx = (jnp.einsum("ti,hi->th", _scaled(dh_gate, s_gate, group), w_gate, preferred_element_type=jnp.float32)
              + jnp.einsum("ti,hi->th", _scaled(dh_up, s_up, group), w_up, preferred_element_type=jnp.float32))
        out = []
        if lora is not None:
            if in_slots is not None:
                d_in_slots, *d_weights = d_weights
            d_a_gate_up, d_b_gate, d_b_up, d_a_down, d_b_down, *d_weights = d_weights
            x_in = x if in_slots is None else _tile_rows(in_slots, t, tile)
            x_low = _low(x_in, None, a_gate_up)  # [T, r]
            d_x_low = (jnp.einsum("ti,ri->tr", dh_gate, b_gate, preferred_element_type=jnp.float32)
                       + jnp.einsum("ti,ri->tr", dh_up, b_up, preferred_element_type=jnp.float32)).astype(dtype)
            d_x_in = jnp.einsum("tr,hr->th", d_x_low, a_gate_up, preferred_element_type=jnp.float32)
            if in_slots is None:
                dx = dx + d_x_in
            else:
                out.append(jax.lax.dynamic_update_slice_in_dim(d_in_slots, d_x_in, t * tile, axis=0))
            low_t = transposed(x_low)
            out += [accumulate(d_a_gate_up, group, jnp.dot(transposed(x_in), d_x_low,
                                                           preferred_element_type=jnp.float32)),
                    accumulate(d_b_gate, group, jnp.dot(low_t, dh_gate, preferred_element_type=jnp.float32)),
                    accumulate(d_b_up, group, jnp.dot(low_t, dh_up, preferred_element_type=jnp.float32)),
                    accumulate(d_a_down, group, jnp.dot(transposed(h_in), d_low, preferred_element_type=jnp.float32)),
                    accumulate(d_b_down, group, jnp.dot(transposed(h_low), dy, preferred_element_type=jnp.float32))]
        if want_weights:
            d_gate, d_up, d_down = d_weights
            d_down = accumulate(d_down, group, jnp.dot(transposed(s * h_up), dy, preferred_element_type=jnp.float32))
            x_t = transposed(x)
            d_gate = accumulate(d_gate, group, jnp.dot(x_t, dh_gate, preferred_element_type=jnp.float32))
            d_up = accumulate(d_up, group, jnp.dot(x_t, dh_up, preferred_element_type=jnp.float32))
            out += [d_gate, d_up, d_down]
        return (jax.lax.dynamic_update_slice_in_dim(dx_slots, dx, t * tile, axis=0), *out)

    slots = layout.num_tiles * tile
    init = (jnp.zeros((slots, rows.shape[1]), jnp.float32),)
    if lora is not None:  # d_x_in in the padded layout (when x_in is given), then the five adapter gradients
        if in_slots is not None:
            init += (jnp.zeros((slots, rows.shape[1]), jnp.float32),)
        init += tuple(jnp.zeros(w.shape, jnp.float32) for w in lora[:5])
    if want_weights:
        init += tuple(jnp.zeros(w.shape, jnp.float32) for w in (gate, up, down))
    dx_slots, *d_rest = jax.lax.fori_loop(0, layout.num_used_tiles, one_tile, init)
    d_lora = None
    if lora is not None:
        d_x_in = None
        if in_slots is not None:
            d_x_in, *d_rest = d_rest
            d_x_in = _from_slots(d_x_in, layout)
        d_lora, d_rest = (*d_rest[:5], d_x_in), d_rest[5:]
    return _from_slots(dx_slots, layout), tuple(d_rest) if want_weights else None, d_lora


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ffn_loop(rows: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, group_sizes: jax.Array,
              scales: Scales | None, lora: LoopLora | None, tile: int) -> jax.Array:
    layout = _tile_layout(group_sizes, rows.shape[0], tile)
    return _ffn_loop_forward(rows, gate, up, down, scales, lora, layout, keep_activations=False)[0]


def _ffn_loop_fwd(rows: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, group_sizes: jax.Array,
                  scales: Scales | None, lora: LoopLora | None, tile: int) -> tuple[jax.Array, tuple]:
    # h_gate and h_up are kept (padded layout, activation dtype) rather than recomputed in the backward:
    # recomputing them costs two more matmuls per tile, and measured slower (fwd+bwd of moe_experts vs the
    # unfused path: 1.20x instead of 1.30x at the small config, 0.94x instead of 1.11x at the medium one).
    layout = _tile_layout(group_sizes, rows.shape[0], tile)
    out, gate_slots, up_slots = _ffn_loop_forward(rows, gate, up, down, scales, lora, layout, keep_activations=True)
    return out, (rows, gate, up, down, group_sizes, scales, lora, gate_slots, up_slots)


def _ffn_loop_bwd(tile: int, residuals: tuple, d_out: jax.Array) -> tuple:
    rows, gate, up, down, group_sizes, scales, lora, gate_slots, up_slots = residuals
    layout = _tile_layout(group_sizes, rows.shape[0], tile)
    d_rows, d_weights, d_lora = _ffn_loop_backward(rows, gate, up, down, scales, lora, gate_slots, up_slots, d_out,
                                                   layout)
    if d_weights is None:  # int8 weights: no gradient; their scales: a zero one (see expert_ffn_loop)
        d_gate = d_up = d_down = None
        d_scales = tuple(jnp.zeros_like(scale) for scale in scales)
    else:
        d_gate, d_up, d_down = (d.astype(w.dtype) for d, w in zip(d_weights, (gate, up, down), strict=True))
        d_scales = None
    if d_lora is not None:  # the dropout mask is a constant: a zero cotangent
        d_lora = LoopLora(*(None if d is None else d.astype(x.dtype) for d, x in zip(d_lora, lora[:6], strict=True)),
                          h_mask=None if lora.h_mask is None else jnp.zeros_like(lora.h_mask))
    # group_sizes is integer: no cotangent (None means zero).
    return d_rows.astype(rows.dtype), d_gate, d_up, d_down, None, d_scales, d_lora


_ffn_loop.defvjp(_ffn_loop_fwd, _ffn_loop_bwd)
