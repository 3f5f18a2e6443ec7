"""A fixed-size KV cache pytree: one [layers, batch, slots, kv_heads, head_dim] pair per layer stack.

With kv_cache_dtype="int8" the keys and values are int8 with one f32 scale per token and head (dots_jax.ops.kv_int8);
attention dequantises what it reads.

Every row writes its tokens at the same slot index (prompts are right-padded to one bucket length); what makes
rows of different lengths correct is that each slot records its token's position and whether it is real, and
attention masks by those, not by slot order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dots_jax.config import Dots1Config
from dots_jax.ops.kv_int8 import check_kv_cache_dtype, dequantize_kv, quantize_kv


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerStackCache:
    """A layer stack's keys and values (inside the model's layer scan: one layer's, without the L axis)."""

    k: jax.Array  # [L, B, T, KV, D]: the activation dtype, or int8
    v: jax.Array
    k_scale: jax.Array | None = None  # [L, B, T, KV] f32 when k and v are int8
    v_scale: jax.Array | None = None

    def write(self, k: jax.Array, v: jax.Array, index: jax.Array | int) -> LayerStackCache:
        """One layer's cache ([B, T, KV, D], as the layer scan hands it to attention) with k, v [B, S, KV, D]
        written at slots index .. index + S - 1, quantised per token and head for an int8 cache."""
        start = (0, index, 0, 0)
        if self.k_scale is None:
            return LayerStackCache(jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), start),
                                   jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), start))
        (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
        return LayerStackCache(jax.lax.dynamic_update_slice(self.k, kq, start),
                               jax.lax.dynamic_update_slice(self.v, vq, start),
                               jax.lax.dynamic_update_slice(self.k_scale, ks, start[:3]),
                               jax.lax.dynamic_update_slice(self.v_scale, vs, start[:3]))

    def read(self, dtype: jnp.dtype | type) -> tuple[jax.Array, jax.Array]:
        """(keys, values) in dtype: an int8 cache dequantised."""
        if self.k_scale is None:
            return self.k.astype(dtype), self.v.astype(dtype)
        return dequantize_kv(self.k, self.k_scale, dtype), dequantize_kv(self.v, self.v_scale, dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    dense: LayerStackCache | None
    moe: LayerStackCache | None
    positions: jax.Array  # [B, T] int32: the position of the token in each slot
    valid: jax.Array  # [B, T] bool: the slot holds a real token (not padding, not yet written)
    index: jax.Array  # int32 scalar: the next slot to write

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def slots(self) -> int:
        return self.positions.shape[1]

    @classmethod
    def create(cls, cfg: Dots1Config, batch: int, slots: int, dtype: jnp.dtype | type,
               kv_cache_dtype: str | None = None) -> KVCache:
        """An empty cache; dtype is the activation dtype, kv_cache_dtype "int8" or None (keys and values in dtype)."""
        int8 = check_kv_cache_dtype(kv_cache_dtype) == "int8"

        def stack(layers: int) -> LayerStackCache | None:
            if layers == 0:
                return None
            shape = (layers, batch, slots, cfg.num_key_value_heads, cfg.head_dim)
            if not int8:
                return LayerStackCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            return LayerStackCache(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8),
                                   jnp.zeros(shape[:-1], jnp.float32), jnp.zeros(shape[:-1], jnp.float32))

        return cls(dense=stack(cfg.num_dense_layers), moe=stack(cfg.num_moe_layers),
                   positions=jnp.zeros((batch, slots), jnp.int32), valid=jnp.zeros((batch, slots), jnp.bool_),
                   index=jnp.zeros((), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    """The serving engine's KV cache: a pool of fixed-size pages per layer stack, shared by all sequences.

    Each stack is [layers, num_pages, page_size, 2 * kv_heads, head_dim] with K and V interleaved by head
    (k0, v0, k1, v1, ...), the layout Pallas' ragged_paged_attention reads. A sequence's slot t (its token at
    position t) lives in page page_indices[t // page_size] at offset t % page_size (see PageTable).

    With kv_cache_dtype="int8" the pools are int8 and each has a scale pool [layers, num_pages, page_size,
    2 * kv_heads] f32 (the same interleave: one scale per token and key or value head).
    """

    dense: jax.Array | None
    moe: jax.Array | None
    dense_scale: jax.Array | None = None
    moe_scale: jax.Array | None = None

    @property
    def num_pages(self) -> int:
        return (self.moe if self.moe is not None else self.dense).shape[1]

    @property
    def page_size(self) -> int:
        return (self.moe if self.moe is not None else self.dense).shape[2]

    @classmethod
    def create(cls, cfg: Dots1Config, num_pages: int, page_size: int, dtype: jnp.dtype | type,
               kv_cache_dtype: str | None = None) -> PagedKVCache:
        """An empty pool; dtype is the activation dtype, kv_cache_dtype "int8" or None (pages in dtype)."""
        int8 = check_kv_cache_dtype(kv_cache_dtype) == "int8"

        def stack(layers: int) -> jax.Array | None:
            if layers == 0:
                return None
            shape = (layers, num_pages, page_size, 2 * cfg.num_key_value_heads, cfg.head_dim)
            return jnp.zeros(shape, jnp.int8 if int8 else dtype)

        def scales(layers: int) -> jax.Array | None:
            if layers == 0 or not int8:
                return None
            return jnp.zeros((layers, num_pages, page_size, 2 * cfg.num_key_value_heads), jnp.float32)

        return cls(dense=stack(cfg.num_dense_layers), moe=stack(cfg.num_moe_layers),
                   dense_scale=scales(cfg.num_dense_layers), moe_scale=scales(cfg.num_moe_layers))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PageTable:
    """Where one step's B rows (sequences) read and write the paged cache.

    Row b's q_lens[b] new tokens sit at the start of its row of input ids (right-padded) at positions
    kv_lens[b] - q_lens[b] + j; after the step its slots 0 .. kv_lens[b] - 1 are written. A row with q_lens 0 is
    unused. page_indices[b] lists row b's pages in order; entries past its last page may hold any page index.
    """

    page_indices: jax.Array  # [B, M] int32
    kv_lens: jax.Array  # [B] int32
    q_lens: jax.Array  # [B] int32
    # dots_jax.ops.paged_attention's backend: static, chosen once per engine.
    backend: str = dataclasses.field(default="auto", metadata={"static": True})

