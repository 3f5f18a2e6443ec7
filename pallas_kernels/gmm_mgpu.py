"""Grouped matmul on Mosaic GPU (Hopper: wgmma tensor-core products fed by the TMA copy engine): gmm and tgmm with
the arguments of gmm_tpu / tgmm_tpu in gmm.py, run behind gmm.gmm's custom VJP with platform="mosaic_gpu".

Pallas' Triton lowering (gmm_gpu.py) is deprecated from JAX 0.11; this is its successor. Both kernels are persistent:
one program per SM loops over work items (plgpu.nd_loop), and each item streams its operands through shared memory
in a multi-buffered pipeline (plgpu.emit_pipeline) into an f32 wgmma accumulator.

  gmm:  a work item is one (visit, column tile). Visits are the (local group, row tile) pairs of visits.make_visits,
        computed once in plain JAX with the rows [lo, hi) each must store: a tile straddling a group boundary is
        visited once per group. An item multiplies its row tile by its group's weights over all of k and stores only
        rows [lo, hi), with a ladder of power-of-two TMA stores (a TMA box has a static shape). Rows of no group of
        ours are never stored by the kernel: the wrapper selects zeros for them. With 256-wide column tiles
        (tiling (tm, 64, 256)) the warp-specialized variant runs: two compute warpgroups share each lhs tile, each
        accumulating 128 of the columns, while a third only issues the TMA copies.
  tgmm: a work item is one (local group, k tile, n tile) of d_rhs: it runs its group's row blocks as the contraction,
        zeroing, in shared memory, the rows of a block that belong to neighbouring groups (first and last block only),
        and stores its whole tile (zeros for an empty group).

Operands: bf16 or f16 go to the tensor cores as they are. f32 operands are split into three bf16 parts each and
multiplied in six passes accumulated in f32 (wgmma would otherwise take f32 as TF32, a 1e-3 relative error; two
parts leave about 2^-17, which the f32 parity tests see): f32 is for exactness checks, bf16 for speed. An int8 rhs
is streamed as int8 (half of bf16's bytes), converted to the lhs's dtype in registers and written back to shared
memory before each product (exact: |q| <= 127); gmm.gmm applies the per-column scales to the f32 output.

Shapes: k and n are zero-padded to multiples of the tiles (zero rows and columns change no product) and the rows to
a multiple of tm; at dots1's shapes (4096, 1408 = 11 x 128) nothing is padded. The GPU interpreter of Pallas runs
the same kernels on a CPU (tests/test_mosaic_gpu.py), and jax.jit(...).lower(lowering_platforms=("cuda",)) lowers
them there for a Hopper GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.visits import local_bounds, make_visits

__all__ = ["choose_tiling", "gmm_mgpu", "tgmm_mgpu"]

Tiling = tuple[int, int, int]  # (tm, tk, tn): row tile, contraction step, column tile (tgmm: its tk x tn output tile)

# H100 SXM and H200 both have 132 SMs; used when lowering on a machine without the GPU (ahead of time).
HOPPER_SMS = 132
# Work-stealing threads the interpreter simulates: each SM is a thread there, and a few cover every work item.
INTERPRET_SMS = 2
# Operand buffers in flight per pipeline (TMA loads run this many steps ahead of the tensor cores).
PIPELINE_STEPS = 4
# The widest column tile one warpgroup accumulates (128 f32 registers a thread); a tiling with twice this many
# columns runs _gmm_ws_body: two compute warpgroups and one that issues the copies.
WG_COLUMNS = 128
# The warp-specialized kernel's pipeline depth and output chunk, within the 227 KiB of shared memory an H100 / H200
# block may use: three stages of a 128 x 64 lhs tile and a 64 x 256 rhs tile in bf16 (144 KiB), the converted int8
# tiles (32 KiB) and two 64-row output chunks in f32 (64 KiB).
WS_PIPELINE_STEPS = 3
STORE_ROWS = 64
# Groups averaging fewer rows than this run 64-row tiles (the smallest wgmma): at decode a 128-row tile is mostly
# padding, and the cost is reading the weights.
_DECODE_ROWS_PER_GROUP = 128


def choose_tiling(m: int, k: int, n: int, num_groups: int = 1) -> Tiling:
    """(tm, tk, tn) for gmm: 64-wide k steps (a 128-byte bf16 row, the widest TMA swizzle) and 128 x 128 output tiles
    (an f32 accumulator of 128 registers per thread of the warpgroup); decode-sized groups get 64-row tiles, the
    smallest wgmma row block, which wastes less on rows that are not there. (64-wide column tiles would spread a
    decode step's weights over more SMs, but an int8 tile of 64 bytes a row finds no shared-memory layout for its
    conversion: the lowering refuses it.)"""
    del k, n
    tm = 64 if m < _DECODE_ROWS_PER_GROUP * max(num_groups, 1) else 128
    return tm, 64, 128


def _check_tiling(tiling: Tiling) -> None:
    tm, tk, tn = tiling
    if tm not in (64, 128):
        raise ValueError(f"Mosaic GPU row tile tm={tm} must be 64 or 128 (wgmma's row blocks; one warpgroup's "
                         "accumulator holds at most 128 x 128)")
    if tk <= 0 or tk % 16 or tn <= 0 or tn % 8:
        raise ValueError(f"Mosaic GPU tiles tk={tk}, tn={tn}: tk must be a multiple of 16, tn of 8 (wgmma shapes)")


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _interpret_params(interpret: Any) -> Any:
    """gmm.gmm's interpret flag as the GPU interpreter takes it: None (compile for the GPU) or its parameters."""
    if not interpret:
        return None
    # Not exported by jax.experimental.pallas.mosaic_gpu in jax 0.10: the class that plgpu.kernel(interpret=) takes.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return interpret if isinstance(interpret, InterpretGPUParams) else InterpretGPUParams()


