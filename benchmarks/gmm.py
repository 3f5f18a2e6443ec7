"""GPU throughput of the grouped matmul at dots1 shapes: our Pallas kernels (Mosaic GPU and the deprecated Triton
lowering) vs jax.lax.ragged_dot vs torch.

    python benchmarks/gmm.py                        # table + benchmarks/results/gmm_gpu.json
    python benchmarks/gmm.py --rows 2048 8192 --impls mosaic_gpu pallas torch
    python benchmarks/gmm.py --tiling 128,64,256 --mosaic-steps 3 4 5   # more columns: tiles, pipeline depths

For each rows-per-expert count and each direction (k=4096 -> n=1408, the gate/up projection, and back,
k=1408 -> n=4096, the down projection) it times the forward (2mkn flops) and the forward plus the gradients
of lhs and rhs (6mkn flops), in bf16 with equal group sizes, and reports TFLOP/s next to the GPU's measured
bf16 matmul peak (a dense 8192^3 jnp.dot timed the same way). torch's entry is torch._grouped_mm where this
torch has it (CUDA, sm90+), else a loop of torch.mm over the experts; torch is skipped when it has no CUDA.
Compilation and warm-up are never timed; each cell is the median of --repeats runs. Our kernels also run the
forward with an int8 rhs (mode "fwd int8": the weights quantised per column, streamed as int8). The JSON ends with
the issue's bar for each shape at 2048 and 8192 rows per expert: the best Mosaic GPU forward+backward against 70% of
the measured peak and against torch._grouped_mm.

Needs a GPU: exits with a message otherwise (the Pallas kernel runs on CPU only in the interpreter, which
says nothing about speed; see benchmarks/gmm_cpu.py for the CPU backends).
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from results_io import write_results  # noqa: E402  (benchmarks/ is on sys.path: scripts run from it)

from dots_jax.ops.quant import quantize_int8  # noqa: E402
from pallas_kernels import gmm as pallas_gmm  # noqa: E402
from pallas_kernels import gmm_mgpu  # noqa: E402

DIRECTIONS = [("gate/up", 4096, 1408), ("down", 1408, 4096)]  # (name, k, n)


def median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[object], None]) -> list[float]:
    sync(fn())  # warm-up (compiled before this)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return times


def compile_cell(matmul: Callable, mode: str, lhs, rhs, group_sizes, d_out, steps: int) -> Callable[[], object]:
    """The compiled forward ("fwd") or forward and both gradients of matmul, as a call with no arguments; the Mosaic
    GPU pipeline depth `steps` is read while the kernel is traced, here."""
    def loss(a, b):
        return jnp.vdot(matmul(a, b, group_sizes).astype(jnp.float32), d_out.astype(jnp.float32))

    fn = (lambda a, b: matmul(a, b, group_sizes)) if mode == "fwd" else jax.grad(loss, argnums=(0, 1))
    gmm_mgpu.PIPELINE_STEPS = steps
    try:
        compiled = jax.jit(fn).lower(lhs, rhs).compile()
    finally:
        gmm_mgpu.PIPELINE_STEPS = DEFAULT_STEPS
    return lambda: compiled(lhs, rhs)


def torch_cell(mode: str, lhs: np.ndarray, rhs: np.ndarray, sizes: np.ndarray, d_out: np.ndarray):
    """(callable, label) for torch, or None when torch or CUDA is missing."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.from_numpy(lhs.astype(np.float32)).to("cuda", torch.bfloat16).requires_grad_(mode != "fwd")
    b = torch.from_numpy(rhs.astype(np.float32)).to("cuda", torch.bfloat16).requires_grad_(mode != "fwd")
    dy = torch.from_numpy(d_out.astype(np.float32)).to("cuda", torch.bfloat16)
    offsets = torch.from_numpy(np.cumsum(sizes).astype(np.int32)).cuda()
    grouped = getattr(torch, "_grouped_mm", None)

    def forward():
        if grouped is not None:
            return grouped(a, b, offs=offsets), "torch._grouped_mm"
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        pieces = [a[s:e] @ b[g] for g, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
        return torch.cat(pieces), "torch.mm loop"

    _, label = forward()

    def run():
        out, _ = forward()
        if mode != "fwd":
            torch.autograd.grad(out, (a, b), dy)
        return out

    return run, label


IMPLS = ("mosaic_gpu", "pallas", "ragged_dot", "torch")
DEFAULT_STEPS = gmm_mgpu.PIPELINE_STEPS
BAR_ROWS = (2048, 8192)  # rows per expert at which issue 21 sets its bar


def base_impls() -> dict[str, Callable]:
    return {"mosaic_gpu": lambda a, b, gs, **kw: pallas_gmm.gmm(a, b, gs, platform="mosaic_gpu", **kw),
            "pallas": lambda a, b, gs, **kw: pallas_gmm.gmm(a, b, gs, platform="gpu", **kw),
            "ragged_dot": lambda a, b, gs: jax.lax.ragged_dot(a, b, gs)}


def torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def acceptance(records: list[dict], peak: float) -> list[dict]:
    """Per (direction, rows per expert in BAR_ROWS): the best Mosaic GPU forward+backward (any tiling or depth
    timed) against 70% of the peak and against torch._grouped_mm's forward+backward."""
    bar = []
    for direction, _, _ in DIRECTIONS:
        for rows in BAR_ROWS:
            cell = [r for r in records if r["direction"] == direction and r["rows_per_expert"] == rows
                    and r["mode"] == "fwd+bwd" and "tflops" in r]
            ours = [r for r in cell if r["impl"].startswith("mosaic_gpu")]
            torch_rows = [r for r in cell if r["impl"] == "torch._grouped_mm"]
            if not ours:
                continue
            best = max(ours, key=lambda r: r["tflops"])
            torch_tflops = torch_rows[0]["tflops"] if torch_rows else None
            bar.append({"direction": direction, "rows_per_expert": rows, "mosaic_impl": best["impl"],
                        "mosaic_tflops": best["tflops"], "fraction_of_peak": best["tflops"] / peak,
                        "torch_tflops": torch_tflops,
                        "met": best["tflops"] >= 0.7 * peak and torch_tflops is not None
                        and best["tflops"] >= torch_tflops})
    return bar


def peak_tflops(repeats: int) -> float:
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    ms = statistics.median(median_ms(lambda: matmul(a, a), repeats, jax.block_until_ready))
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gmm_gpu.json")
    parser.add_argument("--rows", nargs="*", type=int, default=[512, 1024, 2048, 4096, 8192],
                        help="rows per expert")
    parser.add_argument("--experts", type=int, default=16, help="experts in one call (128 / expert shards)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiling", action="append", default=[], metavar="TM,TK,TN",
                        help="also time our kernels with this tiling (repeatable; default: their choose_tiling's)")
    parser.add_argument("--impls", nargs="*", default=list(IMPLS), choices=list(IMPLS),
                        help="which implementations to time")
    parser.add_argument("--mosaic-steps", nargs="*", type=int, default=[],
                        help=f"also time the Mosaic GPU kernels with these pipeline depths (default "
                             f"{gmm_mgpu.PIPELINE_STEPS}; the warp-specialized 256-column variant keeps its own)")
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit(f"benchmarks/gmm.py needs a GPU; JAX sees {jax.default_backend()!r}. "
                 "(For the CPU backends run benchmarks/gmm_cpu.py.)")

    device = jax.devices()[0]
    peak = peak_tflops(args.repeats)
    print(f"jax {jax.__version__} on {device.device_kind}; measured bf16 matmul peak {peak:.1f} TFLOP/s; "
          f"{args.experts} experts; median of {args.repeats} runs\n")
    header = f"{'shape':<36} {'mode':<8} {'impl':<22} {'ms':>9} {'TFLOP/s':>9} {'% peak':>7}"
    print(header)
    print("-" * len(header))
    meta = {"jax": jax.__version__, "device": device.device_kind, "peak_bf16_tflops": peak,
            "machine": platform.machine(), "repeats": args.repeats,
            "tiling": "pallas_kernels.gmm_gpu.choose_tiling / gmm_mgpu.choose_tiling unless named",
            "mosaic_pipeline_steps": DEFAULT_STEPS, "torch": torch_version()}
    rng = np.random.default_rng(0)
    records = []
    impls = {name: fn for name, fn in base_impls().items() if name in args.impls}
    for spec in args.tiling:
        tiling = tuple(int(t) for t in spec.split(","))
        tiles = "x".join(map(str, tiling))
        if "pallas" in args.impls:
            impls[f"pallas {tiles}"] = lambda a, b, gs, tiling=tiling, **kw: pallas_gmm.gmm(
                a, b, gs, tiling=tiling, platform="gpu", **kw)
        if "mosaic_gpu" in args.impls:
            impls[f"mosaic_gpu {tiles}"] = lambda a, b, gs, tiling=tiling, **kw: pallas_gmm.gmm(
                a, b, gs, tiling=tiling, platform="mosaic_gpu", **kw)
    steps = {f"mosaic_gpu s={n}": n for n in args.mosaic_steps if n != gmm_mgpu.PIPELINE_STEPS}
    if "mosaic_gpu" in args.impls:
        for name in steps:
            impls[name] = impls["mosaic_gpu"]
    for rows in args.rows:
        for direction, k, n in DIRECTIONS:
            m, g = rows * args.experts, args.experts
            sizes = np.full(g, rows, np.int32)
            lhs_np = rng.standard_normal((m, k), np.float32)
            rhs_np = rng.standard_normal((g, k, n), np.float32) / np.sqrt(k)
            d_out_np = rng.standard_normal((m, n), np.float32)
            lhs, rhs = jnp.asarray(lhs_np, jnp.bfloat16), jnp.asarray(rhs_np, jnp.bfloat16)
            d_out, group_sizes = jnp.asarray(d_out_np, jnp.bfloat16), jnp.asarray(sizes)
            label = f"{direction} m={m} k={k} n={n}"
            rhs_q, scale = quantize_int8(rhs_np, (1,))  # per (expert, output column), as the model's weights
            for mode, flops in (("fwd", 2 * m * k * n), ("fwd+bwd", 6 * m * k * n), ("fwd int8", 2 * m * k * n)):
                # (name, compile, sync): compiled when timed, so that one implementation failing (a kernel that does
                # not compile on this GPU or jax) costs its own cells only.
                cells: list[tuple[str, Callable[[], Callable[[], object]], Callable[[object], None]]] = []
                for name, fn in impls.items():
                    if mode == "fwd int8" and not name.startswith(("pallas", "mosaic_gpu")):
                        continue
                    if mode == "fwd int8":
                        fn, b, m_ = (lambda a, b, gs, fn=fn, s=scale: fn(a, b, gs, rhs_scale=s)), rhs_q, "fwd"
                    else:
                        b, m_ = rhs, mode
                    cells.append((name, functools.partial(compile_cell, fn, m_, lhs, b, group_sizes, d_out,
                                                          steps.get(name, DEFAULT_STEPS)), jax.block_until_ready))
                torch_run = torch_cell(mode, lhs_np, rhs_np, sizes, d_out_np) if "torch" in args.impls else None
                if torch_run is not None and mode != "fwd int8":
                    import torch

                    cells.append((torch_run[1], lambda run=torch_run[0]: run, lambda _: torch.cuda.synchronize()))
                for name, make, sync in cells:
                    record = {"direction": direction, "rows_per_expert": rows, "experts": g, "m": m, "k": k, "n": n,
                              "mode": mode, "impl": name}
                    try:
                        times = median_ms(make(), args.repeats, sync)
                    except Exception as e:  # recorded, and the other cells still run
                        record["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                        print(f"{label:<36} {mode:<8} {name:<22} failed: {record['error'][:200]}", flush=True)
                        records.append(record)
                        continue
                    ms = statistics.median(times)
                    tflops = flops / (ms * 1e-3) / 1e12
                    print(f"{label:<36} {mode:<8} {name:<22} {ms:>9.3f} {tflops:>9.1f} {100 * tflops / peak:>6.1f}%",
                          flush=True)
                    records.append({**record, "median_ms": ms, "times_ms": times, "tflops": tflops,
                                    "fraction_of_peak": tflops / peak})
                # After every shape: a run stopped by its time budget keeps what it measured.
                write_results(args.out, {"meta": meta, "results": records, "complete": False}, indent=1)
    bar = acceptance(records, peak)
    for row in bar:
        print(f"bar: {row['direction']} {row['rows_per_expert']} rows/expert: best Mosaic GPU fwd+bwd "
              f"{row['mosaic_tflops']:.1f} TFLOP/s ({row['mosaic_impl']}) = {100 * row['fraction_of_peak']:.1f}% of "
              f"peak, torch {row['torch_tflops'] or float('nan'):.1f}: {'met' if row['met'] else 'NOT met'}")
    write_results(args.out, {"meta": meta, "results": records, "bar": bar, "complete": True}, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
