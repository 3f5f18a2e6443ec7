"""Capacity planner: compile the model ahead of time for a TPU slice and report what one step needs.

    python -m dots_jax.plan --topology v5p:4x4x4 --mesh expert=16,fsdp=4 --batch 64 --seq 4096 --mode decode

Runs on a CPU machine with libtpu installed (the [tpu] or [test] extra): the TPU topology is described by
jax.experimental.topologies, every array is a ShapeDtypeStruct carrying the sharding the real run would use
(dots_jax.parallel.sharding's table), and `.compile()` runs the real TPU compiler, Pallas/Mosaic MoE kernels included.
Nothing is allocated and nothing runs on a TPU.

Reported per chip: memory from the compiler (`memory_analysis`: arguments, outputs, temporaries; weights and
KV cache split out by their shard sizes, computed here from the shardings) against the chip's HBM; flops and
bytes per step computed by hand from the config (the compiler's `cost_analysis` counts a scanned layer body
once and counts padded rows: its numbers are printed for reference only); and the roofline tokens/s they imply:
a step takes at least max(flops / peak FLOP/s, bytes / HBM bandwidth) on every chip.

A program that does not fit makes the compiler raise RESOURCE_EXHAUSTED: the planner prints
"does not fit: needs X GiB per chip (HBM Y GiB)" and exits with status 1 (an answer, not a mistake). Bad input
prints one `error: ...` line and exits with 2.

Modes: "decode" one decode step for --batch rows against a KV cache of --seq slots (cache donated; its layout
left to the compiler, which otherwise copies it); "prefill" --batch x --seq prompt tokens written into a cache of
--seq slots; "train" one training step (f32 master weights, bf16 compute, AdamW) on --batch x --seq tokens, or with
--lora-rank R a LoRA step (dots_jax.model.lora): f32 adapters with their AdamW moments and gradients, the frozen
base in bf16 (or int8 with --quantize int8) with no master copy and no moments;
"serve" the serving engine's decode step (dots_jax.inference.engine.engine_step: --batch rows, the engine's
max_batch, over a paged KV cache of --page-size-token pages, attention by the "ragged" Pallas kernel) and how many
KV pages and concurrent --seq-token sequences fit beside it (see serve_capacity).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dots_jax import cli, files
from dots_jax.errors import UserError

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_gib: float  # HBM per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bw: float  # HBM bytes/s per chip
    cores_per_chip: int  # TensorCores per chip: Google's accelerator names (v5p-128) count cores


# Public Cloud TPU figures per chip.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32, 275e12, 1228e9, 2),
    "v5p": Chip("v5p", 95, 459e12, 2765e9, 2),
    "v5e": Chip("v5e", 16, 197e12, 819e9, 1),
    "v6e": Chip("v6e", 32, 918e12, 1640e9, 1),
}
MODES = ("decode", "prefill", "train", "serve")
# dots_jax.model.lora.TARGETS, named here so that the arithmetic imports no JAX (tests check the two agree).
LORA_TARGETS = ("attn", "mlp", "shared", "experts")
# The TPU kernels, named: "auto" resolves by the host's platform, and a planner host is a CPU.
ATTENTION_BACKEND = "splash"
PAGED_BACKEND = "ragged"  # an int8 KV pool runs "blocked" (XLA) instead: the kernel takes no per-token scales


def paged_backend(kv_cache_dtype: str | None) -> str:
    return "blocked" if kv_cache_dtype == "int8" else PAGED_BACKEND
# Serving: the share of HBM held back from the page pool (allocator fragmentation, the runtime's own buffers; the
# engine's prefill step, which the planner does not compile, needs fewer temporaries than its decode step).
SERVE_MARGIN = 0.05


class PlanError(UserError):
    """A bad argument: the message says what to change."""


def chip_for(topology: str) -> Chip:
    generation = topology.split(":", 1)[0]
    if generation not in CHIPS:
        raise PlanError(f"--topology {topology!r}: unknown TPU generation {generation!r}; "
                        f"known: {', '.join(CHIPS)} (e.g. v5p:4x4x4, v5e:8x8, v6e:8x8)")
    return CHIPS[generation]


def topology_chips(topology: str) -> int:
    dims = topology.split(":", 1)[-1]
    if not re.fullmatch(r"\d+(x\d+)*", dims):
        raise PlanError(f"--topology {topology!r}: expected GENERATION:AxB[xC], e.g. v5p:4x4x4 or v5e:8x8")
    return math.prod(int(d) for d in dims.split("x"))


def slice_name(topology: str) -> str:
    """Google's name for the slice, counted in chips (v5p:4x4x4 -> v5p-64)."""
    return f"{topology.split(':')[0]}-{topology_chips(topology)}"


def _quiet_libtpu(topology: str) -> None:
    """libtpu probes for a local TPU when it loads; telling it which accelerator to expect quiets that."""
    chip = chip_for(topology)
    prefix = "v5litepod" if chip.name == "v5e" else chip.name
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{prefix}-{topology_chips(topology) * chip.cores_per_chip}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to guard with the lockfile
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host; the TPU devices come from the topology


# ------------------------------------------------------------------------------------------- arithmetic
def param_counts(cfg) -> dict[str, int]:
    """Parameter counts by kind: the attention projections apart from the small vectors (norms, q/k norms,
    attention biases), which no quantization touches."""
    h, n, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    vectors = 2 * h + 2 * d + (n * d + 2 * kv * d + h if cfg.attention_bias else 0)
    lm_head = 0 if cfg.tie_word_embeddings else h * cfg.vocab_size
    return {
        "embed": cfg.vocab_size * h,
        "lm_head": lm_head,
        "attention": cfg.num_hidden_layers * (h * n * d * 2 + h * kv * d * 2),
        "norms_and_biases": cfg.num_hidden_layers * vectors + h,
        "dense_mlp": cfg.num_dense_layers * 3 * h * cfg.intermediate_size,
        "router": cfg.num_moe_layers * h * cfg.n_routed_experts,
        "shared_experts": cfg.num_moe_layers * 3 * h * cfg.shared_intermediate_size,
        "routed_experts": cfg.num_moe_layers * cfg.n_routed_experts * 3 * h * cfg.moe_intermediate_size,
    }


