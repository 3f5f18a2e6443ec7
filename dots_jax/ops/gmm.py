"""Grouped matrix multiplication ("gmm") for the MoE layer: the backend registry and its backends.

    gmm(lhs [m, k], rhs [g, k, n], group_sizes int32 [g]) -> [m, n]

The rows of `lhs` are sorted by group: rows [0, gs[0]) use rhs[0], the next gs[1] rows use rhs[1], and so
on. Rows at or past sum(group_sizes) belong to no group and produce zeros (their lhs gradient is zero too).
The caller promises sum(group_sizes) <= m; nothing checks it because group_sizes is usually a traced value.
If the promise is broken, rows past m simply do not exist and the last groups are cut short.

Backends (all take the same arguments and agree to float rounding):
  "ragged_dot"  jax.lax.ragged_dot. Native on GPU/TPU; XLA:CPU lowers it to a masked dense product in which
                every row meets every group (g times the work), so it is slow on CPU.
  "dense"       the obviously-correct reference (pallas_kernels.reference.gmm): every row times every group,
                then a one-hot select. Slow and memory hungry ([g, m, n] intermediate); for tests and small problems.
  "loop"        the fast one on CPU (cpu_loops.gmm_loop): pads each group to a multiple of a row tile, then loops
                over the tiles that hold real rows, one small [T, k] @ [k, n] matmul each, with a hand-written
                backward.
  "gather"      one weight matrix gathered per row: reads only the chosen groups; best for decode (2m <= g).
  "pallas"      our Pallas kernels (pallas_kernels/gmm.py): Mosaic on TPU, Triton-lowered on GPU; on CPU the
                TPU kernel runs in the Pallas interpreter (slow: for tests, never picked by "auto" on CPU).
  "mosaic_gpu"  our Mosaic GPU kernels (pallas_kernels/gmm_mgpu.py: wgmma and TMA, NVIDIA Hopper and later), the
                successor of the deprecated Triton lowering; elsewhere in the Pallas GPU interpreter (tests). Not yet
                picked by "auto": it has not run on a GPU (see default_backend).
"auto" picks default_backend(m, g): "pallas" on TPU and GPU; on CPU "gather" when 2m <= g, else "loop".

expert_ffn() is the SwiGLU expert FFN (gate, up, SiLU, down) on rows sorted by expert, for any backend: the fused
loop (cpu_loops.expert_ffn_loop) when the backend resolves to "loop", else three gmm calls.

register_backend() adds a backend (for example a Pallas kernel) without touching any caller.
All backends accumulate in f32 and cast once to the output dtype.

int8 rhs (weight-only quantisation, ops.quant): gmm(..., rhs_scale=) with rhs int8 [g, k, n] and rhs_scale f32
[g, n], one scale per group and output column. "dense" dequantises the whole rhs up front (the reference); every
other backend reads the int8 rhs, converts it where it multiplies (per tile on CPU, in VMEM or in registers in the
Pallas kernels) and scales the f32 output per row by its group's scale, rounding once. With an int8 rhs "gather"
runs one unrolled product per row (up to ROW_PRODUCTS rows; "loop" beyond), and expert_ffn runs "gather" for
"loop" too at decode sizes (m <= g): see gmm_gather. The int8 rhs has no gradient and its scale is a constant
(stop_gradient: a zero cotangent); lhs gradients are exact.

LoRA on the experts (expert_ffn(..., lora=ExpertLora(...))): each of the three products gets its low-rank update
gmm(gmm(x, A), B) per group, on the same backend as the base product (so every backend, Pallas included, runs them and
an expert-parallel shard holds its experts' adapters); gate and up share one A, as PEFT's adapter of transformers'
fused gate_up_proj does. The base may be float or int8 (then only the adapters and the rows get gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dots_jax.ops.common import check_shapes, round_to, row_groups, silu
from dots_jax.ops.cpu_loops import LoopLora, expert_ffn_loop, gmm_loop
from dots_jax.ops.quant import dequantize, scale_rows
from pallas_kernels import reference

__all__ = ["BACKENDS", "Dropout", "ExpertLora", "default_backend", "expert_ffn", "gmm", "gmm_dense", "gmm_gather",
           "gmm_mosaic_gpu", "gmm_pallas", "gmm_ragged_dot", "register_backend"]

# A backend is fn(lhs, rhs, group_sizes, preferred_element_type) -> [m, n] array of dtype
# preferred_element_type. gmm() always passes a concrete dtype there (never None), and it has already
# checked shapes, cast lhs and rhs to one dtype and cast group_sizes to int32. A backend that takes an int8 rhs
# also accepts rhs_scale= (f32 [g, n]); gmm() passes it only then, with lhs a float array and rhs int8.
Backend = Callable[..., jax.Array]


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, backend: str = "auto",
        preferred_element_type: jnp.dtype | None = None, rhs_scale: jax.Array | None = None) -> jax.Array:
    """Grouped matmul: lhs [m, k], rhs [g, k, n], group_sizes int [g] -> [m, n].

    Rows of lhs are sorted by group: rows [0, gs[0]) use rhs[0], the next gs[1] rows use rhs[1], and so on.
    Rows at or past sum(group_sizes) produce zeros. Assumes sum(group_sizes) <= m (not checked: group_sizes
    is usually traced). Works under jax.jit (shapes static, group_sizes traced) and is differentiable with
    respect to lhs and rhs. The output dtype is preferred_element_type if given, else lhs.dtype; products
    are accumulated in f32 and cast once.

    rhs_scale f32 [g, n]: rhs is int8, and the product is lhs @ dequantize(rhs, rhs_scale) (see the module
    docstring); then rhs has no gradient and rhs_scale a zero one.
    """
    if backend == "auto":
        backend = default_backend(lhs.shape[0], rhs.shape[0])
    if backend not in BACKENDS:
        raise ValueError(f"unknown gmm backend {backend!r}; known backends: {sorted(BACKENDS)} (or 'auto')")
    lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
    check_shapes(lhs, rhs, group_sizes)
    out_dtype = jnp.dtype(preferred_element_type if preferred_element_type is not None else lhs.dtype)
    if rhs_scale is None:
        if jnp.issubdtype(rhs.dtype, jnp.integer):
            raise ValueError(f"gmm: an integer rhs ({rhs.dtype}) needs its rhs_scale")
        # One compute dtype for both operands, so that no backend meets a mixed-dtype dot; promotion never loses
        # precision (bf16 with f32 computes in f32).
        compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
        lhs, rhs = lhs.astype(compute_dtype), rhs.astype(compute_dtype)
    else:
        rhs_scale = _check_scale(rhs, jnp.asarray(rhs_scale))
        if not jnp.issubdtype(lhs.dtype, jnp.floating):
            lhs = lhs.astype(jnp.float32)
    group_sizes = group_sizes.astype(jnp.int32)
    m, n = lhs.shape[0], rhs.shape[2]
    if m == 0 or rhs.shape[0] == 0:
        # No rows, or no groups (then every row is past the end): the answer is all zeros.
        return jnp.zeros((m, n), out_dtype)
    if rhs_scale is None:
        return BACKENDS[backend](lhs, rhs, group_sizes, out_dtype)
    return BACKENDS[backend](lhs, rhs, group_sizes, out_dtype, rhs_scale=rhs_scale)


def _check_scale(rhs: jax.Array, rhs_scale: jax.Array) -> jax.Array:
    """rhs_scale as the backends take it (f32, a constant), after checking that it fits an int8 rhs."""
    if rhs.dtype != jnp.int8:
        raise ValueError(f"gmm: rhs_scale goes with an int8 rhs, got {rhs.dtype}")
    expected = (rhs.shape[0], rhs.shape[2])
    if tuple(rhs_scale.shape) != expected:
        raise ValueError(f"gmm: rhs_scale {tuple(rhs_scale.shape)} does not fit rhs {tuple(rhs.shape)}: expected "
                         f"{expected}, one scale per group and output column")
    return jax.lax.stop_gradient(rhs_scale.astype(jnp.float32))


def register_backend(name: str, fn: Backend) -> None:
    """Add (or replace) a gmm backend: fn(lhs, rhs, group_sizes, preferred_element_type) -> [m, n].

    See the `Backend` comment above for what fn may assume about its arguments.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"backend name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(fn):
        raise TypeError(f"backend {name!r} must be callable, got {type(fn).__name__}")
    BACKENDS[name] = fn


