"""Generation throughput: dots_jax vs transformers (PyTorch) on the same random dots1-shaped weights, one run.

For each config: greedy tokens must agree; then prefill tokens/s (one prompt of each --prefill-tokens length,
default 512 and 4096: our prefill, generate() with one new token, against transformers' forward with
logits_to_keep=1, as its generate() prefills), decode tokens/s
at batch 1 and 8, the ratios (ours / reference), and the batch-1 memory-bandwidth floor: the bytes of the weights
one decode step must read (attention, dense/shared MLPs, the chosen experts, the head) / the machine's measured
copy bandwidth, and our fraction of it. Then our decode with int8 weights (from_pretrained(..., quantize="int8"):
the linear layers int8 with f32 scales, the LM head f32) at batch 1 and 8, its speed-up over our f32 decode, and
its batch-1 fraction of the floor computed from the int8 bytes. transformers runs its default attention (sdpa),
dots_jax the --attention-backend (default auto). Prints a table and writes JSON.

    python benchmarks/generate_cpu.py [--configs small,large] [--prefill-tokens 512,4096]
                                      [--attention-backend auto] [--out benchmarks/results/generate_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# tests/oracle.py builds the reference models and sets no XLA flags (the test suite's own set-up does, for the whole
# process): a benchmark must measure the optimised build users run.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oracle import hf_config, hf_model, save  # noqa: E402
from results_io import write_results  # noqa: E402  (benchmarks/ is on sys.path: scripts run from it)

import dots_jax  # noqa: E402
from dots_jax.inference.generate import bucket_length, generate  # noqa: E402
from dots_jax.ops.attention import BACKENDS, default_backend  # noqa: E402

CONFIGS = {
    # ~90M parameters: hidden 512, 6 layers, 32 experts, top-6, 2 shared.
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, moe_intermediate_size=176,
                  num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32,
                  num_experts_per_tok=6, n_shared_experts=2, routed_scaling_factor=2.5),
    # ~608M parameters: hidden 1024, 8 layers, 64 experts, top-6, 2 shared.
    "large": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=352,
                  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                  num_experts_per_tok=6, n_shared_experts=2, routed_scaling_factor=2.5),
}
DECODE_TOKENS = 32
MAX_POSITIONS = 8192  # room for the longest prefill row


def machine_facts(bandwidth: float) -> dict:
    """What a results file records of the machine and the software, and the load average as the run starts
    (other processes slow every side of a comparison alike only roughly)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "copy_bandwidth_GB_s": bandwidth / 1e9,
            "loadavg_1_5_15_start": list(os.getloadavg())}


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes/s of a large memory copy (read + write counted), the best of a few runs."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def active_weight_bytes(cfg: transformers.Dots1Config, itemsize: int = 4, int8: bool = False) -> int:
    """Weights one token reads: every non-expert weight, top-k routed experts per MoE layer, one embedding row.
    int8: the linear layers' weights one byte each plus an f32 scale per output channel (router, embedding row
    and LM head in `itemsize`)."""
    h, n, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = h // n
    width, dense_width = cfg.moe_intermediate_size, cfg.intermediate_size
    dense_layers = cfg.first_k_dense_replace
    moe_layers = cfg.num_hidden_layers - dense_layers
    experts = cfg.num_experts_per_tok + cfg.n_shared_experts  # each of the shared ones as wide as a routed one
    linear = (cfg.num_hidden_layers * h * d * (2 * n + 2 * kv) + dense_layers * 3 * h * dense_width
              + moe_layers * experts * 3 * h * width)
    scales = (cfg.num_hidden_layers * (n * d + 2 * kv * d + h) + dense_layers * (2 * dense_width + h)
              + moe_layers * experts * (2 * width + h))
    other = moe_layers * h * cfg.n_routed_experts + cfg.vocab_size * h + h
    if int8:
        return linear + 4 * scales + other * itemsize
    return (linear + other) * itemsize


def timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up: compile / first-call overheads excluded
    return min(_once(fn) for _ in range(repeats))


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_config(name: str, overrides: dict, bandwidth: float, prefill_tokens: list[int],
                 attention_backend: str) -> dict:
    cfg = hf_config(**overrides, max_position_embeddings=MAX_POSITIONS)
    ref = hf_model(cfg, bias_std=0.01)
    ref.set_attn_implementation("sdpa")  # the oracle's builder picks eager; users get transformers' default
    params = sum(p.numel() for p in ref.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = save(ref, Path(tmp) / name)
        ours = dots_jax.from_pretrained(path, dtype=jnp.float32, attention_backend=attention_backend,
                                        progress=False)
        ours_int8 = dots_jax.from_pretrained(path, dtype=jnp.float32, attention_backend=attention_backend,
                                             progress=False, quantize="int8")
    rng = np.random.default_rng(0)
    row = {"config": name, "params_M": round(params / 1e6, 1), "attention_backend": attention_backend,
           "attn_implementation": ref.config._attn_implementation}

    # Same greedy tokens (the speed of a wrong answer is worth nothing).
    prompt = rng.integers(0, cfg.vocab_size, size=(1, 24)).tolist()
    mine = generate(ours, prompt, max_new_tokens=16, stop_token_ids=[]).tokens[0]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(prompt), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 24:]
    row["greedy_tokens_equal"] = mine == theirs.tolist()

    for n in prefill_tokens:
        long_prompt = rng.integers(0, cfg.vocab_size, size=(1, n)).tolist()
        ours_prefill = timed(lambda p=long_prompt: generate(ours, p, max_new_tokens=1, stop_token_ids=[]))
        with torch.no_grad():
            # As transformers' generate() prefills: the LM head on the last position only (ours does the same).
            ref_prefill = timed(lambda p=long_prompt: ref(torch.tensor(p), logits_to_keep=1))
        row[f"prefill_{n}_tok_s"] = {"ours": n / ours_prefill, "ref": n / ref_prefill}
        if attention_backend == "auto":  # what auto picks for the prompt's queries against generate()'s cache
            s = bucket_length(n)
            row[f"prefill_{n}_attention_backend"] = default_backend(s, s + bucket_length(1))
        print(f"[{name}] prefill {n}: ours {n / ours_prefill:.1f} tok/s, ref {n / ref_prefill:.1f} tok/s", flush=True)

    def decode_s(model, prompts: list[list[int]]) -> float:
        # Decode time = (prefill + N tokens) - (prefill + 1 token), so the prompt does not count.
        return (timed(lambda: generate(model, prompts, max_new_tokens=DECODE_TOKENS + 1, stop_token_ids=[]))
                - timed(lambda: generate(model, prompts, max_new_tokens=1, stop_token_ids=[])))

    for batch in (1, 8):
        prompts = rng.integers(0, cfg.vocab_size, size=(batch, 16)).tolist()
        t_ours = decode_s(ours, prompts)
        t_int8 = decode_s(ours_int8, prompts)
        ids = torch.tensor(prompts)
        with torch.no_grad():
            def hf_gen(n: int, ids: torch.Tensor = ids):
                return lambda: ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            t_ref = timed(hf_gen(DECODE_TOKENS + 1)) - timed(hf_gen(1))
        row[f"decode_b{batch}_tok_s"] = {"ours": batch * DECODE_TOKENS / t_ours, "ref": batch * DECODE_TOKENS / t_ref}
        row[f"decode_b{batch}_int8_tok_s"] = batch * DECODE_TOKENS / t_int8
        row[f"decode_b{batch}_int8_over_f32"] = t_ours / t_int8
        print(f"[{name}] decode b{batch}: ours {batch * DECODE_TOKENS / t_ours:.1f} tok/s (int8 weights "
              f"{batch * DECODE_TOKENS / t_int8:.1f}), ref {batch * DECODE_TOKENS / t_ref:.1f} tok/s", flush=True)

    floor = bandwidth / active_weight_bytes(cfg)
    row["decode_b1_floor_tok_s"] = floor
    row["decode_b1_fraction_of_floor"] = row["decode_b1_tok_s"]["ours"] / floor
    floor_int8 = bandwidth / active_weight_bytes(cfg, int8=True)
    row["decode_b1_int8_floor_tok_s"] = floor_int8
    row["decode_b1_int8_fraction_of_floor"] = row["decode_b1_int8_tok_s"] / floor_int8
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="small,large")
    parser.add_argument("--prefill-tokens", default="512,4096", help="comma-separated prompt lengths")
    parser.add_argument("--attention-backend", choices=["auto", *sorted(BACKENDS)], default="auto",
                        help="dots_jax's attention (auto: dots_jax.ops.attention's choice for the shape)")
    parser.add_argument("--out", default="benchmarks/results/generate_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    bandwidth = copy_bandwidth()
    machine = {**machine_facts(bandwidth), "device": str(jax.devices()[0])}
    prefill_tokens = [int(n) for n in args.prefill_tokens.split(",")]
    if max(prefill_tokens) + 1 > MAX_POSITIONS:
        parser.error(f"--prefill-tokens: at most {MAX_POSITIONS - 1}")
    rows = [bench_config(name, CONFIGS[name], bandwidth, prefill_tokens, args.attention_backend)
            for name in args.configs.split(",")]
    machine["loadavg_1_5_15_end"] = list(os.getloadavg())

    print(f"machine: {machine['processor']}, {machine['cpus']} cpus, copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"load average {machine['loadavg_1_5_15_start'][0]:.1f} -> {machine['loadavg_1_5_15_end'][0]:.1f}")
    header = f"{'config':8} {'params':>7} {'same':>5} {'phase':>12} {'ours tok/s':>11} {'ref tok/s':>10} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        for phase in (*(f"prefill_{n}" for n in prefill_tokens), "decode_b1", "decode_b8"):
            r = row[f"{phase}_tok_s"]
            print(f"{row['config']:8} {row['params_M']:>6}M {row['greedy_tokens_equal']!s:>5} {phase:>12} "
                  f"{r['ours']:>11.1f} {r['ref']:>10.1f} {r['ours'] / r['ref']:>6.2f}")
        print(f"{'':8} batch-1 bandwidth floor {row['decode_b1_floor_tok_s']:.1f} tok/s; "
              f"ours = {100 * row['decode_b1_fraction_of_floor']:.0f}% of it")
        for batch in (1, 8):
            print(f"{'':8} int8 weights, decode b{batch}: {row[f'decode_b{batch}_int8_tok_s']:.1f} tok/s = "
                  f"{row[f'decode_b{batch}_int8_over_f32']:.2f}x ours in f32")
        print(f"{'':8} int8 batch-1 bandwidth floor {row['decode_b1_int8_floor_tok_s']:.1f} tok/s (int8 bytes); "
              f"ours = {100 * row['decode_b1_int8_fraction_of_floor']:.0f}% of it")
    print(f"wrote {write_results(args.out, {'machine': machine, 'results': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