def active_params_per_token(cfg) -> tuple[int, int]:
    """(LM head, decoder layers): the weights one token multiplies through (the embedding is a lookup)."""
    c = param_counts(cfg)
    routed_active = c["routed_experts"] * cfg.num_experts_per_tok // cfg.n_routed_experts
    layers = c["attention"] + c["norms_and_biases"] + c["dense_mlp"] + c["router"] + c["shared_experts"] + routed_active
    return c["lm_head"] or c["embed"], layers


def experts_hit_fraction(cfg, tokens: int) -> float:
    """Expected share of routed experts that at least one of `tokens` tokens chooses (uniform routing)."""
    return 1.0 - (1.0 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** tokens


def step_arithmetic(cfg, mode: str, batch: int, seq: int, mesh_shape: dict[str, int], remat: bool = False,
                    attention_split: int | None = None, quantize: str | None = None,
                    kv_cache_dtype: str | None = None, lora_rank: int | None = None,
                    lora_targets: Sequence[str] = LORA_TARGETS) -> dict[str, float]:
    """Hand-computed flops and HBM bytes per step, total and on the busiest chip.

    flops: 2 x active weights per token for the matmuls, plus attention's QK^T and PV (4 x heads x head_dim per
    attended key: the implementation scores every cache slot, masked, so a token attends to all `seq` slots);
    training is 3x the forward (backward = 2x), 4x with `remat` (the backward recomputes the forward). bytes per
    chip: the weights each chip reads (attention, dense and shared weights whole per chip, split only by the tensor
    axis; routed experts: the share that the step's tokens hit, split over the expert axis), the KV cache split
    over the batch axes, and in training the f32 master weights, gradients and AdamW moments (read + written) of
    the chip's own shard. "serve" counts as "decode". `attention_split`: the chips that share attention's work and
    the KV cache (default all; serving's "ragged" kernel splits only the key/value heads and repeats the rest, see
    paged_kv_arithmetic). `quantize` "int8": the decoder's linear weights are read as one byte each (their f32
    per-channel scales add 4 bytes per output channel); `kv_cache_dtype` "int8": see kv_bytes_per_token.

    `lora_rank` (train): a LoRA step on `lora_targets` (lora_param_counts). The frozen base has no weight gradient:
    its products run twice (forward, the input's gradient; 3x with `remat`) and its bf16 (or int8) weights are read
    twice; the adapters count as full training's weights do (3x, f32), and the optimizer's traffic is theirs only.
    "trainable_params": the adapters, or every parameter in full training.
    """
    chips = math.prod(mesh_shape.values())
    attention_split = attention_split or chips
    tensor, expert = mesh_shape["tensor"], mesh_shape["expert"]
    c = param_counts(cfg)
    head, active = active_params_per_token(cfg)
    tokens = batch * (1 if mode in ("decode", "serve") else seq)
    attn_flops_per_token = 4 * cfg.num_attention_heads * cfg.head_dim * seq * cfg.num_hidden_layers
    lora = lora_param_counts(cfg, lora_rank, lora_targets) if mode == "train" and lora_rank else None
    lora_active = 0  # the adapter weights one token multiplies through: its experts' and every other
    if lora:
        routed = lora["routed_experts"]
        lora_active = sum(lora.values()) - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    passes = (4 if remat else 3) if mode == "train" else 1
    base_passes = passes - 1 if lora else passes
    matmul_flops = tokens * 2 * (base_passes * (active + head) + passes * lora_active)
    attention_flops = passes * tokens * attn_flops_per_token
    flops = matmul_flops + attention_flops

    # f32 master weights in full training (cast to bf16 per use), else bf16 (a LoRA step's frozen base too)
    w_bytes = 4 if mode == "train" and not lora else 2
    linear = 1.0 if quantize == "int8" else w_bytes  # per weight of the decoder's linear layers
    scales = quantized_scale_counts(cfg) if quantize == "int8" else dict.fromkeys(c, 0)
    hit = experts_hit_fraction(cfg, tokens)
    weights_read = sum(
        (linear * c[k] + 4 * scales[k] if k in LINEAR_KINDS else w_bytes * c[k]) / tensor
        for k in c if k not in ("routed_experts", "embed")
    ) + (linear * c["routed_experts"] + 4 * scales["routed_experts"]) * hit / expert
    kv_bytes = batch * seq * kv_bytes_per_token(cfg, kv_cache_dtype) / attention_split  # read or written once
    optimizer, trainable = 0.0, sum(c.values())
    if mode == "train":
        kv_bytes = 0.0
        trainable = sum(lora.values()) if lora else trainable
        optimizer = trainable / chips * 4 * 2 * 4  # params, grads, m, v: f32, each read and written once
        if lora:  # the base: forward and the input's gradient; the f32 adapters as full training's weights
            adapters = sum(v for k, v in lora.items() if k != "routed_experts") / tensor
            weights_read = 2 * weights_read + 3 * 4 * (adapters + lora["routed_experts"] * hit / expert)
        else:
            weights_read *= 3  # forward, and the backward reads them again for both gradients
    per_chip_bytes = weights_read + kv_bytes + optimizer
    flops_per_chip = matmul_flops / chips + attention_flops / attention_split
    return {"tokens_per_step": tokens, "flops_per_step": float(flops), "flops_per_chip": flops_per_chip,
            "bytes_per_chip": per_chip_bytes, "weights_read_per_chip": weights_read,
            "kv_bytes_per_chip": kv_bytes, "experts_hit_fraction": hit,
            "active_params_per_token": active + head, "total_params": sum(c.values()),
            "trainable_params": trainable}


LINEAR_KINDS = ("attention", "dense_mlp", "shared_experts", "routed_experts")  # int8 weights with --quantize


def quantized_scale_counts(cfg) -> dict[str, int]:
    """The f32 per-output-channel scales of the int8 model's linear weights, by param_counts' kinds."""
    h, n, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    counts = dict.fromkeys(param_counts(cfg), 0)
    counts["attention"] = cfg.num_hidden_layers * (n * d + 2 * kv * d + h)  # q, k, v, o
    counts["dense_mlp"] = cfg.num_dense_layers * (2 * cfg.intermediate_size + h)  # gate, up, down
    counts["shared_experts"] = cfg.num_moe_layers * (2 * cfg.shared_intermediate_size + h)
    counts["routed_experts"] = cfg.num_moe_layers * cfg.n_routed_experts * (2 * cfg.moe_intermediate_size + h)
    return counts


def lora_param_counts(cfg, rank: int, targets: Sequence[str] = LORA_TARGETS) -> dict[str, int]:
    """The adapters' parameters by param_counts' kinds: rank x (in + out) per adapted matrix. attn: q, k, v ([H, r]
    and [r, heads x head_dim]) and o ([heads x head_dim, r] and [r, H]) in every layer; mlp: the dense layers'
    gate, up and down; shared: the shared experts' three; experts: per routed expert and MoE layer one A [H, r]
    shared by gate and up, a B [r, I] for each, and [I, r] + [r, H] for down."""
    h, n, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    counts = dict.fromkeys(param_counts(cfg), 0)
    if "attn" in targets:
        counts["attention"] = cfg.num_hidden_layers * rank * (4 * h + 2 * n * d + 2 * kv * d)
    if "mlp" in targets:
        counts["dense_mlp"] = cfg.num_dense_layers * 3 * rank * (h + cfg.intermediate_size)
    if "shared" in targets and cfg.n_shared_experts:
        counts["shared_experts"] = cfg.num_moe_layers * 3 * rank * (h + cfg.shared_intermediate_size)
    if "experts" in targets:
        counts["routed_experts"] = (cfg.num_moe_layers * cfg.n_routed_experts * rank
                                    * (2 * h + 3 * cfg.moe_intermediate_size))
    return counts


def kv_bytes_per_token(cfg, kv_cache_dtype: str | None = None) -> float:
    """K and V of one token over all layers: bf16, or int8 with one f32 scale per head vector."""
    per_head = cfg.head_dim + 4 if kv_cache_dtype == "int8" else 2 * cfg.head_dim
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * per_head


def paged_kv_arithmetic(cfg, mesh_shape: dict[str, int], page_size: int, seq: int,
                        kv_cache_dtype: str | None = None) -> dict[str, Any]:
    """The serving page pool per chip.

    The pool is [layers, pages, page_size, 2 x kv_heads, head_dim] in bf16, one for the whole slice. The "ragged"
    kernel runs per chip in shard_map with the key/value heads split over its head_axes and the pages and the
    rows whole, so the pool is split the same way: every chip holds every page, for its share of the heads, and the
    pool is repeated over the other axes (`pool_replicas`). A page then costs layers x page_size x 2 x
    kv_heads_per_chip x head_dim x 2 bytes on every chip, and a sequence of `seq` tokens takes ceil(seq /
    page_size) pages.
    """
    from dots_jax.ops.ragged_paged import head_axes  # plan imports JAX only once its TPU settings are made

    axes = head_axes(mesh_shape, cfg.num_key_value_heads)
    split = math.prod(mesh_shape[a] for a in axes)
    kv_heads = cfg.num_key_value_heads // split
    page_bytes = page_size * kv_bytes_per_token(cfg, kv_cache_dtype) * kv_heads // cfg.num_key_value_heads
    return {"page_size": page_size, "head_axes": list(axes), "head_split": split,
            "pool_replicas": math.prod(mesh_shape.values()) // split, "kv_heads_per_chip": kv_heads,
            "page_bytes_per_chip": page_bytes, "pages_per_seq": -(-seq // page_size),
            "paged_backend": paged_backend(kv_cache_dtype)}


def serve_capacity(budget_bytes: float, fixed_bytes: float, bytes_per_page: float, pages_per_seq: int,
                   head_split: int) -> dict[str, float]:
    """KV pages per chip and concurrent sequences: what the budget (HBM less the margin) leaves once the compiled
    step's own needs (`fixed_bytes`: weights, other arguments, temporaries, code) are met, in pages of
    `bytes_per_page`. The pool is one for the slice, so `seqs_per_slice` = pages // pages_per_seq; each chip holds
    1/head_split of every one of them, the KV of `seqs_per_chip` whole sequences."""
    pages = max(0, math.floor((budget_bytes - fixed_bytes) / bytes_per_page))
    seqs = pages // pages_per_seq
    return {"kv_pages_per_chip": pages, "seqs_per_slice": seqs, "seqs_per_chip": seqs / head_split}


def roofline(arith: dict[str, float], chip: Chip) -> dict[str, float]:
    t_compute = arith["flops_per_chip"] / chip.peak_flops
    t_memory = arith["bytes_per_chip"] / chip.hbm_bw
    t = max(t_compute, t_memory)
    return {"step_time_s": t, "compute_time_s": t_compute, "memory_time_s": t_memory,
            "bound": "compute" if t_compute >= t_memory else "memory",
            "tokens_per_s": arith["tokens_per_step"] / t}


# --------------------------------------------------------------------------------------------- compiling
def _shard_bytes(sds) -> int:
    sharding = sds.sharding
    sharding = getattr(sharding, "sharding", sharding)  # a Format carries its sharding
    shape = sharding.shard_shape(sds.shape)
    return math.prod(shape) * sds.dtype.itemsize


def _train_state_bytes(state) -> dict[str, int]:
    """A sharded abstract TrainState's bytes per chip by part: what trains (f32), the frozen base (LoRA), the
    optimizer's state, and the rest (router bias, step, expert load)."""
    import jax

    parts = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    named = {"trainable": parts.pop("params"), "frozen": parts.pop("frozen", None),
             "optimizer": parts.pop("opt_state"), "other": parts}
    return {k: sum(_shard_bytes(x) for x in jax.tree.leaves(v)) for k, v in named.items()}


def _lower(cfg, mode: str, batch: int, seq: int, mesh, auto_layout: bool, remat: bool, quantize: str | None = None,
           kv_cache_dtype: str | None = None, lora=None):
    """(jitted-and-lowered step, weight bytes per chip, KV cache bytes per chip, training state bytes per chip by
    part ({} outside training)). `lora`: a LoraConfig, for a LoRA training step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental.layout import Format, Layout
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dots_jax.model.cache import KVCache
    from dots_jax.model.modeling import abstract_model
    from dots_jax.parallel.sharding import batch_axes, cache_shardings, param_shardings, with_shardings

    rows = NamedSharding(mesh, P(batch_axes(batch, mesh), None))

    def tokens_sds(shape, dtype=jnp.int32, sharding=rows):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    if mode == "train":
        from dots_jax.training.checkpoint import abstract_train_state
        from dots_jax.training.data import Batch
        from dots_jax.training.step import TrainConfig, train_step

        tc = TrainConfig(remat=remat)
        graphdef, state = abstract_train_state(cfg, tc, dtype=jnp.bfloat16, moe_backend="pallas",
                                               attention_backend=ATTENTION_BACKEND, lora=lora, quantize=quantize)
        state = with_shardings(state, param_shardings(state, mesh))
        parts = _train_state_bytes(state)
        data = Batch(tokens_sds((batch, seq)), tokens_sds((batch, seq)), tokens_sds((batch, seq), jnp.float32))
        step = jax.jit(train_step, static_argnums=(0, 1), donate_argnums=2)
        with jax.set_mesh(mesh):
            return step.lower(graphdef, tc, state, data), sum(parts.values()), 0, parts

    model = abstract_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, moe_backend="pallas",
                           attention_backend=ATTENTION_BACKEND, quantize=quantize)
    graphdef, state = nnx.split(model)
    state = with_shardings(state, param_shardings(state, mesh))
    weights = sum(_shard_bytes(x) for x in jax.tree.leaves(state))

    cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, seq, jnp.bfloat16, kv_cache_dtype))
    cache_sh = cache_shardings(cache, mesh)
    cache = with_shardings(cache, cache_sh)
    kv_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(cache))
    if auto_layout:  # the compiler picks the cache's layout (else it copies the cache to its preferred one)
        cache_sh = jax.tree.map(lambda s: Format(Layout.AUTO, s), cache_sh)

    if mode == "decode":
        def fn(state, tokens, positions, cache):
            logits, cache = nnx.merge(graphdef, state)(tokens[:, None], positions=positions[:, None], cache=cache)
            return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

        vec = NamedSharding(mesh, P(batch_axes(batch, mesh)))
        args = (state, tokens_sds((batch,), sharding=vec), tokens_sds((batch,), sharding=vec), cache)
        out_shardings = (vec, cache_sh)
    else:
        def fn(state, ids, cache):
            logits, cache = nnx.merge(graphdef, state)(ids, cache=cache)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

        vec = NamedSharding(mesh, P(batch_axes(batch, mesh)))
        args = (state, tokens_sds((batch, seq)), cache)
        out_shardings = (vec, cache_sh)
    in_shardings = (*(jax.tree.map(lambda x: x.sharding, a) for a in args[:-1]), cache_sh)
    step = jax.jit(fn, donate_argnums=len(args) - 1, in_shardings=in_shardings, out_shardings=out_shardings)
    with jax.set_mesh(mesh):
        return step.lower(*args), weights, kv_bytes, {}


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _serve_model(cfg, mesh, quantize: str | None = None):
    """(graphdef, abstract state with the table's shardings, weight bytes per chip) of the bf16 (or int8) model."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dots_jax.model.modeling import abstract_model
    from dots_jax.parallel.sharding import param_shardings, with_shardings

    model = abstract_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, moe_backend="pallas",
                           attention_backend=ATTENTION_BACKEND, quantize=quantize)
    graphdef, state = nnx.split(model)
    state = with_shardings(state, param_shardings(state, mesh))
    return graphdef, state, sum(_shard_bytes(x) for x in jax.tree.leaves(state))


# The engine's per-row sampling arrays (dots_jax.inference.engine.RowSampling), by field.
_SAMPLING_DTYPES = {"temperature": "float32", "top_k": "int32", "top_p": "float32", "min_p": "float32",
                    "seed": "uint32", "count": "int32"}


def _lower_serve(cfg, graphdef, state, mesh, rows: int, seq: int, page_size: int, num_pages: int,
                 head_axes: Sequence[str], kv_cache_dtype: str | None = None):
    """(the engine's decode step lowered for `rows` rows over a pool of `num_pages` pages, pool bytes per chip).
    The step is the engine's own jitted function, with the arguments the engine passes it: page-table columns
    padded to a power of two as the engine pads them, the pool donated."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dots_jax.inference.engine import RowSampling, engine_step
    from dots_jax.model.cache import PagedKVCache, PageTable
    from dots_jax.parallel.sharding import with_shardings

    cache = jax.eval_shape(lambda: PagedKVCache.create(cfg, num_pages, page_size, jnp.bfloat16, kv_cache_dtype))
    # Pages [L, P, page, 2 KV, D] and an int8 pool's scales [L, P, page, 2 KV]: split by the heads alike.
    cache = with_shardings(cache, jax.tree.map(
        lambda x: NamedSharding(mesh, P(None, None, None, tuple(head_axes) or None, *[None] * (x.ndim - 4))), cache))
    whole = NamedSharding(mesh, P())  # the kernel reads every row's table on every chip

    def sds(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=whole)

    cols = _pow2(-(-seq // page_size))
    pages = PageTable(sds((rows, cols)), sds((rows,)), sds((rows,)), paged_backend(kv_cache_dtype))
    sampling = RowSampling(**{f.name: sds((rows,), jnp.dtype(_SAMPLING_DTYPES[f.name]))
                              for f in dataclasses.fields(RowSampling)})
    with jax.set_mesh(mesh):
        lowered = engine_step.lower(graphdef, state, cache, sds((rows, 1)), pages, sampling)
    return lowered, sum(_shard_bytes(x) for x in jax.tree.leaves(cache))


def _memory(compiled, weights: int, kv: int) -> dict[str, float]:
    """The compiler's memory per chip, in GiB, weights and KV cache split out of the arguments."""
    mem = compiled.memory_analysis()
    args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    code = getattr(mem, "generated_code_size_in_bytes", 0)
    return {"weights": weights / GiB, "kv_cache": kv / GiB, "other_arguments": max(args - weights - kv, 0) / GiB,
            "outputs_not_aliased": (out - alias) / GiB, "temporaries": temp / GiB, "code": code / GiB,
            "total": (args + out - alias + temp + code) / GiB}


def _exhausted(e: Exception) -> bool:
    message = str(e)
    return "RESOURCE_EXHAUSTED" in message or "exceeds" in message.lower()


def _plan_serve(cfg, mesh, shape: dict[str, int], chip: Chip, batch: int, seq: int, page_size: int, margin: float,
                verify: bool, quantize: str | None = None, kv_cache_dtype: str | None = None) -> dict[str, Any]:
    """The serve mode's compiles and capacity: the report's "serve", "memory_gib", "fits" and the capacity keys.

    1. The engine's decode step with the engine's default pool (a whole sequence per row): what it needs per chip
       besides its pool, taken from the budget, gives the pages (serve_capacity, a page costing its bytes).
    2. With `verify`, the step again with that pool: it must fit the HBM, and its need must have grown by the
       pool's bytes.
    3. If it grew by more (the step copies its pool, or a buffer scales with it), the two compiles give the real
       cost of a page: the pages are recomputed from it and compiled once more.
    """
    kv = paged_kv_arithmetic(cfg, shape, page_size, seq, kv_cache_dtype)
    rows, page_bytes = _pow2(batch), float(kv["page_bytes_per_chip"])
    budget = chip.hbm_gib * GiB * (1 - margin)
    graphdef, state, weights = _serve_model(cfg, mesh, quantize)
    compiles: list[dict[str, Any]] = []

    def compile_at(pages: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        lowered, pool = _lower_serve(cfg, graphdef, state, mesh, rows, seq, page_size, pages, kv["head_axes"],
                                     kv_cache_dtype)
        point: dict[str, Any] = {"pages": pages, "pool_gib": pool / GiB}
        try:
            compiled = lowered.compile()
        except Exception as e:  # XlaRuntimeError / JaxRuntimeError, depending on the version
            if not _exhausted(e):
                raise
            point.update(fits=False, needs_gib=needed_from_message(str(e)),
                         compiler_message=str(e).splitlines()[0][:500])
        else:
            memory = _memory(compiled, weights, pool)
            point.update(fits=memory["total"] <= chip.hbm_gib, needs_gib=memory["total"], memory_gib=memory,
                         mosaic_kernels=mosaic_kernels(compiled.as_text()))
        point["compile_s"] = time.perf_counter() - t0
        compiles.append(point)
        return point

    def capacity(point: dict[str, Any], per_page: float) -> dict[str, Any]:
        fixed = point["needs_gib"] * GiB - per_page * point["pages"]
        return {"step_gib_without_pool": fixed / GiB, "bytes_per_page": per_page,
                **serve_capacity(budget, fixed, per_page, kv["pages_per_seq"], kv["head_split"])}

    point, per_page = compile_at(rows * kv["pages_per_seq"]), page_bytes
    if verify and point["needs_gib"]:
        probe = point
        pages = capacity(probe, per_page)["kv_pages_per_chip"]
        if 0 < pages != probe["pages"]:
            point = compile_at(pages)
        if point is not probe and point["needs_gib"]:
            slope = (point["needs_gib"] - probe["needs_gib"]) * GiB / (point["pages"] - probe["pages"])
            # Within 1% of the page's bytes the difference is the compiler's alignment, not a cost of the pool.
            if abs(slope / page_bytes - 1) >= 0.01:
                per_page = slope
                pages = capacity(point, per_page)["kv_pages_per_chip"]
                if pages > 0:
                    point = compile_at(pages)
    # The capacity from the last compile: with `verify`, a pool within 1% of the one it compiled.
    cap = capacity(point, per_page) if point["needs_gib"] else {}
    verified = (len(compiles) > 1 and point["fits"]
                and abs(cap["kv_pages_per_chip"] - point["pages"]) <= point["pages"] // 100)
    out: dict[str, Any] = {
        **cap, "weights_gib": weights / GiB, "kv_cache_gib": point["pool_gib"], "needs_gib": point["needs_gib"],
        "compile_s": sum(c["compile_s"] for c in compiles),
        "fits": point["fits"] and cap.get("kv_pages_per_chip", 0) >= kv["pages_per_seq"],
        "serve": {**kv, "rows": rows, "margin": margin, "budget_gib": budget / GiB, "compiles": compiles,
                  "verified": verified, "pool_copied": per_page > 1.01 * page_bytes},
    }
    for key in ("memory_gib", "mosaic_kernels", "compiler_message"):
        if key in point:
            out[key] = point[key]
    return out


# XLA:TPU's words: "the total memory required for HLO temporaries (266.52G) exceeds available HBM (95.74G)",
# or (other versions) "Used 123.45G of 95.74G hbm".
_NEEDS = (re.compile(r"\(([0-9.]+)\s*([KMGT]?)i?B?\)\s+exceeds available HBM", re.I),
          re.compile(r"Used\s+([0-9.]+)\s*([KMGT]?)i?B?\s+of\s+[0-9.]+\s*[KMGT]?i?B?\s+hbm", re.I))
_UNIT = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def needed_from_message(message: str) -> float | None:
    """GiB per chip that XLA's RESOURCE_EXHAUSTED message says the program needs, if it says."""
    for pattern in _NEEDS:
        m = pattern.search(message)
        if m:
            return float(m.group(1)) * _UNIT[m.group(2).upper()] / GiB
    return None


# Our gmm kernels' names, splash attention's (splash_{mha,mqa}_{fwd,dq,dkv}[_segmented]_{residuals,...}) and
# the serving engine's paged attention kernel.
_KERNEL_NAMES = re.compile(r"\b(dots_t?gmm(?:_t)?|splash_m[hq]a_\w+?_(?:no_)?residuals"
                           r"|ragged_paged_attention_kernel)\b")


def mosaic_kernels(hlo_text: str) -> list[str]:
    """The Pallas kernels (Mosaic custom calls) a compiled TPU module holds, by name."""
    return sorted(set(_KERNEL_NAMES.findall(hlo_text))) if "tpu_custom_call" in hlo_text else []


def _split_physical_mesh(mesh_spec: str, devices):
    """A mesh whose axes may split physical torus axes (8 x 8 on a 4x4x4 v5p, 16 x 4 on a 16x16 v5e): jax.make_mesh
    refuses those; mesh_utils builds them (an axis then spans a part of a ring: its collectives are slower)."""
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from dots_jax.parallel.sharding import MESH_AXES, parse_mesh_spec

    sizes = parse_mesh_spec(mesh_spec)
    grid = mesh_utils.create_device_mesh(tuple(sizes[a] for a in MESH_AXES), devices,
                                         allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh(mesh_spec: str, devices):
    from dots_jax.parallel.sharding import make_mesh

    try:
        return make_mesh(mesh_spec, devices=devices)
    except NotImplementedError:  # jax.make_mesh maps each mesh axis onto whole physical torus axes
        return _split_physical_mesh(mesh_spec, devices)


def plan(topology: str, mesh_spec: str, batch: int, seq: int, mode: str, config: Any = "dots.llm1.inst",
         auto_layout: bool = True, remat: bool = False, page_size: int = 16, margin: float = SERVE_MARGIN,
         verify: bool = True, quantize: str | None = None, kv_cache_dtype: str | None = None,
         lora_rank: int | None = None, lora_alpha: float | None = None,
         lora_targets: Sequence[str] | None = None) -> dict[str, Any]:
    """Compile one step and return the report (a dict; "fits" False with "needs_gib" when it does not fit).
    `config`: a preset name, a config.json path or a Dots1Config. `remat`: a training step that recomputes each
    layer in its backward pass (`python -m dots_jax.train --remat`). Serve mode: `page_size` tokens per KV page,
    `margin` the share of HBM kept out of the pool, `verify` compiles the step again with the pool it reports.
    `quantize` "int8": int8 weights (from_pretrained(..., quantize="int8")); `kv_cache_dtype` "int8": an int8 KV
    cache (decode, prefill and serve). `lora_rank` (train): a LoRA step (dots_jax.model.lora.LoraConfig with
    `lora_alpha` and `lora_targets`, default all of LORA_TARGETS) on a frozen bf16 base, int8 with `quantize`."""
    if mode not in MODES:
        raise PlanError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if batch < 1 or seq < 1:
        raise PlanError(f"--batch and --seq must be positive, got {batch} and {seq}")
    if quantize not in (None, "int8") or kv_cache_dtype not in (None, "int8"):
        raise PlanError(f"--quantize and --kv-cache-dtype: int8 or nothing, got {quantize!r} and {kv_cache_dtype!r}")
    if lora_rank is None and (lora_alpha is not None or lora_targets is not None):
        raise PlanError("--lora-alpha and --lora-targets need --lora-rank")
    if lora_rank is not None and mode != "train":
        raise PlanError(f"--lora-rank applies to --mode train only, not --mode {mode}")
    if mode == "train" and (kv_cache_dtype or (quantize and lora_rank is None)):
        raise PlanError("--quantize and --kv-cache-dtype apply to inference (decode, prefill, serve), not --mode "
                        "train; --quantize int8 trains with --lora-rank (a frozen int8 base)")
    if page_size < 1 or not 0 <= margin < 1:
        raise PlanError(f"--page-size must be positive and --margin in [0, 1), got {page_size} and {margin}")
    chip = chip_for(topology)
    topology_chips(topology)
    _quiet_libtpu(topology)

    from jax.experimental import topologies

    from dots_jax.config import Dots1Config, preset
    from dots_jax.model.lora import LoraConfig
    from dots_jax.parallel.sharding import check_shardable, parse_mesh_spec

    lora = None
    if lora_rank is not None:
        try:
            lora = LoraConfig(lora_rank, lora_alpha, targets=tuple(lora_targets or LORA_TARGETS))
        except ValueError as e:
            raise PlanError(f"--lora-rank/--lora-alpha/--lora-targets: {e}") from None
    if isinstance(config, Dots1Config):
        cfg, config = config, "custom config"
    else:
        cfg = Dots1Config.from_hf(config) if config.endswith(".json") else preset(config)
    if seq > cfg.max_position_embeddings:
        raise PlanError(f"--seq {seq} exceeds the model's context of {cfg.max_position_embeddings}")
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # libtpu's error types vary; its message is the useful part
        raise PlanError(f"--topology {topology!r}: {e}") from None
    try:
        mesh = _mesh(mesh_spec, devices)
        check_shardable(cfg, mesh)
    except ValueError as e:
        raise PlanError(f"--mesh {mesh_spec!r}: {e}") from None
    shape = parse_mesh_spec(mesh_spec)
    if remat and mode != "train":
        raise PlanError("--remat applies to --mode train only (inference keeps no activations for a backward)")
    kv_split = paged_kv_arithmetic(cfg, shape, page_size, seq)["head_split"] if mode == "serve" else None
    arith = step_arithmetic(cfg, mode, batch, seq, shape, remat, attention_split=kv_split, quantize=quantize,
                            kv_cache_dtype=kv_cache_dtype, lora_rank=lora_rank,
                            lora_targets=lora.targets if lora else LORA_TARGETS)
    report: dict[str, Any] = {
        "topology": topology, "slice": slice_name(topology), "chips": len(devices), "mesh": mesh_spec,
        "mode": mode, "remat": remat, "quantize": quantize, "kv_cache_dtype": kv_cache_dtype, "batch": batch,
        "seq": seq, "config": config, "hbm_gib": chip.hbm_gib,
        "lora_rank": lora_rank, "lora_alpha": lora.alpha if lora else None,
        "lora_targets": list(lora.targets) if lora else None,
        "arithmetic": arith, "roofline": roofline(arith, chip),
    }
    if mode == "serve":
        report.update(_plan_serve(cfg, mesh, shape, chip, batch, seq, page_size, margin, verify, quantize,
                                  kv_cache_dtype))
        return report
    t0 = time.perf_counter()
    try:
        lowered, weights, kv, parts = _lower(cfg, mode, batch, seq, mesh, auto_layout, remat, quantize,
                                             kv_cache_dtype, lora)
        report["weights_gib"], report["kv_cache_gib"] = weights / GiB, kv / GiB
        if parts:
            report["train_state_gib"] = {k: v / GiB for k, v in parts.items()}
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError / JaxRuntimeError, depending on the version
        if not _exhausted(e):
            raise
        message = str(e)
        report["compile_s"] = time.perf_counter() - t0
        # The message's figure where it gives one, else what the arguments alone take (a lower bound).
        needs = needed_from_message(message) or (report.get("weights_gib", 0) + report.get("kv_cache_gib", 0))
        report.update(fits=False, needs_gib=needs, compiler_message=message.splitlines()[0][:500])
        return report
    report["compile_s"] = time.perf_counter() - t0
    report["mosaic_kernels"] = mosaic_kernels(compiled.as_text())
    memory = _memory(compiled, weights, kv)
    report.update(memory_gib=memory, fits=memory["total"] <= chip.hbm_gib, needs_gib=memory["total"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if cost:
        report["compiler_cost_analysis"] = {"flops": float(cost.get("flops", 0.0)),
                                            "bytes_accessed": float(cost.get("bytes accessed", 0.0))}
    return report


# ------------------------------------------------------------------------------------------------ output
def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def format_report(r: dict[str, Any]) -> str:
    a, roof = r["arithmetic"], r["roofline"]
    mode = _mode_label(r)
    lines = [f"dots.llm1 ({r['config']}, {a['total_params'] / 1e9:.1f}B params) {mode}: batch {r['batch']}, "
             f"seq {r['seq']} on {r['slice']} ({r['topology']}, {r['chips']} chips), mesh {r['mesh']}"]
    if r["mode"] == "serve":
        lines += _serve_lines(r)
    if not r["fits"]:
        needs = r.get("needs_gib")
        lines.append(f"does not fit: needs {needs:.1f} GiB per chip (HBM {r['hbm_gib']:g} GiB)" if needs
                     else f"does not fit: needs more than the HBM per chip (HBM {r['hbm_gib']:g} GiB)")
        if "memory_gib" in r:
            m = r["memory_gib"]
            lines.append(f"  weights {m['weights']:.2f} GiB | KV cache {m['kv_cache']:.2f} GiB | "
                         f"activations/temporaries {m['temporaries']:.2f} GiB")
        elif "weights_gib" in r:
            lines.append(f"  weights {r['weights_gib']:.2f} GiB + KV cache {r['kv_cache_gib']:.2f} GiB per chip "
                         "before activations")
        if "train_state_gib" in r:
            lines.append("  " + _train_state_line(r))
        if "compiler_message" in r:
            lines.append(f"  compiler: {r['compiler_message']}")
        return "\n".join(lines)
    m = r["memory_gib"]
    lines += [
        f"memory per chip (compiler): {m['total']:.2f} GiB of {r['hbm_gib']:g} GiB HBM "
        f"({100 * m['total'] / r['hbm_gib']:.0f}%), compiled in {r['compile_s']:.1f} s",
        f"  weights {m['weights']:.2f} GiB | KV cache {m['kv_cache']:.2f} GiB | other arguments "
        f"{m['other_arguments']:.2f} GiB | activations/temporaries {m['temporaries']:.2f} GiB | "
        f"outputs not aliased {m['outputs_not_aliased']:.2f} GiB",
        f"per step (by hand): {a['tokens_per_step']} tokens, {_si(a['flops_per_step'], 'FLOP')} "
        f"({_si(a['flops_per_chip'], 'FLOP')} per chip), {_si(a['bytes_per_chip'], 'B')} HBM traffic per chip "
        f"(experts hit {100 * a['experts_hit_fraction']:.0f}%)",
        f"roofline: {roof['tokens_per_s']:,.0f} tokens/s ({roof['bound']}-bound, step >= "
        f"{1e3 * roof['step_time_s']:.2f} ms: compute {1e3 * roof['compute_time_s']:.2f} ms, memory "
        f"{1e3 * roof['memory_time_s']:.2f} ms)",
    ]
    if "train_state_gib" in r:
        lines.insert(3, "  " + _train_state_line(r))
    if r.get("mosaic_kernels"):
        lines.append(f"Pallas kernels in the compiled step: {', '.join(r['mosaic_kernels'])}")
    if "compiler_cost_analysis" in r:
        c = r["compiler_cost_analysis"]
        lines.append(f"compiler cost_analysis (reference only: counts a scanned layer once, padded rows too): "
                     f"{_si(c['flops'], 'FLOP')}, {_si(c['bytes_accessed'], 'B')} per chip")
    return "\n".join(lines)


def _serve_lines(r: dict[str, Any]) -> list[str]:
    sv = r["serve"]
    axes = "x".join(sv["head_axes"]) or "no axis"
    lines = [f"serving: the engine's decode step ({sv['rows']} rows, \"{sv['paged_backend']}\" paged attention), "
             f"{sv['page_size']}-token KV pages of {sv['page_bytes_per_chip'] / 2**20:.2f} MiB per chip "
             f"({sv['kv_heads_per_chip']} KV heads per chip: heads split {sv['head_split']} ways over {axes}, the "
             f"pool repeated {sv['pool_replicas']}x)"]
    if "kv_pages_per_chip" in r:
        lines += [
            f"  KV pages per chip: {r['kv_pages_per_chip']:,} "
            f"({r['kv_pages_per_chip'] * sv['page_bytes_per_chip'] / GiB:.1f} GiB) -> {r['seqs_per_slice']:,} "
            f"concurrent {r['seq']}-token sequences on the slice ({sv['pages_per_seq']} pages each), the KV of "
            f"{r['seqs_per_chip']:.1f} per chip",
            f"  budget {sv['budget_gib']:.2f} GiB ({r['hbm_gib']:g} GiB HBM less {100 * sv['margin']:g}%) - "
            f"{r['step_gib_without_pool']:.2f} GiB the compiled step needs besides its pool",
        ]
    if sv["pool_copied"]:
        lines.append(f"  the step's need grows by {r['bytes_per_page'] / sv['page_bytes_per_chip']:.2f}x a page's "
                     "bytes per page: it copies its page pool (the pages above count the copy)")
    compiles = "; ".join(f"{c['pages']:,} pages: {c['needs_gib']:.2f} GiB" if c.get("needs_gib") else
                         f"{c['pages']:,} pages: does not fit" for c in sv["compiles"])
    lines.append(f"  compiles ({'verified' if sv['verified'] else 'not verified'}): {compiles}")
    return lines


def _train_state_line(r: dict[str, Any]) -> str:
    """The training state per chip by part, and the share of the parameters that trains."""
    st, a = r["train_state_gib"], r["arithmetic"]
    share = f"{a['trainable_params'] / 1e9:.2f}B of {a['total_params'] / 1e9:.2f}B parameters train " \
            f"({100 * a['trainable_params'] / a['total_params']:.2f}%)"
    if r.get("lora_rank"):
        base = "int8" if r.get("quantize") else "bf16"
        return (f"{share}: LoRA adapters (f32) {st['trainable']:.2f} GiB + their AdamW moments "
                f"{st['optimizer']:.2f} GiB; frozen {base} base {st['frozen']:.2f} GiB per chip")
    return f"{share}: f32 master weights {st['trainable']:.2f} GiB + AdamW moments {st['optimizer']:.2f} GiB per chip"


def _mode_label(r: dict[str, Any]) -> str:
    lora = r.get("lora_rank") and f"LoRA r={r['lora_rank']}" + (
        "" if tuple(r["lora_targets"]) == LORA_TARGETS else f" {','.join(r['lora_targets'])}")
    extras = [x for x, on in ((lora, lora), ("remat", r.get("remat")), ("int8 weights", r.get("quantize")),
                              ("int8 KV", r.get("kv_cache_dtype"))) if on]
    return r["mode"] + (f" ({', '.join(extras)})" if extras else "")


def table_row(r: dict[str, Any]) -> str:
    mem = f"{r['memory_gib']['total']:.1f}" if r["fits"] else f"**does not fit** ({r['needs_gib']:.0f} needed)" \
        if r.get("needs_gib") else "**does not fit**"
    tps = f"{r['roofline']['tokens_per_s']:,.0f} ({r['roofline']['bound']})" if r["fits"] else "-"
    weights = f"{r['weights_gib']:.1f}" if "weights_gib" in r else "-"
    kv = f"{r['kv_cache_gib']:.1f}" if "kv_cache_gib" in r else "-"
    mode = _mode_label(r)
    return (f"| {r['slice']} (`{r['topology']}`) | `{r['mesh']}` | {mode} | {r['batch']} x {r['seq']} | "
            f"{weights} | {kv} | {mem} / {r['hbm_gib']:g} | {tps} |")


TABLE_HEADER = ("| slice | mesh | mode | batch x seq | weights GiB/chip | KV cache GiB/chip "
                "| total GiB/chip (compiler) / HBM | roofline tokens/s |\n|---|---|---|---|---|---|---|---|")


def serve_table_row(r: dict[str, Any]) -> str:
    """A serve-mode report as a row of SERVE_TABLE_HEADER."""
    sv = r["serve"]
    if "kv_pages_per_chip" not in r:
        return (f"| {r['slice']} (`{r['topology']}`) | `{r['mesh']}` | {r['batch']} x {r['seq']} | "
                f"{sv['page_size']} | **does not fit** | | | | | |")
    total = f"{r['memory_gib']['total']:.1f}" if "memory_gib" in r else "-"
    return (f"| {r['slice']} (`{r['topology']}`) | `{r['mesh']}` | {r['batch']} x {r['seq']} | {sv['page_size']} | "
            f"{r['weights_gib']:.1f} | {r['step_gib_without_pool']:.1f} | {sv['page_bytes_per_chip'] / 2**20:.2f} | "
            f"{r['kv_pages_per_chip']:,} | {r['seqs_per_slice']:,} ({r['seqs_per_chip']:.1f}) | "
            f"{total} / {r['hbm_gib']:g} |")


SERVE_TABLE_HEADER = ("| slice | mesh | max batch x seq | page | weights GiB/chip | step without pool GiB/chip "
                      "| KV page MiB/chip | KV pages/chip | concurrent sequences: slice (KV per chip) "
                      "| total GiB/chip (compiler) / HBM |\n|---|---|---|---|---|---|---|---|---|---|")


def _main(argv: Sequence[str] | None) -> int:
    p = cli.Parser(prog="python -m dots_jax.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:4x4x4 (64 chips), v5e:8x8, v6e:8x8")
    p.add_argument("--mesh", required=True, help="mesh axes, e.g. expert=16,fsdp=4 (data, fsdp, expert, tensor)")
    p.add_argument("--batch", "--max-batch", type=int, default=64, help="rows per step (serve: the engine's "
                   "max_batch)")
    p.add_argument("--seq", type=int, default=4096, help="KV cache slots (decode), tokens per row, or (serve) "
                   "the sequence length whose concurrent sequences are counted")
    p.add_argument("--mode", choices=MODES, default="decode")
    p.add_argument("--config", default="dots.llm1.inst", help="a preset in configs/ or a config.json path")
    p.add_argument("--no-auto-layout", action="store_true", help="keep the KV cache's default layout")
    p.add_argument("--remat", action="store_true",
                   help="train mode: recompute each layer in the backward pass, as `python -m dots_jax.train "
                        "--remat` does (long sequences)")
    p.add_argument("--page-size", type=int, default=16, help="serve: tokens per KV page")
    p.add_argument("--margin", type=float, default=SERVE_MARGIN,
                   help="serve: the share of HBM kept out of the KV page pool")
    p.add_argument("--no-verify", action="store_true",
                   help="serve: one compile, without compiling the step again with the pool it reports")
    p.add_argument("--quantize", choices=["int8"], help="int8 weights, as from_pretrained(..., quantize='int8')")
    p.add_argument("--kv-cache-dtype", choices=["int8"], help="an int8 KV cache (per token and head scales)")
    p.add_argument("--lora-rank", type=int, help="train mode: a LoRA step of this rank (frozen bf16 base, or int8 "
                   "with --quantize int8; f32 adapters and their AdamW moments)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scaling alpha / rank (default alpha = rank)")
    p.add_argument("--lora-targets", help=f"comma-separated, of {','.join(LORA_TARGETS)} (default all)")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = p.parse_args(argv)
    report = plan(args.topology, args.mesh, args.batch, args.seq, args.mode, args.config,
                  auto_layout=not args.no_auto_layout, remat=args.remat, page_size=args.page_size,
                  margin=args.margin, verify=not args.no_verify, quantize=args.quantize,
                  kv_cache_dtype=args.kv_cache_dtype, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                  lora_targets=args.lora_targets and [t.strip() for t in args.lora_targets.split(",")])
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0 if report["fits"] else 1  # "does not fit" is the plan's answer, not bad input


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dots_jax.plan ...`; returns the exit code (1: does not fit; 2: bad input, one `error:` line)."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
