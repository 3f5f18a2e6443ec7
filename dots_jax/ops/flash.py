"""The "flash" attention backend: FlashAttention-2's blockwise online softmax in pure JAX, with a hand-written
backward that recomputes each block's probabilities, so nothing of size S x T exists in either pass.

Layout. Queries are cut into blocks of bq positions, each laid out as [B, KV, bq * G, D] (the G query heads that
share a key/value head are extra rows of one matmul: GQA without repeating K/V). Keys and values stay in the
caller's [B, T, KV, D] and are read in blocks of bk slots; the last block is shifted back to end at T (no padded
copy of a KV cache), and the keys it shares with the previous block are masked out.

Skipping. For each query block, the first and last key block that may hold a key some query of the block attends
(over the whole batch: min/max positions of the valid keys and of the queries, the causal and window conditions)
bound a dynamic loop; blocks outside it (above the causal diagonal, outside the sliding window, padding, the
unwritten tail of a cache) are never computed. The bound is conservative, so inside a computed block the exact
mask from the positions still applies: any positions give the exact answer.

A query with no key to attend gives output 0 and zero gradients (the reference gives a mean of the values there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["BLOCK_K", "BLOCK_Q", "flash_attention"]

BLOCK_Q = 512  # query positions per block (times G rows per key/value head)
BLOCK_K = 512  # key slots per block

_F32 = jnp.float32
_BIG = jnp.iinfo(jnp.int32).max


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                    key_valid: jax.Array, window: int | jax.Array, q_offset: int | jax.Array | None = None, *,
                    block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> jax.Array:
    """q [B, S, N, D], k = v [B, T, KV, D] -> [B, S, N, D] in q.dtype (the contract of dots_jax.ops.attention)."""
    del q_offset  # the mask comes from the positions
    b, s, n, d = q.shape
    t, kv = k.shape[1], k.shape[2]
    g = n // kv
    bq, nq = _blocks(s, block_q)
    bk, nk = _blocks(t, block_k)
    sp = bq * nq
    # [nq, B, KV, bq * G, D]: one query block per scan step, rows ordered (position, group head)
    qb = jnp.pad(q, ((0, 0), (0, sp - s), (0, 0), (0, 0))).reshape(b, nq, bq, kv, g, d)
    qb = qb.transpose(1, 0, 3, 2, 4, 5).reshape(nq, b, kv, bq * g, d)
    q_pos = q_pos.astype(jnp.int32)
    q_valid = jnp.broadcast_to(jnp.arange(sp) < s, (b, sp))
    qpb = jnp.pad(q_pos, ((0, 0), (0, sp - s))).reshape(b, nq, bq).transpose(1, 0, 2)
    ranges = _key_ranges(qpb, q_valid.reshape(b, nq, bq).transpose(1, 0, 2), k_pos.astype(jnp.int32),
                         key_valid, jnp.asarray(window, jnp.int32), bk, nk)
    out = _flash(qb, k, v, qpb, k_pos.astype(jnp.int32), key_valid.astype(bool), jnp.asarray(window, jnp.int32),
                 ranges, bk)
    out = out.reshape(nq, b, kv, bq, g, d).transpose(1, 0, 3, 2, 4, 5).reshape(b, sp, n, d)
    return out[:, :s]


def _blocks(length: int, block: int) -> tuple[int, int]:
    """(block size, number of blocks) covering length: one exact block when it fits, else near-equal blocks."""
    if length <= block:
        return length, 1
    size = -(-length // -(-length // block))  # near-equal blocks, rounded up to a multiple of 8
    size = min(-(-size // 8) * 8, length)
    return size, -(-length // size)


def _key_start(j: jax.Array, bk: int, t: int) -> jax.Array:
    """First slot read for key block j: the last block is shifted back to end at t."""
    return jnp.minimum(j * bk, t - bk)


def _key_ranges(q_pos: jax.Array, q_valid: jax.Array, k_pos: jax.Array, key_valid: jax.Array, window: jax.Array,
                bk: int, nk: int) -> jax.Array:
    """[nq, 2] int32: for each query block, the key blocks [first, end) that may hold an attendable key."""
    t = k_pos.shape[1]
    slots = jnp.arange(nk * bk)
    slot = jnp.minimum(slots, t - 1)  # the padded tail of the last block repeats slot t - 1, marked invalid
    kp = jnp.take(k_pos, slot, axis=1).reshape(-1, nk, bk)
    kvld = (jnp.take(key_valid, slot, axis=1) & (slots < t)).reshape(-1, nk, bk)
    has_key = kvld.any(axis=(0, 2))
    k_min = jnp.where(kvld, kp, _BIG).min(axis=(0, 2))
    k_max = jnp.where(kvld, kp, -_BIG).max(axis=(0, 2))
    has_query = q_valid.any(axis=(1, 2))
    q_min = jnp.where(q_valid, q_pos, _BIG).min(axis=(1, 2))
    q_max = jnp.where(q_valid, q_pos, -_BIG).max(axis=(1, 2))
    # A key block may matter to a query block when its smallest key is not after the latest query (causal) and its
    # latest key is within the window of the earliest query. Sentinels are zeroed so the difference cannot wrap.
    live = has_query[:, None] & has_key[None, :]
    gap = jnp.where(live, q_min[:, None], 0) - jnp.where(live, k_max[None, :], 0)
    may = live & (k_min[None, :] <= q_max[:, None]) & (gap < window)
    first = jnp.argmax(may, axis=1)
    end = nk - jnp.argmax(may[:, ::-1], axis=1)
    some = may.any(axis=1)
    return jnp.stack([jnp.where(some, first, 0), jnp.where(some, end, 0)], axis=1).astype(jnp.int32)


def _key_block(k: jax.Array, v: jax.Array, k_pos: jax.Array, key_valid: jax.Array, j: jax.Array, bk: int
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Key block j: k, v [B, KV, bk, D], its positions [B, bk], validity [B, bk] (slots an earlier block already
    read are invalid here), and its first slot."""
    t = k.shape[1]
    start = _key_start(j, bk, t)
    kb = jax.lax.dynamic_slice_in_dim(k, start, bk, axis=1).transpose(0, 2, 1, 3)
    vb = jax.lax.dynamic_slice_in_dim(v, start, bk, axis=1).transpose(0, 2, 1, 3)
    kp = jax.lax.dynamic_slice_in_dim(k_pos, start, bk, axis=1)
    valid = jax.lax.dynamic_slice_in_dim(key_valid, start, bk, axis=1) & (start + jnp.arange(bk) >= j * bk)
    return kb, vb, kp, valid, start