def default_backend(m: int | None = None, g: int | None = None) -> str:
    """'pallas' on TPU and GPU (on an H100 our Triton kernel ran 3.5x to 7x faster than XLA's ragged_dot at dots1
    shapes, and ragged_dot's gradient ran out of memory on a 1.3B model; benchmarks/gmm.py). On CPU, where ragged_dot is
    a g-times-too-much masked product and Pallas only interprets: 'gather' for decode-sized problems (2m <= g
    rows: it reads only the chosen experts' weights; measured, it loses to 'loop' from about m = g on, see
    benchmarks/gmm_cpu.py), else 'loop'. 'mosaic_gpu', the Triton kernel's successor on GPU, becomes the GPU default
    once benchmarks/gmm.py has measured it on a GPU: it has only run in the interpreter and been lowered for one."""
    if jax.default_backend() != "cpu":
        return "pallas"
    return "gather" if m is not None and g is not None and 2 * m <= g else "loop"


class ExpertLora(NamedTuple):
    """The routed experts' LoRA adapters, per group (expert): gate_up_a [g, H, r] (one A for gate and up),
    gate_b and up_b [g, r, I], down_a [g, I, r], down_b [g, r, H]. The B factors come multiplied by LoRA's scaling
    (alpha / r) already."""

    gate_up_a: jax.Array
    gate_b: jax.Array
    up_b: jax.Array
    down_a: jax.Array
    down_b: jax.Array


