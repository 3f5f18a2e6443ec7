"""Attention: rotate-half RoPE, the causal / sliding-window / padding mask, and Qwen3-style GQA attention with q/k
RMSNorm (eager: scores, f32 softmax, values). Attention backends join here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dots_jax.config import Dots1Config
from dots_jax.model.layers import DType, RMSNorm, param

NO_WINDOW = 2**30  # the "window" of a full-attention layer: larger than any sequence


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype: DType) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, S, head_dim] for rotate-half RoPE: computed in f32, then cast to the activation dtype."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, S, N, D]; cos/sin [B, S, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nnx.Module):
    """Qwen3-style attention: q/k RMSNorm over the head dim before RoPE; GQA; optional sliding window."""

    def __init__(self, cfg: Dots1Config, *, param_dtype: DType, rngs: nnx.Rngs):
        h, n, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        std = cfg.initializer_range
        self.num_heads, self.num_kv_heads, self.head_dim = n, kv, d
        self.q_proj = param(rngs, (h, n, d), ("embed", "q_heads", "head_dim"), param_dtype, std=std)
        self.k_proj = param(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype, std=std)
        self.v_proj = param(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype, std=std)
        self.o_proj = param(rngs, (n, d, h), ("q_heads", "head_dim", "embed"), param_dtype, std=std)
        if cfg.attention_bias:
            zeros = jax.nn.initializers.zeros
            self.q_bias = param(rngs, (n, d), ("q_heads", "head_dim"), param_dtype, init=zeros)
            self.k_bias = param(rngs, (kv, d), ("kv_heads", "head_dim"), param_dtype, init=zeros)
            self.v_bias = param(rngs, (kv, d), ("kv_heads", "head_dim"), param_dtype, init=zeros)
            self.o_bias = param(rngs, (h,), ("embed",), param_dtype, init=zeros)
        else:
            self.q_bias = self.k_bias = self.v_bias = self.o_bias = None
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, axis_name="head_dim", rngs=rngs)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, axis_name="head_dim", rngs=rngs)

    def _project(self, x: jax.Array, w: nnx.Param, b: nnx.Param | None) -> jax.Array:
        y = jnp.einsum("bsh,hnd->bsnd", x, w[...].astype(x.dtype))
        return y if b is None else y + b[...].astype(x.dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, S, H]; mask [B, S, T] bool (True = may attend). Without a cache T = S; with one, this layer's
        cache kv ([B, T, KV, D] each) gets the new keys/values written at slot `index` and is returned."""
        dtype = x.dtype
        q = apply_rope(self.q_norm(self._project(x, self.q_proj, self.q_bias)), cos, sin)
        k = apply_rope(self.k_norm(self._project(x, self.k_proj, self.k_bias)), cos, sin)
        v = self._project(x, self.v_proj, self.v_bias)
        if kv is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            kv = (k, v)

        b, s = x.shape[:2]
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, s, self.num_kv_heads, groups, self.head_dim)  # head n = kv * groups + g, as repeat_kv
        # Scores in the activation dtype, then the scale; softmax in f32 and back (the reference's eager path).
        scores = jnp.einsum("bsngd,btnd->bngst", q, k.astype(dtype)) * jnp.asarray(self.head_dim**-0.5, dtype)
        # An additive bias (0 or the dtype's minimum), as the reference's eager path adds its mask: softmax gives
        # masked keys exactly 0 either way, and unlike a select, an add keeps no [B, heads, S, T] mask for the
        # backward pass (a residual per layer that cost about as much as the select itself in a training step).
        bias = jnp.where(mask, jnp.zeros((), dtype), jnp.finfo(dtype).min)
        scores = scores + bias[:, None, None, :, :]
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
        out = jnp.einsum("bngst,btnd->bsngd", probs, v.astype(dtype)).reshape(b, s, self.num_heads, self.head_dim)
        y = jnp.einsum("bsnd,ndh->bsh", out, self.o_proj[...].astype(dtype))
        return (y if self.o_bias is None else y + self.o_bias[...].astype(dtype)), kv


def make_attention_mask(q_pos: jax.Array, k_pos: jax.Array, key_valid: jax.Array, window: jax.Array) -> jax.Array:
    """[B, Sq, Sk] bool: causal by position, keys within the window, padding keys excluded."""
    delta = q_pos[:, :, None] - k_pos[:, None, :]
    return (delta >= 0) & (delta < window) & key_valid[:, None, :]

