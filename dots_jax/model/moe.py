"""Routing and dropless dispatch for dots.llm1's routed experts.

route():     sigmoid router in f32 with the correction bias used for selection only (DeepSeek-V3 style).
moe_experts(): sort token copies by expert, grouped matmuls, unsort, weighted combine in f32, one cast.
The experts run through `ops.gmm.expert_ffn`, one signature over every gmm backend (see that module).
expert_parallel(): the same under a mesh, in shard_map: each expert shard runs only its own experts, combined
by a psum (decode, small batches) or by a token exchange (large batches): ragged_all_to_all on TPU and GPU, a
padded all_to_all on CPU, whose XLA has no ragged-all-to-all.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dots_jax.ops import gmm
from dots_jax.ops.common import round_to
from dots_jax.ops.gmm import Dropout, ExpertLora

EXPERT_AXIS = "expert"
# Mesh axes that split tokens inside the expert-parallel MoE (the psum path keeps them whole over "expert").
TOKEN_AXES = ("data", "fsdp", "tensor")
A2A_MIN_TOKENS = 16  # tokens per device from which the token exchange replaces the psum
STRATEGIES = ("auto", "psum", "all_to_all", "ragged_all_to_all")
# The routed experts' int8 scales (gate [E, I], up [E, I], down [E, H]), or None for float experts.
Scales = tuple[jax.Array, jax.Array, jax.Array] | None


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
    scales: Scales = None,
    lora: ExpertLora | None = None,
    dropout: Dropout | None = None,
) -> jax.Array:
    """Routed experts, dropless: every token copy is computed.

    x [T, H] in the activation dtype; weights [T, k] f32; indices [T, k]; gate/up [E, H, I]; down [E, I, H] (int8
    with their per-expert, per-output-channel `scales`, or float with scales None). lora: the experts' LoRA adapters
    [E, ...] and dropout their input dropout (ops.gmm.expert_ffn).
    Returns sum_k weights[t, k] * expert_{indices[t, k]}(x[t]), accumulated in f32 and cast once to x.dtype.
    """
    return round_to(local_experts(x, weights, indices, gate, up, down, first_expert=0, backend=backend,
                                  scales=scales, lora=lora, dropout=dropout), x.dtype)


def local_experts(x: jax.Array, weights: jax.Array, indices: jax.Array, gate: jax.Array, up: jax.Array,
                  down: jax.Array, *, first_expert: jax.Array | int, backend: str = "auto",
                  scales: Scales = None, lora: ExpertLora | None = None, dropout: Dropout | None = None
                  ) -> jax.Array:
    """The f32 combine of the copies routed to experts first_expert .. first_expert + E_local - 1, whose
    weights gate/up/down [E_local, ...] hold (megablox's `group_offset`); copies routed elsewhere add zero.
    Summed over all expert shards (a psum) this is moe_experts before its cast."""
    num_tokens, top_k = indices.shape
    copy_token = jnp.arange(num_tokens * top_k, dtype=jnp.int32) // top_k  # copy c belongs to token c // k
    out = expert_ffn(x, copy_token, indices.reshape(-1) - first_expert, gate, up, down, backend=backend,
                     scales=scales, lora=lora, dropout=dropout)
    return jnp.einsum("tkh,tk->th", out.reshape(num_tokens, top_k, -1).astype(jnp.float32),
                      weights.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def expert_ffn(source: jax.Array, row_index: jax.Array, group: jax.Array, gate: jax.Array, up: jax.Array,
               down: jax.Array, *, backend: str = "auto", scales: Scales = None, lora: ExpertLora | None = None,
               dropout: Dropout | None = None) -> jax.Array:
    """out[c] = SwiGLU expert `group[c]` applied to source[row_index[c]], or zeros where group[c] is outside
    [0, E) (another shard's expert, or padding). source [N, H]; row_index, group [C]; returns [C, H]."""
    num_groups = gate.shape[0]
    group = jnp.where((group >= 0) & (group < num_groups), group, num_groups)  # foreign rows sort last
    order = jnp.argsort(group, stable=True)
    # Counting the foreign rows as one extra group and dropping it leaves them past sum(group_sizes): zeros.
    group_sizes = jnp.bincount(group, length=num_groups + 1)[:num_groups].astype(jnp.int32)
    rows = source[row_index[order]]  # sorted by group
    out_sorted = gmm.expert_ffn(rows, gate, up, down, group_sizes, backend=backend, scales=scales, lora=lora,
                                dropout=dropout)  # [C, H]

    # Unsort with a gather (its gradient is a scatter-add; cheaper than scattering forward).
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return out_sorted[inverse]


# ======================================================================================== expert parallelism
def ep_strategy(num_tokens: int, mesh: jax.sharding.AbstractMesh | jax.sharding.Mesh) -> str:
    """"exchange" when the tokens split evenly over every device with at least A2A_MIN_TOKENS each, else
    "psum" (decode steps, small or odd batches). The exchange is "ragged_all_to_all" on TPU and GPU and
    "all_to_all" on CPU, chosen when lowering (see _ep_exchange)."""
    devices = mesh.shape[EXPERT_AXIS] * _size(mesh, TOKEN_AXES)
    return "exchange" if num_tokens % devices == 0 and num_tokens // devices >= A2A_MIN_TOKENS else "psum"


def expert_parallel(x: jax.Array, weights: jax.Array, indices: jax.Array, gate: jax.Array, up: jax.Array,
                    down: jax.Array, *, mesh: jax.sharding.AbstractMesh | jax.sharding.Mesh,
                    backend: str = "auto", strategy: str = "auto", scales: Scales = None,
                    lora: ExpertLora | None = None, dropout: Dropout | None = None) -> jax.Array:
    """moe_experts with the experts split over the mesh's "expert" axis (gate/up/down [E, ...] sharded on E).

    "psum": tokens split over the non-expert axes and whole on each expert shard; each shard computes the
    copies routed to its own experts, and a psum over "expert" adds the partial f32 sums.
    "all_to_all" and "ragged_all_to_all": tokens split over every axis; each device sends its token copies to
    the shards owning their experts, computes what it received, and sends the results back. Each receiver has
    room for every copy of every shard (expert-axis size x T x k rows here), so nothing is ever dropped.
    "all_to_all" sends every block padded to that size: it runs on any backend but moves (expert-axis size)
    times the bytes of "ragged_all_to_all", which sends only the real copies and needs XLA's ragged-all-to-all
    (TPU, GPU; not CPU). "auto": psum or an exchange by ep_strategy, the ragged one wherever XLA has it.
    int8 experts' `scales` and LoRA adapters (`lora`) are split over "expert" with their experts; each shard draws
    its adapters' dropout from the key folded with its shard number.
    """
    num_experts = gate.shape[0]
    shards = mesh.shape[EXPERT_AXIS]
    if num_experts % shards:
        raise ValueError(f"n_routed_experts={num_experts} is not divisible by the expert axis ({shards})")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown expert-parallel strategy {strategy!r}: one of {', '.join(map(repr, STRATEGIES))}")
    strategy = ep_strategy(x.shape[0], mesh) if strategy == "auto" else strategy
    if strategy == "psum":
        tokens = P(_dividing_axes(x.shape[0], mesh, TOKEN_AXES))
    else:
        tokens = P((*TOKEN_AXES, EXPERT_AXIS))
    body = functools.partial({"psum": _ep_psum, "all_to_all": _ep_all_to_all, "exchange": _ep_exchange,
                              "ragged_all_to_all": _ep_ragged_all_to_all}[strategy], backend=backend)
    experts = P(EXPERT_AXIS)
    # Only what is given travels (shard_map's specs would have nothing to match for None): the int8 scales, the
    # adapters (split with their experts), the dropout key and rate (replicated).
    extras = {name: value for name, value in (("scales", None if scales is None else tuple(scales)),
                                              ("lora", lora), ("dropout", dropout)) if value is not None}
    extra_specs = {name: P() if name == "dropout" else experts for name in extras}

    def shard(x: jax.Array, weights: jax.Array, indices: jax.Array, gate: jax.Array, up: jax.Array,
              down: jax.Array, extra: dict) -> jax.Array:
        return body(x, weights, indices, gate, up, down, **extra)

    # check_vma=False: the gmm backends' loops (and Pallas kernels) start from unannotated zeros, which the
    # varying-axes check rejects. The gradients are checked against the single-device model in the tests.
    specs = (tokens, tokens, tokens, experts, experts, experts, extra_specs)
    combined = jax.shard_map(shard, mesh=mesh, in_specs=specs, out_specs=tokens,
                             check_vma=False)(x, weights, indices, gate, up, down, extras)
    return round_to(combined, x.dtype)


def _shard_dropout(dropout: Dropout | None) -> Dropout | None:
    """This expert shard's dropout: the key folded with the shard number (each shard's rows draw their own masks)."""
    if dropout is None:
        return None
    return Dropout(jax.random.fold_in(dropout.key, jax.lax.axis_index(EXPERT_AXIS)), dropout.rate)


def _ep_psum(x: jax.Array, weights: jax.Array, indices: jax.Array, gate: jax.Array, up: jax.Array,
             down: jax.Array, scales: Scales = None, lora: ExpertLora | None = None,
             dropout: Dropout | None = None, *, backend: str) -> jax.Array:
    first = jax.lax.axis_index(EXPERT_AXIS) * gate.shape[0]
    partial = local_experts(x, weights, indices, gate, up, down, first_expert=first, backend=backend,
                            scales=scales, lora=lora, dropout=_shard_dropout(dropout))
    return jax.lax.psum(partial, EXPERT_AXIS)  # f32: one rounding, at the final cast


def _ep_all_to_all(x: jax.Array, weights: jax.Array, indices: jax.Array, gate: jax.Array, up: jax.Array,
                   down: jax.Array, scales: Scales = None, lora: ExpertLora | None = None,
                   dropout: Dropout | None = None, *, backend: str) -> jax.Array:
    num_tokens, top_k = indices.shape
    shards, local = jax.lax.axis_size(EXPERT_AXIS), gate.shape[0]
    copies = num_tokens * top_k
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # by expert, hence by destination shard
    dest = flat[order] // local
    counts = jnp.bincount(dest, length=shards)
    slot = jnp.arange(copies, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[dest]  # place in dest's block

    # Send buffers [shards, copies, H]: block d holds the copies for shard d; unused slots get group `local`
    # (past the last local expert), so the receiver computes zeros for them.
    send = jnp.zeros((shards, copies, x.shape[1]), x.dtype).at[dest, slot].set(x[order // top_k])
    send_group = jnp.full((shards, copies), local, jnp.int32).at[dest, slot].set(flat[order] - dest * local)
    recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0)  # recv[s]: what shard s sent here
    recv_group = jax.lax.all_to_all(send_group, EXPERT_AXIS, 0, 0)

    rows = shards * copies
    out = expert_ffn(recv.reshape(rows, -1), jnp.arange(rows, dtype=jnp.int32), recv_group.reshape(rows),
                     gate, up, down, backend=backend, scales=scales, lora=lora, dropout=_shard_dropout(dropout))
    back = jax.lax.all_to_all(out.reshape(shards, copies, -1), EXPERT_AXIS, 0, 0)  # back[d]: from shard d
    return _unsort_and_combine(back[dest, slot], order, weights)


def _ep_ragged_all_to_all(x: jax.Array, weights: jax.Array, indices: jax.Array, gate: jax.Array, up: jax.Array,
                          down: jax.Array, scales: Scales = None, lora: ExpertLora | None = None,
                          dropout: Dropout | None = None, *, backend: str) -> jax.Array:
    num_tokens, top_k = indices.shape
    shards, local = jax.lax.axis_size(EXPERT_AXIS), gate.shape[0]
    copies = num_tokens * top_k
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # by expert, hence by destination shard: one block per destination
    send_counts = jnp.bincount(flat, length=shards * local).reshape(shards, local)  # [dest shard, its expert]
    recv_counts = jax.lax.all_to_all(send_counts, EXPERT_AXIS, 0, 0)  # [source shard, local expert]
    send_sizes, recv_sizes = send_counts.sum(axis=1), recv_counts.sum(axis=1)
    send_offsets = jnp.cumsum(send_sizes) - send_sizes  # block d of the send buffer
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes  # source s's block in the receive buffer
    # ragged_all_to_all takes, per destination, the offset of this shard's block in the destination's buffer,
    # and, for the way back, in the source's buffer: each is what the other shard computed.
    at_dest = jax.lax.all_to_all(recv_offsets, EXPERT_AXIS, 0, 0, tiled=True)
    at_source = jax.lax.all_to_all(send_offsets, EXPERT_AXIS, 0, 0, tiled=True)

    rows = shards * copies  # room for every copy of every shard
    received = jax.lax.ragged_all_to_all(x[order // top_k], jnp.zeros((rows, x.shape[1]), x.dtype), send_offsets,
                                         send_sizes, at_dest, recv_sizes, axis_name=EXPERT_AXIS)
    # The sources' blocks lie one after another, each sorted by local expert: row r's expert is the
    # (source, expert) bucket of recv_counts it falls in; rows past the last block get `local` (zeros).
    bucket = jnp.searchsorted(jnp.cumsum(recv_counts.reshape(-1)), jnp.arange(rows), side="right")
    group = jnp.where(bucket < shards * local, bucket % local, local)
    out = expert_ffn(received, jnp.arange(rows, dtype=jnp.int32), group, gate, up, down, backend=backend,
                     scales=scales, lora=lora, dropout=_shard_dropout(dropout))
    back = jax.lax.ragged_all_to_all(out, jnp.zeros((copies, out.shape[1]), out.dtype), recv_offsets, recv_sizes,
                                     at_source, send_sizes, axis_name=EXPERT_AXIS)
    return _unsort_and_combine(back, order, weights)


def _ep_exchange(x: jax.Array, weights: jax.Array, indices: jax.Array, gate: jax.Array, up: jax.Array,
                 down: jax.Array, scales: Scales = None, lora: ExpertLora | None = None,
                 dropout: Dropout | None = None, *, backend: str) -> jax.Array:
    """"ragged_all_to_all", or "all_to_all" on CPU. Chosen when lowering, not from jax.default_backend(): a CPU
    host compiling ahead of time for a TPU gets the ragged exchange."""
    return jax.lax.platform_dependent(x, weights, indices, gate, up, down, scales, lora, dropout,
                                      cpu=functools.partial(_ep_all_to_all, backend=backend),
                                      default=functools.partial(_ep_ragged_all_to_all, backend=backend))


def _unsort_and_combine(sorted_out: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """sorted_out [T*k, H]: the expert outputs of the copies in `order`; returns the f32 weighted sum per token."""
    num_tokens, top_k = weights.shape
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    per_copy = sorted_out[inverse].reshape(num_tokens, top_k, -1)
    return jnp.einsum("tkh,tk->th", per_copy.astype(jnp.float32), weights.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def _size(mesh: jax.sharding.AbstractMesh | jax.sharding.Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _dividing_axes(n: int, mesh: jax.sharding.AbstractMesh | jax.sharding.Mesh,
                   axes: tuple[str, ...]) -> tuple[str, ...] | None:
    """The axes (in order, skipping any that would not divide) that split n rows evenly."""
    chosen: list[str] = []
    for a in axes:
        if mesh.shape[a] > 1 and n % (_size(mesh, tuple(chosen)) * mesh.shape[a]) == 0:
            chosen.append(a)
    return tuple(chosen) or None
