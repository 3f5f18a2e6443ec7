"""The "blocked" paged attention backend: the serving path on CPU and GPU.

Same contract as dots_jax.ops.paged_attention.paged_attention ("reference" is its oracle):

    blocked_paged_attention(q [B, S, N, D], kv_pages [P, page, 2 * KV, D] (or a stack's [L, P, ...] with layer),
                            page_indices [B, M], kv_lens [B], q_lens [B], window, layer, scale_pages)
                            -> [B, S, N, D]

The reference gathers every page of every row's table before it attends, so its cost follows the table's width,
and the engine would need a compiled step per width. This one walks the tables a block of pages at a time with an
exact online softmax (FlashAttention's running max and sum) and stops after the block that holds the longest row's
last key: a step costs what its longest row needs, whatever the width, and one full-width table serves every
length (one compiled shape). Not differentiable (its loop count is traced): serving only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["blocked_paged_attention"]

# Whole pages. A block past a row's last key is still read (and masked): short rows want short blocks.
KEY_SLOTS_PER_BLOCK = 128


def blocked_paged_attention(q: jax.Array, kv_pages: jax.Array, page_indices: jax.Array, kv_lens: jax.Array,
                            q_lens: jax.Array, window: int | jax.Array, layer: int | jax.Array | None = None,
                            scale_pages: jax.Array | None = None) -> jax.Array:
    b, s, n, d = q.shape
    page, combined = kv_pages.shape[-3], kv_pages.shape[-2]
    kv_heads = combined // 2
    groups = n // kv_heads
    per_block = max(1, min(page_indices.shape[1], KEY_SLOTS_PER_BLOCK // page))
    cols = -(-page_indices.shape[1] // per_block) * per_block
    # Entries past a row's pages may hold anything: clamped to a page, read and masked.
    table = jnp.clip(jnp.pad(page_indices, ((0, 0), (0, cols - page_indices.shape[1]))), 0, kv_pages.shape[-4] - 1)
    slots = per_block * page
    q_pos = (kv_lens - q_lens)[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]  # [B, S]
    # [B, KV, groups, S, D]: query head h reads key/value head h // groups, as transformers' repeat_kv orders them.
    qf = q.astype(jnp.float32).reshape(b, s, kv_heads, groups, d).transpose(0, 2, 3, 1, 4) * d**-0.5

    def block(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        top, total, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(table, j * per_block, per_block, axis=1)
        where = pages if layer is None else (layer, pages)
        kv = kv_pages[where].reshape(b, slots, combined, d).astype(jnp.float32)
        if scale_pages is not None:  # an int8 pool: one scale per token and key or value head
            kv = kv * scale_pages[where].reshape(b, slots, combined, 1)
        k, v = kv[:, :, 0::2], kv[:, :, 1::2]  # [B, slots, KV, D]
        k_pos = j * slots + jnp.arange(slots, dtype=jnp.int32)
        distance = q_pos[:, :, None] - k_pos[None, None, :]  # [B, S, slots]
        allowed = (distance >= 0) & (distance < window) & (k_pos[None, None, :] < kv_lens[:, None, None])
        scores = jnp.einsum("bkgsd,btkd->bkgst", qf, k)
        scores = jnp.where(allowed[:, None, None], scores, -jnp.inf)
        new_top = jnp.maximum(top, scores.max(-1))
        weights = jnp.exp(scores - new_top[..., None])
        rescale = jnp.exp(top - new_top)
        total = total * rescale + weights.sum(-1)
        acc = acc * rescale[..., None] + jnp.einsum("bkgst,btkd->bkgsd", weights, v)
        return new_top, total, acc

    # A finite floor for the running max: a block with no allowed key leaves it there and adds exp(-inf) = 0.
    init = (jnp.full((b, kv_heads, groups, s), -1e30, jnp.float32), jnp.zeros((b, kv_heads, groups, s), jnp.float32),
            jnp.zeros((b, kv_heads, groups, s, d), jnp.float32))
    blocks = (jnp.max(jnp.where(q_lens > 0, kv_lens, 0)) + slots - 1) // slots
    _, total, acc = jax.lax.fori_loop(0, blocks, block, init)
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # a row or query with no key gives zeros
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, s, n, d)
    real = jnp.arange(s)[None, :] < q_lens[:, None]
    return jnp.where(real[:, :, None, None], out, 0.0).astype(q.dtype)

