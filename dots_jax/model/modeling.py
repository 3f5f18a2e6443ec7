"""dots.llm1 in Flax NNX, following transformers' models/dots1 step by step.

Weights are stored [in, out] (JAX convention); routed experts as [E, in, out]. Every parameter carries logical
axis names in its `out_sharding` metadata, so the sharding table (dots_jax.parallel.sharding) needs no model change.
Layers of one kind (dense, MoE) are created stacked on a leading "layers" axis and run under one jax.lax.scan.
Under `jax.set_mesh(dots_jax.parallel.sharding.make_mesh(...))` the residual stream is constrained at every layer
boundary and the routed experts run expert-parallel in shard_map; without a mesh nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dots_jax.config import Dots1Config
from dots_jax.model.attention import Attention, rope_tables
from dots_jax.model.cache import KVCache, LayerStackCache, PagedKVCache, PageTable
from dots_jax.model.layers import CONTRACTED, DType, RMSNorm, check_quantize, linear, param, read
from dots_jax.model.lora import (
    LoraConfig,
    adapt,
    adapter,
    fold,
    for_target,
    init_adapters,
    lora_a,
    lora_b,
    weight_key,
)
from dots_jax.model.moe import RouterStats, expert_parallel, moe_experts, route, routing_stats
from dots_jax.ops.attention import NO_WINDOW
from dots_jax.ops.common import round_to, silu
from dots_jax.ops.gmm import Dropout, ExpertLora
from dots_jax.ops.paged_attention import slot_positions
from dots_jax.ops.quant import dequantize, qeinsum
from dots_jax.parallel.sharding import constrain, current_mesh

ACTIVATION = ("batch", "seq", "act_embed")  # logical axes of the residual stream [B, S, H]


class RouterBias(nnx.Variable):
    """The router's e_score_correction_bias: f32, steers selection, updated by the balancing rule, not by
    gradients (an optimizer over nnx.Param skips it)."""


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for the dense layers and for the shared experts. With `lora`,
    gate, up and down each get an adapter (dots_jax.model.lora)."""

    def __init__(self, hidden: int, width: int, *, axis_name: str, std: float, param_dtype: DType,
                 rngs: nnx.Rngs, quantize: str | None = None, lora: LoraConfig | None = None):
        self.gate_proj, self.gate_proj_scale = linear(rngs, (hidden, width), ("embed", axis_name), param_dtype,
                                                      name="gate_proj", quantize=quantize, std=std)
        self.up_proj, self.up_proj_scale = linear(rngs, (hidden, width), ("embed", axis_name), param_dtype,
                                                  name="up_proj", quantize=quantize, std=std)
        self.down_proj, self.down_proj_scale = linear(rngs, (width, hidden), (axis_name, "embed"), param_dtype,
                                                      name="down_proj", quantize=quantize, std=std)
        self.lora = lora
        inner, outer = ((hidden, "embed"),), ((width, axis_name),)
        self.gate_proj_lora_a, self.gate_proj_lora_b = adapter(lora, inner, outer)
        self.up_proj_lora_a, self.up_proj_lora_b = adapter(lora, inner, outer)
        self.down_proj_lora_a, self.down_proj_lora_b = adapter(lora, outer, inner)

    def _linear(self, x: jax.Array, name: str, lora_key: jax.Array | None) -> jax.Array:
        y = qeinsum("...h,hi->...i", x, getattr(self, name)[...], read(getattr(self, f"{name}_scale")))
        return adapt(y, x, getattr(self, f"{name}_lora_a"), getattr(self, f"{name}_lora_b"), self.lora,
                     weight_key(lora_key, name), "...h,hr->...r", "...r,ri->...i")

    def __call__(self, x: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        h = silu(self._linear(x, "gate_proj", lora_key)) * self._linear(x, "up_proj", lora_key)
        return self._linear(h, "down_proj", lora_key)


class MoE(nnx.Module):
    """Routed experts (sigmoid router, top-k, dropless) plus the shared experts, which are not scaled.

    lora: the LoRA config of the whole model; the routed experts are adapted when it targets "experts" (one A
    shared by gate and up, dots_jax.model.lora), the shared experts when it targets "shared"."""

    def __init__(self, cfg: Dots1Config, *, param_dtype: DType, moe_backend: str, rngs: nnx.Rngs,
                 quantize: str | None = None, lora: LoraConfig | None = None):
        h, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        std = cfg.initializer_range
        self.cfg = cfg
        self.moe_backend = moe_backend
        self.router = param(rngs, (h, e), ("embed", None), param_dtype, std=std)
        self.correction_bias = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,),
                                          eager_sharding=False)
        # The routed experts, per expert and output channel when quantised: gate/up scales [E, I], down [E, H].
        self.gate_proj, self.gate_proj_scale = linear(rngs, (e, h, i), ("expert", "embed", "moe_mlp"), param_dtype,
                                                      name="gate_proj", quantize=quantize, std=std)
        self.up_proj, self.up_proj_scale = linear(rngs, (e, h, i), ("expert", "embed", "moe_mlp"), param_dtype,
                                                  name="up_proj", quantize=quantize, std=std)
        self.down_proj, self.down_proj_scale = linear(rngs, (e, i, h), ("expert", "moe_mlp", "embed"), param_dtype,
                                                      name="down_proj", quantize=quantize, std=std)
        self.lora = for_target(lora, "experts")
        if self.lora is None:
            self.gate_up_proj_lora_a = self.gate_proj_lora_b = self.up_proj_lora_b = None
            self.down_proj_lora_a = self.down_proj_lora_b = None
        else:
            r, expert = self.lora.rank, ((e, "expert"),)
            self.gate_up_proj_lora_a = lora_a(r, ((h, "embed"),), lead=expert)
            self.gate_proj_lora_b = lora_b(r, ((i, "moe_mlp"),), lead=expert)
            self.up_proj_lora_b = lora_b(r, ((i, "moe_mlp"),), lead=expert)
            self.down_proj_lora_a = lora_a(r, ((i, "moe_mlp"),), lead=expert)
            self.down_proj_lora_b = lora_b(r, ((h, "embed"),), lead=expert)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(h, cfg.shared_intermediate_size, axis_name="mlp", std=std,
                                      param_dtype=param_dtype, rngs=rngs, quantize=quantize,
                                      lora=for_target(lora, "shared"))
        else:
            self.shared_experts = None

    def router_outputs(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(weights [T, k] f32, experts [T, k], logits [T, E]) for tokens x [..., H]."""
        cfg = self.cfg
        return route(x.reshape(-1, x.shape[-1]), self.router[...], self.correction_bias[...],
                     top_k=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
                     norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor)

    def expert_lora(self, lora_key: jax.Array | None = None) -> tuple[ExpertLora | None, Dropout | None]:
        """The routed experts' adapters as ops.gmm.expert_ffn takes them (the B factors times the scaling) and
        their dropout (None without a key or at rate 0); (None, None) when the experts are not adapted."""
        if self.lora is None:
            return None, None
        scaling = self.lora.scaling
        lora = ExpertLora(self.gate_up_proj_lora_a[...], scaling * self.gate_proj_lora_b[...],
                          scaling * self.up_proj_lora_b[...], self.down_proj_lora_a[...],
                          scaling * self.down_proj_lora_b[...])
        drop = None
        if lora_key is not None and self.lora.dropout > 0:
            drop = Dropout(weight_key(lora_key, "gate_up_proj"), jnp.asarray(self.lora.dropout, jnp.float32))
        return lora, drop

    def __call__(self, x: jax.Array, token_valid: jax.Array, lora_key: jax.Array | None = None
                 ) -> tuple[jax.Array, RouterStats]:
        """x [B, S, H]; token_valid [B, S] (padding is left out of the routing statistics); lora_key: the
        adapters' dropout key (None: no dropout)."""
        weights, experts, logits = self.router_outputs(x)
        args = (x.reshape(-1, x.shape[-1]), weights, experts, self.gate_proj[...], self.up_proj[...],
                self.down_proj[...])
        scales = None
        if self.gate_proj_scale is not None:
            scales = (self.gate_proj_scale[...], self.up_proj_scale[...], self.down_proj_scale[...])
        lora, drop = self.expert_lora(lora_key)
        mesh = current_mesh()
        # Under any multi-device mesh, even one without an expert axis: Mosaic (Pallas TPU) kernels cannot be
        # partitioned by XLA, only run per device inside shard_map.
        if mesh is not None and mesh.size > 1:
            routed = expert_parallel(*args, mesh=mesh, backend=self.moe_backend, scales=scales, lora=lora,
                                     dropout=drop)
        else:
            routed = moe_experts(*args, backend=self.moe_backend, scales=scales, lora=lora, dropout=drop)
        out = routed.reshape(x.shape)
        b, s = x.shape[:2]
        stats = routing_stats(logits.reshape(b, s, -1), experts.reshape(b, s, -1), token_valid)
        if self.shared_experts is None:
            return out, stats
        return rounded_add(out, self.shared_experts(x, weight_key(lora_key, "shared_experts"))), stats


def rounded_add(x: jax.Array, y: jax.Array) -> jax.Array:
    """x + y in x's dtype, rounded where transformers rounds (see round_to: a plain bf16 add fused into the next
    RMSNorm's f32 upcast loses its rounding to XLA's excess precision)."""
    return round_to(x.astype(jnp.float32) + y.astype(jnp.float32), jnp.result_type(x, y))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Dots1Config, *, moe: bool, param_dtype: DType, moe_backend: str,
                 attention_backend: str, rngs: nnx.Rngs, quantize: str | None = None,
                 lora: LoraConfig | None = None):
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, param_dtype=param_dtype, axis_name="embed",
                                       rngs=rngs)
        self.self_attn = Attention(cfg, param_dtype=param_dtype, backend=attention_backend, rngs=rngs,
                                   quantize=quantize, lora=for_target(lora, "attn"))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, param_dtype=param_dtype,
                                                axis_name="embed", rngs=rngs)
        if moe:
            self.mlp = MoE(cfg, param_dtype=param_dtype, moe_backend=moe_backend, rngs=rngs, quantize=quantize,
                           lora=lora)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, axis_name="mlp", std=cfg.initializer_range,
                           param_dtype=param_dtype, rngs=rngs, quantize=quantize, lora=for_target(lora, "mlp"))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                 key_valid: jax.Array, window: int | jax.Array, q_offset: int | jax.Array | None,
                 token_valid: jax.Array, kv: LayerStackCache | tuple[jax.Array, jax.Array | None] | None = None,
                 index: jax.Array | None = None, pages: PageTable | None = None, lora_key: jax.Array | None = None
                 ) -> tuple[jax.Array, LayerStackCache | tuple[jax.Array, jax.Array | None] | None,
                            RouterStats | None]:
        """lora_key: this layer's adapter dropout key (None: no dropout)."""
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, q_pos, k_pos, key_valid, window, q_offset,
                                  kv, index, pages, lora_key=fold(lora_key, 0))
        x = rounded_add(x, attn)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, stats = self.mlp(h, token_valid, fold(lora_key, 1))
            return rounded_add(x, out), kv, stats
        return rounded_add(x, self.mlp(h, fold(lora_key, 1))), kv, None


