"""Attention over a paged KV cache (the serving engine's), and the write of new keys and values into its pages.

    paged_attention(q [B, S, N, D], kv_pages [P, page, 2 * KV, D], page_indices [B, M], kv_lens [B], q_lens [B],
                    *, window, backend, layer=None) -> [B, S, N, D] in q.dtype

kv_pages may also be a layer stack's whole pool [L, P, page, 2 * KV, D], with `layer` (an int or a traced scalar)
naming the layer whose pages the table indexes; write_kv takes the same. The model scans its layers carrying the
stack's pool this way: every layer writes and reads its own pages in the one buffer, which XLA updates in place
(a per-layer slice of the pool, taken and put back, is a copy of it).

A step has B rows (sequences) of S query slots. Row b's q_lens[b] new tokens sit at the start of its row
(right-padded), at positions kv_lens[b] - q_lens[b] + j; by the time attention runs, write_kv has put their keys and
values into slots 0 .. kv_lens[b] - 1 of the row's pages (slot t in page page_indices[b, t // page] at offset
t % page). Query j of row b attends the row's keys at positions p < kv_lens[b] with 0 <= pos - p < window: causal,
as dots_jax.ops.attention's contract with positions equal to slots. Padding queries (j >= q_lens[b]) give zeros.
Rows may mix a decode (q_lens 1), a prefill chunk (q_lens up to S) and nothing (q_lens 0) in one call.

K and V are interleaved by head in a page (k0, v0, k1, v1, ...), the layout of Pallas' ragged_paged_attention.

An int8 cache (dots_jax.ops.kv_int8): int8 pages plus scale_pages [(L,) P, page, 2 * KV] f32, one scale per token
and key or value head in the same interleave; write_kv_int8 quantises what it writes, and paged_attention(...,
scale_pages=) dequantises what it reads ("reference" and "blocked"; "ragged" refuses an int8 pool).

Backends (they agree to float rounding):
  "reference"  gathers each row's pages into a dense [B, M * page] cache and runs dots_jax.ops.attention (its "auto"
               backend): runs everywhere; the CPU serving path and the oracle of the kernel.
  "blocked"    a block of pages at a time with an online softmax, up to the longest row's last key
               (dots_jax.ops.paged_blocked): its cost follows the lengths, not the tables' width.
  "ragged"     Pallas' ragged_paged_attention (dots_jax.ops.ragged_paged): Mosaic on TPU, the interpreter elsewhere.
"auto" is "ragged" on TPU and "blocked" elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dots_jax.ops.attention import attention
from dots_jax.ops.common import NO_WINDOW
from dots_jax.ops.kv_int8 import quantize_kv
from dots_jax.ops.paged_blocked import blocked_paged_attention
from dots_jax.ops.ragged_paged import ragged_paged_attention

__all__ = ["PAGED_BACKENDS", "default_paged_backend", "paged_attention", "reference_paged_attention",
           "slot_positions", "write_kv", "write_kv_int8"]

PagedBackend = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, int, jax.Array | None,
                         jax.Array | None], jax.Array]


def slot_positions(kv_lens: jax.Array, q_lens: jax.Array, s: int) -> jax.Array:
    """[B, s] int32: the position of each query slot (padding slots continue past the row's end)."""
    return (kv_lens - q_lens)[:, None].astype(jnp.int32) + jnp.arange(s, dtype=jnp.int32)[None, :]


def interleave_kv(k: jax.Array, v: jax.Array) -> jax.Array:
    """k, v [..., KV, D] -> [..., 2 * KV, D] as k0, v0, k1, v1, ..."""
    return jnp.stack([k, v], axis=-2).reshape(*k.shape[:-2], 2 * k.shape[-2], k.shape[-1])


def _slots(kv_pages: jax.Array, s: int, page_indices: jax.Array, kv_lens: jax.Array, q_lens: jax.Array,
           layer: int | jax.Array | None) -> tuple[jax.Array, ...]:
    """The pool index of each of the step's [B, s] slots; padding slots get an out-of-range page, which a
    mode="drop" scatter skips."""
    num_pages, page = kv_pages.shape[-4:-2]
    pos = slot_positions(kv_lens, q_lens, s)
    real = jnp.arange(s)[None, :] < q_lens[:, None]
    which = jnp.clip(pos // page, 0, page_indices.shape[1] - 1)
    pages = jnp.take_along_axis(page_indices, which, axis=1)
    pages = jnp.where(real, pages, num_pages)
    return (pages, pos % page) if layer is None else (layer, pages, pos % page)


def write_kv(kv_pages: jax.Array, k: jax.Array, v: jax.Array, page_indices: jax.Array, kv_lens: jax.Array,
             q_lens: jax.Array, layer: int | jax.Array | None = None) -> jax.Array:
    """Scatter the step's new keys and values (k, v [B, S, KV, D]) into their pages (of `layer`, for a stack's
    pool); padding slots are dropped."""
    where = _slots(kv_pages, k.shape[1], page_indices, kv_lens, q_lens, layer)
    return kv_pages.at[where].set(interleave_kv(k, v).astype(kv_pages.dtype), mode="drop")


def write_kv_int8(kv_pages: jax.Array, scale_pages: jax.Array, k: jax.Array, v: jax.Array, page_indices: jax.Array,
                  kv_lens: jax.Array, q_lens: jax.Array, layer: int | jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """write_kv for an int8 pool: each new key and value vector quantised with its own scale, which goes to the
    same slot of scale_pages."""
    where = _slots(kv_pages, k.shape[1], page_indices, kv_lens, q_lens, layer)
    values, scales = quantize_kv(interleave_kv(k, v))
    return (kv_pages.at[where].set(values, mode="drop"), scale_pages.at[where].set(scales, mode="drop"))


def reference_paged_attention(q: jax.Array, kv_pages: jax.Array, page_indices: jax.Array, kv_lens: jax.Array,
                              q_lens: jax.Array, window: int, layer: int | jax.Array | None = None,
                              scale_pages: jax.Array | None = None) -> jax.Array:
    """The "reference" backend: each row's pages gathered into a dense cache (dequantised, for an int8 pool), then
    the dense attention contract."""
    b, s = q.shape[:2]
    combined, d = kv_pages.shape[-2:]
    rows = kv_pages[page_indices] if layer is None else kv_pages[layer, page_indices]
    rows = rows.reshape(b, -1, combined, d)  # [B, M * page, 2 * KV, D]
    if scale_pages is not None:
        scales = scale_pages[page_indices] if layer is None else scale_pages[layer, page_indices]
        rows = rows.astype(jnp.float32) * scales.reshape(b, -1, combined, 1)
    k, v = rows[:, :, 0::2].astype(q.dtype), rows[:, :, 1::2].astype(q.dtype)
    k_pos = jnp.broadcast_to(jnp.arange(rows.shape[1], dtype=jnp.int32), (b, rows.shape[1]))
    out = attention(q, k, v, slot_positions(kv_lens, q_lens, s), k_pos, k_pos < kv_lens[:, None], window=window)
    return _zero_padding(out, q_lens)


def _zero_padding(out: jax.Array, q_lens: jax.Array) -> jax.Array:
    real = jnp.arange(out.shape[1])[None, :] < q_lens[:, None]
    return jnp.where(real[:, :, None, None], out, jnp.zeros((), out.dtype))


def default_paged_backend(int8: bool = False) -> str:
    """"ragged" (the TPU kernel) on TPU, else "blocked". An int8 pool gets "blocked" everywhere: the kernel takes no
    per-token scales (ragged_paged.INT8_KV_UNSUPPORTED)."""
    tpu = jax.default_backend() == "tpu" and "ragged" in PAGED_BACKENDS
    return "ragged" if tpu and not int8 else "blocked"


def paged_attention(q: jax.Array, kv_pages: jax.Array, page_indices: jax.Array, kv_lens: jax.Array,
                    q_lens: jax.Array, *, window: int = NO_WINDOW, backend: str = "auto",
                    layer: int | jax.Array | None = None, scale_pages: jax.Array | None = None) -> jax.Array:
    """Attention of the step's queries over the paged cache (see the module docstring for the contract)."""
    b, s, n, d = q.shape
    ndim = 4 if layer is None else 5
    if kv_pages.ndim != ndim or kv_pages.shape[-1] != d or kv_pages.shape[-2] % 2 or n % (kv_pages.shape[-2] // 2):
        raise ValueError(f"paged attention shapes: q {q.shape}, kv_pages {kv_pages.shape} (want q [B, S, N, D], "
                         "kv_pages [pages, page_size, 2 * KV, D] with N a multiple of KV, or [layers, pages, ...] "
                         "with a layer)")
    if (kv_pages.dtype == jnp.int8) != (scale_pages is not None) or (
            scale_pages is not None and scale_pages.shape != kv_pages.shape[:-1]):
        raise ValueError(f"paged attention: an int8 pool needs scale_pages of its shape less head_dim, and only an "
                         f"int8 pool takes them: kv_pages {kv_pages.dtype} {kv_pages.shape}, scale_pages "
                         f"{None if scale_pages is None else scale_pages.shape}")
    if page_indices.ndim != 2 or page_indices.shape[0] != b or kv_lens.shape != (b,) or q_lens.shape != (b,):
        raise ValueError(f"paged attention tables: page_indices {page_indices.shape} (want [{b}, M]), kv_lens "
                         f"{kv_lens.shape} and q_lens {q_lens.shape} (want [{b}])")
    if backend == "auto":
        backend = default_paged_backend(int8=scale_pages is not None)
    if backend not in PAGED_BACKENDS:
        raise ValueError(f"unknown paged attention backend {backend!r}; known: {sorted(PAGED_BACKENDS)} (or 'auto')")
    return PAGED_BACKENDS[backend](q, kv_pages, page_indices.astype(jnp.int32), kv_lens.astype(jnp.int32),
                                   q_lens.astype(jnp.int32), window, layer, scale_pages)


PAGED_BACKENDS: dict[str, PagedBackend] = {"reference": reference_paged_attention, "blocked": blocked_paged_attention,
                                           "ragged": ragged_paged_attention}