class Dropout(NamedTuple):
    """Dropout on the adapters' inputs (training): a PRNG key and the rate, an f32 scalar (it may be traced)."""

    key: jax.Array
    rate: jax.Array


# The Pallas kernels take the adapters' rank as a contraction or output width: the GPU (Triton) kernel's blocks are
# powers of two of at least 16 dividing it, so the rank is zero-padded to a multiple of this (the TPU kernel takes
# any width as one whole block).
PALLAS_RANK_MULTIPLE = 16


def expert_ffn(rows: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, group_sizes: jax.Array, *,
               backend: str = "auto", scales: tuple[jax.Array, jax.Array, jax.Array] | None = None,
               lora: ExpertLora | None = None, dropout: Dropout | None = None) -> jax.Array:
    """SwiGLU experts on rows sorted by expert: out = (silu(rows @ gate[g]) * (rows @ up[g])) @ down[g] per group.

    rows [m, H]; gate/up [g, H, I]; down [g, I, H] (cast to rows.dtype); group_sizes int [g], sum <= m (rows past
    the sum give zeros). Returns [m, H] in rows.dtype. "auto" resolves as gmm does.
    scales = (gate_scale [g, I], up_scale [g, I], down_scale [g, H]): the three weights are int8 (gmm's rhs_scale,
    per product), with no gradient; the scales are constants (a zero cotangent).
    lora: LoRA adapters (cast to rows.dtype): rows @ gate[g] gets + (dropout(rows) @ gate_up_a[g]) @ gate_b[g], up
    the same with up_b, and h @ down[g] gets + (dropout(h) @ down_a[g]) @ down_b[g] (h the SwiGLU activation);
    dropout (a key and a rate) only when given.
    """
    dtype = rows.dtype
    if backend == "auto":
        backend = default_backend(rows.shape[0], gate.shape[0])
    if scales is not None:
        scales = tuple(jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32)) for scale in scales)
        weights = (gate, up, down)
    else:
        scales = (None, None, None)
        weights = tuple(w.astype(dtype) for w in (gate, up, down))
    if scales[0] is not None and backend in ("gather", "loop") and rows.shape[0] <= min(gate.shape[0], ROW_PRODUCTS):
        backend = "gather"  # int8 at decode sizes: one product per row, no loop (see gmm_gather)
    if lora is not None:
        return _expert_ffn_lora(rows, weights, scales, group_sizes, backend, lora, dropout)
    if backend == "loop":
        # The same computation fused into one loop over row tiles forward and one backward, instead of three
        # of each: on CPU, where "loop" runs, per-tile overhead dominates the small expert matmuls.
        return expert_ffn_loop(rows, *weights, group_sizes, scales=None if scales[0] is None else scales)
    h_gate = gmm(rows, weights[0], group_sizes, backend=backend, rhs_scale=scales[0])
    h_up = gmm(rows, weights[1], group_sizes, backend=backend, rhs_scale=scales[1])
    # Rounded as torch rounds its bf16 product: "gather" fuses the product into its einsum, where XLA would
    # otherwise keep it in f32 (see round_to).
    h = round_to(silu(h_gate).astype(jnp.float32) * h_up.astype(jnp.float32), dtype)
    return gmm(h, weights[2], group_sizes, backend=backend, rhs_scale=scales[2])