def _layer_stack(count: int, make: Callable[[nnx.Rngs], DecoderLayer], rngs: nnx.Rngs) -> DecoderLayer | None:
    """`count` layers with their parameters stacked on a leading "layers" axis (one module, vmapped init)."""
    if count == 0:
        return None

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> DecoderLayer:
        return make(rngs)

    return create(rngs)


def _run_stack(stack: DecoderLayer | None, x: jax.Array, windows: list[int], cos: jax.Array, sin: jax.Array,
               q_pos: jax.Array, k_pos: jax.Array, key_valid: jax.Array, q_offset: int | jax.Array | None,
               token_valid: jax.Array, cache: LayerStackCache | None, index: jax.Array | None, remat: bool,
               lora_key: jax.Array | None = None) -> tuple[jax.Array, LayerStackCache | None, RouterStats | None]:
    """Run stacked layers under one scan; `windows` holds each layer's attention window, and the cache (if any)
    is scanned along with the parameters, each layer reading and writing its own slice. With `remat` the backward
    pass recomputes each layer from its input instead of keeping its activations. lora_key: the stack's adapter
    dropout key, folded with each layer's number in the stack (None: no dropout)."""
    if stack is None:
        return x, cache, None
    graphdef, state = nnx.split(stack)
    # One window for the whole stack stays a Python int, so that backends can build static masks from it
    # (splash); layers that differ scan theirs as a traced value.
    uniform = len(set(windows)) == 1
    scanned_windows = None if uniform else jnp.asarray(windows, jnp.int32)
    layer_numbers = None if lora_key is None else jnp.arange(len(windows), dtype=jnp.int32)

    def body(h: jax.Array, layer_in: tuple) -> tuple[jax.Array, tuple]:
        layer_state, window, kv, layer = layer_in
        window = windows[0] if uniform else window
        h, kv, stats = nnx.merge(graphdef, layer_state)(h, cos, sin, q_pos, k_pos, key_valid, window, q_offset,
                                                        token_valid, kv, index, lora_key=fold(lora_key, layer))
        return constrain(h, ACTIVATION), (kv, stats)

    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    # The cache is scanned as it is: each layer gets its own [B, T, KV, D] slices (and scales, if int8).
    x, (cache, stats) = jax.lax.scan(body, x, (state, scanned_windows, cache, layer_numbers))
    return x, cache, stats


