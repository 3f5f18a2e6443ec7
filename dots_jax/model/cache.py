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
