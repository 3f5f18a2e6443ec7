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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dots_jax.ops.common import make_attention_mask

__all__ = ["BLOCK_K", "BLOCK_Q", "flash_attention"]

BLOCK_Q = 512  # query positions per block (times G rows per key/value head)
BLOCK_K = 512  # key slots per block

_F32 = jnp.float32
SKIP, MASKED, FULL = 0, 1, 2
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
    kinds = _block_kinds(qpb, q_valid.reshape(b, nq, bq).transpose(1, 0, 2), k_pos.astype(jnp.int32), key_valid,
                        jnp.asarray(window, jnp.int32), bk, nk)
    out = _flash(qb, k, v, qpb, k_pos.astype(jnp.int32), key_valid.astype(bool), jnp.asarray(window, jnp.int32),
                 kinds, bk)
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


def _block_kinds(q_pos: jax.Array, q_valid: jax.Array, k_pos: jax.Array, key_valid: jax.Array, window: jax.Array,
                 bk: int, nk: int) -> jax.Array:
    """[nq, nk] int8: for query block i and key block j, SKIP (no query of the block may attend a key of the
    block), FULL (every query attends every key: no mask needed) or MASKED."""
    t = k_pos.shape[1]
    slots = jnp.arange(nk * bk)
    slot = jnp.minimum(slots, t - 1)  # the padded tail of the last block repeats slot t - 1, marked invalid
    kp = jnp.take(k_pos, slot, axis=1).reshape(-1, nk, bk)
    kvld = (jnp.take(key_valid, slot, axis=1) & (slots < t)).reshape(-1, nk, bk)
    has_key = kvld.any(axis=(0, 2))
    every_key = kvld.all(axis=(0, 2))  # never for a last block that overlaps the previous one
    k_min = jnp.where(kvld, kp, _BIG).min(axis=(0, 2))
    k_max = jnp.where(kvld, kp, -_BIG).max(axis=(0, 2))
    has_query = q_valid.any(axis=(1, 2))
    q_min = jnp.where(q_valid, q_pos, _BIG).min(axis=(1, 2))
    q_max = jnp.where(q_valid, q_pos, -_BIG).max(axis=(1, 2))
    # A key block may matter to a query block when its smallest key is not after the latest query (causal) and its
    # latest key is within the window of the earliest query; every pair attends when its latest key is not after
    # the earliest query and its smallest key within the window of the latest. Sentinels are zeroed (no wrap).
    live = has_query[:, None] & has_key[None, :]
    q_min, q_max = jnp.where(live, q_min[:, None], 0), jnp.where(live, q_max[:, None], 0)
    k_min, k_max = jnp.where(live, k_min[None, :], 0), jnp.where(live, k_max[None, :], 0)
    live &= (k_min <= q_max) & (q_min - k_max < window)
    full = live & every_key[None, :] & (k_max <= q_min) & (q_max - k_min < window)
    return jnp.where(full, FULL, jnp.where(live, MASKED, SKIP)).astype(jnp.int8)


def _ranges(kinds: jax.Array) -> jax.Array:
    """[n, 2] int32: for each row of kinds, the columns [first, end) from its first to its last block not skipped."""
    live = kinds != SKIP
    first = jnp.argmax(live, axis=1)
    end = live.shape[1] - jnp.argmax(live[:, ::-1], axis=1)
    some = live.any(axis=1)
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
            window: jax.Array, masked: bool) -> jax.Array:
    """Scaled scores [B, KV, bq * G, bk] in f32, -inf where the mask forbids (when masked)."""
    b, kv, rows, d = qb.shape
    bq, bk = q_pos.shape[1], k_pos.shape[1]
    scores = jnp.einsum("bhqd,bhkd->bhqk", qb, kb, preferred_element_type=_F32) * _F32(d**-0.5)
    if not masked:
        return scores
    mask = make_attention_mask(q_pos, k_pos, valid, window)
    scores = jnp.where(mask[:, None, :, None, :], scores.reshape(b, kv, bq, rows // bq, bk), -jnp.inf)
    return scores.reshape(b, kv, rows, bk)


def _scores_t(kb: jax.Array, qb: jax.Array, k_pos: jax.Array, q_pos: jax.Array, valid: jax.Array,
              window: jax.Array, masked: bool) -> jax.Array:
    """_scores transposed, [B, KV, bk, bq * G]: the backward's layout, where dK, dV and dQ^T are plain matmuls."""
    b, kv, rows, d = qb.shape
    bq, bk = q_pos.shape[1], k_pos.shape[1]
    scores = jnp.einsum("bhkd,bhqd->bhkq", kb, qb, preferred_element_type=_F32) * _F32(d**-0.5)
    if not masked:
        return scores
    mask = make_attention_mask(q_pos, k_pos, valid, window).transpose(0, 2, 1)
    scores = jnp.where(mask[:, None, :, :, None], scores.reshape(b, kv, bk, bq, rows // bq), -jnp.inf)
    return scores.reshape(b, kv, bk, rows)


def _forward(q, k, v, q_pos, k_pos, key_valid, window, kinds, bk):
    """q [nq, B, KV, R, D] -> out (same shape, q.dtype), lse [nq, B, KV, R] f32 (0 for rows with no key)."""

    def query_block(xs):
        qb, qp, kinds_i, (first, end) = xs

        def key_step(j, carry, masked):
            m, l, acc = carry
            kb, vb, kp, valid, _ = _key_block(k, v, k_pos, key_valid, j, bk)
            s = _scores(qb, kb, qp, kp, valid, window, masked)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing yet: exp(-inf) = 0, not NaN
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + p.sum(axis=-1)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vb, preferred_element_type=_F32)
            return m_new, l, alpha[..., None] * acc + pv

        rows = qb.shape[:-1]
        init = (jnp.full(rows, -jnp.inf, _F32), jnp.zeros(rows, _F32), jnp.zeros(qb.shape, _F32))
        m, l, acc = jax.lax.fori_loop(first, end, _by_kind(kinds_i, key_step), init)
        empty = l == 0.0
        out = acc / jnp.where(empty, 1.0, l)[..., None]
        return out.astype(q.dtype), jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))

    ranges = _ranges(kinds)
    return jax.lax.map(query_block, (q, q_pos, kinds, (ranges[:, 0], ranges[:, 1])))


def _by_kind(kinds: jax.Array, step: Callable) -> Callable:
    """A fori_loop body that runs step(j, carry, masked) without the mask on FULL blocks."""
    def body(j: jax.Array, carry: Any) -> Any:
        return jax.lax.cond(kinds[j] == FULL, functools.partial(step, masked=False),
                            functools.partial(step, masked=True), j, carry)
    return body


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash(q, k, v, q_pos, k_pos, key_valid, window, kinds, bk):
    return _forward(q, k, v, q_pos, k_pos, key_valid, window, kinds, bk)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, key_valid, window, kinds, bk):
    out, lse = _forward(q, k, v, q_pos, k_pos, key_valid, window, kinds, bk)
    return out, (q, k, v, out, lse, q_pos, k_pos, key_valid, window, kinds)


