"""Paged attention (dots_jax.ops.paged_attention) against a float64 numpy oracle written here: the "reference"
backend, "blocked" and "ragged" (the TPU kernel, in the Pallas interpreter on CPU), on steps that mix a fresh prefill, a
prefill chunk continuing a sequence, decodes and an unused row, over pages scattered through a shuffled pool; and
write_kv (new keys and values land at their page and offset, nothing else changes).

The interpreted kernel compiles slowly (seconds per shape and window), so the cases share a few tiny shapes.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dots_jax.ops import paged_blocked
from dots_jax.ops.common import NO_WINDOW
from dots_jax.ops.paged_attention import paged_attention, write_kv
from dots_jax.ops.ragged_paged import ragged_paged_attention

PAGE, PAGES_PER_ROW, POOL = 4, 6, 40  # rows hold up to 24 slots, in up to 6 of the pool's 40 pages
N, KV, D = 4, 2, 16  # GQA: two query heads per key/value head; tiny model's head dim (the kernel pads it to 128)

# (q_lens, kv_lens) per row of a step with S = 6 query slots: a fresh prefill, a chunk continuing a prefill, a
# decode deep into its pages, an unused row, a decode of a sequence's second token.
MIXED = ([6, 5, 1, 0, 1], [6, 19, 22, 0, 2])
DECODE = ([1, 1, 0, 1], [23, 9, 0, 4])  # S = 1
IDLE = ([0, 0, 0, 0], [0, 0, 0, 0])  # no query at all


def oracle(q: np.ndarray, pool: np.ndarray, table: np.ndarray, kv_lens: np.ndarray, q_lens: np.ndarray,
           window: int) -> np.ndarray:
    """Per row and query: softmax over the row's keys at positions p <= pos with pos - p < window, in float64."""
    q, pool = q.astype(np.float64), pool.astype(np.float64)
    groups = q.shape[2] // (pool.shape[2] // 2)
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        pages = table[b, : -(-kv_lens[b] // PAGE)]
        slots = pool[pages].reshape(-1, *pool.shape[2:])  # slot t = page table[b, t // PAGE], offset t % PAGE
        k, v = slots[:, 0::2], slots[:, 1::2]
        for j in range(q_lens[b]):
            pos = kv_lens[b] - q_lens[b] + j
            p = np.arange(kv_lens[b])
            p = p[(p <= pos) & (pos - p < window)]
            for h in range(q.shape[2]):
                scores = k[p, h // groups] @ q[b, j, h] / np.sqrt(q.shape[3])
                weights = np.exp(scores - scores.max())
                out[b, j, h] = weights @ v[p, h // groups] / weights.sum()
    return out


def make_step(rng: np.random.Generator, q_lens: list[int], kv_lens: list[int], s: int):
    """A step's arrays: a random pool, each row's pages drawn without replacement from a shuffled pool; table entries
    past a row's pages are out of range (no page: never to be read)."""
    b = len(q_lens)
    pool = rng.standard_normal((POOL, PAGE, 2 * KV, D)).astype(np.float32)
    table = rng.permutation(POOL)[: b * PAGES_PER_ROW].reshape(b, PAGES_PER_ROW).astype(np.int32)
    table[np.arange(PAGES_PER_ROW) >= -(-np.asarray(kv_lens)[:, None] // PAGE)] = POOL
    q = rng.standard_normal((b, s, N, D)).astype(np.float32)
    return q, pool, table, np.asarray(kv_lens, np.int32), np.asarray(q_lens, np.int32)


step_fn = jax.jit(paged_attention, static_argnames=("window", "backend"))


@pytest.mark.parametrize("backend", ["reference", "blocked", "ragged"])
@pytest.mark.parametrize(("steps", "s", "window"), [([MIXED] * 2, 6, NO_WINDOW), ([MIXED] * 2, 6, 5),
                                                     ([DECODE, IDLE], 1, NO_WINDOW)],
                         ids=["mixed", "mixed-window5", "decode"])
def test_paged_attention_matches_the_oracle(backend: str, steps: list[tuple[list[int], list[int]]], s: int,
                                            window: int) -> None:
    rng = np.random.default_rng(0)
    for lens in steps:  # each a new draw of pool, pages and queries through the one compiled step
        q, pool, table, kv_lens, q_lens = make_step(rng, *lens, s)
        out = np.asarray(step_fn(q, pool, table, kv_lens, q_lens, window=window, backend=backend))
        np.testing.assert_allclose(out, oracle(q, pool, table, kv_lens, q_lens, window), rtol=0, atol=1e-5)


def test_ragged_says_what_it_cannot_run() -> None:
    q = np.zeros((1, 1, 6, 128), np.float32)
    table, lens = np.zeros((1, 1), np.int32), np.ones(1, np.int32)
    pool = np.zeros((2, PAGE, 6, 128), np.float32)  # 3 key/value heads: 6 combined ones do not tile
    with pytest.raises(ValueError, match="3 key/value heads per device"):
        ragged_paged_attention(q, pool, table, lens, lens, NO_WINDOW)
    pool = np.zeros((2, PAGE, 4, 128), np.float32)

    def traced_window(window: jax.Array) -> jax.Array:
        return ragged_paged_attention(q, pool, table, lens, lens, window)

    with pytest.raises(ValueError, match="static positive int window"):
        jax.jit(traced_window)(np.int32(4))


def test_write_kv_puts_new_tokens_at_their_page_and_offset() -> None:
    rng = np.random.default_rng(1)
    q_lens, kv_lens, s = MIXED[0], MIXED[1], 6
    _, pool, table, kv_lens, q_lens = make_step(rng, q_lens, kv_lens, s)
    k, v = (rng.standard_normal((len(q_lens), s, KV, D)).astype(np.float32) for _ in range(2))
    expected = pool.copy()
    for b in range(len(q_lens)):
        for j in range(q_lens[b]):  # padding slots j >= q_lens[b] are dropped
            t = kv_lens[b] - q_lens[b] + j
            expected[table[b, t // PAGE], t % PAGE, 0::2] = k[b, j]
            expected[table[b, t // PAGE], t % PAGE, 1::2] = v[b, j]
    out = np.asarray(jax.jit(write_kv)(pool, k, v, table, kv_lens, q_lens))
    np.testing.assert_array_equal(out, expected)  # every other slot of the pool unchanged


@pytest.mark.parametrize("backend", ["reference", "blocked", "ragged"])
def test_a_layer_of_a_stacks_pool(backend: str) -> None:
    """The model's form: the whole [layers, pages, ...] pool and a traced layer number. Writes land in that layer's
    pages only and attention reads that layer's, as if it were a pool of its own."""
    rng = np.random.default_rng(2)
    q_lens, kv_lens, s = MIXED[0], MIXED[1], 6
    q, pool, table, kv_lens, q_lens = make_step(rng, q_lens, kv_lens, s)
    stack = rng.standard_normal((3, *pool.shape)).astype(np.float32)
    k, v = (rng.standard_normal((len(q_lens), s, KV, D)).astype(np.float32) for _ in range(2))

    @jax.jit
    def step(stack, layer, q, k, v, table, kv_lens, q_lens):
        stack = write_kv(stack, k, v, table, kv_lens, q_lens, layer=layer)
        return stack, paged_attention(q, stack, table, kv_lens, q_lens, backend=backend, layer=layer)

    new_stack, out = (np.asarray(x) for x in step(stack, np.int32(1), q, k, v, table, kv_lens, q_lens))
    np.testing.assert_array_equal(new_stack[[0, 2]], stack[[0, 2]])
    np.testing.assert_array_equal(new_stack[1], np.asarray(jax.jit(write_kv)(stack[1], k, v, table, kv_lens, q_lens)))
    np.testing.assert_allclose(out, oracle(q, new_stack[1], table, kv_lens, q_lens, NO_WINDOW), rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [NO_WINDOW, 5])
def test_blocked_across_several_blocks(monkeypatch, window: int) -> None:
    """Blocks of two pages: rows span up to three blocks, the loop stops after the longest row's last key, and the
    online softmax joins the blocks exactly."""
    monkeypatch.setattr(paged_blocked, "KEY_SLOTS_PER_BLOCK", 2 * PAGE)
    rng = np.random.default_rng(3)
    q, pool, table, kv_lens, q_lens = make_step(rng, *MIXED, 6)
    out = np.asarray(jax.jit(paged_blocked.blocked_paged_attention, static_argnums=5)(
        q, pool, table, kv_lens, q_lens, window))
    np.testing.assert_allclose(out, oracle(q, pool, table, kv_lens, q_lens, window), rtol=0, atol=1e-5)
