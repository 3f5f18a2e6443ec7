"""What the gmm backends (gmm.py), the CPU loop kernels (cpu_loops.py), the attention backends and the model share:
the group of each sorted row, the gmm shape check, the bf16 rounding rules (round_to, and silu, which rounds as torch
does), the attention mask from positions, and the window of a full-attention layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["NO_WINDOW", "check_shapes", "make_attention_mask", "round_to", "row_groups", "silu"]

NO_WINDOW = 2**30  # the attention "window" of a full-attention layer: larger than any sequence


def make_attention_mask(q_pos: jax.Array, k_pos: jax.Array, key_valid: jax.Array,
                        window: int | jax.Array) -> jax.Array:
    """[B, S, T] bool: causal by position, keys within the window, padding keys excluded."""
    delta = q_pos[:, :, None] - k_pos[:, None, :]
    return (delta >= 0) & (delta < window) & key_valid[:, None, :]


def check_shapes(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"gmm expects lhs [m, k], rhs [g, k, n], group_sizes [g]; got lhs {lhs.shape}, "
                         f"rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    if lhs.shape[1] != rhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(f"gmm shape mismatch: lhs {lhs.shape}, rhs {rhs.shape}, group_sizes "
                         f"{group_sizes.shape} (need lhs [m, k], rhs [g, k, n], group_sizes [g])")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}")


def row_groups(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
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


def silu(x: jax.Array) -> jax.Array:
    """SiLU computed in f32 and cast back, as torch does for bf16 inputs: the one copy that the fused expert loop,
    the unfused expert path and the model's MLPs share."""
    return round_to(jax.nn.silu(x.astype(jnp.float32)), x.dtype)