def _flash_bwd(bk, residuals, dout):
    """FlashAttention-2's order: for each key block, loop over the query blocks that may attend it, accumulating
    dK and dV of the block; dQ accumulates per query block. Scores are built transposed ([keys, queries]) so
    that every product is a plain or an A @ B^T matmul: XLA:CPU runs A^T @ B several times slower."""
    q, k, v, out, lse, q_pos, k_pos, key_valid, window, kinds = residuals
    nq, b, kv, rows, d = q.shape
    t = k.shape[1]
    scale = _F32(d**-0.5)
    dout = dout.astype(q.dtype)
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1)  # D = rowsum(dO * O)
    ranges = _ranges(kinds.T)

    def key_block(dq_t, xs):
        j, kinds_j, first, end = xs
        kb, vb, kp, valid, _ = _key_block(k, v, k_pos, key_valid, j, bk)
        kb_t = kb.transpose(0, 1, 3, 2)

        def query_step(i, carry, masked):
            dq_t, dk, dv = carry
            qb, dob = q[i], dout[i]
            p_t = jnp.exp(_scores_t(kb, qb, kp, q_pos[i], valid, window, masked) - lse[i][:, :, None, :])
            dv = dv + jnp.einsum("bhkq,bhqd->bhkd", p_t.astype(dob.dtype), dob, preferred_element_type=_F32)
            dp_t = jnp.einsum("bhkd,bhqd->bhkq", vb, dob, preferred_element_type=_F32)
            ds_t = (p_t * (dp_t - delta[i][:, :, None, :])).astype(q.dtype)
            dk = dk + jnp.einsum("bhkq,bhqd->bhkd", ds_t, qb, preferred_element_type=_F32)
            dq_i = jax.lax.dynamic_index_in_dim(dq_t, i, keepdims=False)
            dq_i = dq_i + jnp.einsum("bhdk,bhkq->bhdq", kb_t, ds_t, preferred_element_type=_F32)
            return jax.lax.dynamic_update_index_in_dim(dq_t, dq_i, i, 0), dk, dv

        zeros = jnp.zeros(kb.shape, _F32)
        dq_t, dk, dv = jax.lax.fori_loop(first, end, _by_kind(kinds_j, query_step), (dq_t, zeros, zeros))
        return dq_t, (dk, dv)

    nk = kinds.shape[1]
    dq_t, (dk, dv) = jax.lax.scan(key_block, jnp.zeros((nq, b, kv, d, rows), _F32),
                                  (jnp.arange(nk), kinds.T, ranges[:, 0], ranges[:, 1]))
    dq = (dq_t * scale).transpose(0, 1, 2, 4, 3).astype(q.dtype)
    return dq, _unblock(dk * scale, t).astype(k.dtype), _unblock(dv, t).astype(v.dtype), None, None, None, None, None


def _unblock(x: jax.Array, t: int) -> jax.Array:
    """Key blocks [nk, B, KV, bk, D] -> [B, T, KV, D]; the last block was read ending at T (its first slots belong
    to the previous block, and hold zeros here: masked)."""
    nk, b, kv, bk, d = x.shape
    x = x.transpose(1, 0, 3, 2, 4)
    head = x[:, :-1].reshape(b, (nk - 1) * bk, kv, d)
    return jnp.concatenate([head, x[:, -1, nk * bk - t:]], axis=1)


_flash.defvjp(_flash_fwd, _flash_bwd)
