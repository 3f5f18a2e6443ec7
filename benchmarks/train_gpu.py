"""Training-step throughput on a GPU: dots_jax vs transformers + torch (forward, backward, AdamW), same weights.

    python benchmarks/train_gpu.py [--configs medium,gpu700m] [--batch 8] [--seq-len 1024] [--steps 10]

The GPU counterpart of benchmarks/train_cpu.py (same optimizer: clip to global norm 1.0, AdamW betas (0.9, 0.95),
eps 1e-8, weight decay 0.1 on matrices, constant learning rate; no balance loss, no bias update). Both sides keep
f32 master weights and compute in bf16: dots_jax loads with dtype=bfloat16, param_dtype=float32; torch runs the
model under torch.autocast(bfloat16). One random model written by transformers is loaded into both. The first-step
losses are printed and must agree to 5e-2 (bf16 rounding differs between the two), else the run stops.

Timed after warm-up and compilation, the median of --steps runs of each, interleaved run by run, each run ending
in a device sync: the whole step, and forward + backward alone. dots_jax runs its default MoE backend on GPU
(--moe-backend to choose: ragged_dot, pallas); transformers its defaults (sdpa attention, its experts
implementation, recorded in the JSON). Needs a GPU: exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cuda,cpu")  # before train_cpu's import sets its CPU default
# JAX's allocator takes 75% of the GPU by default and never gives memory back; torch needs its share beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from results_io import write_results  # noqa: E402  (benchmarks/ is on sys.path: scripts run from it)
from train_cpu import CLIP, COMMON, CONFIGS, interleaved, next_token_batch, reference_train_config, torch_adamw  # noqa: E402

import dots_jax  # noqa: E402
from dots_jax import training as train  # noqa: E402

GPU_CONFIGS = {
    **CONFIGS,
    # ~0.7B parameters: hidden 1536, 8 layers (1 dense), 32 experts of 512 top-6, 2 shared. Both implementations
    # hold f32 weights, gradients and AdamW state in one process on one GPU: a 1.3B model did not fit an 80 GB H100
    # twice over (torch ran out of memory beside JAX).
    "gpu700m": dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, moe_intermediate_size=512,
                    num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12, n_routed_experts=32,
                    num_experts_per_tok=6, n_shared_experts=2),
}
LOSS_TOLERANCE = 5e-2


class Ours:
    def __init__(self, path: Path, ids: np.ndarray, moe_backend: str):
        model = dots_jax.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32, progress=False,
                                         moe_backend=moe_backend)
        self.tc = reference_train_config()
        self.batch = next_token_batch(ids)
        self.graphdef, self.state = train.init_state(model, self.tc)
        gd = self.graphdef
        self._grad = jax.jit(jax.value_and_grad(
            lambda p, rb, b: train.loss_fn(p, rb, gd, b, 0.0), has_aux=True))

    def first_loss(self) -> float:
        (loss, _), _ = self._grad(self.state.params, self.state.router_bias, self.batch)
        return float(loss)

    def fwd_bwd(self) -> None:
        jax.block_until_ready(self._grad(self.state.params, self.state.router_bias, self.batch))

    def step(self) -> None:
        self.state, metrics = train.jit_train_step(self.graphdef, self.tc, self.state, self.batch)
        metrics["loss"].block_until_ready()


class Reference:
    def __init__(self, model: transformers.Dots1ForCausalLM, ids: np.ndarray):
        self.model = model.cuda().train()
        self.ids = torch.from_numpy(ids.astype(np.int64)).cuda()
        self.params, self.opt = torch_adamw(self.model)

    def loss(self) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.model(input_ids=self.ids, labels=self.ids, use_cache=False).loss

    def first_loss(self) -> float:
        with torch.no_grad():
            return float(self.loss())

    def fwd_bwd(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        torch.cuda.synchronize()

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()
        torch.cuda.synchronize()


def bench_config(name: str, batch: int, seq: int, runs: int, moe_backend: str) -> dict:
    cfg = transformers.Dots1Config(**{**COMMON, **GPU_CONFIGS[name]})
    torch.manual_seed(0)
    ref_model = transformers.Dots1ForCausalLM(cfg)
    params = sum(p.numel() for p in ref_model.parameters())
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, seq), dtype=np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        ref_model.save_pretrained(Path(tmp) / name)
        ours = Ours(Path(tmp) / name, ids, moe_backend)
    ref = Reference(ref_model, ids)
    tokens = batch * seq
    loss_ours, loss_ref = ours.first_loss(), ref.first_loss()
    print(f"[{name}] {params / 1e6:.0f}M params, batch {batch}x{seq}; first-step loss ours {loss_ours:.5f} "
          f"ref {loss_ref:.5f}", flush=True)
    if not abs(loss_ours - loss_ref) <= LOSS_TOLERANCE:
        raise SystemExit(f"first-step losses differ by more than {LOSS_TOLERANCE}: not the same computation")
    fwd_bwd = interleaved({"ours": ours.fwd_bwd, "ref": ref.fwd_bwd}, runs, warmup=2)
    step = interleaved({"ours": ours.step, "ref": ref.step}, runs, warmup=2)
    row = {"config": name, "params_M": round(params / 1e6, 1), "batch": batch, "seq": seq, "tokens": tokens,
           "moe_backend": moe_backend, "first_loss": {"ours": loss_ours, "ref": loss_ref},
           "experts_implementation": ref_model.config._experts_implementation,
           "attn_implementation": ref_model.config._attn_implementation,
           "fwd_bwd_ms": {k: 1e3 * v for k, v in fwd_bwd.items()},
           "step_ms": {k: 1e3 * v for k, v in step.items()},
           "tokens_per_s": {k: tokens / v for k, v in step.items()}}
    row["ratio"] = row["tokens_per_s"]["ours"] / row["tokens_per_s"]["ref"]
    print(f"[{name}] step ours {row['step_ms']['ours']:.1f} ms, ref {row['step_ms']['ref']:.1f} ms, "
          f"ratio {row['ratio']:.2f}", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="medium,gpu700m", help=f"comma-separated, of {sorted(GPU_CONFIGS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--moe-backend", default="auto", help="dots_jax MoE backend (auto, ragged_dot, pallas)")
    parser.add_argument("--out", default="benchmarks/results/train_gpu.json")
    args = parser.parse_args()
    if jax.default_backend() != "gpu" or not torch.cuda.is_available():
        sys.exit(f"benchmarks/train_gpu.py needs a GPU for both JAX (sees {jax.default_backend()!r}) and torch "
                 f"(cuda available: {torch.cuda.is_available()}); on CPU run benchmarks/train_cpu.py")
    rows = [bench_config(name, args.batch, args.seq_len, args.steps, args.moe_backend)
            for name in args.configs.split(",")]
    machine = {"device": jax.devices()[0].device_kind, "torch_device": torch.cuda.get_device_name(),
               "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
               "platform": platform.platform(), "timed_runs": args.steps}
    print(f"\n{machine['device']}; jax {machine['jax']}, torch {machine['torch']}, transformers "
          f"{machine['transformers']}; bf16 compute, f32 master weights")
    header = f"{'config':7} {'params':>7} {'batch':>8} {'backend':>10} {'ours tok/s':>11} {'ref tok/s':>10} " \
             f"{'ratio':>6} {'fwd+bwd ratio':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        fb = r["fwd_bwd_ms"]["ref"] / r["fwd_bwd_ms"]["ours"]
        print(f"{r['config']:7} {r['params_M']:>6.0f}M {r['batch']:>3}x{r['seq']:<4} {r['moe_backend']:>10} "
              f"{r['tokens_per_s']['ours']:>11.0f} {r['tokens_per_s']['ref']:>10.0f} {r['ratio']:>6.2f} {fb:>13.2f}")
    print(f"wrote {write_results(args.out, {'machine': machine, 'results': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
