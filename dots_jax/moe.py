"""Routing and dropless dispatch for dots.llm1's routed experts.

route():     sigmoid router in f32 with the correction bias used for selection only (DeepSeek-V3 style).
moe_experts(): sort token copies by expert, grouped matmuls, unsort, weighted combine in f32, one cast.
The grouped matmul is `grouped_matmul.gmm`, one signature with several backends (see that module).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dots_jax.grouped_matmul import gmm


def route(
    x: jax.Array,
    router_weight: jax.Array,
    correction_bias: jax.Array,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Choose experts for each token.

    x [T, H], router_weight [H, E], correction_bias [E] (f32).
    Returns (weights [T, k] f32, expert indices [T, k] int32, router logits [T, E] f32).
    """
    logits = jnp.dot(x.astype(jnp.float32), router_weight.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.sigmoid(logits)
    # The bias steers which experts are chosen; it never enters the weights.
    choice = scores + correction_bias.astype(jnp.float32)[None, :]
    if n_group > 1:
        num_tokens, num_experts = choice.shape
        grouped = choice.reshape(num_tokens, n_group, num_experts // n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(axis=-1)  # [T, n_group]
        _, kept = jax.lax.top_k(group_scores, topk_group)
        group_mask = jax.nn.one_hot(kept, n_group, dtype=jnp.bool_).any(axis=-2)  # [T, n_group]
        expert_mask = jnp.repeat(group_mask, num_experts // n_group, axis=-1)
        # -inf (as transformers 5.x does): older releases filled 0.0, which can pick a masked expert when
        # biased scores are negative.
        choice = jnp.where(expert_mask, choice, -jnp.inf)
    _, indices = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return weights, indices.astype(jnp.int32), logits


class RouterStats(NamedTuple):
    """Per MoE layer (a leading layer axis when stacked): what load balancing needs."""

    expert_load: jax.Array  # [E] f32: real tokens routed to each expert
    balance_loss: jax.Array  # [] f32: the sequence-wise balance loss sum_i f_i P_i, mean over sequences


def routing_stats(logits: jax.Array, indices: jax.Array, valid: jax.Array) -> RouterStats:
    """logits [B, S, E] f32 router logits, indices [B, S, k] chosen experts, valid [B, S] real tokens.

    Sequence-wise balance loss (DeepSeek-V3, used by dots.llm1): per sequence of T real tokens,
    f_i = E / (k T) * (tokens choosing expert i) and P_i = mean over tokens of s_i / sum_j s_j with
    s = sigmoid(logits); the loss is sum_i f_i P_i (1 when perfectly balanced). f carries no gradient.
    """
    num_experts, top_k = logits.shape[-1], indices.shape[-1]
    valid = valid.astype(jnp.float32)
    chosen = jax.nn.one_hot(indices, num_experts, dtype=jnp.float32).sum(axis=-2) * valid[..., None]  # [B,S,E]
    tokens = jnp.maximum(valid.sum(axis=-1), 1.0)  # [B]
    f = num_experts / (top_k * tokens)[:, None] * chosen.sum(axis=1)  # [B, E]
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    p = (scores / scores.sum(axis=-1, keepdims=True) * valid[..., None]).sum(axis=1) / tokens[:, None]
    balance = (jax.lax.stop_gradient(f) * p).sum(axis=-1).mean()
    return RouterStats(expert_load=chosen.sum(axis=(0, 1)), balance_loss=balance)


def moe_experts(
    x: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    *,
    backend: str = "auto",
) -> jax.Array:
    """Routed experts, dropless: every token copy is computed.

    x [T, H] in the activation dtype; weights [T, k] f32; indices [T, k]; gate/up [E, H, I]; down [E, I, H].
    Returns sum_k weights[t, k] * expert_{indices[t, k]}(x[t]), accumulated in f32 and cast once to x.dtype.
    """
    num_tokens, top_k = indices.shape
    num_experts = gate.shape[0]
    dtype = x.dtype
    flat_experts = indices.reshape(-1)  # [T*k], copy c belongs to token c // k
    order = jnp.argsort(flat_experts, stable=True)
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    rows = x[order // top_k]  # token copies, sorted by expert

    h_gate = gmm(rows, gate.astype(dtype), group_sizes, backend=backend)
    h_up = gmm(rows, up.astype(dtype), group_sizes, backend=backend)
    h = silu(h_gate) * h_up
    out_sorted = gmm(h, down.astype(dtype), group_sizes, backend=backend)  # [T*k, H]

    # Unsort with a gather (its gradient is a scatter-add; cheaper than scattering forward).
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    out = out_sorted[inverse].reshape(num_tokens, top_k, -1)
    combined = jnp.einsum("tkh,tk->th", out.astype(jnp.float32), weights.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)
    return combined.astype(dtype)


def silu(x: jax.Array) -> jax.Array:
    """SiLU computed in f32 and cast back, as torch does for bf16 inputs."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)
