"""Generation throughput on a GPU: dots_jax vs transformers (PyTorch, CUDA) on the same random dots1-shaped
weights, bf16 on both sides, in one run.

One ~2.9B-parameter dots1-shaped model (hidden 2048, 10 layers of which the first is dense, 64 routed experts of
width 704, top-6, 2 shared; about 0.65B parameters active per token) is built by tests/oracle.py with random
weights, cast to bf16 and saved once as an HF directory; dots_jax loads it with from_pretrained(dtype=bfloat16,
moe_backend=--moe-backend), transformers with Dots1ForCausalLM.from_pretrained(dtype=torch.bfloat16) on cuda with
its defaults (sdpa attention, the "grouped_mm" experts implementation, both recorded in the JSON). Phases:

- greedy: 16 new tokens from one 16-token prompt on both sides; the fraction of positions equal and the first
  position that differs (bf16 in two implementations may legitimately part after a near-tie: recorded, not fatal);
- prefill tokens/s of one prompt of each --prefill-tokens length (default 2048, 8192): ours generate() with one new
  token, transformers' forward with logits_to_keep=1 (as its generate() prefills);
- decode tokens/s at each --batches size (default 1, 8, 64): generate(N + 1 tokens) - generate(1 token), so the
  prompt does not count, on both sides; N = 15 by default, so that both calls fall in generate()'s 16-token bucket
  of new tokens and run the same compiled programs (one compile per batch size, and no difference in cache length
  between the two calls);
- ratios ours / transformers, beside the targets of issue 21 (decode 3x at batch 1, 2x at 64, prefill 1.5x).

Every timed call ends in a device sync (our generate() returns host tokens; torch.cuda.synchronize()); the first
call of each shape (compilation, autotuning) is untimed; the figure is the median of --repeats calls. Prints a
table and writes JSON. Needs a GPU for both JAX and torch, else exits 2 with an `error:` line. `--dry-run` runs
every phase on the CPU with a tiny config and tiny lengths (a check of the script, not a measurement) and writes
to a temporary file unless --out is given.

    python benchmarks/generate_gpu.py [--moe-backend auto] [--attention-backend auto] [--batches 1,8,64]
                                      [--prefill-tokens 2048,8192] [--repeats 5] [--model-dir DIR]
                                      [--out benchmarks/results/generate_gpu.json] [--dry-run]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Decided before JAX is imported (argparse checks the flag again later): a dry run must stay on the CPU even where
# a GPU is present; a real run asks for CUDA first.
DRY_RUN = "--dry-run" in sys.argv[1:]
os.environ.setdefault("JAX_PLATFORMS", "cpu" if DRY_RUN else "cuda,cpu")
# JAX's allocator takes 75% of the GPU by default and never gives memory back; torch needs its share beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# tests/oracle.py builds the reference model and sets no XLA flags (the test suite's own set-up does, for the whole
# process): a benchmark must measure the optimised build users run.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oracle import hf_config, hf_model, save  # noqa: E402
from results_io import write_results  # noqa: E402  (benchmarks/ is on sys.path: scripts run from it)

import dots_jax  # noqa: E402
from dots_jax.inference.generate import bucket_length, generate  # noqa: E402
from dots_jax.ops import attention, gmm  # noqa: E402

# ~2.9B parameters, ~0.65B active: dots.llm1's shape (hidden 4096, 128 experts of 1408) halved in width and in
# experts, 10 layers. bf16 weights take 5.8 GB on each side; the f32 build before the cast 11.6 GB, on the GPU.
CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=704,
              num_hidden_layers=10, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
              num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5)
# The dry run's: every phase in seconds on two CPU cores.
DRY_CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5)
MAX_POSITIONS = 16384  # room for the longest prefill row and its new tokens
# The greedy check's prompt as long as the decode rows': at batch 1 they share compiled shapes (one compile fewer
# in the dry run; nothing timed depends on it).
GREEDY_PROMPT, GREEDY_TOKENS = 16, 16
DECODE_PROMPT = 16
# Issue 21's acceptance figures (ours / transformers), printed beside the ratios.
TARGETS = {"decode_b1": 3.0, "decode_b64": 2.0, "prefill": 1.5}


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def gpu_problem() -> str | None:
    """Why this process cannot run the GPU benchmark (None: it can)."""
    try:
        backend = jax.default_backend()
    except RuntimeError as e:  # JAX_PLATFORMS names a platform that did not start
        return f"JAX found no usable platform ({str(e).splitlines()[0]})"
    if backend != "gpu":
        return f"JAX runs on {backend!r}, not a GPU"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def command_output(*cmd: str) -> str | None:
    """A command's stripped stdout, None when it is missing or fails (nvidia-smi on a machine without a driver)."""
    if shutil.which(cmd[0]) is None:
        return None
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return done.stdout.strip() if done.returncode == 0 else None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict:
    """The card, the driver and the software measured, and the load average as the run starts."""
    cuda = torch.cuda.is_available()
    driver = command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return {"device": jax.devices()[0].device_kind, "jax_platform": jax.default_backend(),
            "torch_device": torch.cuda.get_device_name() if cuda else "cpu",
            "driver": driver.splitlines()[0] if driver else None, "torch_cuda": torch.version.cuda,
            "jax": jax.__version__, "jaxlib": package_version("jaxlib"),
            "jax_cuda_plugin": package_version("jax-cuda13-plugin") or package_version("jax-cuda12-plugin"),
            "torch": torch.__version__, "transformers": transformers.__version__, "flax": package_version("flax"),
            "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
            "loadavg_1_5_15_start": list(os.getloadavg())}


