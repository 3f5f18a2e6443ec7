"""dots.llm1 in Flax NNX, following transformers' models/dots1 step by step.

Weights are stored [in, out] (JAX convention); routed experts as [E, in, out]. Every parameter carries logical
axis names in its `out_sharding` metadata, so the sharding table (dots_jax.parallel.sharding) needs no model change.
Layers of one kind (dense, MoE) are created stacked on a leading "layers" axis and run under one jax.lax.scan.
Under `jax.set_mesh(dots_jax.parallel.sharding.make_mesh(...))` the residual stream is constrained at every layer
boundary and the routed experts run expert-parallel in shard_map; without a mesh nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dots_jax.config import Dots1Config
from dots_jax.model.cache import KVCache, LayerStackCache
from dots_jax.model.moe import RouterStats, expert_parallel, moe_experts, route, routing_stats
from dots_jax.ops.common import round_to, silu
from dots_jax.parallel.sharding import constrain, current_mesh

DType = jnp.dtype | type
NO_WINDOW = 2**30  # the "window" of a full-attention layer: larger than any sequence
ACTIVATION = ("batch", "seq", "act_embed")  # logical axes of the residual stream [B, S, H]


class RouterBias(nnx.Variable):
    """The router's e_score_correction_bias: f32, steers selection, updated by the balancing rule, not by
    gradients (an optimizer over nnx.Param skips it)."""


def _param(rngs: nnx.Rngs, shape: Sequence[int], axes: tuple[str | None, ...], dtype: DType,
           init: Callable | None = None, std: float = 0.02) -> nnx.Param:
    init = init or jax.nn.initializers.normal(std)
    # eager_sharding=False: the axes are names for the sharding table, applied later under a mesh.
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype: DType, axis_name: str, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = _param(rngs, (dim,), (axis_name,), param_dtype, init=jax.nn.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        # f32 statistics, cast back to the activation dtype BEFORE the weight multiply (as the reference).
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


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
        self.q_proj = _param(rngs, (h, n, d), ("embed", "q_heads", "head_dim"), param_dtype, std=std)
        self.k_proj = _param(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype, std=std)
        self.v_proj = _param(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype, std=std)
        self.o_proj = _param(rngs, (n, d, h), ("q_heads", "head_dim", "embed"), param_dtype, std=std)
        if cfg.attention_bias:
            zeros = jax.nn.initializers.zeros
            self.q_bias = _param(rngs, (n, d), ("q_heads", "head_dim"), param_dtype, init=zeros)
            self.k_bias = _param(rngs, (kv, d), ("kv_heads", "head_dim"), param_dtype, init=zeros)
            self.v_bias = _param(rngs, (kv, d), ("kv_heads", "head_dim"), param_dtype, init=zeros)
            self.o_bias = _param(rngs, (h,), ("embed",), param_dtype, init=zeros)
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


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for the dense layers and for the shared experts."""

    def __init__(self, hidden: int, width: int, *, axis_name: str, std: float, param_dtype: DType,
                 rngs: nnx.Rngs):
        self.gate_proj = _param(rngs, (hidden, width), ("embed", axis_name), param_dtype, std=std)
        self.up_proj = _param(rngs, (hidden, width), ("embed", axis_name), param_dtype, std=std)
        self.down_proj = _param(rngs, (width, hidden), (axis_name, "embed"), param_dtype, std=std)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        h = silu(x @ self.gate_proj[...].astype(dtype)) * (x @ self.up_proj[...].astype(dtype))
        return h @ self.down_proj[...].astype(dtype)


