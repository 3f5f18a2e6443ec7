"""LoRA adapters (issue 20): low-rank updates W + scaling * A @ B beside frozen base weights, routed experts included.

An adapted weight `w` of a module gets two siblings, `w_lora_a` and `w_lora_b` (None when `w` is not targeted, as
`w_scale` is None for a float weight), of the variable type nnx.LoRAParam (a subclass of nnx.Param), always f32
whatever the base's dtype, computed in the activation dtype. Trainable state is then
`nnx.split(model, nnx.LoRAParam, nnx.Param, RouterBias)`'s first part. The routed experts have one A shared by gate
and up (`gate_up_proj_lora_a` [E, H, r]; PEFT adapts transformers' fused gate_up_proj with one A) and a B for each
(`gate_proj_lora_b`, `up_proj_lora_b` [E, r, I]), and `down_proj_lora_a` [E, I, r], `down_proj_lora_b` [E, r, H];
they run through ops.gmm.expert_ffn(lora=) on every gmm backend and split over "expert" with their experts.

The forward of an adapted projection is base(x) + scaling * (dropout(x) @ A) @ B, added before any bias, with
scaling = alpha / rank and dropout (training only: a key is given) on the adapter's input, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dots_jax.config import Dots1Config
from dots_jax.model.layers import CONTRACTED
from dots_jax.ops.quant import dequantize
from dots_jax.parallel.sharding import param_shardings

# The model is annotated as nnx.Module here: dots_jax.model.modeling imports this module, not the other way round.

# attn: q/k/v/o; mlp: the dense layers' MLP; shared: the shared experts' MLP; experts: the routed experts.
TARGETS = ("attn", "mlp", "shared", "experts")
RANK_AXIS = "lora_rank"  # the logical axis of the rank dimension (never split: sharding.RULES)
A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
GATE_UP_A = "gate_up_proj_lora_a"  # the routed experts' A, shared by gate_proj and up_proj
# Each adapted weight's dropout draws from its own key, folded in by this number (a stable order, not a hash).
WEIGHT_IDS = {name: i for i, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj", "gate_up_proj", "shared_experts"))}
# W + A @ B for each adapted weight, in our layouts; "..." holds the stacked-layer and expert axes.
DELTA = {"q_proj": "...hr,...rnd->...hnd", "k_proj": "...hr,...rnd->...hnd", "v_proj": "...hr,...rnd->...hnd",
         "o_proj": "...ndr,...rh->...ndh",
         "gate_proj": "...ir,...ro->...io", "up_proj": "...ir,...ro->...io", "down_proj": "...ir,...ro->...io"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r; alpha (None: alpha = r, scaling 1; PEFT's meaning, scaling = alpha / r); dropout on the adapter's
    input (training only); targets, a non-empty subset of TARGETS (kept in TARGETS' order)."""

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float)
                                       or not self.alpha > 0):
            raise ValueError(f"LoraConfig.alpha must be a positive number or None (= rank), got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if not targets or unknown:
            raise ValueError(f"LoraConfig.targets must be a non-empty subset of {TARGETS}, got {self.targets!r}")
        # A canonical order, so that two configs naming the same targets are equal (checkpoints compare them).
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))

    @property
    def scaling(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def for_target(lora: LoraConfig | None, target: str) -> LoraConfig | None:
    """`lora` when it adapts `target` (one of TARGETS), else None: what a module's `lora` argument takes."""
    return lora if lora is not None and target in lora.targets else None


# ------------------------------------------------------------------------------------------------ parameters
# Axes of an A that are not the adapted weight's input: its fan-in is the product of the others.
NOT_INPUT_AXES = ("layers", "expert", RANK_AXIS)


def lora_a(rank: int, inputs: Sequence[tuple[int, str | None]],
           lead: Sequence[tuple[int, str | None]] = ()) -> nnx.LoRAParam:
    """A [*lead, *inputs, rank] in f32, zeros until init_adapters draws it (Dots1ForCausalLM does, last). `lead`:
    axes the weight has before its inputs (the routed experts' "expert")."""
    shape = tuple(size for size, _ in (*lead, *inputs)) + (rank,)
    axes = tuple(name for _, name in (*lead, *inputs)) + (RANK_AXIS,)
    return nnx.LoRAParam(jnp.zeros(shape, jnp.float32), out_sharding=axes, eager_sharding=False)


def lora_b(rank: int, outputs: Sequence[tuple[int, str | None]],
           lead: Sequence[tuple[int, str | None]] = ()) -> nnx.LoRAParam:
    """B [*lead, rank, *outputs] in f32, zeros (PEFT's init: the adapted model starts as the base)."""
    shape = tuple(size for size, _ in lead) + (rank,) + tuple(size for size, _ in outputs)
    axes = tuple(name for _, name in lead) + (RANK_AXIS,) + tuple(name for _, name in outputs)
    return nnx.LoRAParam(jnp.zeros(shape, jnp.float32), out_sharding=axes, eager_sharding=False)


def adapter(lora: LoraConfig | None, inputs: Sequence[tuple[int, str | None]],
            outputs: Sequence[tuple[int, str | None]]) -> tuple[nnx.LoRAParam | None, nnx.LoRAParam | None]:
    """(A, B) for a weight [*inputs, *outputs], or (None, None) without `lora`."""
    if lora is None:
        return None, None
    return lora_a(lora.rank, inputs), lora_b(lora.rank, outputs)


def init_adapters(model: nnx.Module, key: jax.Array) -> None:
    """Draw every A under `model` as PEFT does, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's kaiming_uniform_ with
    a = sqrt(5)), fan_in the adapted weight's input size, each from its own key folded from `key` in module order.
    The model draws them from one key taken after every base weight, so that its base weights are those the same
    seed gives without adapters."""
    count = 0
    for _, module in nnx.iter_modules(model):
        for name, var in vars(module).items():
            if not (name.endswith(A_SUFFIX) and isinstance(var, nnx.LoRAParam)):
                continue
            shape, axes = var.get_value().shape, var.get_metadata()["out_sharding"]
            bound = 1.0 / math.sqrt(math.prod(n for n, a in zip(shape, axes, strict=True) if a not in NOT_INPUT_AXES))
            var.set_value(jax.random.uniform(jax.random.fold_in(key, count), shape, jnp.float32, -bound, bound))
            count += 1


# ------------------------------------------------------------------------------------------------- forward
def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout (kept values scaled by 1 / (1 - rate)); x itself without a key or at rate 0."""
    if key is None or rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def fold(key: jax.Array | None, n: int | jax.Array) -> jax.Array | None:
    """jax.random.fold_in(key, n): a key of its own for part n (a layer, a module); None stays None."""
    return None if key is None else jax.random.fold_in(key, n)


def weight_key(key: jax.Array | None, name: str) -> jax.Array | None:
    """The dropout key of adapted weight `name` (WEIGHT_IDS) from its module's key; None stays None."""
    return fold(key, WEIGHT_IDS[name])


def adapt(y: jax.Array, x: jax.Array, a: nnx.LoRAParam | None, b: nnx.LoRAParam | None, lora: LoraConfig | None,
          key: jax.Array | None, x_to_rank: str, rank_to_y: str) -> jax.Array:
    """y + scaling * (dropout(x) @ A) @ B in x's dtype (the two products as einsum equations), or y when the weight
    has no adapter (a is None)."""
    if a is None:
        return y
    x = dropout(x, lora.dropout, key)
    low = jnp.einsum(x_to_rank, x, a[...].astype(x.dtype))
    delta = jnp.einsum(rank_to_y, low, b[...].astype(x.dtype))
    return y + (delta * jnp.asarray(lora.scaling, delta.dtype)).astype(y.dtype)


# ---------------------------------------------------------------------------------------------- arithmetic
def lora_param_count(cfg: Dots1Config, lora: LoraConfig) -> int:
    """Trainable adapter elements: r * (in + out) per adapted matrix, per layer; the routed experts
    E * r * (H + 2I) for gate+up (one A, two Bs) and E * r * (I + H) for down, per MoE layer."""
    r, h = lora.rank, cfg.hidden_size
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def mlp(width: int) -> int:  # gate and up [H, width], down [width, H]
        return 3 * r * (h + width)

    total = 0
    if "attn" in lora.targets:
        total += cfg.num_hidden_layers * r * ((h + q_out) + 2 * (h + kv_out) + (q_out + h))
    if "mlp" in lora.targets:
        total += cfg.num_dense_layers * mlp(cfg.intermediate_size)
    if "shared" in lora.targets and cfg.n_shared_experts:
        total += cfg.num_moe_layers * mlp(cfg.shared_intermediate_size)
    if "experts" in lora.targets:
        e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
        total += cfg.num_moe_layers * (e * r * (h + 2 * i) + e * r * (i + h))
    return total


# ---------------------------------------------------------------------------------------- attach and merge
def attach_lora(model: nnx.Module, lora: LoraConfig, seed: int = 0) -> nnx.Module:
    """`model` with fresh adapters (A random, B zero) on lora.targets: the same base arrays (same dtype, int8 kept)
    in a model whose `lora` is `lora`. The adapters are those Dots1ForCausalLM(..., lora=lora, rngs=nnx.Rngs(seed))
    draws; only they are computed (the init runs as one program whose base weights XLA drops). A base placed on a
    multi-device mesh gets its adapters created on that mesh, split by the sharding table."""
    if model.lora is not None:
        raise ValueError(f"this model has adapters already (lora={model.lora}); merge_lora(model) first")
    options = {**model.options(), "lora": lora}

    def build() -> nnx.Module:
        return type(model)(model.cfg, rngs=nnx.Rngs(seed), **options)

    placed = model.embed_tokens.get_value().sharding
    mesh = placed.mesh if isinstance(placed, jax.sharding.NamedSharding) and placed.mesh.size > 1 else None
    # Built outside any mesh: under one, nnx would read the logical axis names as mesh axes.
    with jax.set_mesh(None):
        graphdef, abstract = nnx.split(nnx.eval_shape(build))
        shardings = None if mesh is None else param_shardings(nnx.state(abstract, nnx.LoRAParam), mesh)
        init = jax.jit(lambda: nnx.state(build(), nnx.LoRAParam), out_shardings=shardings)
        adapters = dict(nnx.to_flat_state(init.lower().compile({"xla_backend_optimization_level": 0})()))
    base = dict(nnx.to_flat_state(nnx.state(model)))
    flat = dict(nnx.to_flat_state(abstract))
    for path, var in flat.items():
        var.set_value((adapters if path in adapters else base)[path].get_value())
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A model without adapters computing what `model` computes (dropout off): each adapted weight becomes
    W + scaling * A @ B, computed in f32 (HIGHEST precision) and cast to W's dtype; `model` itself when it has no
    adapters.

    An int8 base becomes a float model: every int8 weight (adapted or not, the LM head too) is dequantised in f32,
    the adapter added, and the result cast to the model's parameter dtype (the embedding's dtype, which the
    unquantised parameters have). Other parameters are the same arrays."""
    lora = model.lora
    if lora is None:
        return model
    param_dtype = model.embed_tokens.get_value().dtype
    options = {**model.options(), "lora": None, "quantize": None, "quantize_head": False, "param_dtype": param_dtype}
    with jax.set_mesh(None):  # as in attach_lora
        graphdef, target = nnx.split(nnx.eval_shape(lambda: type(model)(model.cfg, rngs=nnx.Rngs(0), **options)))
    source = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    flat = dict(nnx.to_flat_state(target))
    for path, var in flat.items():
        var.set_value(_merged_weight(source, path, lora.scaling, param_dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _merged_weight(source: dict[tuple, jax.Array], path: tuple, scaling: float, param_dtype: jnp.dtype
                   ) -> jax.Array:
    """The merged model's parameter at `path`, from the adapted model's flat state `source`."""
    *parent, name = path
    parent = tuple(parent)
    w = source[path]
    quantised = w.dtype == jnp.int8
    b = source.get(parent + (name + B_SUFFIX,))
    if b is None and not quantised:
        return w
    out_dtype = param_dtype if quantised else w.dtype
    merged = (dequantize(w, source[parent + (name + "_scale",)], CONTRACTED[name], jnp.float32) if quantised
              else w.astype(jnp.float32))
    if b is not None:
        a = source.get(parent + (name + A_SUFFIX,))
        a = source[parent + (GATE_UP_A,)] if a is None else a  # the routed experts' gate and up share one A
        delta = jnp.einsum(DELTA[name], a.astype(jnp.float32), b.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        merged = merged + scaling * delta
    return merged.astype(out_dtype)