def parameter_counts(cfg: transformers.Dots1Config, total: int) -> dict:
    """Total parameters (counted on the model) and those one token uses: all but the routed experts it skips."""
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    skipped = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size \
        * cfg.moe_intermediate_size
    return {"params": total, "active_params": total - skipped, "params_B": round(total / 1e9, 3),
            "active_params_B": round((total - skipped) / 1e9, 3)}


def model_facts(overrides: dict, cfg: transformers.Dots1Config, total: int, moe_backend: str) -> dict:
    """What a results file records of the model build_checkpoint(overrides) made and both sides ran: its config,
    parameter counts, dtype, our MoE backend and the reference's attention and experts implementations."""
    return {"config": {**overrides, "max_position_embeddings": MAX_POSITIONS}, **parameter_counts(cfg, total),
            "dtype": "bfloat16",
            "moe_backend": moe_backend, "ref_attn_implementation": cfg._attn_implementation,
            "ref_experts_implementation": getattr(cfg, "_experts_implementation", None)}


def build_checkpoint(overrides: dict, directory: Path, device: str) -> tuple[Path, int]:
    """The oracle's random model, built on `device` (the f32 init of 2.9B weights is minutes on a CPU, a second on
    the GPU), cast to bf16 and saved as an HF directory. Reused when `directory` holds one of the same config (the
    serving benchmark's decode-step rows load the same one). Returns (directory, parameter count)."""
    marker = directory / "generate_gpu_config.json"
    wanted = json.dumps(overrides, sort_keys=True)
    if marker.exists() and marker.read_text() == wanted:
        return directory, json.loads((directory / "parameter_count.json").read_text())
    cfg = hf_config(**overrides, max_position_embeddings=MAX_POSITIONS)
    with torch.device(device):
        model = hf_model(cfg, bias_std=0.01)
    total = sum(p.numel() for p in model.parameters())
    # bf16 on disk: both sides load the same rounded values (transformers keeps the correction bias in f32 by its
    # _keep_in_fp32_modules_strict; so does dots_jax).
    save(model.to(torch.bfloat16), directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the f32 build's memory back before JAX takes its share
    (directory / "parameter_count.json").write_text(json.dumps(total))
    marker.write_text(wanted)
    return directory, total


def load_reference(path: Path, device: str) -> transformers.Dots1ForCausalLM:
    """transformers' model as users get it: bf16, sdpa attention; on the GPU its grouped experts ("grouped_mm",
    torch's grouped GEMM), on the CPU its default."""
    kwargs = {"experts_implementation": "grouped_mm"} if device == "cuda" else {}
    model = transformers.Dots1ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                          **kwargs)
    return model.to(device).eval()


