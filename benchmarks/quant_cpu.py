"""CPU timings of int8-weight products (dots_jax.ops.quant.qeinsum's candidate forms, the int8 gmm backends) against
the f32 product they replace: which form of "x @ (q * s)" XLA:CPU runs fastest at decode and prefill sizes.

    python benchmarks/quant_cpu.py [--repeats 9] [--out benchmarks/results/quant_cpu.json]

Dense products x [m, k] @ w [k, n], the scale per output column:
  f32           x @ w, f32 weight: what the int8 forms must beat
  convert_dot   dot(x, q.astype(f32)) * s; XLA may convert the whole q into an f32 copy first
  mul_reduce    sum(x[:, :, None] * q.astype(f32), axis=1) * s: one fused loop that reads int8
  mixed_dot     dot_general(x, q int8, preferred_element_type=f32) * s: the mixed-dtype dot as XLA gets it
  bf16_dot      dot(x.astype(bf16), q.astype(bf16), preferred_element_type=f32) * s
  chunked_C     a loop over C-row chunks of q: each chunk converted (it stays in cache) then multiplied
Routed experts: one product (gmm) per backend, f32 and int8 ("gather" at decode, which with int8 runs the loop
at one row per tile, "loop" at 8 tokens and prefill sizes), two alternative gather forms, and the whole SwiGLU
expert FFN as "auto" runs it.

Weights are cycled through enough distinct copies to exceed the last-level cache three times, as a decode step
streams every weight from memory once. Each cell is compiled ahead of time, warmed up, then timed; the table shows
the median microseconds per call and the weight bytes read per second. No XLA flags are set: this is the optimised
build users run.
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

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from results_io import write_results  # noqa: E402  (benchmarks/ is on sys.path: scripts run from it)

from dots_jax.ops import gmm as grouped_matmul  # noqa: E402
from dots_jax.ops.quant import qeinsum, quantize_int8  # noqa: E402

CACHE_BYTES = 32 << 20  # this machine's L3; the copies of each weight total at least 3x this
F32 = jnp.float32

# name: (k, n). "generic" is a 7B-class MLP; the rest are the ~600M config of benchmarks/generate_cpu.py.
DENSE_SHAPES = {
    "generic_mlp_up": (2048, 5632),
    "600M_attention": (1024, 1024),
    "600M_dense_mlp_up": (1024, 2816),
    "600M_dense_mlp_down": (2816, 1024),
    "600M_shared_up": (1024, 704),
    "600M_head": (1024, 32000),
}
DENSE_ROWS = (1, 8, 32, 256)


def dense_forms(chunk_sizes: tuple[int, ...]) -> dict[str, Callable[..., jax.Array]]:
    forms: dict[str, Callable[..., jax.Array]] = {
        "convert_dot": lambda x, q, s: jnp.dot(x, q.astype(F32)) * s,
        "mul_reduce": lambda x, q, s: jnp.sum(x[:, :, None] * q.astype(F32)[None], axis=1) * s,
        "mixed_dot": lambda x, q, s: jax.lax.dot_general(x, q, (((1,), (0,)), ((), ())),
                                                         preferred_element_type=F32) * s,
        "bf16_dot": lambda x, q, s: jnp.dot(x.astype(jnp.bfloat16), q.astype(jnp.bfloat16),
                                            preferred_element_type=F32) * s,
        "qeinsum": lambda x, q, s: qeinsum("mk,kn->mn", x, q, s),  # the form dots_jax picks (quant.chunk_rows)
    }
    for chunk in chunk_sizes:
        forms[f"chunked_{chunk}"] = lambda x, q, s, chunk=chunk: chunked(x, q, s, chunk)
    return forms


def chunked(x: jax.Array, q: jax.Array, s: jax.Array, chunk: int) -> jax.Array:
    k = q.shape[0]
    if k % chunk:
        return jnp.dot(x, q.astype(F32)) * s

    def step(i: jax.Array, acc: jax.Array) -> jax.Array:
        xs = jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)
        qs = jax.lax.dynamic_slice_in_dim(q, i * chunk, chunk, axis=0)
        return acc + jnp.dot(xs, qs.astype(F32))

    return jax.lax.fori_loop(0, k // chunk, step, jnp.zeros((x.shape[0], q.shape[1]), F32)) * s


def timed(fn: Callable[[int], jax.Array], copies: int, repeats: int, budget_s: float) -> list[float]:
    """Microseconds per call, calls cycling through the weight copies; one warm-up cycle first."""
    for i in range(copies):
        jax.block_until_ready(fn(i))
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and spent < budget_s:
        start = time.perf_counter()
        for i in range(copies):
            jax.block_until_ready(fn(i))
        elapsed = time.perf_counter() - start
        spent += elapsed
        times.append(elapsed / copies * 1e6)
    return times


def copies_for(nbytes: int) -> int:
    """Distinct copies of a weight whose calls read nbytes each, so that a cycle reads 2x the cache (at most 32)."""
    return min(32, max(2, -(-2 * CACHE_BYTES // nbytes)))


def bench_dense(args: argparse.Namespace, rng: np.random.Generator, records: list[dict]) -> None:
    forms = dense_forms(tuple(args.chunks))
    for name, (k, n) in DENSE_SHAPES.items():
        if args.shapes and name not in args.shapes:
            continue
        w = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
        q, s = quantize_int8(w, (0,))
        w32 = [jnp.asarray(w + 0.0) for _ in range(copies_for(w.nbytes))]
        q8 = [jnp.asarray(np.asarray(q)) + jnp.int8(0) for _ in range(copies_for(q.size))]
        for m in args.rows:
            x = jnp.asarray(rng.standard_normal((m, k)), F32)
            cells = {"f32": (lambda a, b, c: a @ b, w32, 4)}
            cells.update({form: (fn, q8, 1) for form, fn in forms.items() if not args.forms or form in args.forms})
            baseline = None
            for form, (fn, weights, itemsize) in cells.items():
                compiled = jax.jit(fn).lower(x, weights[0], s).compile()
                times = timed(lambda i, c=compiled, ws=weights, x=x, s=s: c(x, ws[i % len(ws)], s), len(weights),
                              args.repeats, args.budget_s)
                median = statistics.median(times)
                baseline = baseline or median
                gbps = k * n * itemsize / median / 1e3
                print(f"{name:<22} {m:>5} {form:<20} {median:>10.1f} {min(times):>10.1f} {gbps:>8.2f} "
                      f"{baseline / median:>8.2f}", flush=True)
                records.append({"kind": "dense", "shape": name, "k": k, "n": n, "m": m, "form": form,
                                "median_us": median, "times_us": times, "weight_GB_s": gbps,
                                "speedup_vs_f32": baseline / median})


# name: (m rows, g experts, k, n, backends). Decode: top-6 copies of 1 and 8 tokens; prefill: 64 tokens.
EXPERT_SHAPES = {
    "600M_up_decode1": (6, 64, 1024, 352, ("gather",)),
    "600M_down_decode1": (6, 64, 352, 1024, ("gather",)),
    "600M_up_decode8": (48, 64, 1024, 352, ("gather", "loop")),
    "600M_up_prefill64": (384, 64, 1024, 352, ("loop",)),
    "600M_down_prefill64": (384, 64, 352, 1024, ("loop",)),
}


def expert_forms() -> dict[str, Callable[..., jax.Array]]:
    """Alternatives to the "gather" backend's int8 form, on rows with one expert each (group per row given)."""
    return {
        "gather_mul_reduce": lambda x, q, s, group: jnp.sum(x[:, :, None] * q[group].astype(F32), axis=1)
        * s[group],
        "gather_mixed_dot": lambda x, q, s, group: jax.lax.dot_general(
            x, q[group], (((1,), (1,)), ((0,), (0,))), preferred_element_type=F32) * s[group],
    }


