"""The "ragged" paged attention backend: the TPU kernel of jax.experimental.pallas.ops.tpu.ragged_paged_attention
(its copy in pallas_kernels/ragged_paged_attention.py, which also runs in the Pallas interpreter).

Same contract as dots_jax.ops.paged_attention.paged_attention ("reference" is its oracle):

    ragged_paged_attention(q [B, S, N, D], kv_pages [P, page, 2 * KV, D], page_indices [B, M], kv_lens [B],
                           q_lens [B], window) -> [B, S, N, D] in q.dtype

Row b's q_lens[b] new tokens are at the start of its S slots (right-padded), at positions kv_lens[b] - q_lens[b] + j;
query j attends row b's keys at positions p < kv_lens[b] with 0 <= pos - p < window; padding queries give zeros.

The kernel wants the queries of all sequences packed back to back ([tokens, N, D], sequence i owning tokens
cu_q_lens[i] .. cu_q_lens[i + 1] - 1, its last query at position kv_lens[i] - 1): exactly our rows once their
padding is squeezed out, so this packs the real queries (a gather), runs the kernel over those only (a mixed step's
decode rows cost one query each, not S) and unpacks (a gather, zeros for padding).

Mosaic on TPU, the Pallas interpreter elsewhere (tests: slow), chosen when lowering so that an ahead-of-time TPU
compile from a CPU host gets Mosaic. Mosaic kernels cannot be partitioned by XLA, so under a multi-device mesh the
kernel runs per device in shard_map: heads split over the mesh axes that divide the key/value heads, the page pool
and the rows whole on every device (a pool sharded otherwise is gathered first).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels import ragged_paged_attention as rpa

__all__ = ["ragged_paged_attention"]

# Block sizes, static: jax's tuned table keys on jax.devices(), which is wrong when compiling for a TPU from another
# host. About 512 key slots (whole pages) per block and 32 queries, the kernel's untuned default; not tuned on a TPU.
KV_SLOTS_PER_BLOCK = 512
QUERIES_PER_BLOCK = 32
LANES = 128  # the kernel's head dim must be a multiple of the TPU's lane width
# The kernel takes one static k_scale and v_scale for the whole pool, not a scale per token and head. Reading a scale
# page beside each KV page works in the kernel (DMA, then a lane-masked column per head), but on TPU an f32 scale
# pool [pages, page, 2 * KV] has XLA's default layout with the pages minor (its minor dim is far under 128 lanes),
# and Mosaic needs it row-major: XLA then relays the whole pool out, 16x padded, before every layer's call.
INT8_KV_UNSUPPORTED = (
    "kv_cache_dtype='int8' is not supported by the 'ragged' paged attention backend (the TPU kernel, the serving "
    "engine's default on TPU with a float cache): it takes no per-token scales. Use 'auto' (which picks 'blocked' "
    "for an int8 cache), 'blocked' or 'reference'")


def ragged_paged_attention(q: jax.Array, kv_pages: jax.Array, page_indices: jax.Array, kv_lens: jax.Array,
                           q_lens: jax.Array, window: int | jax.Array, layer: int | jax.Array | None = None,
                           scale_pages: jax.Array | None = None) -> jax.Array:
    """The "ragged" backend (see the module docstring). `window` must be a Python int: the kernel's mask is
    static. A stack's pool [L, P, ...] with `layer` is read as one pool of L * P pages (a view, not a copy), in
    which the layer's pages are layer * P + its table's. An int8 pool (scale_pages given) is refused: see
    INT8_KV_UNSUPPORTED."""
    if scale_pages is not None:
        raise ValueError(INT8_KV_UNSUPPORTED)
    b, s, n, d = q.shape
    if layer is not None and kv_pages.ndim == 5:
        page_indices = page_indices + layer * kv_pages.shape[1]
        kv_pages = kv_pages.reshape(-1, *kv_pages.shape[2:])
    if (kv_pages.ndim != 4 or kv_pages.shape[2] % 2 or kv_pages.shape[3] != d or n % (kv_pages.shape[2] // 2)
            or page_indices.ndim != 2 or page_indices.shape[0] != b or kv_lens.shape != (b,)
            or q_lens.shape != (b,)):
        raise ValueError(f"ragged paged attention shapes: q {q.shape}, kv_pages {kv_pages.shape}, page_indices "
                         f"{page_indices.shape}, kv_lens {kv_lens.shape}, q_lens {q_lens.shape} (want q [B, S, N, D], "
                         "kv_pages [P, page, 2 * KV, D] with N a multiple of KV, page_indices [B, M], lens [B])")
    if not isinstance(window, int | np.integer) or isinstance(window, bool) or window < 1:
        raise ValueError(f"ragged paged attention needs a static positive int window (the kernel's mask is built "
                         f"when tracing; a layer stack whose windows differ passes a traced one: use the 'reference' "
                         f"backend there), got {window!r}")
    # A window at least as long as a row's slots masks nothing.
    sliding = None if window >= page_indices.shape[1] * kv_pages.shape[1] else int(window)
    fn = functools.partial(_ragged, sliding_window=sliding)
    return _per_device(fn, q, kv_pages, page_indices.astype(jnp.int32), kv_lens.astype(jnp.int32),
                       q_lens.astype(jnp.int32))


def head_axes(mesh_shape: Mapping[str, int], kv_heads: int) -> tuple[str, ...]:
    """The mesh axes over which the kernel splits the key/value heads, and so how the page pool is best split:
    the largest axes first (the more ways the heads split, the less work each device repeats), each kept while the
    product still divides the heads."""
    axes: list[str] = []
    for axis in sorted(mesh_shape, key=lambda a: -mesh_shape[a]):
        if mesh_shape[axis] > 1 and kv_heads % (math.prod(mesh_shape[a] for a in axes) * mesh_shape[axis]) == 0:
            axes.append(axis)
    return tuple(axes)


def _per_device(fn: Callable[..., jax.Array], q: jax.Array, kv_pages: jax.Array, page_indices: jax.Array,
                kv_lens: jax.Array, q_lens: jax.Array) -> jax.Array:
    """fn(q, kv_pages, page_indices, kv_lens, q_lens), in shard_map under a multi-device mesh (heads split)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, kv_pages, page_indices, kv_lens, q_lens)
    heads = head_axes(dict(mesh.shape), kv_pages.shape[2] // 2)
    # Contiguous chunks of the combined heads (k0, v0, k1, v1, ...) are whole key/value heads, the ones the same
    # chunk of query heads reads (query head n reads key/value head n // (N // KV)).
    spec = P(None, None, tuple(heads) or None, None)
    # check_vma=False: Pallas kernels start from unannotated scratch, which the varying-axes check rejects.
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, P(), P(), P()), out_specs=spec,
                         check_vma=False)(q, kv_pages, page_indices, kv_lens, q_lens)