class MoE(nnx.Module):
    """Routed experts (sigmoid router, top-k, dropless) plus the shared experts, which are not scaled."""

    def __init__(self, cfg: Dots1Config, *, param_dtype: DType, moe_backend: str, rngs: nnx.Rngs):
        h, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        std = cfg.initializer_range
        self.cfg = cfg
        self.moe_backend = moe_backend
        self.router = _param(rngs, (h, e), ("embed", None), param_dtype, std=std)
        self.correction_bias = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,),
                                          eager_sharding=False)
        self.gate_proj = _param(rngs, (e, h, i), ("expert", "embed", "moe_mlp"), param_dtype, std=std)
        self.up_proj = _param(rngs, (e, h, i), ("expert", "embed", "moe_mlp"), param_dtype, std=std)
        self.down_proj = _param(rngs, (e, i, h), ("expert", "moe_mlp", "embed"), param_dtype, std=std)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(h, cfg.shared_intermediate_size, axis_name="mlp", std=std,
                                      param_dtype=param_dtype, rngs=rngs)
        else:
            self.shared_experts = None

    def router_outputs(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(weights [T, k] f32, experts [T, k], logits [T, E]) for tokens x [..., H]."""
        cfg = self.cfg
        return route(x.reshape(-1, x.shape[-1]), self.router[...], self.correction_bias[...],
                     top_k=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
                     norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor)

    def __call__(self, x: jax.Array, token_valid: jax.Array) -> tuple[jax.Array, RouterStats]:
        """x [B, S, H]; token_valid [B, S] (padding is left out of the routing statistics)."""
        weights, experts, logits = self.router_outputs(x)
        args = (x.reshape(-1, x.shape[-1]), weights, experts, self.gate_proj[...], self.up_proj[...],
                self.down_proj[...])
        mesh = current_mesh()
        # Under any multi-device mesh, even one without an expert axis: Mosaic (Pallas TPU) kernels cannot be
        # partitioned by XLA, only run per device inside shard_map.
        if mesh is not None and mesh.size > 1:
            routed = expert_parallel(*args, mesh=mesh, backend=self.moe_backend)
        else:
            routed = moe_experts(*args, backend=self.moe_backend)
        out = routed.reshape(x.shape)
        b, s = x.shape[:2]
        stats = routing_stats(logits.reshape(b, s, -1), experts.reshape(b, s, -1), token_valid)
        return (out if self.shared_experts is None else rounded_add(out, self.shared_experts(x))), stats


def rounded_add(x: jax.Array, y: jax.Array) -> jax.Array:
    """x + y in x's dtype, rounded where transformers rounds (see round_to: a plain bf16 add fused into the next
    RMSNorm's f32 upcast loses its rounding to XLA's excess precision)."""
    return round_to(x.astype(jnp.float32) + y.astype(jnp.float32), jnp.result_type(x, y))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Dots1Config, *, moe: bool, param_dtype: DType, moe_backend: str,
                 rngs: nnx.Rngs):
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, param_dtype=param_dtype, axis_name="embed",
                                       rngs=rngs)
        self.self_attn = Attention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, param_dtype=param_dtype,
                                                axis_name="embed", rngs=rngs)
        if moe:
            self.mlp = MoE(cfg, param_dtype=param_dtype, moe_backend=moe_backend, rngs=rngs)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, axis_name="mlp", std=cfg.initializer_range,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, token_valid: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None, RouterStats | None]:
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index)
        x = rounded_add(x, attn)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, stats = self.mlp(h, token_valid)
            return rounded_add(x, out), kv, stats
        return rounded_add(x, self.mlp(h)), kv, None


def _layer_stack(count: int, make: Callable[[nnx.Rngs], DecoderLayer], rngs: nnx.Rngs) -> DecoderLayer | None:
    """`count` layers with their parameters stacked on a leading "layers" axis (one module, vmapped init)."""
    if count == 0:
        return None

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> DecoderLayer:
        return make(rngs)

    return create(rngs)


def _run_stack(stack: DecoderLayer | None, x: jax.Array, windows: jax.Array, cos: jax.Array, sin: jax.Array,
               q_pos: jax.Array, k_pos: jax.Array, key_valid: jax.Array, token_valid: jax.Array,
               cache: LayerStackCache | None, index: jax.Array | None
               ) -> tuple[jax.Array, LayerStackCache | None, RouterStats | None]:
    """Run stacked layers under one scan; `windows` [L] holds each layer's attention window, and the cache
    (if any) is scanned along with the parameters, each layer reading and writing its own slice."""
    if stack is None:
        return x, cache, None
    graphdef, state = nnx.split(stack)

    def body(h: jax.Array, layer_in: tuple) -> tuple[jax.Array, tuple]:
        layer_state, window, kv = layer_in
        mask = make_attention_mask(q_pos, k_pos, key_valid, window)
        h, kv, stats = nnx.merge(graphdef, layer_state)(h, cos, sin, mask, token_valid, kv, index)
        return constrain(h, ACTIVATION), (kv, stats)

    kv_in = None if cache is None else (cache.k, cache.v)
    x, (kv_out, stats) = jax.lax.scan(body, x, (state, windows, kv_in))
    return x, None if cache is None else LayerStackCache(*kv_out), stats


def make_attention_mask(q_pos: jax.Array, k_pos: jax.Array, key_valid: jax.Array, window: jax.Array) -> jax.Array:
    """[B, Sq, Sk] bool: causal by position, keys within the window, padding keys excluded."""
    delta = q_pos[:, :, None] - k_pos[:, None, :]
    return (delta >= 0) & (delta < window) & key_valid[:, None, :]


class Dots1ForCausalLM(nnx.Module):
    """logits = model(input_ids): int32 [batch, seq] -> [batch, seq, vocab] in the activation dtype."""

    def __init__(self, cfg: Dots1Config, *, dtype: DType = jnp.float32, param_dtype: DType | None = None,
                 moe_backend: str = "auto", rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        std = cfg.initializer_range
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype,
                                   std=std)

        def layer(moe: bool) -> Callable[[nnx.Rngs], DecoderLayer]:
            return lambda r: DecoderLayer(cfg, moe=moe, param_dtype=param_dtype, moe_backend=moe_backend, rngs=r)

        self.dense_layers = _layer_stack(cfg.num_dense_layers, layer(False), rngs)
        self.moe_layers = _layer_stack(cfg.num_moe_layers, layer(True), rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, axis_name="embed",
                            rngs=rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype,
                                  std=std)

    def _windows(self, layers: range) -> jax.Array:
        return jnp.asarray([self.cfg.layer_window(i) or NO_WINDOW for i in layers], jnp.int32)

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, cache: KVCache | None = None
                 ) -> jax.Array | tuple[jax.Array, KVCache]:
        """input_ids [B, S]; positions [B, S] (default 0..S-1); attention_mask [B, S] (1 = real token,
        0 = padding that no token may attend to; default all ones).

        With a KVCache the S new tokens are written at slots cache.index.. and attend to every valid slot;
        returns (logits, updated cache). Without one returns logits.
        """
        logits, cache, _ = self.forward(input_ids, positions, attention_mask, cache)
        return logits if cache is None else (logits, cache)

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None,
                      attention_mask: jax.Array | None = None, cache: KVCache | None = None
                      ) -> tuple[jax.Array, KVCache | None, RouterStats | None]:
        """As forward, but the final-norm hidden states [B, S, H] in place of the logits (the LM head is
        head_weight()); training applies the head fused with its loss (train.head_nll)."""
        cfg, dtype = self.cfg, self.dtype
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer [batch, seq], got {input_ids.dtype} {input_ids.shape}")
        b, s = input_ids.shape
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
        valid = jnp.ones((b, s), jnp.bool_) if attention_mask is None else jnp.asarray(attention_mask) != 0
        if cache is None:
            k_pos, key_valid, index = positions, valid, None
        else:
            index = cache.index
            k_pos = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, index))
            key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, index))

        x = constrain(jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(dtype), ACTIVATION)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, dtype)
        dense = range(cfg.num_dense_layers)
        moe = range(cfg.num_dense_layers, cfg.num_hidden_layers)
        x, dense_cache, _ = _run_stack(self.dense_layers, x, self._windows(dense), cos, sin, positions, k_pos,
                                       key_valid, valid, None if cache is None else cache.dense, index)
        x, moe_cache, stats = _run_stack(self.moe_layers, x, self._windows(moe), cos, sin, positions, k_pos,
                                         key_valid, valid, None if cache is None else cache.moe, index)
        if cache is not None:
            cache = KVCache(dense=dense_cache, moe=moe_cache, positions=k_pos, valid=key_valid, index=index + s)
        return self.norm(x), cache, stats

    def head_weight(self) -> jax.Array:
        """The LM head [H, V] in the activation dtype (the embedding's transpose when tied)."""
        head = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return head.astype(self.dtype)

    def forward(self, input_ids: jax.Array, positions: jax.Array | None = None,
                attention_mask: jax.Array | None = None, cache: KVCache | None = None
                ) -> tuple[jax.Array, KVCache | None, RouterStats | None]:
        """As __call__, also returning each MoE layer's routing statistics (stacked on a leading layer axis;
        None without MoE layers), which training uses for load balancing."""
        x, cache, stats = self.hidden_states(input_ids, positions, attention_mask, cache)
        logits = constrain(x @ self.head_weight(), ("batch", "seq", "act_vocab"))
        return logits, cache, stats


def abstract_model(cfg: Dots1Config, *, dtype: DType = jnp.float32, param_dtype: DType | None = None,
                   moe_backend: str = "auto", seed: int = 0) -> Dots1ForCausalLM:
    """The model with ShapeDtypeStructs for weights: its structure, shapes and dtypes, no array computed (what a
    loader fills, a planner compiles, a checkpoint restores into)."""
    return nnx.eval_shape(lambda: Dots1ForCausalLM(cfg, dtype=dtype, param_dtype=param_dtype,
                                                   moe_backend=moe_backend, rngs=nnx.Rngs(seed)))


def random_model(cfg: Dots1Config, seed: int, *, dtype: DType = jnp.float32, param_dtype: DType | None = None,
                 moe_backend: str = "auto") -> Dots1ForCausalLM:
    """A randomly initialised model, its init compiled as one program at XLA's lowest optimisation level: it
    runs once, and compiled optimised, or op by op as eager init does, it takes 15+ s on a small CPU (~2 s this
    way). Deterministic for a seed on a given platform; not bitwise the eager init's numbers."""
    def make() -> Dots1ForCausalLM:
        return Dots1ForCausalLM(cfg, dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend,
                                rngs=nnx.Rngs(seed))

    graphdef, _ = nnx.split(abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend,
                                           seed=seed))
    init = jax.jit(lambda: nnx.state(make())).lower().compile({"xla_backend_optimization_level": 0})
    return nnx.merge(graphdef, init())