def bench_experts(args: argparse.Namespace, rng: np.random.Generator, records: list[dict]) -> None:
    for name, (m, g, k, n, backends) in EXPERT_SHAPES.items():
        if args.shapes and name not in args.shapes:
            continue
        w = rng.standard_normal((g, k, n)).astype(np.float32) / np.sqrt(k)
        q, s = quantize_int8(w, (1,))
        x = jnp.asarray(rng.standard_normal((m, k)), F32)
        group = np.sort(rng.choice(g, size=m, replace=m > g))
        touched = len(np.unique(group)) * k * n  # weights one call reads: copies are counted by these
        w32 = [jnp.asarray(w + 0.0) for _ in range(copies_for(4 * touched))]
        q8 = [jnp.asarray(np.asarray(q)) + jnp.int8(0) for _ in range(copies_for(touched))]
        sizes = jnp.asarray(np.bincount(group, minlength=g).astype(np.int32))
        cells: dict[str, tuple[Callable[..., jax.Array], list[jax.Array], bool]] = {}
        for backend in backends:
            cells[f"{backend}_f32"] = (lambda a, b, c, gs, be=backend: grouped_matmul.gmm(a, b, gs, backend=be),
                                       w32, False)
            cells[f"{backend}_int8"] = (lambda a, b, c, gs, be=backend: grouped_matmul.gmm(
                a, b, gs, backend=be, rhs_scale=c), q8, True)
        if "loop" in backends:
            cells["loop_int8_upfront"] = (lambda a, b, c, gs: grouped_matmul.gmm(
                a, b.astype(F32) * c[:, None, :], gs, backend="loop"), q8, True)
        if "gather" in backends:
            for form, fn in expert_forms().items():
                cells[form] = (lambda a, b, c, gs, fn=fn, group=group: fn(a, b, c, jnp.asarray(group)), q8, True)
        # Bytes a decode step reads: the chosen experts' matrices (all of them at prefill sizes).
        chosen = len(np.unique(group))
        baseline = None
        for form, (fn, weights, int8) in cells.items():
            compiled = jax.jit(fn).lower(x, weights[0], s, sizes).compile()
            times = timed(lambda i, c=compiled, ws=weights, x=x, s=s, gs=sizes: c(x, ws[i % len(ws)], s, gs),
                          len(weights), args.repeats, args.budget_s)
            median = statistics.median(times)
            baseline = baseline or median
            gbps = chosen * k * n * (1 if int8 else 4) / median / 1e3
            print(f"{name:<22} {m:>5} {form:<20} {median:>10.1f} {min(times):>10.1f} {gbps:>8.2f} "
                  f"{baseline / median:>8.2f}", flush=True)
            records.append({"kind": "experts", "shape": name, "m": m, "g": g, "k": k, "n": n, "form": form,
                            "chosen_experts": chosen, "median_us": median, "times_us": times, "weight_GB_s": gbps,
                            "speedup_vs_first": baseline / median})


