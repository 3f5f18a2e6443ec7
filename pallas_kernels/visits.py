"""Which (group, row tile) pairs a grouped-matmul kernel visits: computed once per call in plain JAX and handed to the
kernel (scalar-prefetched by the TPU kernels of gmm.py, read from global memory by the Mosaic GPU ones of
gmm_mgpu.py)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Visits", "local_bounds", "make_visits"]


def local_bounds(group_sizes: jax.Array, group_offset: jax.Array, num_local: int) -> tuple[jax.Array, jax.Array]:
    """(starts, ends), int32 [num_local]: the first row and one past the last of groups o .. o + num_local - 1."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)
    return (jax.lax.dynamic_slice_in_dim(starts, group_offset, num_local),
            jax.lax.dynamic_slice_in_dim(ends, group_offset, num_local))


class Visits(NamedTuple):
    """Which (segment, row tile) each grid step or work item handles; computed once per call."""

    seg_start: jax.Array  # int32 [S]: first row of each segment
    seg_end: jax.Array  # int32 [S]: one past its last row
    seg_id: jax.Array  # int32 [L]: segment of each grid step (L is a static upper bound on the visits)
    tile_id: jax.Array  # int32 [L]: row tile of each grid step
    num_visits: jax.Array  # int32 []: how many of the L steps are real (the grid's dynamic extent)


def make_visits(group_sizes: jax.Array, group_offset: jax.Array, num_local: int, m_pad: int, tm: int, *,
                gaps: bool) -> Visits:
    """The visit list for rows [0, m_pad) cut into tiles of tm.

    gaps=True (gmm): segments are [gap before our groups, our num_local groups, gap after], a partition of
    all rows, and empty segments are not visited. gaps=False (tgmm): segments are our groups only, and an
    empty group is visited once (on a clamped tile, with no rows) so that its output gets written.
    """
    local_starts, local_ends = local_bounds(group_sizes, group_offset, num_local)
    if gaps:
        zero, end = jnp.zeros((1,), jnp.int32), jnp.full((1,), m_pad, jnp.int32)
        seg_start = jnp.concatenate([zero, local_starts, local_ends[-1:]])
        seg_end = jnp.concatenate([local_starts[:1], local_ends, end])
    else:
        seg_start, seg_end = local_starts, local_ends
    num_tiles = m_pad // tm
    first_tile = seg_start // tm
    spanned = jnp.where(seg_end > seg_start, (seg_end - 1) // tm - first_tile + 1, 0)
    tiles_per_seg = spanned if gaps else jnp.maximum(spanned, 1)
    seg_visit_end = jnp.cumsum(tiles_per_seg)
    # Upper bound: tiles overlap only at segment boundaries, so the visits are at most one per tile plus one
    # per segment boundary; tgmm adds at most one visit per (empty) group.
    max_visits = num_tiles + seg_start.shape[0]
    steps = jnp.arange(max_visits, dtype=jnp.int32)
    seg_id = jnp.minimum(jnp.searchsorted(seg_visit_end, steps, side="right"), seg_start.shape[0] - 1)
    seg_id = seg_id.astype(jnp.int32)
    within = steps - (seg_visit_end[seg_id] - tiles_per_seg[seg_id])
    tile_id = jnp.clip(first_tile[seg_id] + within, 0, num_tiles - 1).astype(jnp.int32)
    return Visits(seg_start, seg_end, seg_id, tile_id, seg_visit_end[-1])