def _keep_mask(dropout: Dropout, which: int, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """Inverted dropout's multiplier: 1 / (1 - rate) where kept, else 0, drawn with the `which`-th key folded from
    dropout.key (0: the gate/up adapters' input, the rows; 1: the down adapter's, the SwiGLU activation)."""
    keep = jax.random.bernoulli(jax.random.fold_in(dropout.key, which), 1.0 - dropout.rate, shape)
    return jnp.where(keep, 1.0 / (1.0 - dropout.rate), 0.0).astype(dtype)


def _dropped(x: jax.Array, dropout: Dropout | None, which: int) -> jax.Array:
    """x with dropout (_keep_mask), or x itself without dropout."""
    return x if dropout is None else x * _keep_mask(dropout, which, x.shape, x.dtype)


def _pad_rank(lora: ExpertLora, multiple: int) -> ExpertLora:
    """The adapters with their rank zero-padded to a multiple of `multiple`: zero columns of A meet zero rows of B,
    so the products are unchanged, and the padding's gradients are cut off by the pad's own."""
    rank = lora.gate_up_a.shape[-1]
    extra = -rank % multiple
    if extra == 0:
        return lora

    def pad(x: jax.Array, axis: int) -> jax.Array:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return jnp.pad(x, widths)

    return ExpertLora(pad(lora.gate_up_a, 2), pad(lora.gate_b, 1), pad(lora.up_b, 1), pad(lora.down_a, 2),
                      pad(lora.down_b, 1))


def _expert_ffn_lora(rows: jax.Array, weights: tuple[jax.Array, ...], scales: tuple[jax.Array | None, ...],
                     group_sizes: jax.Array, backend: str, lora: ExpertLora, dropout: Dropout | None) -> jax.Array:
    """expert_ffn with adapters: each base product plus its low-rank update, every product a gmm on `backend`; on
    "loop", all of them inside the fused loop (cpu_loops.LoopLora)."""
    dtype = rows.dtype
    lora = ExpertLora(*(w.astype(dtype) for w in lora))
    if backend == "loop":
        x_in = None if dropout is None else _dropped(rows, dropout, 0)
        mask = None if dropout is None else _keep_mask(dropout, 1, (rows.shape[0], lora.down_a.shape[1]), dtype)
        return expert_ffn_loop(rows, *weights, group_sizes, scales=None if scales[0] is None else scales,
                               lora=LoopLora(*lora, x_in=x_in, h_mask=mask))
    if backend == "pallas":
        lora = _pad_rank(lora, PALLAS_RANK_MULTIPLE)

    def product(x: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        return gmm(x, w, group_sizes, backend=backend, rhs_scale=scale)

    x_low = product(_dropped(rows, dropout, 0), lora.gate_up_a)  # [m, r], shared by gate and up
    h_gate = product(rows, weights[0], scales[0]) + product(x_low, lora.gate_b)
    h_up = product(rows, weights[1], scales[1]) + product(x_low, lora.up_b)
    h = round_to(silu(h_gate).astype(jnp.float32) * h_up.astype(jnp.float32), dtype)
    h_low = product(_dropped(h, dropout, 1), lora.down_a)
    return product(h, weights[2], scales[2]) + product(h_low, lora.down_b)


# ---------------------------------------------------------------------------------------------------------
# "ragged_dot"


def gmm_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                   preferred_element_type: jnp.dtype, *, rhs_scale: jax.Array | None = None) -> jax.Array:
    """jax.lax.ragged_dot, accumulating in f32, with rows past sum(group_sizes) masked to zero. An int8 rhs is
    converted to lhs's dtype for it (exactly) and the output scaled per row."""
    if rhs_scale is not None:
        out = jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes, preferred_element_type=jnp.float32)
        return round_to(scale_rows(out, rhs_scale, group_sizes), preferred_element_type)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    # XLA:CPU's lowering already zeroes rows past the last group (checked in the tests), but native GPU/TPU
    # kernels may leave them unwritten, and the select is cheap next to the matmul.
    _, valid = row_groups(group_sizes, lhs.shape[0])
    return round_to(jnp.where(valid[:, None], out, 0.0), preferred_element_type)


