"""The serving benchmark's GPU rows: the engine's decode step on a GPU against transformers' on cuda, same weights.

benchmarks/serve_cpu.py's "decode step alone", on the model of benchmarks/generate_gpu.py (~2.9B parameters, bf16
on both sides): dots_jax.inference.engine.Engine in this process with B sequences all decoding, time per
Engine.step() at each --batches size (default 1, 8, 32, 64; serve_cpu's engine_step_s), against transformers'
forward of one token per row with its KV cache at the same batch and context (sdpa attention, grouped_mm experts),
each step ending in torch.cuda.synchronize(); and the memory-bandwidth floor of the step (serve_cpu's step_bytes
in bf16 / the GPU's measured device-to-device copy bandwidth). The HTTP half of serve_cpu.py is not run: the GPU
machine's image has neither fastapi nor uvicorn, and its server process is pinned to the CPU.

Needs a GPU for JAX and torch, else exits 2 with an `error:` line; `--dry-run` runs it on the CPU with
generate_gpu's tiny config (a check of the script, not a measurement) and writes to a temporary file unless --out
is given. --model-dir reuses the checkpoint generate_gpu.py saved there with the same flag.

    python benchmarks/serve_gpu.py [--moe-backend auto] [--batches 1,8,32,64] [--model-dir DIR]
                                   [--out benchmarks/results/serve_gpu.json] [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# Before anything imports JAX: generate_gpu decides the platform the same way (serve_cpu's import chain would set
# the CPU for a real run, so generate_gpu is imported first).
os.environ.setdefault("JAX_PLATFORMS", "cpu" if "--dry-run" in sys.argv[1:] else "cuda,cpu")

import generate_gpu  # noqa: E402  (benchmarks/ is on sys.path: scripts run from it)
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from generate_cpu import copy_bandwidth  # noqa: E402
from results_io import write_results  # noqa: E402
from serve_cpu import STEP_PROMPT, STEP_TIMED, engine_step_s, step_bytes, transformers_step_s  # noqa: E402

import dots_jax  # noqa: E402
from dots_jax.inference.engine import Engine  # noqa: E402

MAX_SEQ_LEN = 512  # as serve_cpu's server: the decode-step rows stay within 128 tokens


def gpu_copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a device-to-device copy on the GPU (read + write counted), the best of a few runs."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moe-backend", default="auto", help="dots_jax's MoE backend, passed to from_pretrained")
    parser.add_argument("--batches", type=generate_gpu.int_list, default=None,
                        help="decoding sequences per step (default 1,8,32,64)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the random checkpoint's directory (reused if generate_gpu.py saved the same one)")
    parser.add_argument("--out", default=None,
                        help="results JSON (default benchmarks/results/serve_gpu.json; dry run: a temp file)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU with a tiny config: checks the script, measures nothing")
    args = parser.parse_args()
    if args.dry_run:
        overrides, device, batches = generate_gpu.DRY_CONFIG, "cpu", [1, 4]
        torch.set_num_threads(1)  # as generate_gpu's dry run: no spinning thread pool beside other processes
        out = args.out or str(Path(tempfile.gettempdir()) / "serve_gpu_dry_run.json")
        bandwidth = copy_bandwidth(1 << 26)
    else:
        problem = generate_gpu.gpu_problem()
        if problem:
            print(f"error: benchmarks/serve_gpu.py needs a GPU for JAX and torch: {problem} (on a CPU: "
                  "--dry-run checks the script, benchmarks/serve_cpu.py measures)", file=sys.stderr)
            return 2
        overrides, device, batches = generate_gpu.CONFIG, "cuda", [1, 8, 32, 64]
        out = args.out or "benchmarks/results/serve_gpu.json"
        bandwidth = gpu_copy_bandwidth()
    batches = args.batches or batches

    machine = {**generate_gpu.machine_facts(), "copy_bandwidth_GB_s": bandwidth / 1e9}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path, total = generate_gpu.build_checkpoint(overrides, args.model_dir or Path(tmp) / "model", device)
        ours = dots_jax.from_pretrained(path, dtype=jnp.bfloat16, moe_backend=args.moe_backend, progress=False)
        ref = generate_gpu.load_reference(path, device)
    cfg = ref.config
    model = generate_gpu.model_facts(overrides, cfg, total, args.moe_backend)

    settings = {"dry_run": args.dry_run, "batches": batches, "prompt_tokens": STEP_PROMPT, "timed_steps": STEP_TIMED,
                "engine": f"max_batch {max(batches)}, max_seq_len {MAX_SEQ_LEN} (other options default)",
                "floor": "bf16 step bytes (serve_cpu.step_bytes) / measured copy bandwidth"}
    # Written after every row, "complete" false until the end (as generate_gpu.py: a run out of time keeps its rows).
    rows: list[dict] = []
    payload = {"complete": False, "machine": machine, "settings": settings, "model": model, "decode_step": rows}
    # No tokenizer: the rows add token ids, and nothing is decoded to text.
    engine = Engine(ours, None, max_batch=max(batches), max_seq_len=MAX_SEQ_LEN)
    for batch in batches:
        t_ours = engine_step_s(engine, batch, cfg.vocab_size)
        t_ref = transformers_step_s(ref, batch, cfg.vocab_size, device)
        floor = batch * bandwidth / step_bytes(cfg, batch, STEP_PROMPT + STEP_TIMED // 2, itemsize=2)
        rows.append({"batch": batch, "engine_ms": 1e3 * t_ours, "transformers_ms": 1e3 * t_ref,
                     "engine_tok_s": batch / t_ours, "transformers_tok_s": batch / t_ref, "ratio": t_ref / t_ours,
                     "floor_tok_s": floor, "engine_fraction_of_floor": batch / t_ours / floor})
        print(f"decode step b{batch}: engine {1e3 * t_ours:.2f} ms, transformers {1e3 * t_ref:.2f} ms "
              f"({t_ref / t_ours:.2f}x)", flush=True)
        write_results(out, payload)
    machine["loadavg_1_5_15_end"] = list(os.getloadavg())
    machine["wall_s"] = time.perf_counter() - start
    payload["complete"] = True

    print(f"\n{machine['device']}, driver {machine['driver']}, copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
          f"{model['params_B']}B parameters ({model['active_params_B']}B active), moe_backend={args.moe_backend}")
    print(f"{'batch':>5} {'engine ms':>10} {'transf. ms':>10} {'ratio':>6} {'engine tok/s':>12} {'floor tok/s':>11}")
    for r in rows:
        print(f"{r['batch']:>5} {r['engine_ms']:>10.2f} {r['transformers_ms']:>10.2f} {r['ratio']:>6.2f} "
              f"{r['engine_tok_s']:>12.1f} {r['floor_tok_s']:>11.1f}")
    print(f"wrote {write_results(out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
