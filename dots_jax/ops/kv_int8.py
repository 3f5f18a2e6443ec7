"""The int8 KV cache's number format: symmetric int8 per token and head, one f32 scale per head vector.

    quantize_kv(x [..., D]) -> (int8 [..., D], scale f32 [...]),  scale = max|x| over D / 127
    dequantize_kv(q, scale, dtype) = q * scale, computed in f32 and cast to dtype

A key or value vector of head_dim numbers shares one scale, so the cache costs D + 4 bytes per token and head
instead of 2 D (bf16) or 4 D (f32), and each element is off by at most scale / 2 (rounding to the nearest step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["KV_CACHE_DTYPES", "check_kv_cache_dtype", "dequantize_kv", "quantize_kv"]

KV_CACHE_DTYPES = ("int8",)  # besides None: the activation dtype


def check_kv_cache_dtype(kv_cache_dtype: str | None) -> str | None:
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be None (the activation dtype) or one of {list(KV_CACHE_DTYPES)}, "
                         f"got {kv_cache_dtype!r}")
    return kv_cache_dtype


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (int8 [..., D], f32 scale [...]). An all-zero vector gets scale 0 (and int8 zeros)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    q = jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize_kv(q: jax.Array, scale: jax.Array, dtype: jnp.dtype | type) -> jax.Array:
    """int8 [..., D] and scale [...] -> [..., D] in dtype."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)