def _num_sms(interpret: Any) -> int:
    if interpret:
        return INTERPRET_SMS
    devices = jax.devices()
    return devices[0].core_count if devices[0].platform == "gpu" else HOPPER_SMS


def _split_f32(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x as three bf16 parts, x = x0 + x1 + x2 to within 2^-24 |x| (each part holds the next 8 bits)."""
    parts = []
    rest = x.astype(jnp.float32)
    for _ in range(3):
        part = rest.astype(jnp.bfloat16)
        parts.append(part)
        rest = rest - part.astype(jnp.float32)
    return tuple(parts)


def _passes(lhs: jax.Array, rhs: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """The (lhs, rhs) products whose sum is lhs @ rhs: one for 16-bit operands; for f32, the six bf16 products of
    three-part splits whose orders add up to at most 2 (what is left is below f32's rounding), or three for an int8
    rhs, which bf16 holds exactly."""
    if lhs.dtype != jnp.float32:
        return [(lhs, rhs)]
    x = _split_f32(lhs)
    if rhs.dtype == jnp.int8:
        return [(part, rhs) for part in x]
    w = _split_f32(rhs)
    return [(x[i], w[j]) for i in range(3) for j in range(3) if i + j <= 2]


def _sum_passes(results: list[jax.Array], out_dtype: Any) -> jax.Array:
    total = results[0]
    for part in results[1:]:
        total = total + part
    return total.astype(out_dtype)


def _compiler_params() -> Any:
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


# ------------------------------------------------------------------------------------------------ gmm


def _transposed(ref, scratch, interpret: bool):
    """ref [a, b] as the [b, a] operand of a wgmma. Natively a transposed view (the tensor cores read either
    order); the GPU interpreter has no rule for that view, so there the tile is transposed into `scratch`."""
    if not interpret:
        return plgpu.transpose_ref(ref, (1, 0))
    scratch[...] = ref[...].T
    return scratch


def _accumulate(multiply, acc_shape: tuple[int, int], scratch: list[Any]) -> jax.Array:
    """multiply(acc_ref, *scratch_refs) with an f32 wgmma accumulator and the shared-memory scratch buffers (scoped
    apart: register and shared-memory allocations cannot share one scope)."""
    if not scratch:
        return pl.run_scoped(multiply, plgpu.ACC(acc_shape))
    return pl.run_scoped(lambda *buffers: pl.run_scoped(lambda acc_ref: multiply(acc_ref, *buffers),
                                                        plgpu.ACC(acc_shape)), *scratch)


def _for_each_visit(lo_ref, hi_ref, group_ref, tile_ref, num_visits: int, grid_n: int, visit_fn) -> None:
    """visit_fn(tile, group, col, lo, hi) for every (visit, column tile) work item with rows to store, the items
    spread over the SMs. Visit-major order: the items of one visit (its column tiles) run side by side and share the
    lhs tile in L2."""
    @plgpu.nd_loop((num_visits * grid_n,), collective_axes="sm")
    def _work(loop_info: plgpu.NDLoopInfo) -> None:
        item = loop_info.index[0]
        visit, col = jax.lax.div(item, grid_n), jax.lax.rem(item, grid_n)
        lo, hi = lo_ref[visit], hi_ref[visit]

        @pl.when(hi > lo)
        def _visit() -> None:
            visit_fn(tile_ref[visit], group_ref[visit], col, lo, hi)


def _gmm_body(lo_ref, hi_ref, group_ref, tile_ref, lhs_gmem, rhs_gmem, out_gmem, *, tm: int, tk: int, tn: int,
              num_visits: int, transpose_rhs: bool, interpret: bool) -> None:
    k = lhs_gmem.shape[1]
    grid_n = out_gmem.shape[1] // tn
    dtype = lhs_gmem.dtype
    convert = rhs_gmem.dtype != dtype  # an int8 rhs
    rhs_block = (tn, tk) if transpose_rhs else (tk, tn)
    # Shared-memory scratch a step may need: the int8 tile converted, and (interpreter only) a transposed copy.
    scratch = []
    if convert:
        scratch.append(plgpu.SMEM(rhs_block, dtype))
    if transpose_rhs and interpret:
        scratch.append(plgpu.SMEM((tk, tn), dtype))

    def visit(tile: jax.Array, group: jax.Array, col: jax.Array, lo: jax.Array, hi: jax.Array) -> None:
        def multiply(acc_ref, *buffers) -> jax.Array:
            buffers = list(buffers)

            def step(_, x_smem, w_smem) -> None:
                if convert:
                    converted = buffers[0]
                    # The previous product may still read the buffer: wait before overwriting it.
                    plgpu.wgmma_wait(0)
                    converted[...] = w_smem[...].astype(dtype)
                    plgpu.commit_smem()
                    w_smem = converted
                if transpose_rhs:
                    w_smem = _transposed(w_smem, buffers[-1] if interpret else None, interpret)
                plgpu.wgmma(acc_ref, x_smem, w_smem)

            plgpu.emit_pipeline(
                step,
                grid=(k // tk,),
                in_specs=[
                    plgpu.BlockSpec((tm, tk), lambda kk: (tile, kk), delay_release=1),
                    plgpu.BlockSpec(rhs_block, (lambda kk: (col, kk)) if transpose_rhs else (lambda kk: (kk, col)),
                                    delay_release=1),
                ],
                max_concurrent_steps=PIPELINE_STEPS,
            )(lhs_gmem, rhs_gmem.at[group])
            return acc_ref[...]

        acc = _accumulate(multiply, (tm, tn), scratch)

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((tm, tn), out_gmem.dtype))
        def _store(o_smem) -> None:
            o_smem[...] = acc.astype(o_smem.dtype)
            plgpu.commit_smem()
            _store_rows(o_smem, out_gmem, lo, hi, tile * tm, pl.ds(col * tn, tn))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    _for_each_visit(lo_ref, hi_ref, group_ref, tile_ref, num_visits, grid_n, visit)


def _gmm_ws_body(lo_ref, hi_ref, group_ref, tile_ref, lhs_gmem, rhs_gmem, out_gmem, *, tm: int, tk: int, tn: int,
                 num_visits: int, transpose_rhs: bool, interpret: bool) -> None:
    """_gmm_body with a column tile of tn = 2 x WG_COLUMNS split between two compute warpgroups, which share each lhs
    tile (half the lhs traffic of two 128-wide items), while a third warpgroup only issues the TMA copies ahead of
    them (warp specialization)."""
    k = lhs_gmem.shape[1]
    grid_n = out_gmem.shape[1] // tn
    dtype = lhs_gmem.dtype
    convert = rhs_gmem.dtype != dtype
    half = tn // 2
    rhs_block = (tn, tk) if transpose_rhs else (tk, tn)
    half_block = (half, tk) if transpose_rhs else (tk, half)

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k // tk,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), memory_space=plgpu.SMEM),
                plgpu.BlockSpec(rhs_block, (lambda kk: (0, kk)) if transpose_rhs else (lambda kk: (kk, 0)),
                                memory_space=plgpu.SMEM),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=WS_PIPELINE_STEPS,
            compute_context=context,
        )

    chunk = min(tm, STORE_ROWS)
    scratch = {"out_smem": plgpu.SMEM((2, chunk, half), out_gmem.dtype)}
    if convert:
        scratch["converted"] = plgpu.SMEM((2, *half_block), dtype)
    if transpose_rhs and interpret:
        scratch["transposed"] = plgpu.SMEM((2, tk, half), dtype)
    # Allocation shapes depend only on the block specs, not on the bodies.
    allocations = pipeline(lambda *_: None, lambda *_: None).get_allocations(lhs_gmem, rhs_gmem.at[0])

    @functools.partial(pl.run_scoped, allocations=allocations, **scratch, collective_axes="wg")
    def _scope(allocations, out_smem, converted=None, transposed=None) -> None:
        wg = jax.lax.axis_index("wg")

        def visit(tile: jax.Array, group: jax.Array, col: jax.Array, lo: jax.Array, hi: jax.Array) -> None:
            def context(run_pipeline) -> None:
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, half)))
                def _epilogue(acc_ref) -> None:
                    run_pipeline(acc_ref)
                    acc = acc_ref[...]
                    # In chunks of STORE_ROWS rows: an output buffer of the whole tile does not fit beside the
                    # pipeline's.
                    for part in range(tm // chunk):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last stores have read the buffer
                        out_smem[wg] = acc[part * chunk:(part + 1) * chunk].astype(out_smem.dtype)
                        plgpu.commit_smem()
                        _store_rows(out_smem.at[wg], out_gmem, lo, hi, tile * tm + part * chunk,
                                    pl.ds(col * tn + wg * half, half))

            def step(_, x_smem, w_smem, acc_ref):
                mine = pl.ds(wg * half, half)  # this warpgroup's columns of the rhs tile
                w_smem = w_smem.at[mine] if transpose_rhs else w_smem.at[:, mine]
                if convert:
                    converted.at[wg][...] = w_smem[...].astype(dtype)
                    plgpu.commit_smem()
                    w_smem = converted.at[wg]
                if transpose_rhs:
                    w_smem = _transposed(w_smem, transposed.at[wg] if interpret else None, interpret)
                plgpu.wgmma(acc_ref, x_smem, w_smem)
                plgpu.wgmma_wait(0)  # the stage is released to the memory warpgroup when the step returns
                return acc_ref

            rhs = rhs_gmem.at[group]
            rhs = rhs.at[pl.ds(col * tn, tn), :] if transpose_rhs else rhs.at[:, pl.ds(col * tn, tn)]
            pipeline(step, context)(lhs_gmem.at[pl.ds(tile * tm, tm), :], rhs, allocations=allocations)

        _for_each_visit(lo_ref, hi_ref, group_ref, tile_ref, num_visits, grid_n, visit)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _store_rows(o_smem, out_gmem, lo: jax.Array, hi: jax.Array, row0: jax.Array, cols) -> None:
    """The rows of [lo, hi) among the o_smem.shape[0] rows that start at out_gmem row row0, stored to out_gmem's
    columns `cols` as a sum of power-of-two boxes: a TMA store has a static shape, the row count is only known at run
    time."""
    rows = o_smem.shape[0]
    first = jnp.clip(lo, row0, row0 + rows)
    count = jnp.clip(hi, row0, row0 + rows) - first
    offset = first - row0
    size = rows
    while size >= 1:
        @pl.when((count & size) != 0)
        def _copy(offset=offset, size=size) -> None:
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(offset, size)], out_gmem.at[pl.ds(row0 + offset, size), cols])

        offset = offset + (count & size)
        size //= 2


def _gmm_call(lhs: jax.Array, rhs: jax.Array, visits: tuple[jax.Array, ...], *, tiling: Tiling, out_dtype: Any,
              transpose_rhs: bool, interpret: Any) -> jax.Array:
    tm, tk, tn = tiling
    m_pad = lhs.shape[0]
    n_pad = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    specialized = tn == 2 * WG_COLUMNS
    body = functools.partial(_gmm_ws_body if specialized else _gmm_body, tm=tm, tk=tk, tn=tn,
                             num_visits=visits[0].shape[0], transpose_rhs=transpose_rhs, interpret=bool(interpret))
    threads = {"num_threads": 3, "thread_name": "wg"} if specialized else {}
    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
                          grid=(_num_sms(interpret),), grid_names=("sm",), compiler_params=_compiler_params(),
                          interpret=_interpret_params(interpret), **threads)
    return kernel(*visits, lhs, rhs)


def gmm_mgpu(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array, *,
             tiling: Tiling | None, out_dtype: Any, transpose_rhs: bool = False, interpret: Any = False) -> jax.Array:
    """The Mosaic GPU gmm (gmm.gmm_tpu's contract): rows of groups o .. o + g_local - 1 get lhs @ rhs[group - o],
    every other row zeros. transpose_rhs: rhs is [g_local, n, k], used as its transpose."""
    m, k = lhs.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling if tiling is not None else choose_tiling(m, k, n, group_sizes.shape[0])
    _check_tiling((tm, tk, tn))
    # Zero padding: rows to whole tiles (never stored), k (adds zero products) and n (sliced off).
    lhs = _pad_to(_pad_to(lhs, 0, tm), 1, tk)
    k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
    rhs = _pad_to(_pad_to(rhs, k_axis, tk), n_axis, tn)
    m_pad = lhs.shape[0]
    v = make_visits(group_sizes, group_offset, num_local, m_pad, tm, gaps=False)
    tile_start = v.tile_id * tm
    real = jnp.arange(v.seg_id.shape[0]) < v.num_visits
    lo = jnp.maximum(v.seg_start[v.seg_id], tile_start)
    hi = jnp.where(real, jnp.minimum(v.seg_end[v.seg_id], tile_start + tm), lo)
    visits = (lo.astype(jnp.int32), hi.astype(jnp.int32), v.seg_id, v.tile_id)
    kernel_dtype = jnp.float32 if lhs.dtype == jnp.float32 else out_dtype
    out = _sum_passes([_gmm_call(a, b, visits, tiling=(tm, tk, tn), out_dtype=kernel_dtype,
                                 transpose_rhs=transpose_rhs, interpret=interpret)
                       for a, b in _passes(lhs, rhs)], out_dtype)
    rows = jnp.arange(m, dtype=jnp.int32)[:, None]
    owned = (rows >= v.seg_start[0]) & (rows < v.seg_end[-1])
    # A select, not a multiply: the rows the kernel never stored hold whatever the allocator left (NaN included).
    return jnp.where(owned, out[:m, :n], jnp.zeros((), out_dtype))


# ------------------------------------------------------------------------------------------------ tgmm


def _swizzled(minor: int, dtype: Any) -> tuple[Any, ...]:
    """Shared-memory transforms for a tile with `minor` columns of `dtype`: 8-row tiles, the widest swizzle."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _tgmm_body(start_ref, end_ref, lhs_gmem, dout_gmem, out_gmem, *, tr: int, tk: int, tn: int,
               num_local: int, interpret: bool) -> None:
    grid_k, grid_n = out_gmem.shape[1] // tk, out_gmem.shape[2] // tn
    x_transforms = _swizzled(tk, lhs_gmem.dtype)

    @plgpu.nd_loop((num_local * grid_k * grid_n,), collective_axes="sm")
    def _work(loop_info: plgpu.NDLoopInfo) -> None:
        item = loop_info.index[0]
        group = jax.lax.div(item, grid_k * grid_n)
        ki = jax.lax.div(jax.lax.rem(item, grid_k * grid_n), grid_n)
        ni = jax.lax.rem(item, grid_n)
        start, end = start_ref[group], end_ref[group]
        first = jax.lax.div(start, tr)
        num_blocks = jax.lax.div(end + tr - 1, tr) - first

        def multiply(acc_ref, *buffers) -> jax.Array:
            def step(index, x_smem, dy_smem) -> None:
                row0 = (first + index[0]) * tr

                # Only a block that straddles the group's first or last row holds rows of other groups.
                @pl.when((row0 < start) | (row0 + tr > end))
                def _mask() -> None:
                    rows = jax.lax.broadcasted_iota(jnp.int32, (tr, tk), 0)
                    if not interpret:  # the interpreter has no layouts (and no rule for layout_cast)
                        rows = plgpu.layout_cast(rows, plgpu.Layout.WGMMA)
                    rows = row0 + rows
                    x = x_smem[...]
                    x_smem[...] = jnp.where((rows >= start) & (rows < end), x, jnp.zeros_like(x))
                    plgpu.commit_smem()

                plgpu.wgmma(acc_ref, _transposed(x_smem, buffers[0] if interpret else None, interpret), dy_smem)

            @pl.when(end > start)  # an empty group stores the accumulator's zeros
            def _run() -> None:
                plgpu.emit_pipeline(
                    step,
                    grid=(num_blocks,),
                    in_specs=[
                        plgpu.BlockSpec((tr, tk), lambda b: (first + b, ki), delay_release=1,
                                        transforms=x_transforms),
                        plgpu.BlockSpec((tr, tn), lambda b: (first + b, ni), delay_release=1,
                                        transforms=_swizzled(tn, dout_gmem.dtype)),
                    ],
                    max_concurrent_steps=PIPELINE_STEPS,
                )(lhs_gmem, dout_gmem)

            return acc_ref[...]

        scratch = [plgpu.SMEM((tk, tr), lhs_gmem.dtype)] if interpret else []
        acc = _accumulate(multiply, (tk, tn), scratch)

        @functools.partial(pl.run_scoped,
                           o_smem=plgpu.SMEM((tk, tn), out_gmem.dtype, transforms=_swizzled(tn, out_gmem.dtype)))
        def _store(o_smem) -> None:
            o_smem[...] = acc.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[group, pl.ds(ki * tk, tk), pl.ds(ni * tn, tn)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def tgmm_mgpu(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, group_offset: jax.Array, *,
              num_local: int, tiling: Tiling | None, out_dtype: Any, interpret: Any = False) -> jax.Array:
    """The Mosaic GPU tgmm (gmm.tgmm_tpu's contract): [g_local, k, n], out[j] = lhs[rows of o + j]^T dout[same rows].
    tiling: gmm's (tm, tk, tn); the output tile is tk x tn, and the rows stream 64 at a time."""
    m, k = lhs.shape
    n = dout.shape[1]
    tk, tn = (64, 128) if tiling is None else tiling[1:]
    tr = 64
    if tk % 64 or tn % 8:
        raise ValueError(f"Mosaic GPU tgmm tiles tk={tk}, tn={tn}: tk must be a multiple of 64 (wgmma's row blocks), "
                         "tn of 8")
    lhs = _pad_to(_pad_to(lhs, 0, tr), 1, tk)
    dout = _pad_to(_pad_to(dout, 0, tr), 1, tn)
    starts, ends = local_bounds(group_sizes, group_offset, num_local)
    body = functools.partial(_tgmm_body, tr=tr, tk=tk, tn=tn, num_local=num_local, interpret=bool(interpret))
    kernel_dtype = jnp.float32 if lhs.dtype == jnp.float32 else out_dtype

    def call(x: jax.Array, dy: jax.Array) -> jax.Array:
        kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((num_local, x.shape[1], dy.shape[1]), kernel_dtype),
                              grid=(_num_sms(interpret),), grid_names=("sm",), compiler_params=_compiler_params(),
                              interpret=_interpret_params(interpret))
        return kernel(starts, ends, x, dy)

    out = _sum_passes([call(a, b) for a, b in _passes(lhs, dout)], out_dtype)
    return out[:, :k, :n]
