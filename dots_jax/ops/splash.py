"""Fused attention kernels behind dots_jax.ops.attention's contract: "splash" (TPU) and "cudnn" (GPU).

"splash": Pallas' splash attention (jax.experimental.pallas.ops.tpu.splash_attention), Mosaic on TPU and the Pallas
interpreter elsewhere (tests), chosen when lowering. Its masks are static and by slot: causal with the queries at
slots q_offset.., a local window of `window` slots, key validity through segment ids, GQA through the kernel's MQA
form per key/value head (K and V are never repeated). It needs a static window and a known q_offset: a traced
q_offset (a KV cache) runs splash when it is 0 (a prefill into a fresh cache) and the exact fallback otherwise;
without q_offset, or with a traced window, everything goes to the fallback.

"cudnn": jax.nn.dot_product_attention with cuDNN's fused kernel on GPU ("xla" on other platforms, so that CPU tests
check the masking), for q_offset == 0 known when tracing (training, a forward without cache) and a static window.

The fallback is "flash" (dots_jax.ops.flash), exact for any positions.

Mosaic kernels cannot be partitioned by XLA, so under a multi-device mesh splash runs per device in shard_map:
rows split as the model splits its batch, heads over the other mesh axes that divide the key/value heads.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dots_jax.ops.flash import flash_attention
from dots_jax.parallel.sharding import MESH_AXES, batch_axes

__all__ = ["cudnn_attention", "splash_attention"]

LANES = 128  # the TPU's lane width: splash's blocks are multiples of it


def _fallback(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, key_valid: jax.Array,
              window: int | jax.Array, q_offset: int | jax.Array | None) -> jax.Array:
    """The exact backend for what the fused kernels do not cover."""
    return flash_attention(q, k, v, q_pos, k_pos, key_valid, window, q_offset)


def _static_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block(length: int) -> int:
    # Larger blocks amortise the kernel's per-step overhead on long sequences; short ones pad less with 128.
    return 512 if length >= 2048 else LANES


def _has_key(key_valid: jax.Array, s: int, window: int, q_offset: int) -> jax.Array:
    """[B, s] bool: query i (slot q_offset + i) has a valid key among slots (q_offset + i - window, q_offset + i]."""
    counts = jnp.pad(jnp.cumsum(key_valid.astype(jnp.int32), axis=1), ((0, 0), (1, 0)))  # counts[:, j] = sum [0, j)
    hi = q_offset + jnp.arange(s) + 1
    lo = jnp.maximum(hi - window, 0)
    return (counts[:, hi] - counts[:, lo]) > 0


# ------------------------------------------------------------------------------------------------------ splash
def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                     key_valid: jax.Array, window: int | jax.Array, q_offset: int | jax.Array | None) -> jax.Array:
    """The "splash" backend (see the module docstring): Backend signature of dots_jax.ops.attention."""
    if q_offset is None or not _static_int(window):
        return _fallback(q, k, v, q_pos, k_pos, key_valid, window, q_offset)
    if _static_int(q_offset):
        return _per_device(functools.partial(_splash, window=int(window), q_offset=int(q_offset)), q, k, v,
                           key_valid)

    def fresh(q, k, v, q_pos, k_pos, key_valid):
        return _per_device(functools.partial(_splash, window=int(window), q_offset=0), q, k, v, key_valid)

    def other(q, k, v, q_pos, k_pos, key_valid):
        return _fallback(q, k, v, q_pos, k_pos, key_valid, window, q_offset)

    return jax.lax.cond(q_offset == 0, fresh, other, q, k, v, q_pos, k_pos, key_valid)


def _per_device(fn: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array,
                key_valid: jax.Array) -> jax.Array:
    """fn(q, k, v, key_valid), in shard_map under a multi-device mesh (rows and heads split, the sequence whole)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, key_valid)
    rows = batch_axes(q.shape[0], mesh) if tuple(mesh.axis_names) == MESH_AXES else None
    used = set(rows or ())
    heads: list[str] = []
    # The largest axes first: the more ways the heads split, the less work each device repeats.
    for axis in sorted(mesh.axis_names, key=lambda a: -mesh.shape[a]):
        size = math.prod(mesh.shape[a] for a in heads) * mesh.shape[axis]
        if axis not in used and mesh.shape[axis] > 1 and k.shape[2] % size == 0:
            heads.append(axis)
    spec = P(rows, None, tuple(heads) or None, None)
    # check_vma=False: Pallas kernels start from unannotated scratch, which the varying-axes check rejects.
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P(rows, None)), out_specs=spec,
                         check_vma=False)(q, k, v, key_valid)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, *, window: int,
            q_offset: int) -> jax.Array:
    """Splash attention on one device's rows and heads; queries at slots q_offset.."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, s, n, d = q.shape
    t, kv = k.shape[1], k.shape[2]
    groups = n // kv
    block_q = _block(s)
    s_pad = _round_up(s, block_q)
    # Every padding query gets a key slot of its own (its own slot, an invalid one): a query with nothing to attend
    # would give NaN, and its NaN would reach the other queries' gradients through the backward kernel.
    block_kv = _block(max(t, q_offset + s_pad))
    t_pad = _round_up(max(t, q_offset + s_pad), block_kv)
    d_pad = _round_up(d, LANES)  # zeros add nothing to q.k nor to the output's real columns

    key_valid = jnp.pad(key_valid, ((0, 0), (0, t_pad - t)))
    # Segment ids: a query with a valid key in its window (segment 1) attends exactly the valid keys (segment 1); one
    # without (a padding query) attends the invalid slots of its window instead, its own among them: finite values
    # that nobody reads, and its gradient stays among invalid keys (whose K/V gradients nobody reads either).
    q_segment = _has_key(key_valid, s_pad, window, q_offset).astype(jnp.int32)
    kv_segment = key_valid.astype(jnp.int32)

    scale = jnp.asarray(d**-0.5, q.dtype)  # of the real head dim; the kernel itself does not scale
    q = jnp.pad(q * scale, ((0, 0), (0, s_pad - s), (0, 0), (0, d_pad - d)))
    q = q.reshape(b, s_pad, kv, groups, d_pad).transpose(0, 2, 3, 1, 4)  # [B, KV, G, S, D]: head n = kv * G + g
    k, v = (jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, d_pad - d))).transpose(0, 2, 1, 3) for x in (k, v))

    shape = (s_pad, t_pad)
    if window >= q_offset + s_pad:  # the window reaches back past slot 0 from every query
        mask = sa.CausalMask(shape, offset=q_offset)
    else:
        mask = sa.LocalMask(shape, window_size=(window - 1, 0), offset=q_offset)
    blocks = sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
                           block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                           block_kv_dq=block_kv)

    def run(interpret: bool) -> Callable[..., jax.Array]:
        def call(q: jax.Array, k: jax.Array, v: jax.Array, q_segment: jax.Array, kv_segment: jax.Array) -> jax.Array:
            kernel = sa.make_splash_mqa(sa.MultiHeadMask([mask] * groups), block_sizes=blocks, head_shards=1,
                                        q_seq_shards=1, interpret=interpret)

            def one(q, k, v, q_segment, kv_segment):  # [G, S, D], [T, D], [T, D], [S], [T]: one key/value head
                return kernel(q, k, v, sa.SegmentIds(q_segment, kv_segment))

            per_row = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # over key/value heads
            return jax.vmap(per_row)(q, k, v, q_segment, kv_segment)  # over rows
        return call

    # Chosen when lowering, not from jax.default_backend(): a CPU host compiling ahead of time for a TPU must get
    # the Mosaic kernel, not the interpreter.
    out = jax.lax.platform_dependent(q, k, v, q_segment, kv_segment, tpu=run(False), default=run(True))
    out = out[:, :, :, :s, :d].transpose(0, 3, 1, 2, 4)  # [B, S, KV, G, D]
    return out.reshape(b, s, n, d).astype(q.dtype)


# ------------------------------------------------------------------------------------------------------- cudnn
def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                    key_valid: jax.Array, window: int | jax.Array, q_offset: int | jax.Array | None) -> jax.Array:
    """The "cudnn" backend (see the module docstring): Backend signature of dots_jax.ops.attention."""
    s, t, d = q.shape[1], k.shape[1], q.shape[3]
    if not (_static_int(q_offset) and q_offset == 0 and _static_int(window) and s == t):
        return _fallback(q, k, v, q_pos, k_pos, key_valid, window, q_offset)
    window = int(window)
    local = (window - 1, 0) if window < t else None
    # Key validity as lengths (cuDNN's padding mask: no S x T array) when the valid keys of every row are a prefix
    # (right padding) and every query has one in its window; else as a boolean mask, in which a query without a
    # valid key in its window attends the invalid ones (finite values that nobody reads).
    count = jnp.sum(key_valid, axis=1, dtype=jnp.int32)
    has_key = _has_key(key_valid, s, window, 0)
    use_lengths = jnp.all(key_valid == (jnp.arange(t)[None, :] < count[:, None])) & jnp.all(has_key)
    mask = (key_valid[:, None, :] | ~has_key[:, :, None])[:, None]  # [B, 1, S, T]

    def run(implementation: str) -> Callable[..., jax.Array]:
        def by_lengths(q, k, v, count, mask):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=count,
                                                local_window_size=local, implementation=implementation)

        def by_mask(q, k, v, count, mask):
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=local,
                                                implementation=implementation)

        def call(q, k, v, count, mask):
            return jax.lax.cond(use_lengths, by_lengths, by_mask, q, k, v, count, mask)
        return call

    # cuDNN's fused attention takes bf16/f16 only, head dims up to 128 in multiples of 8 (its portable subset).
    if q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128:
        gpu = run("cudnn")
    else:
        def gpu(q, k, v, count, mask):
            return _fallback(q, k, v, q_pos, k_pos, key_valid, window, q_offset)
    out = jax.lax.platform_dependent(q, k, v, count, mask, cuda=gpu, default=run("xla"))
    return out.astype(q.dtype)
