"""Attention: the backend registry and the reference backend.

    attention(q [B, S, N, D], k [B, T, KV, D], v [B, T, KV, D], q_pos [B, S], k_pos [B, T], key_valid [B, T],
              window, q_offset) -> [B, S, N, D] in q.dtype

Query i of row b may attend key t of row b when key_valid[b, t] and 0 <= q_pos[b, i] - k_pos[b, t] < window
(causal by position, a sliding window, padding keys excluded). N is a multiple of KV (GQA: query head n reads
key/value head n // (N // KV), as transformers' repeat_kv orders them). Scores are scaled by D ** -0.5; the
softmax is exact (f32). A query with no key to attend gives finite values that nobody reads (a padding row).

`window` is a Python int (the same for every call of a layer stack: backends may build static masks from it) or
a traced int32 scalar (stacks whose layers differ). NO_WINDOW means full attention.
`q_offset` is None, or the key slot of query 0 when slots follow positions: query i sits at slot q_offset + i and,
for every valid key, k_pos <= q_pos exactly when its slot <= the query's slot, and the position distance equals the
slot distance. The model passes it when positions are its defaults (0.. without a cache, cache.index.. with one).
Backends with static, slot-based masks (splash) need it; the others read positions and ignore it.

Backends (all agree with "reference" to float rounding, values and gradients):
  "reference"  scores [B, heads, S, T], a mask, an f32 softmax, values: transformers' eager computation, the oracle.
  "flash"      pure JAX blockwise online softmax with a hand-written backward (dots_jax.ops.flash): memory linear
               in the sequence; blocks that no query may attend are skipped; decode (S = 1) reads the cache once.
  "splash"     Pallas' splash attention (dots_jax.ops.splash): Mosaic on TPU, the Pallas interpreter on CPU.
  "cudnn"      jax.nn.dot_product_attention's cuDNN kernel on GPU (dots_jax.ops.splash).
"auto" picks default_backend(...) by platform and shape. register_backend() adds one without touching callers.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dots_jax.ops.common import NO_WINDOW, make_attention_mask
from dots_jax.ops.flash import flash_attention
from dots_jax.ops.splash import cudnn_attention, splash_attention

__all__ = ["BACKENDS", "NO_WINDOW", "Backend", "attention", "default_backend", "make_attention_mask",
           "reference_attention", "register_backend"]

# A backend is fn(q, k, v, q_pos, k_pos, key_valid, window, q_offset) -> [B, S, N, D] in q.dtype; attention()
# has checked the shapes and cast positions to int32 and key_valid to bool.
Backend = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, "int | jax.Array",
                    "int | jax.Array | None"], jax.Array]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, key_valid: jax.Array,
              *, window: int | jax.Array = NO_WINDOW, q_offset: int | jax.Array | None = None,
              backend: str = "auto") -> jax.Array:
    """Masked softmax attention (see the module docstring for the contract) with the chosen backend."""
    b, s, n, d = q.shape
    if k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[3] != d or n % k.shape[2]:
        raise ValueError(f"attention shapes: q {q.shape}, k {k.shape}, v {v.shape} (want q [B, S, N, D], "
                         "k = v [B, T, KV, D] with N a multiple of KV)")
    t = k.shape[1]
    if q_pos.shape != (b, s) or k_pos.shape != (b, t) or key_valid.shape != (b, t):
        raise ValueError(f"attention positions: q_pos {q_pos.shape} (want {(b, s)}), k_pos {k_pos.shape} and "
                         f"key_valid {key_valid.shape} (want {(b, t)})")
    if backend == "auto":
        backend = default_backend(s, t)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known backends: {sorted(BACKENDS)} (or 'auto')")
    return BACKENDS[backend](q, k, v, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32), key_valid.astype(bool),
                             window, q_offset)


def register_backend(name: str, fn: Backend) -> None:
    """Add (or replace) an attention backend; see `Backend` for what fn may assume."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"backend name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(fn):
        raise TypeError(f"backend {name!r} must be callable, got {type(fn).__name__}")
    BACKENDS[name] = fn


# On CPU, "auto" keeps "reference" for s > 1 queries while s * t is at most this: there its einsums measured
# faster than flash's loops forward and backward (training at short sequences); flash wins above it, and for decode.
_CPU_REFERENCE_MAX_SCORES = 512 * 512


def default_backend(s: int | None = None, t: int | None = None) -> str:
    """The backend "auto" resolves to for s queries against t keys on this platform: on TPU "splash", on GPU
    "cudnn" (each "flash" while not registered); on CPU "flash", except "reference" for 1 < s with s * t at most
    _CPU_REFERENCE_MAX_SCORES. Measured on a 2-core CPU (f32, head_dim 64, causal): forward and backward, flash
    was slower than the reference at 256 x 256, on par at 512 x 512 and faster from 1024 x 1024 on; forward only
    (prefill) and decode against a cache, flash was as fast or faster at every size measured."""
    platform = jax.default_backend()
    if platform == "tpu":
        return "splash" if "splash" in BACKENDS else "flash"
    if platform == "gpu":
        return "cudnn" if "cudnn" in BACKENDS else "flash"
    if s is not None and t is not None and 1 < s and s * t <= _CPU_REFERENCE_MAX_SCORES:
        return "reference"
    return "flash"


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                        key_valid: jax.Array, window: int | jax.Array, q_offset: int | jax.Array | None = None
                        ) -> jax.Array:
    """transformers' eager attention: scores in the activation dtype, then the scale; softmax in f32 and back."""
    del q_offset  # the mask comes from the positions
    dtype = q.dtype
    b, s, n, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, s, kv, n // kv, d)  # head n = kv * groups + g, as repeat_kv
    scores = jnp.einsum("bsngd,btnd->bngst", q, k.astype(dtype)) * jnp.asarray(d**-0.5, dtype)
    # An additive bias (0 or the dtype's minimum), as the reference's eager path adds its mask: softmax gives
    # masked keys exactly 0 either way, and unlike a select, an add keeps no [B, heads, S, T] mask for the
    # backward pass (a residual per layer that cost about as much as the select itself in a training step).
    mask = make_attention_mask(q_pos, k_pos, key_valid, window)
    bias = jnp.where(mask, jnp.zeros((), dtype), jnp.finfo(dtype).min)
    scores = scores + bias[:, None, None, :, :]
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
    return jnp.einsum("bngst,btnd->bsngd", probs, v.astype(dtype)).reshape(b, s, n, d)


BACKENDS: dict[str, Backend] = {
    "reference": reference_attention,
    "flash": flash_attention,
    "splash": splash_attention,
    "cudnn": cudnn_attention,
}