def _check_heads(n: int, combined: int, q_dtype: jnp.dtype, kv_dtype: jnp.dtype) -> None:
    """The kernel's head tiling, with an error that says what does not fit."""
    try:
        rpa.get_min_heads_per_blk(n, combined, q_dtype, kv_dtype)
    except ValueError as e:
        packing = rpa.get_dtype_packing(kv_dtype)
        raise ValueError(
            f"ragged paged attention: {combined // 2} key/value heads per device ({combined} K and V heads "
            f"combined) do not tile in {jnp.dtype(kv_dtype).name}: the kernel needs the combined count to be a "
            f"multiple of {packing} whose quotient is 1, 2, 4, 8 or a multiple of 8") from e


def _ragged(q: jax.Array, kv_pages: jax.Array, page_indices: jax.Array, kv_lens: jax.Array, q_lens: jax.Array, *,
            sliding_window: int | None) -> jax.Array:
    """The kernel on one device's heads: pack the real queries, attend, unpack."""
    b, s, n, d = q.shape
    num_pages, page_size, combined, _ = kv_pages.shape
    _check_heads(n, combined, q.dtype, kv_pages.dtype)
    tokens = b * s
    cu_q_lens = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(q_lens, dtype=jnp.int32)])
    # Packed token i is query j of row r, r the row whose span [cu_q_lens[r], cu_q_lens[r + 1]) holds i. Tokens past
    # the last span are never computed (the kernel stops at cu_q_lens[B]) and never read back.
    i = jnp.arange(tokens, dtype=jnp.int32)
    row = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], i, side="right"), b - 1)
    source = jnp.clip(row * s + i - cu_q_lens[row], 0, tokens - 1)
    packed = q.reshape(tokens, n, d)[source]
    # Zeros add nothing to q.k nor to the output's real columns. Padding copies the pool: free for dots1's head dim
    # (128), a cost only small models (tests) pay.
    d_pad = -(-d // LANES) * LANES
    if d_pad != d:
        packed = jnp.pad(packed, ((0, 0), (0, 0), (0, d_pad - d)))
        kv_pages = jnp.pad(kv_pages, ((0, 0), (0, 0), (0, 0), (0, d_pad - d)))

    # The kernel fetches the first key block of every sequence ahead of its turn; an unused row (q_lens 0) with no
    # keys would leave that copy unclaimed and shift every later sequence's buffers, so it gets one key (and no
    # query reads it). The kernel DMAs the pages of a row's first cdiv(kv_len, page) table entries, and its entry 0
    # in place of any past them in a block, so an unused row's entry 0 is read: every entry is clamped to a page
    # (what it holds past kv_len is masked).
    kv_lens = jnp.where(q_lens > 0, kv_lens, 1)
    page_indices = jnp.clip(page_indices, 0, num_pages - 1)
    pages_per_block = max(1, min(page_indices.shape[1], KV_SLOTS_PER_BLOCK // page_size))
    kernel = functools.partial(rpa.ragged_paged_attention, sm_scale=d**-0.5, sliding_window=sliding_window,
                               num_kv_pages_per_block=pages_per_block,
                               num_queries_per_block=min(tokens, QUERIES_PER_BLOCK))
    num_seqs = jnp.array([b], jnp.int32)

    def run(interpret: bool) -> Callable[..., jax.Array]:
        def call(packed, kv_pages, kv_lens, page_indices, cu_q_lens):
            return kernel(packed, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, interpret=interpret)
        return call

    def attend(*args: jax.Array) -> jax.Array:
        # Chosen when lowering, not from jax.default_backend(): a CPU host compiling ahead of time for a TPU must
        # get the Mosaic kernel, not the interpreter.
        return jax.lax.platform_dependent(*args, tpu=run(False), default=run(True))

    # A step without a single query is all padding, and the kernel would start its first key prefetch and never
    # wait for it.
    out = jax.lax.cond(cu_q_lens[-1] > 0, attend, lambda packed, *_: jnp.zeros_like(packed), packed, kv_pages,
                       kv_lens, page_indices, cu_q_lens)
    j = jnp.arange(s, dtype=jnp.int32)
    out = out[jnp.clip(cu_q_lens[:-1, None] + j, 0, tokens - 1), :, :d]  # [B, S, N, D]
    return jnp.where((j < q_lens[:, None])[:, :, None, None], out, 0).astype(q.dtype)