def median_s(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls after one untimed call (compilation, autotuning, allocator warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synced(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """fn, then a wait for the GPU: torch returns before its kernels finish."""
    def run() -> object:
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return run


def greedy_check(ours, ref, vocab: int, device: str, rng: np.random.Generator) -> dict:
    prompt = rng.integers(0, vocab, size=(1, GREEDY_PROMPT)).tolist()
    mine = generate(ours, prompt, max_new_tokens=GREEDY_TOKENS, stop_token_ids=[]).tokens[0]
    ids = torch.tensor(prompt, device=device)
    with torch.no_grad():
        theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS,
                              min_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=0)
    theirs = theirs[0, GREEDY_PROMPT:].tolist()
    equal = [a == b for a, b in zip(mine, theirs, strict=True)]
    return {"tokens": GREEDY_TOKENS, "ours": mine, "ref": theirs, "equal": all(equal),
            "fraction_equal": sum(equal) / len(equal),
            "first_divergence": None if all(equal) else equal.index(False)}


def bench(ours, ref, cfg: transformers.Dots1Config, device: str, prefill_tokens: list[int], batches: list[int],
          decode_tokens: int, repeats: int, rng: np.random.Generator, rows: list[dict],
          on_row: Callable[[], object]) -> None:
    """Appends one row per phase to `rows`, calling on_row after each."""
    for n in prefill_tokens:
        prompt = rng.integers(0, cfg.vocab_size, size=(1, n)).tolist()
        ids = torch.tensor(prompt, device=device)
        t_ours = median_s(lambda p=prompt: generate(ours, p, max_new_tokens=1, stop_token_ids=[]), repeats)
        with torch.no_grad():
            # As transformers' generate() prefills: the LM head on the last position only (ours does the same).
            t_ref = median_s(synced(lambda ids=ids: ref(ids, logits_to_keep=1), device), repeats)
        s = bucket_length(n)
        rows.append({"phase": f"prefill_{n}", "tokens": n, "ours_s": t_ours, "ref_s": t_ref,
                     "ours_tok_s": n / t_ours, "ref_tok_s": n / t_ref, "ratio": t_ref / t_ours,
                     "target": TARGETS["prefill"],
                     "attention_backend_auto": attention.default_backend(s, s + bucket_length(1))})
        on_row()
        print(f"prefill {n}: ours {n / t_ours:,.0f} tok/s, ref {n / t_ref:,.0f} tok/s", flush=True)

    for batch in batches:
        prompts = rng.integers(0, cfg.vocab_size, size=(batch, DECODE_PROMPT)).tolist()
        ids = torch.tensor(prompts, device=device)

        def ours_gen(n: int, prompts: list[list[int]] = prompts) -> Callable[[], object]:
            return lambda: generate(ours, prompts, max_new_tokens=n, stop_token_ids=[])

        def ref_gen(n: int, ids: torch.Tensor = ids) -> Callable[[], object]:
            return synced(lambda: ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                               min_new_tokens=n, do_sample=False, pad_token_id=0), device)

        # Decode time = (prefill + N + 1 tokens) - (prefill + 1 token): the N decode steps alone.
        t_ours = median_s(ours_gen(decode_tokens + 1), repeats) - median_s(ours_gen(1), repeats)
        with torch.no_grad():
            t_ref = median_s(ref_gen(decode_tokens + 1), repeats) - median_s(ref_gen(1), repeats)
        tokens = batch * decode_tokens
        rows.append({"phase": f"decode_b{batch}", "batch": batch, "tokens": tokens, "ours_s": t_ours,
                     "ref_s": t_ref, "ours_tok_s": tokens / t_ours, "ref_tok_s": tokens / t_ref,
                     "ratio": t_ref / t_ours, "target": TARGETS.get(f"decode_b{batch}")})
        on_row()
        print(f"decode b{batch}: ours {tokens / t_ours:,.1f} tok/s, ref {tokens / t_ref:,.1f} tok/s", flush=True)


def print_table(machine: dict, model: dict, greedy: dict, rows: list[dict]) -> None:
    print(f"\n{machine['device']} (torch: {machine['torch_device']}), driver {machine['driver']}; jax "
          f"{machine['jax']}, torch {machine['torch']}, transformers {machine['transformers']}; load average "
          f"{machine['loadavg_1_5_15_start'][0]:.2f} -> {machine['loadavg_1_5_15_end'][0]:.2f}")
    print(f"model: {model['params_B']}B parameters, {model['active_params_B']}B active, {model['dtype']}; ours "
          f"moe_backend={model['moe_backend']}, reference experts={model['ref_experts_implementation']} "
          f"attention={model['ref_attn_implementation']}")
    print(f"greedy: {greedy['fraction_equal']:.2f} of {greedy['tokens']} tokens equal"
          + ("" if greedy["equal"] else f", first divergence at {greedy['first_divergence']}"))
    header = f"{'phase':>14} {'ours tok/s':>12} {'ref tok/s':>12} {'ratio':>6} {'target':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        target = f"{r['target']:.1f}" if r["target"] else ""
        print(f"{r['phase']:>14} {r['ours_tok_s']:>12.1f} {r['ref_tok_s']:>12.1f} {r['ratio']:>6.2f} {target:>6}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moe-backend", default="auto",
                        help="dots_jax's MoE backend, passed to from_pretrained (auto, ragged_dot, pallas, ...)")
    parser.add_argument("--attention-backend", default="auto", help="dots_jax's attention backend")
    parser.add_argument("--batches", type=int_list, default=None, help="decode batch sizes (default 1,8,64)")
    parser.add_argument("--prefill-tokens", type=int_list, default=None, help="prompt lengths (default 2048,8192)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="timed decode steps (default 15)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure, median (default 5)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where to save the random checkpoint (reused if it holds the same one; default: a "
                             "temporary directory)")
    parser.add_argument("--out", default=None,
                        help="results JSON (default benchmarks/results/generate_gpu.json; dry run: a temp file)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every phase on the CPU, tiny config and lengths: checks the script, measures nothing")
    args = parser.parse_args()
    if args.dry_run:
        overrides, device = DRY_CONFIG, "cpu"
        # One thread: torch's thread pool spins for seconds per call on a CPU shared with compiling processes
        # (a test runs this beside another), and the tiny model gains nothing from more.
        torch.set_num_threads(1)
        batches, prefill, decode_tokens, repeats = [1, 4], [64, 128], 4, 1
        out = args.out or str(Path(tempfile.gettempdir()) / "generate_gpu_dry_run.json")
    else:
        problem = gpu_problem()
        if problem:
            print(f"error: benchmarks/generate_gpu.py needs a GPU for JAX and torch: {problem} (on a CPU: "
                  "--dry-run checks the script, benchmarks/generate_cpu.py measures)", file=sys.stderr)
            return 2
        overrides, device = CONFIG, "cuda"
        batches, prefill, decode_tokens, repeats = [1, 8, 64], [2048, 8192], 15, 5
        out = args.out or "benchmarks/results/generate_gpu.json"
    batches = args.batches or batches
    prefill = args.prefill_tokens or prefill
    decode_tokens = args.decode_tokens or decode_tokens
    repeats = args.repeats or repeats
    if max(prefill) + decode_tokens + 1 > MAX_POSITIONS:
        parser.error(f"--prefill-tokens: at most {MAX_POSITIONS - decode_tokens - 1}")

    machine = machine_facts()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.model_dir or Path(tmp) / "model"
        path, total = build_checkpoint(overrides, directory, device)
        built = time.perf_counter() - start
        ours = dots_jax.from_pretrained(path, dtype=jnp.bfloat16, moe_backend=args.moe_backend,
                                        attention_backend=args.attention_backend, progress=False)
        ref = load_reference(path, device)
    loaded = time.perf_counter() - start - built
    cfg = ref.config
    print(f"built in {built:.0f} s, loaded both in {loaded:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    model = {**model_facts(overrides, cfg, total, args.moe_backend), "attention_backend": args.attention_backend,
             "moe_backend_auto": gmm.default_backend()}
    machine["build_s"], machine["load_s"] = built, loaded
    settings = {"dry_run": args.dry_run, "batches": batches, "prefill_tokens": prefill,
                "decode_tokens": decode_tokens, "decode_prompt_tokens": DECODE_PROMPT, "repeats": repeats,
                "timing": "median of repeats after one untimed call; decode = generate(N+1) - generate(1)"}
    # Written after every phase, "complete" false until the end: a run stopped by its time budget on the device
    # machine still returns what it measured.
    payload = {"complete": False, "machine": machine, "settings": settings, "model": model, "greedy": None,
               "results": []}
    payload["greedy"] = greedy_check(ours, ref, cfg.vocab_size, device, rng)
    write_results(out, payload)
    print(f"greedy: {payload['greedy']['fraction_equal']:.2f} of the tokens equal", flush=True)
    bench(ours, ref, cfg, device, prefill, batches, decode_tokens, repeats, rng, payload["results"],
          lambda: write_results(out, payload))
    machine["loadavg_1_5_15_end"] = list(os.getloadavg())
    machine["wall_s"] = time.perf_counter() - start
    payload["complete"] = True
    print_table(machine, model, payload["greedy"], payload["results"])
    print(f"wrote {write_results(out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