def _scores(qb: jax.Array, kb: jax.Array, q_pos: jax.Array, k_pos: jax.Array, valid: jax.Array,
            window: jax.Array) -> jax.Array:
    """Scaled scores [B, KV, bq * G, bk] in f32, -inf where the mask forbids."""
    b, kv, rows, d = qb.shape
    bq, bk = q_pos.shape[1], k_pos.shape[1]
    scores = jnp.einsum("bhqd,bhkd->bhqk", qb, kb, preferred_element_type=_F32) * _F32(d**-0.5)
    delta = q_pos[:, :, None] - k_pos[:, None, :]
    mask = (delta >= 0) & (delta < window) & valid[:, None, :]
    scores = jnp.where(mask[:, None, :, None, :], scores.reshape(b, kv, bq, rows // bq, bk), -jnp.inf)
    return scores.reshape(b, kv, rows, bk)


def _forward(q, k, v, q_pos, k_pos, key_valid, window, ranges, bk):
    """q [nq, B, KV, R, D] -> out (same shape, q.dtype), lse [nq, B, KV, R] f32 (0 for rows with no key)."""

    def query_block(xs):
        qb, qp, (first, end) = xs

        def key_step(j, carry):
            m, l, acc = carry
            kb, vb, kp, valid, _ = _key_block(k, v, k_pos, key_valid, j, bk)
            s = _scores(qb, kb, qp, kp, valid, window)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing yet: exp(-inf) = 0, not NaN
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + p.sum(axis=-1)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vb, preferred_element_type=_F32)
            return m_new, l, alpha[..., None] * acc + pv

        rows = qb.shape[:-1]
        init = (jnp.full(rows, -jnp.inf, _F32), jnp.zeros(rows, _F32), jnp.zeros(qb.shape, _F32))
        m, l, acc = jax.lax.fori_loop(first, end, key_step, init)
        empty = l == 0.0
        out = acc / jnp.where(empty, 1.0, l)[..., None]
        return out.astype(q.dtype), jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))

    return jax.lax.map(query_block, (q, q_pos, (ranges[:, 0], ranges[:, 1])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash(q, k, v, q_pos, k_pos, key_valid, window, ranges, bk):
    return _forward(q, k, v, q_pos, k_pos, key_valid, window, ranges, bk)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, key_valid, window, ranges, bk):
    out, lse = _forward(q, k, v, q_pos, k_pos, key_valid, window, ranges, bk)
    return out, (q, k, v, out, lse, q_pos, k_pos, key_valid, window, ranges)


def _flash_bwd(bk, residuals, dout):
    q, k, v, out, lse, q_pos, k_pos, key_valid, window, ranges = residuals
    b, t, kv, d = k.shape
    scale = _F32(d**-0.5)
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1)  # D = rowsum(dO * O)

    def query_block(carry, xs):
        qb, dob, lse_b, delta_b, qp, first, end = xs

        def key_step(j, inner):
            dq, dk, dv = inner
            kb, vb, kp, valid, start = _key_block(k, v, k_pos, key_valid, j, bk)
            p = jnp.exp(_scores(qb, kb, qp, kp, valid, window) - lse_b[..., None])
            dp = jnp.einsum("bhqd,bhkd->bhqk", dob, vb, preferred_element_type=_F32)
            ds = (p * (dp - delta_b[..., None])).astype(q.dtype)
            dq = dq + jnp.einsum("bhqk,bhkd->bhqd", ds, kb, preferred_element_type=_F32)
            dv_j = jnp.einsum("bhqk,bhqd->bhkd", p.astype(dob.dtype), dob, preferred_element_type=_F32)
            dk_j = jnp.einsum("bhqk,bhqd->bhkd", ds, qb, preferred_element_type=_F32)
            # Keys the shifted last block shares with the previous one are masked here (p = ds = 0): adding
            # over the overlap adds zeros.
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, start, dk_j.shape[2], axis=2) + dk_j, start, axis=2)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, start, dv_j.shape[2], axis=2) + dv_j, start, axis=2)
            return dq, dk, dv

        dq, dk, dv = jax.lax.fori_loop(first, end, key_step, (jnp.zeros(qb.shape, _F32), *carry))
        return (dk, dv), (dq * scale).astype(q.dtype)

    zeros = jnp.zeros((b, kv, t, d), _F32)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros),
                                (q, dout.astype(q.dtype), lse, delta, q_pos, ranges[:, 0], ranges[:, 1]))
    dk = (dk * scale).transpose(0, 2, 1, 3).astype(k.dtype)
    dv = dv.transpose(0, 2, 1, 3).astype(v.dtype)
    return dq, dk, dv, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
