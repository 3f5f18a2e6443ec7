"""The "flash" backend with blocks small enough that the block machinery runs: several query and key blocks, the
shifted last key block, skipped blocks, rows with no key. tests/test_attention.py checks every backend at its
default block sizes; this file checks what only small blocks reach. Oracle: the "reference" backend."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dots_jax.ops.attention import NO_WINDOW, make_attention_mask, reference_attention
from dots_jax.ops.flash import FULL, MASKED, SKIP, _block_kinds, _ranges, flash_attention

TOL = 1e-5


def _case(b: int, s: int, t: int, n: int, kv: int, q_pos: np.ndarray, k_pos: np.ndarray, key_valid: np.ndarray,
          window: int, block_q: int, block_k: int) -> None:
    rng = np.random.default_rng(s * t + n)
    q = jnp.asarray(rng.normal(size=(b, s, n, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv, 16)), jnp.float32) for _ in range(2))
    q_pos, k_pos, key_valid = jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32), jnp.asarray(key_valid)
    rows = np.asarray(make_attention_mask(q_pos, k_pos, key_valid, window).any(-1))[:, :, None, None]
    dout = jnp.asarray(rng.normal(size=(b, s, n, 16)), jnp.float32)

    def run(fn):
        def loss(q, k, v):
            # The reference averages the values in a row with no key; only attendable rows are compared.
            return jnp.sum(fn(q, k, v, q_pos, k_pos, key_valid, window) * dout * rows)
        out = fn(q, k, v, q_pos, k_pos, key_valid, window)
        return (out, *jax.grad(loss, argnums=(0, 1, 2))(q, k, v))

    got = jax.jit(lambda: run(lambda *a: flash_attention(*a, block_q=block_q, block_k=block_k)))()
    want = jax.jit(lambda: run(reference_attention))()
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if name == "out":
            assert np.all(g[~np.broadcast_to(rows, g.shape)] == 0), "a row with no key must give 0"
            g, w = g * rows, w * rows
        assert np.isfinite(g).all(), name
        # Gradients that are 0 in exact arithmetic (one key: the softmax is constant) are held to the inputs' O(1)
        # scale: FA2's dS = P (dP - rowsum(dO * O)) leaves rounding there.
        scale = max(np.abs(w).max(), 1.0)
        assert np.abs(g - w).max() <= TOL * scale, (name, np.abs(g - w).max(), np.abs(w).max())


@pytest.mark.parametrize("window", [NO_WINDOW, 6])
def test_blocks_gqa_right_padded_odd_length(window):
    """GQA (6 heads on 2), 37 positions (5 query blocks of 8, the last padded; key blocks of 16, the last
    shifted), right-padded rows, a sliding window narrower than a block."""
    b, s = 2, 37
    pos = np.broadcast_to(np.arange(s), (b, s))
    valid = np.arange(s)[None, :] < np.array([[s], [20]])
    _case(b, s, s, 6, 2, pos, pos, valid, window, 8, 16)


def test_decode_and_rows_without_keys():
    """Three queries per row against a 50-slot cache filled to 13 and 41 (the unwritten tail skipped); row 0's
    first keys are invalid (left padding), so its query at position 1 attends nothing: output and gradients 0."""
    t, fill = 50, np.array([13, 41])
    k_pos = np.broadcast_to(np.arange(t), (2, t))
    valid = (np.arange(t)[None, :] < fill[:, None]) & ~((np.arange(t) < 3) & (np.arange(2) == 0)[:, None])
    q_pos = np.array([[1, 11, 12], [38, 39, 40]])
    _case(2, 3, t, 4, 4, q_pos, k_pos, valid, NO_WINDOW, 8, 8)


def test_single_token():
    one = np.zeros((1, 1), np.int32)
    _case(1, 1, 1, 2, 1, one, one, np.ones((1, 1), bool), NO_WINDOW, 8, 8)


def test_skipped_blocks():
    """The key blocks computed per query block of 8: causal stops at the diagonal (blocks below it unmasked), a
    window starts late, a cache stops at its last written slot, and an invalid prefix is skipped."""
    def kinds(q_pos, k_pos, valid, window, bq=8, bk=8):
        b, s = q_pos.shape
        q = jnp.asarray(q_pos).reshape(b, s // bq, bq).transpose(1, 0, 2)
        t = k_pos.shape[1]
        return _block_kinds(q, jnp.ones_like(q, bool), jnp.asarray(k_pos), jnp.asarray(valid), jnp.int32(window),
                            bk, -(-t // bk))

    def ranges(*args, **kwargs):
        return np.asarray(_ranges(kinds(*args, **kwargs))).tolist()

    pos = np.broadcast_to(np.arange(32), (2, 32))
    every = np.ones((2, 32), bool)
    assert ranges(pos, pos, every, NO_WINDOW) == [[0, 1], [0, 2], [0, 3], [0, 4]]
    # Below the diagonal every query attends every key: no mask there.
    want = np.where(np.tri(4, k=-1, dtype=bool), FULL, np.where(np.eye(4, dtype=bool), MASKED, SKIP))
    np.testing.assert_array_equal(kinds(pos, pos, every, NO_WINDOW), want)
    assert ranges(pos, pos, every, 8) == [[0, 1], [0, 2], [1, 3], [2, 4]]
    cache = np.arange(40)[None, :] < np.array([[10], [3]])
    assert ranges(np.array([[9], [2]]), np.broadcast_to(np.arange(40), (2, 40)), cache, NO_WINDOW, bq=1) == [[0, 2]]
    late = every & (np.arange(32) >= 17)
    assert ranges(pos, pos, late, NO_WINDOW) == [[0, 0], [0, 0], [2, 3], [2, 4]]


def test_nothing_of_size_s_by_t():
    """The compiled forward and gradient hold no buffer as large as one head's S x T scores."""
    b, s, n, kv, d = 1, 512, 2, 1, 8
    q, k = jnp.zeros((b, s, n, d)), jnp.zeros((b, s, kv, d))
    pos, valid = jnp.broadcast_to(jnp.arange(s), (b, s)), jnp.ones((b, s), bool)

    def f(q, k, v):
        return flash_attention(q, k, v, pos, pos, valid, NO_WINDOW, block_q=64, block_k=64)

    for fn in (f, jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2))):
        hlo = jax.jit(fn).lower(q, k, k).compile().as_text()
        shapes = re.findall(r"(?:f32|bf16|pred|s32)\[([\d,]+)\]", hlo)
        largest = max(int(np.prod([int(x) for x in shape.split(",")])) for shape in shapes)
        assert largest < s * s, largest