# ---------------------------------------------------------------------------------------------------------
# "dense"


def gmm_dense(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
              preferred_element_type: jnp.dtype, *, rhs_scale: jax.Array | None = None) -> jax.Array:
    """The reference, pallas_kernels.reference.gmm (every row times every group, then a one-hot select), summed
    in f32 and rounded once to the output dtype by round_to, as every backend rounds. An int8 rhs is dequantised
    up front, to f32 (with lhs in f32): the oracle the other backends' int8 paths are tested against."""
    if rhs_scale is not None:
        lhs, rhs = lhs.astype(jnp.float32), dequantize(rhs, rhs_scale, (1,), jnp.float32)
    out = reference.gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return round_to(out, preferred_element_type)


# ---------------------------------------------------------------------------------------------------------
# "gather"

ROW_PRODUCTS = 64  # with an int8 rhs, "gather" unrolls one product per row up to this many rows, else runs "loop"


def gmm_gather(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
               preferred_element_type: jnp.dtype, *, rhs_scale: jax.Array | None = None) -> jax.Array:
    """out[i] = lhs[i] @ rhs[group of row i]: gathers one weight matrix per row, so it reads only the experts
    some row chose. For decode-sized m (a few rows per step, m <= g) that is the least memory traffic of all
    backends, and it is one batched matmul with no loop; for large m it copies m matrices: use "loop"."""
    group, valid = row_groups(group_sizes, lhs.shape[0])
    if rhs_scale is not None:
        if lhs.shape[0] > ROW_PRODUCTS:
            return gmm_loop(lhs, rhs, group_sizes, preferred_element_type, rhs_scale=rhs_scale)
        # An int8 rhs, gathered and converted, would be written out as m f32 matrices and read again (XLA:CPU does
        # not fuse a convert into a dot); a loop over the rows (the "loop" backend at one row per tile) would take
        # rhs as a loop operand, and inside the model's scan over layers that copies the layer's whole [g, k, n]
        # slice every step. One product per row, unrolled, converts each chosen matrix into a small buffer straight
        # from wherever rhs lives (benchmarks/quant_cpu.py).
        x = lhs.astype(jnp.float32)
        out = jnp.concatenate([
            jnp.dot(x[i:i + 1], jax.lax.dynamic_index_in_dim(rhs, group[i], axis=0, keepdims=False).astype(jnp.float32),
                    preferred_element_type=jnp.float32)
            * jax.lax.dynamic_index_in_dim(rhs_scale, group[i], axis=0, keepdims=True)
            for i in range(lhs.shape[0])])
        return round_to(jnp.where(valid[:, None], out, 0.0), preferred_element_type)
    # The weights are gathered in f32: the gather's gradient scatter-adds one [k, n] product per row into rhs's
    # gradient, and in bf16 each addition rounds (a bf16 d_rhs entry measured 4x off its float64 value); in f32 it
    # is rounded once. XLA converts only the gathered rows, and a product of bf16 values is exact in f32.
    out = jnp.einsum("mk,mkn->mn", lhs, rhs.astype(jnp.float32)[group], preferred_element_type=jnp.float32)
    return round_to(jnp.where(valid[:, None], out, 0.0), preferred_element_type)