def _run_paged_stack(stack: DecoderLayer | None, x: jax.Array, windows: list[int], cos: jax.Array, sin: jax.Array,
                     positions: jax.Array, token_valid: jax.Array, pool: jax.Array | None, scales: jax.Array | None,
                     pages: PageTable) -> tuple[jax.Array, jax.Array | None, jax.Array | None, RouterStats | None]:
    """_run_stack over a paged cache: the stack's whole pool [layers, pages, ...] (and its scale pool, if int8) is
    carried through the scan and each layer writes and reads its own pages in it by its layer number. A carried
    buffer is updated in place; scanning the pool as a per-layer input and output instead makes XLA write a second
    pool, and any reshape or slice of the carry made XLA:CPU copy it every step (a step's time then grows with the
    pool)."""
    if stack is None:
        return x, pool, scales, None
    graphdef, state = nnx.split(stack)
    layers = pool.shape[0]
    uniform = len(set(windows)) == 1
    scanned_windows = None if uniform else jnp.asarray(windows, jnp.int32)

    def body(carry: tuple, layer_in: tuple) -> tuple[tuple, RouterStats]:
        h, kv = carry
        layer_state, window, layer = layer_in
        window = windows[0] if uniform else window
        h, kv, stats = nnx.merge(graphdef, layer_state)(h, cos, sin, positions, None, None, window, None,
                                                        token_valid, kv, layer, pages)
        return (constrain(h, ACTIVATION), kv), stats

    (x, (pool, scales)), stats = jax.lax.scan(body, (x, (pool, scales)),
                                              (state, scanned_windows, jnp.arange(layers, dtype=jnp.int32)))
    return x, pool, scales, stats