# name: (m rows, g experts, hidden, expert width): the routed experts' whole SwiGLU FFN (ops.gmm.expert_ffn) at one
# and eight decode tokens (top-6) of the ~600M config, as "auto" runs it.
FFN_SHAPES = {"600M_ffn_decode1": (6, 64, 1024, 352), "600M_ffn_decode8": (48, 64, 1024, 352)}


def bench_ffn(args: argparse.Namespace, rng: np.random.Generator, records: list[dict]) -> None:
    for name, (m, g, hidden, inner) in FFN_SHAPES.items():
        if args.shapes and name not in args.shapes:
            continue
        gate, up = (rng.standard_normal((g, hidden, inner)).astype(np.float32) / np.sqrt(hidden) for _ in range(2))
        down = rng.standard_normal((g, inner, hidden)).astype(np.float32) / np.sqrt(inner)
        quantised = [quantize_int8(w, (1,)) for w in (gate, up, down)]
        group = np.sort(rng.choice(g, size=m, replace=m > g))
        sizes = jnp.asarray(np.bincount(group, minlength=g).astype(np.int32))
        touched = 3 * len(np.unique(group)) * hidden * inner
        f32_weights = [tuple(jnp.asarray(w + 0.0) for w in (gate, up, down)) for _ in range(copies_for(4 * touched))]
        int8_weights = [tuple(jnp.asarray(np.asarray(q)) + jnp.int8(0) for q, _ in quantised)
                        for _ in range(copies_for(touched))]
        scales = tuple(sc for _, sc in quantised)
        x = jnp.asarray(rng.standard_normal((m, hidden)), F32)
        backend = grouped_matmul.default_backend(m, g)
        cells = {
            f"{backend}_f32": (lambda a, ws, gs: grouped_matmul.expert_ffn(a, *ws, gs, backend="auto"), f32_weights, 4),
            f"{backend}_int8": (lambda a, ws, gs, sc=scales: grouped_matmul.expert_ffn(a, *ws, gs, backend="auto",
                                                                                     scales=sc), int8_weights, 1),
        }
        baseline = None
        for form, (fn, weights, itemsize) in cells.items():
            compiled = jax.jit(fn).lower(x, weights[0], sizes).compile()
            times = timed(lambda i, c=compiled, ws=weights, x=x, gs=sizes: c(x, ws[i % len(ws)], gs), len(weights),
                          args.repeats, args.budget_s)
            median = statistics.median(times)
            baseline = baseline or median
            gbps = touched * itemsize / median / 1e3
            print(f"{name:<22} {m:>5} {form:<20} {median:>10.1f} {min(times):>10.1f} {gbps:>8.2f} "
                  f"{baseline / median:>8.2f}", flush=True)
            records.append({"kind": "expert_ffn", "shape": name, "m": m, "g": g, "hidden": hidden, "inner": inner,
                            "form": form, "median_us": median, "times_us": times, "weight_GB_s": gbps,
                            "speedup_vs_f32": baseline / median})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "quant_cpu.json")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--budget-s", type=float, default=2.0, help="stop timing a cell after this long")
    parser.add_argument("--rows", nargs="*", type=int, default=list(DENSE_ROWS))
    parser.add_argument("--chunks", nargs="*", type=int, default=[16, 64])
    parser.add_argument("--shapes", nargs="*", default=[], help="subset of the dense and expert shape names")
    parser.add_argument("--skip", nargs="*", default=[], choices=["dense", "experts", "ffn"])
    parser.add_argument("--forms", nargs="*", default=[], help="subset of the dense forms (f32 always runs)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    records: list[dict] = []
    print(f"jax {jax.__version__}, {os.cpu_count()} cpus, load {os.getloadavg()}; median us per call\n")
    print(f"{'shape':<22} {'m':>5} {'form':<20} {'median us':>10} {'min us':>10} {'GB/s':>8} {'speedup':>8}")
    if "dense" not in args.skip:
        bench_dense(args, rng, records)
    if "experts" not in args.skip:
        bench_experts(args, rng, records)
    if "ffn" not in args.skip:
        bench_ffn(args, rng, records)
    facts = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
             "cpus": os.cpu_count(), "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "loadavg_1_5_15_end": list(os.getloadavg())}
    print(f"\nwrote {write_results(args.out, {'machine': facts, 'records': records})}")


if __name__ == "__main__":
    main()
