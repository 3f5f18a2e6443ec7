"""Training and fine-tuning: next-token loss, AdamW with warmup-stable-decay, and MoE load balancing.

The paper's recipe (arXiv 2506.05767): AdamW (0.9, 0.95), weight decay 0.1, gradient clip 1.0, a
warmup-stable-decay schedule; auxiliary-loss-free balancing (each MoE layer's e_score_correction_bias is nudged
up for under-loaded experts and down for over-loaded ones after every step) plus a small sequence-wise balance loss.
bf16 compute with f32 master weights is a model built with dtype=bfloat16, param_dtype=float32.

LoRA (a model with adapters, dots_jax.model.lora.attach_lora): the same step trains the adapters (nnx.LoRAParam)
alone; the base's nnx.Params ride along in TrainState.frozen, untouched (bf16, f32 or int8 as loaded), with no
gradient and no optimizer state; the router's correction bias follows the balancing rule as in full training.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dots_jax.model.modeling import Dots1ForCausalLM, RouterBias
from dots_jax.ops.head_loss import head_nll
from dots_jax.training.data import Batch


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 3e-4
    total_steps: int = 1000
    warmup_steps: int = 100
    decay_steps: int = 200  # the last decay_steps decay linearly to min_lr_ratio * learning_rate
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    balance_loss_coef: float = 1e-4  # the sequence-wise balance loss weight ("small" in the paper)
    bias_update_rate: float = 1e-3  # auxiliary-loss-free balancing step; 0 switches it off
    grad_accum_steps: int = 1
    remat: bool = False  # recompute each layer in the backward pass: activation memory of one layer, not all
    seed: int = 0  # LoRA dropout's masks come from (seed, micro-step), so a resumed run draws what it would have

    def __post_init__(self) -> None:
        def need(cond: bool, field: str, what: str) -> None:
            if not cond:
                raise ValueError(f"TrainConfig.{field} must be {what}, got {getattr(self, field)!r}")

        need(self.learning_rate > 0, "learning_rate", "> 0")
        need(self.total_steps >= 1, "total_steps", ">= 1")
        need(0 <= self.warmup_steps and 0 <= self.decay_steps, "warmup_steps", ">= 0 (and decay_steps too)")
        need(self.warmup_steps + self.decay_steps <= self.total_steps, "decay_steps",
             "such that warmup_steps + decay_steps <= total_steps")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        need(self.grad_clip > 0, "grad_clip", "> 0")
        need(self.balance_loss_coef >= 0 and self.bias_update_rate >= 0, "bias_update_rate",
             ">= 0 (and balance_loss_coef too)")
        need(self.grad_accum_steps >= 1, "grad_accum_steps", ">= 1")


def wsd_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0, constant, then linear decay to min_lr_ratio * peak over the last decay_steps."""
    peak, stable = tc.learning_rate, tc.total_steps - tc.warmup_steps - tc.decay_steps
    return optax.join_schedules([
        optax.linear_schedule(0.0, peak, max(tc.warmup_steps, 1)),
        optax.constant_schedule(peak),
        optax.linear_schedule(peak, peak * tc.min_lr_ratio, max(tc.decay_steps, 1)),
    ], boundaries=[tc.warmup_steps, tc.warmup_steps + stable])


LAYER_STACKS = ("dense_layers", "moe_layers")  # their parameters carry a leading "layers" axis


def weight_decay_mask(params: nnx.State) -> nnx.State:
    """True for the matrices AdamW decays; False for norm weights and biases, which are 1-D per layer (a
    stacked norm is [layers, dim], a q/k/v bias [layers, heads, head_dim]: ndim alone would decay them)."""
    def decays(path: tuple, p: jax.Array) -> bool:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        stacked = int(bool(keys) and keys[0] in LAYER_STACKS)
        name = next((k for k in reversed(keys) if isinstance(k, str) and k != "value"), "")
        return p.ndim - stacked >= 2 and not name.endswith("bias")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Clip, then AdamW; norms and biases (1-D per layer) are not decayed. With grad_accum_steps > 1 the update
    applies every that many micro-steps, on the mean gradient."""
    opt = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(wsd_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                    mask=weight_decay_mask),
    )
    return optax.MultiSteps(opt, every_k_schedule=tc.grad_accum_steps) if tc.grad_accum_steps > 1 else opt


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: nnx.State  # the nnx.Param leaves (f32 master weights)
    router_bias: nnx.State  # the RouterBias leaves: changed by the balancing rule, never by gradients
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: micro-steps taken
    # [L, E] expert load summed over the micro-steps of the current optimizer step: the balancing update uses
    # the whole step's load, once per optimizer step, as the paper does.
    expert_load_sum: jax.Array
    # LoRA: the base model's nnx.Params, which no step changes (training checkpoints leave them out); empty for
    # full training.
    frozen: nnx.State = dataclasses.field(default_factory=lambda: nnx.State({}))


def is_lora(state: TrainState) -> bool:
    return bool(jax.tree.leaves(state.frozen))


def init_state(model: Dots1ForCausalLM, tc: TrainConfig) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, the state before the first step). A model with LoRA adapters (model.lora set) trains them only:
    params are its nnx.LoRAParams, frozen the other nnx.Params."""
    if getattr(model, "lora", None) is not None:
        graphdef, params, frozen, router_bias = nnx.split(model, nnx.LoRAParam, nnx.Param, RouterBias)
    else:
        graphdef, params, router_bias = nnx.split(model, nnx.Param, RouterBias)
        frozen = nnx.State({})
    opt_state = make_optimizer(tc).init(params)
    cfg = model.cfg
    load_shape = (cfg.num_moe_layers, cfg.n_routed_experts) if cfg.num_moe_layers else (0, 0)
    return graphdef, TrainState(params, router_bias, opt_state, jnp.zeros((), jnp.int32),
                                jnp.zeros(load_shape, jnp.float32), frozen)


