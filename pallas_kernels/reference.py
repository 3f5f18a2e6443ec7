"""Pure-jnp references for the kernels in gmm.py, with the same signatures (tiling and interpret are
accepted and ignored). Written for clarity: every row meets every group through a one-hot mask."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["gmm", "tgmm"]


def _local_membership(group_sizes: jax.Array, group_offset: Any, num_local: int, m: int) -> jax.Array:
    """bool [num_local, m]: row i belongs to group group_offset + j."""
    ends = jnp.cumsum(jnp.asarray(group_sizes, jnp.int32))
    starts = ends - group_sizes
    groups = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32) + jnp.arange(num_local)
    valid = groups < group_sizes.shape[0]
    groups = jnp.minimum(groups, group_sizes.shape[0] - 1)
    rows = jnp.arange(m)[None, :]
    return valid[:, None] & (rows >= starts[groups][:, None]) & (rows < ends[groups][:, None])


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, group_offset: Any = None, tiling: Any = None,
        preferred_element_type: Any = None, interpret: Any = False) -> jax.Array:
    """out[i] = lhs[i] @ rhs[j - group_offset] for row i of an owned group j; zeros for every other row."""
    del tiling, interpret
    out_dtype = np.dtype(preferred_element_type if preferred_element_type is not None else lhs.dtype)
    member = _local_membership(group_sizes, group_offset, rhs.shape[0], lhs.shape[0])  # [g, m]
    every = jnp.einsum("mk,gkn->gmn", lhs, rhs, preferred_element_type=jnp.float32)
    # A select, not a multiply by the mask: a non-finite row outside our groups must still give exactly 0.
    return jnp.where(member[:, :, None], every, 0.0).sum(axis=0).astype(out_dtype)


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, group_offset: Any = None,
         num_local: int | None = None, tiling: Any = None, preferred_element_type: Any = None,
         interpret: Any = False) -> jax.Array:
    """out[j] = sum over rows i of group group_offset + j of outer(lhs[i], dout[i]) -> [num_local, k, n]."""
    del tiling, interpret
    num_local = group_sizes.shape[0] if num_local is None else num_local
    out_dtype = np.dtype(preferred_element_type if preferred_element_type is not None else lhs.dtype)
    member = _local_membership(group_sizes, group_offset, num_local, lhs.shape[0])
    x = jnp.where(member[:, :, None], lhs[None].astype(jnp.float32), 0.0)  # [g, m, k]
    dy = jnp.where(member[:, :, None], dout[None].astype(jnp.float32), 0.0)  # [g, m, n]
    return jnp.einsum("gmk,gmn->gkn", x, dy, precision=jax.lax.Precision.HIGHEST).astype(out_dtype)
