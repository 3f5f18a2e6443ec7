"""CPU timings of the grouped-matmul backends (dots_jax.ops.gmm), forward and forward+backward.

    python benchmarks/gmm_cpu.py                    # default shapes, table + benchmarks/results/gmm_cpu.json
    python benchmarks/gmm_cpu.py --tile-sweep 8 16 32 64 128   # also time "loop" at these row tiles

Each cell is jitted and compiled ahead of time (compilation is never timed), run once to warm up, then
timed `--repeats` times; the table shows the median. Slow cells are cut short to keep the default run near
a minute: timing stops once `--budget-s` seconds are spent, and a cell whose warm-up run alone exceeds the
budget reports that run (already compiled, so it is a fair single sample).
"""

from __future__ import annotations

import argparse
import os
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

from dots_jax.ops.cpu_loops import gmm_loop, loop_row_tile  # noqa: E402
from dots_jax.ops.gmm import gmm  # noqa: E402

# (name, m, g, k, n, routing). m = 6 copies per token (top-6 routing) times the token count.
# "balanced": group sizes drawn multinomially with equal probabilities; "skewed": Zipf-like probabilities,
# so a few groups are large and several are empty, as with an untrained router.
SHAPES: list[tuple[str, int, int, int, int, str]] = [
    ("small", 6 * 64, 16, 256, 128, "balanced"),
    ("large", 6 * 512, 128, 512, 256, "balanced"),
    ("skewed", 6 * 256, 32, 512, 256, "skewed"),
    ("decode", 6 * 8, 128, 512, 256, "balanced"),  # one decode step of 8 sequences: fewer rows than groups
]
BACKEND_NAMES = ["ragged_dot", "dense", "loop", "gather"]


def group_sizes_for(m: int, g: int, routing: str, rng: np.random.Generator) -> np.ndarray:
    if routing == "balanced":
        probs = np.full(g, 1.0 / g)
    elif routing == "skewed":
        probs = 1.0 / np.arange(1, g + 1) ** 1.5
        probs[rng.choice(g, size=g // 4, replace=False)] = 0.0  # some experts get no tokens at all
        probs = rng.permutation(probs / probs.sum())
    else:
        raise ValueError(f"unknown routing {routing!r}")
    return rng.multinomial(m, probs).astype(np.int32)


def timed_call(fn: Callable[[], jax.Array]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return (time.perf_counter() - start) * 1e3


def time_cell(fn: Callable[[], jax.Array], repeats: int, budget_s: float) -> list[float]:
    """Milliseconds of each timed call of an already-compiled fn, after one warm-up call."""
    warm_up = timed_call(fn)
    if warm_up > budget_s * 1e3:
        return [warm_up]  # too slow to repeat; compiled ahead of time, so this run holds no compilation
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s * 1e3):
        times.append(timed_call(fn))
    return times


def compile_cell(matmul: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], mode: str, lhs: jax.Array,
                 rhs: jax.Array, group_sizes: jax.Array, d_out: jax.Array) -> Callable[[], jax.Array]:
    """The compiled forward ("fwd"), or forward+backward ("fwd+bwd": the value and gradient of <out, d_out>
    with respect to lhs and rhs), as a no-argument callable."""

    def loss(a: jax.Array, b: jax.Array, gs: jax.Array) -> jax.Array:
        return jnp.vdot(matmul(a, b, gs).astype(jnp.float32), d_out)

    fn = matmul if mode == "fwd" else jax.value_and_grad(loss, argnums=(0, 1))
    args = (lhs, rhs, group_sizes)
    compiled = jax.jit(fn).lower(*args).compile()
    return lambda: compiled(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "gmm_cpu.json")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=3.0, help="stop timing a cell after this long")
    parser.add_argument("--shapes", nargs="*", default=[s[0] for s in SHAPES],
                        help=f"subset of {[s[0] for s in SHAPES]}")
    parser.add_argument("--backends", nargs="*", default=BACKEND_NAMES)
    parser.add_argument("--tile-sweep", nargs="*", type=int, default=[],
                        help="also time the loop backend at these row tiles (shown as loop[T=..])")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    records: list[dict] = []
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus; median of up to "
          f"{args.repeats} runs\n")
    header = f"{'shape':<34} {'mode':<8} {'backend':<14} {'ms':>10} {'vs ragged_dot':>14}"
    print(header)
    print("-" * len(header))
    for name, m, g, k, n, routing in SHAPES:
        if name not in args.shapes:
            continue
        sizes = group_sizes_for(m, g, routing, rng)
        lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        rhs = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.float32)
        d_out = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
        group_sizes = jnp.asarray(sizes)

        variants: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {}
        for backend in args.backends:
            if backend == "gather" and m > g:
                continue  # gather copies one [k, n] matrix per row (GBs here); it is meant for m <= g only
            variants[backend] = lambda a, b, gs, backend=backend: gmm(a, b, gs, backend=backend)
        for tile in args.tile_sweep:
            variants[f"loop[T={tile}]"] = lambda a, b, gs, tile=tile: gmm_loop(a, b, gs, a.dtype, tile=tile)

        label = f"{name} m={m} g={g} k={k} n={n}"
        for mode in ("fwd", "fwd+bwd"):
            baseline: float | None = None
            for variant, matmul in variants.items():
                cell = compile_cell(matmul, mode, lhs, rhs, group_sizes, d_out)
                times = time_cell(cell, args.repeats, args.budget_s)
                median = statistics.median(times)
                if variant == "ragged_dot":
                    baseline = median
                ratio = f"{median / baseline:.3f}" if baseline else "-"
                print(f"{label:<34} {mode:<8} {variant:<14} {median:>10.2f} {ratio:>14}", flush=True)
                records.append({"shape": name, "m": m, "g": g, "k": k, "n": n, "routing": routing,
                                "group_sizes": sizes.tolist(), "loop_tile": loop_row_tile(m, g),
                                "mode": mode, "backend": variant, "median_ms": median, "times_ms": times,
                                "ratio_vs_ragged_dot": median / baseline if baseline else None})

    meta = {"jax": jax.__version__, "platform": jax.devices()[0].platform, "cpus": os.cpu_count(),
            "machine": platform.machine(), "repeats": args.repeats, "budget_s": args.budget_s}
    write_results(args.out, {"meta": meta, "results": records}, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