def loss_fn(params: nnx.State, router_bias: nnx.State, graphdef: nnx.GraphDef, batch: Batch,
            balance_loss_coef: float, remat: bool = False, frozen: nnx.State | None = None,
            lora_key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy over the masked tokens + coef * the mean per-layer balance loss. LoRA: params
    are the adapters, frozen the base; lora_key draws the adapters' dropout (None: none, as in eval)."""
    model = nnx.merge(graphdef, params, router_bias, *([] if frozen is None else [frozen]))
    dropout = {} if lora_key is None else {"lora_key": lora_key}
    x, _, stats = model.hidden_states(batch.inputs, remat=remat, **dropout)
    head = model.head_weight()
    # A padded model (dots_jax.model.padding) has extra vocabulary columns, zeros whose logits must not enter
    # the loss.
    head = head[:, :getattr(model, "unpadded_cfg", model.cfg).vocab_size]
    mask = batch.loss_mask.astype(jnp.float32)
    nll = head_nll(x.reshape(-1, x.shape[-1]), head, batch.targets.reshape(-1)).reshape(batch.targets.shape)
    ce = (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    if stats is None:  # a model without MoE layers
        return ce, {"ce": ce, "balance_loss": jnp.zeros(()), "expert_load": jnp.zeros((0, 0))}
    balance = stats.balance_loss.mean()
    return ce + balance_loss_coef * balance, {"ce": ce, "balance_loss": balance, "expert_load": stats.expert_load}


def update_router_bias(router_bias: nnx.State, expert_load: jax.Array, rate: float) -> nnx.State:
    """Auxiliary-loss-free balancing: bias += rate * sign(mean load - load), per MoE layer ([L, E])."""
    step = (rate * jnp.sign(expert_load.mean(axis=-1, keepdims=True) - expert_load)).astype(jnp.float32)
    return jax.tree.map(lambda bias: bias + step, router_bias)  # the one leaf: moe_layers' [L, E] bias


def train_step(graphdef: nnx.GraphDef, tc: TrainConfig, state: TrainState, batch: Batch
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One (micro-)step: gradients, AdamW update, balancing update. Pure; jit it with graphdef and tc static.

    Sharded: place the state with `dots_jax.parallel.sharding.shard_state(state, mesh)` and call the step inside
    `with jax.set_mesh(mesh):` (the model reads the mesh there: activation constraints, expert parallelism)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)  # with respect to state.params only
    lora_key = jax.random.fold_in(jax.random.key(tc.seed), state.step) if is_lora(state) else None
    (loss, aux), grads = grad_fn(state.params, state.router_bias, graphdef, batch, tc.balance_loss_coef, tc.remat,
                                 state.frozen, lora_key)
    updates, opt_state = make_optimizer(tc).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    router_bias = state.router_bias
    load_sum = state.expert_load_sum + aux["expert_load"]
    last_micro_step = (state.step + 1) % tc.grad_accum_steps == 0  # the optimizer applies its update now
    if tc.bias_update_rate > 0 and load_sum.size:
        updated = update_router_bias(router_bias, load_sum, tc.bias_update_rate)
        router_bias = jax.tree.map(lambda new, old: jnp.where(last_micro_step, new, old), updated, router_bias)
    load_sum = jnp.where(last_micro_step, 0.0, load_sum)
    metrics = {"loss": loss, "ce": aux["ce"], "balance_loss": aux["balance_loss"],
               "grad_norm": optax.tree.norm(grads), "expert_load": aux["expert_load"],
               "learning_rate": wsd_schedule(tc)(state.step // tc.grad_accum_steps)}
    return TrainState(params, router_bias, opt_state, state.step + 1, load_sum, state.frozen), metrics


jit_train_step = jax.jit(train_step, static_argnums=(0, 1), donate_argnums=2)


def load_cv(expert_load: jax.Array) -> jax.Array:
    """Coefficient of variation of each MoE layer's expert load ([L, E] -> [L]): 0 is perfectly balanced."""
    mean = expert_load.mean(axis=-1)
    return expert_load.std(axis=-1) / jnp.maximum(mean, 1e-9)
