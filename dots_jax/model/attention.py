"""Attention's call site: rotate-half RoPE and Qwen3-style GQA attention with q/k RMSNorm; the attention itself is
dots_jax.ops.attention (its backends and the mask contract)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dots_jax.config import Dots1Config
from dots_jax.model.cache import LayerStackCache, PageTable
from dots_jax.model.layers import DType, RMSNorm, check_quantize, linear, param, read
from dots_jax.model.lora import LoraConfig, adapt, adapter, weight_key
from dots_jax.ops.attention import attention
from dots_jax.ops.paged_attention import paged_attention, write_kv, write_kv_int8
from dots_jax.ops.quant import qeinsum


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

    def __init__(self, cfg: Dots1Config, *, param_dtype: DType, backend: str, rngs: nnx.Rngs,
                 quantize: str | None = None, lora: LoraConfig | None = None):
        """quantize "int8": q/k/v/o are int8 with per-output-channel scales q_proj_scale .. o_proj_scale
        (dots_jax.model.layers.linear); None: they are in param_dtype and the scales are None. lora: q/k/v/o get
        adapters <name>_lora_a / _lora_b (dots_jax.model.lora); None: those are None."""
        h, n, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        std = cfg.initializer_range
        self.num_heads, self.num_kv_heads, self.head_dim = n, kv, d
        self.backend = backend
        quantize = check_quantize(quantize)
        self.q_proj, self.q_proj_scale = linear(rngs, (h, n, d), ("embed", "q_heads", "head_dim"), param_dtype,
                                                name="q_proj", quantize=quantize, std=std)
        self.k_proj, self.k_proj_scale = linear(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype,
                                                name="k_proj", quantize=quantize, std=std)
        self.v_proj, self.v_proj_scale = linear(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype,
                                                name="v_proj", quantize=quantize, std=std)
        self.o_proj, self.o_proj_scale = linear(rngs, (n, d, h), ("q_heads", "head_dim", "embed"), param_dtype,
                                                name="o_proj", quantize=quantize, std=std)
        self.lora = lora
        heads = {"q_proj": ((n, "q_heads"), (d, "head_dim")), "k_proj": ((kv, "kv_heads"), (d, "head_dim")),
                 "v_proj": ((kv, "kv_heads"), (d, "head_dim"))}
        self.q_proj_lora_a, self.q_proj_lora_b = adapter(lora, ((h, "embed"),), heads["q_proj"])
        self.k_proj_lora_a, self.k_proj_lora_b = adapter(lora, ((h, "embed"),), heads["k_proj"])
        self.v_proj_lora_a, self.v_proj_lora_b = adapter(lora, ((h, "embed"),), heads["v_proj"])
        self.o_proj_lora_a, self.o_proj_lora_b = adapter(lora, heads["q_proj"], ((h, "embed"),))
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

    def _project(self, x: jax.Array, name: str, b: nnx.Param | None, lora_key: jax.Array | None) -> jax.Array:
        y = qeinsum("bsh,hnd->bsnd", x, getattr(self, name)[...], read(getattr(self, f"{name}_scale")))
        y = adapt(y, x, getattr(self, f"{name}_lora_a"), getattr(self, f"{name}_lora_b"), self.lora,
                  weight_key(lora_key, name), "bsh,hr->bsr", "bsr,rnd->bsnd")
        return y if b is None else y + b[...].astype(x.dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                 key_valid: jax.Array, window: int | jax.Array, q_offset: int | jax.Array | None,
                 kv: LayerStackCache | tuple[jax.Array, jax.Array | None] | None = None,
                 index: jax.Array | None = None, pages: PageTable | None = None, lora_key: jax.Array | None = None
                 ) -> tuple[jax.Array, LayerStackCache | tuple[jax.Array, jax.Array | None] | None]:
        """x [B, S, H]; q_pos [B, S]; k_pos, key_valid [B, T]; window and q_offset as dots_jax.ops.attention
        has them. Without a cache T = S; with one, this layer's cache kv (a LayerStackCache of [B, T, KV, D]) gets
        the new keys/values written at slot `index` and is returned. With `pages`, kv is the layer stack's page
        pool and its scale pool (None unless int8; dots_jax.model.cache.PagedKVCache), index this layer's number in
        it, and attention is dots_jax.ops.paged_attention's (k_pos, key_valid and q_offset unused). lora_key:
        the adapters' dropout key (None: no dropout)."""
        dtype = x.dtype
        q = apply_rope(self.q_norm(self._project(x, "q_proj", self.q_bias, lora_key)), cos, sin)
        k = apply_rope(self.k_norm(self._project(x, "k_proj", self.k_bias, lora_key)), cos, sin)
        v = self._project(x, "v_proj", self.v_bias, lora_key)
        if pages is not None:
            pool, scales = kv
            table = (pages.page_indices, pages.kv_lens, pages.q_lens)
            if scales is None:
                pool = write_kv(pool, k, v, *table, layer=index)
            else:
                pool, scales = write_kv_int8(pool, scales, k, v, *table, layer=index)
            out = paged_attention(q, pool, *table, window=window, backend=pages.backend, layer=index,
                                  scale_pages=scales)
            return self._output(out, lora_key), (pool, scales)
        if kv is not None:
            kv = kv.write(k, v, index)
            k, v = kv.read(dtype)
        out = attention(q, k.astype(dtype), v.astype(dtype), q_pos, k_pos, key_valid, window=window,
                        q_offset=q_offset, backend=self.backend)
        return self._output(out, lora_key), kv

    def _output(self, out: jax.Array, lora_key: jax.Array | None) -> jax.Array:
        dtype = out.dtype
        y = qeinsum("bsnd,ndh->bsh", out, self.o_proj[...], read(self.o_proj_scale))
        y = adapt(y, out, self.o_proj_lora_a, self.o_proj_lora_b, self.lora, weight_key(lora_key, "o_proj"),
                  "bsnd,ndr->bsr", "bsr,rh->bsh")
        return y if self.o_bias is None else y + self.o_bias[...].astype(dtype)

