"""A fixed-size KV cache pytree: one [layers, batch, slots, kv_heads, head_dim] pair per layer stack.

Every row writes its tokens at the same slot index (prompts are right-padded to one bucket length); what makes
rows of different lengths correct is that each slot records its token's position and whether it is real, and
attention masks by those, not by slot order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dots_jax.config import Dots1Config


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerStackCache:
    k: jax.Array  # [L, B, T, KV, D]
    v: jax.Array


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
    def create(cls, cfg: Dots1Config, batch: int, slots: int, dtype: jnp.dtype | type) -> KVCache:
        def stack(layers: int) -> LayerStackCache | None:
            if layers == 0:
                return None
            shape = (layers, batch, slots, cfg.num_key_value_heads, cfg.head_dim)
            return LayerStackCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

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
    """

    dense: jax.Array | None
    moe: jax.Array | None

    @property
    def num_pages(self) -> int:
        return (self.moe if self.moe is not None else self.dense).shape[1]

    @property
    def page_size(self) -> int:
        return (self.moe if self.moe is not None else self.dense).shape[2]

    @classmethod
    def create(cls, cfg: Dots1Config, num_pages: int, page_size: int, dtype: jnp.dtype | type) -> PagedKVCache:
        def stack(layers: int) -> jax.Array | None:
            if layers == 0:
                return None
            return jnp.zeros((layers, num_pages, page_size, 2 * cfg.num_key_value_heads, cfg.head_dim), dtype)

        return cls(dense=stack(cfg.num_dense_layers), moe=stack(cfg.num_moe_layers))


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