class Dots1ForCausalLM(nnx.Module):
    """logits = model(input_ids): int32 [batch, seq] -> [batch, seq, vocab] in the activation dtype.

    quantize="int8": weight-only int8 for every linear layer (attention q/k/v/o, the dense and shared MLPs, the
    routed experts), each an int8 nnx.Param under its usual name and logical axes with a sibling f32 `<name>_scale`
    per output channel (dots_jax.ops.quant); the embedding, norms, router, correction bias and biases stay as they
    are. quantize_head=True quantises the LM head too (an untied one only; off by default).

    lora: LoRA adapters (f32 nnx.LoRAParam) beside the weights lora.targets names (dots_jax.model.lora), on a float
    or int8 base; `model.lora` holds the config (None: no adapters)."""

    def __init__(self, cfg: Dots1Config, *, dtype: DType = jnp.float32, param_dtype: DType | None = None,
                 moe_backend: str = "auto", attention_backend: str = "auto", rngs: nnx.Rngs,
                 quantize: str | None = None, quantize_head: bool = False, lora: LoraConfig | None = None):
        param_dtype = param_dtype or dtype
        std = cfg.initializer_range
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.moe_backend, self.attention_backend = moe_backend, attention_backend
        self.lora = lora
        self.quantize = check_quantize(quantize)
        if quantize_head and quantize is None:
            raise ValueError("quantize_head=True needs quantize (e.g. quantize='int8')")
        self.quantize_head = bool(quantize_head) and not cfg.tie_word_embeddings
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype,
                                   std=std)

        def layer(moe: bool) -> Callable[[nnx.Rngs], DecoderLayer]:
            return lambda r: DecoderLayer(cfg, moe=moe, param_dtype=param_dtype, moe_backend=moe_backend,
                                          attention_backend=attention_backend, rngs=r, quantize=quantize, lora=lora)

        self.dense_layers = _layer_stack(cfg.num_dense_layers, layer(False), rngs)
        self.moe_layers = _layer_stack(cfg.num_moe_layers, layer(True), rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, axis_name="embed",
                            rngs=rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = self.lm_head_scale = None
        else:
            self.lm_head, self.lm_head_scale = linear(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                                      param_dtype, name="lm_head",
                                                      quantize=quantize if self.quantize_head else None, std=std)
        if lora is not None:  # last: the base weights are then what this seed draws without adapters
            init_adapters(self, rngs.params())

    def options(self) -> dict:
        """The keyword arguments that build this model's structure again (with cfg and rngs): what
        dots_jax.model.lora's attach_lora and merge_lora rebuild it from. param_dtype is the embedding's."""
        return dict(dtype=self.dtype, param_dtype=self.embed_tokens.get_value().dtype, moe_backend=self.moe_backend,
                    attention_backend=self.attention_backend, quantize=self.quantize,
                    quantize_head=self.quantize_head, lora=self.lora)

    def _windows(self, layers: range) -> list[int]:
        return [self.cfg.layer_window(i) or NO_WINDOW for i in layers]

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
                      attention_mask: jax.Array | None = None, cache: KVCache | PagedKVCache | None = None, *,
                      remat: bool = False, pages: PageTable | None = None, lora_key: jax.Array | None = None
                      ) -> tuple[jax.Array, KVCache | PagedKVCache | None, RouterStats | None]:
        """As forward, but the final-norm hidden states [B, S, H] in place of the logits (the LM head is
        head_weight()); training applies the head fused with its loss (train.head_nll). `remat`: gradients
        recompute each layer in the backward pass (memory for long sequences, at about one more forward).

        The serving engine's paged cache: `cache` a PagedKVCache and `pages` its PageTable for this step, which
        also gives the positions and the padding (positions and attention_mask must be None).

        lora_key: dropout on the LoRA adapters' inputs (training), each layer and adapted weight drawing from its
        own key folded from it; None: no dropout (evaluation, inference, and the paged cache always)."""
        cfg, dtype = self.cfg, self.dtype
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer [batch, seq], got {input_ids.dtype} {input_ids.shape}")
        b, s = input_ids.shape
        if isinstance(cache, PagedKVCache):
            return self._paged_hidden_states(input_ids, cache, pages)
        # Default positions follow the cache slots: backends with slot-based masks (splash) may use them.
        q_offset = None
        if positions is None:
            q_offset = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(q_offset + jnp.arange(s, dtype=jnp.int32), (b, s))
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
                                       key_valid, q_offset, valid, None if cache is None else cache.dense, index,
                                       remat, fold(lora_key, 0))
        x, moe_cache, stats = _run_stack(self.moe_layers, x, self._windows(moe), cos, sin, positions, k_pos,
                                         key_valid, q_offset, valid, None if cache is None else cache.moe, index,
                                         remat, fold(lora_key, 1))
        if cache is not None:
            cache = KVCache(dense=dense_cache, moe=moe_cache, positions=k_pos, valid=key_valid, index=index + s)
        return self.norm(x), cache, stats

    def _paged_hidden_states(self, input_ids: jax.Array, cache: PagedKVCache, pages: PageTable | None
                             ) -> tuple[jax.Array, PagedKVCache, RouterStats | None]:
        if pages is None:
            raise ValueError("a PagedKVCache needs pages= (its PageTable for this step)")
        cfg = self.cfg
        s = input_ids.shape[1]
        positions = slot_positions(pages.kv_lens, pages.q_lens, s)
        valid = jnp.arange(s)[None, :] < pages.q_lens[:, None]
        x = constrain(jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype), ACTIVATION)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, self.dtype)
        dense = range(cfg.num_dense_layers)
        moe = range(cfg.num_dense_layers, cfg.num_hidden_layers)
        x, dense_pages, dense_scale, _ = _run_paged_stack(self.dense_layers, x, self._windows(dense), cos, sin,
                                                          positions, valid, cache.dense, cache.dense_scale, pages)
        x, moe_pages, moe_scale, stats = _run_paged_stack(self.moe_layers, x, self._windows(moe), cos, sin, positions,
                                                          valid, cache.moe, cache.moe_scale, pages)
        return self.norm(x), PagedKVCache(dense_pages, moe_pages, dense_scale, moe_scale), stats

    def head_weight(self) -> jax.Array:
        """The LM head [H, V] in the activation dtype (the embedding's transpose when tied; dequantised when
        quantised)."""
        if self.lm_head is None:
            return self.embed_tokens[...].T.astype(self.dtype)
        if self.lm_head_scale is None:
            return self.lm_head[...].astype(self.dtype)
        return dequantize(self.lm_head[...], self.lm_head_scale[...], CONTRACTED["lm_head"], self.dtype)

    def forward(self, input_ids: jax.Array, positions: jax.Array | None = None,
                attention_mask: jax.Array | None = None, cache: KVCache | None = None, *,
                lora_key: jax.Array | None = None) -> tuple[jax.Array, KVCache | None, RouterStats | None]:
        """As __call__, also returning each MoE layer's routing statistics (stacked on a leading layer axis;
        None without MoE layers), which training uses for load balancing. lora_key: as hidden_states."""
        x, cache, stats = self.hidden_states(input_ids, positions, attention_mask, cache, lora_key=lora_key)
        return constrain(self.logits(x), ("batch", "seq", "act_vocab")), cache, stats

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The LM head: final-norm hidden states [..., H] -> logits [..., vocab]."""
        if self.lm_head_scale is not None:
            return qeinsum("...h,hv->...v", hidden, self.lm_head[...], self.lm_head_scale[...])
        return hidden @ self.head_weight()


def abstract_model(cfg: Dots1Config, *, dtype: DType = jnp.float32, param_dtype: DType | None = None,
                   moe_backend: str = "auto", attention_backend: str = "auto", seed: int = 0,
                   quantize: str | None = None, quantize_head: bool = False,
                   lora: LoraConfig | None = None) -> Dots1ForCausalLM:
    """The model with ShapeDtypeStructs for weights: its structure, shapes and dtypes, no array computed (what a
    loader fills, a planner compiles, a checkpoint restores into)."""
    return nnx.eval_shape(lambda: Dots1ForCausalLM(cfg, dtype=dtype, param_dtype=param_dtype,
                                                   moe_backend=moe_backend, attention_backend=attention_backend,
                                                   rngs=nnx.Rngs(seed), quantize=quantize,
                                                   quantize_head=quantize_head, lora=lora))


def random_model(cfg: Dots1Config, seed: int, *, dtype: DType = jnp.float32, param_dtype: DType | None = None,
                 moe_backend: str = "auto", attention_backend: str = "auto", quantize: str | None = None,
                 quantize_head: bool = False, lora: LoraConfig | None = None) -> Dots1ForCausalLM:
    """A randomly initialised model, its init compiled as one program at XLA's lowest optimisation level: it
    runs once, and compiled optimised, or op by op as eager init does, it takes 15+ s on a small CPU (~2 s this
    way). Deterministic for a seed on a given platform; not bitwise the eager init's numbers. With quantize, the
    linear weights are an f32 model's random draws for the seed, quantised. With lora, adapters as PEFT initialises
    them (A random, B zero; dots_jax.model.lora)."""
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend, attention_backend=attention_backend,
                  quantize=quantize, quantize_head=quantize_head, lora=lora)

    def make() -> Dots1ForCausalLM:
        return Dots1ForCausalLM(cfg, rngs=nnx.Rngs(seed), **kwargs)

    graphdef, _ = nnx.split(abstract_model(cfg, seed=seed, **kwargs))
    init = jax.jit(lambda: nnx.state(make())).lower().compile({"xla_backend_optimization_level": 0})
    return nnx.merge(graphdef, init())