# ---------------------------------------------------------------------------------------------------------
# "pallas"


def gmm_pallas(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
               preferred_element_type: jnp.dtype, *, rhs_scale: jax.Array | None = None) -> jax.Array:
    """pallas_kernels.gmm: the Mosaic kernel on TPU, the Triton one on GPU, the interpreted Mosaic kernel on
    CPU. Tiles come from its per-shape table; rows past sum(group_sizes) are written as zeros by the kernel.
    An int8 rhs is converted inside the kernels (in VMEM per tile on TPU, in registers on GPU)."""
    # Chosen when lowering, not from jax.default_backend(): a CPU host compiling ahead of time for a TPU
    # (jax.jit(...).lower(...) on TPU devices) must get the Mosaic kernel, not the interpreter.
    return _pallas_kernel(lhs, rhs, group_sizes, rhs_scale, preferred_element_type,
                          tpu=("tpu", False), cuda=("gpu", False), rocm=("gpu", False), default=("tpu", True))


def gmm_mosaic_gpu(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                   preferred_element_type: jnp.dtype, *, rhs_scale: jax.Array | None = None) -> jax.Array:
    """pallas_kernels.gmm_mgpu: the Mosaic GPU kernels (wgmma, Hopper and later) on an NVIDIA GPU, the same
    kernels in the Pallas GPU interpreter elsewhere (slow: for tests). An int8 rhs is converted in shared memory."""
    return _pallas_kernel(lhs, rhs, group_sizes, rhs_scale, preferred_element_type,
                          cuda=("mosaic_gpu", False), default=("mosaic_gpu", True))


def _pallas_kernel(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, rhs_scale: jax.Array | None,
                   preferred_element_type: jnp.dtype, **platforms: tuple[str, bool]) -> jax.Array:
    """pallas_kernels.gmm.gmm with, per lowering platform (jax.lax.platform_dependent's keywords), its kernel family
    and whether it is interpreted."""
    # Imported here: Pallas (and on GPU its lowerings) is only loaded by those who use these backends.
    from pallas_kernels import gmm as pallas_gmm

    def kernel(platform: str, interpret: bool) -> Callable[..., jax.Array]:
        def run(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, rhs_scale: jax.Array | None) -> jax.Array:
            return pallas_gmm.gmm(lhs, rhs, group_sizes, rhs_scale=rhs_scale,
                                  preferred_element_type=preferred_element_type, platform=platform,
                                  interpret=interpret)
        return run

    branches = {name: kernel(*choice) for name, choice in platforms.items()}
    return jax.lax.platform_dependent(lhs, rhs, group_sizes, rhs_scale, **branches)


BACKENDS: dict[str, Backend] = {
    "ragged_dot": gmm_ragged_dot,
    "dense": gmm_dense,
    "loop": gmm_loop,
    "gather": gmm_gather,
    "pallas": gmm_pallas,
    "mosaic_gpu": gmm_mosaic_gpu,
}
