"""Training-step throughput: dots_jax vs transformers + torch (forward, backward, AdamW), same weights, one run.

For each config: one random dots1 model built by transformers (its own init) is saved with save_pretrained and
loaded into dots_jax, so both sides train the very same f32 weights on the very same batch with the same optimizer
(gradient clipping to global norm 1.0, then AdamW with betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on the
matrices only, constant learning rate). The first-step losses must agree (printed; the run fails if they differ by
more than 1e-4), otherwise the comparison is not apples to apples.

Timed (after warm-up / compilation; median of --steps runs, the two implementations interleaved run by run so that
load from other processes hits both alike):
  step       the whole training step (jit_train_step for dots_jax; zero_grad, forward, backward, clip, AdamW.step)
  forward    the loss only (no gradients)
  fwd+bwd    the loss and all gradients
  optimizer  clip + AdamW update on given gradients
and fwd+bwd of sub-blocks on the same random activations [batch, seq, hidden], times the layers of that kind:
  MoE (router, routed and shared experts), attention (q/k/v/o, q/k norm, RoPE, softmax), dense MLP, and the head
  (final norm, LM head, cross-entropy). "other" is fwd+bwd minus their sum (embedding, residuals, layer norms,
  routing statistics, layer loop).

The attention row also times dots_jax's attention block with the other backends of --compare-attention (default
flash and reference, less the one the run uses) on the same weights and activations, beside transformers' sdpa.

dots_jax runs its CPU defaults (moe_backend auto = the "loop" grouped matmul with its custom VJP; attention_backend
as --attention-backend, default auto); transformers runs its defaults (sdpa attention, grouped_mm experts). XLA:CPU
uses all cores; torch gets torch.set_num_threads(os.cpu_count()), stated in the output. Every config runs at every
batch x seq shape of --shapes (default 8x256 and 2x2048). Prints a table and writes JSON.

    python benchmarks/train_cpu.py [--quick] [--steps N] [--configs small,medium] [--shapes 8x256,2x2048]
                                   [--attention-backend auto] [--compare-attention flash,reference]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from results_io import write_results  # noqa: E402  (benchmarks/ is on sys.path: scripts run from it)

import dots_jax  # noqa: E402
from dots_jax import training as train  # noqa: E402
from dots_jax.model.attention import rope_tables  # noqa: E402
from dots_jax.ops.attention import BACKENDS, NO_WINDOW, default_backend  # noqa: E402
from dots_jax.ops.head_loss import head_nll  # noqa: E402
from dots_jax.parallel.cpu_tuning import tune_allocator  # noqa: E402

CONFIGS = {
    # The shape of configs/demo.json (~9M parameters): hidden 256, 4 layers (1 dense), 16 experts top-2, 1 shared.
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
                  num_experts_per_tok=2, n_shared_experts=1),
    # ~90M parameters: hidden 512, 6 layers (1 dense), 32 experts top-6, 2 shared (generate_cpu.py's "small").
    "medium": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, moe_intermediate_size=176,
                   num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32,
                   num_experts_per_tok=6, n_shared_experts=2),
    # ~608M parameters: hidden 1024, 8 layers (1 dense), 64 experts top-6, 2 shared (slow on a small CPU).
    "large": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=352,
                  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                  num_experts_per_tok=6, n_shared_experts=2),
}
COMMON = dict(first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
              rms_norm_eps=1e-5, max_position_embeddings=2048, sliding_window=None, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0
LOSS_TOLERANCE = 1e-4


def interleaved(fns: dict[str, Callable[[], None]], runs: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each fn; the fns take turns, run by run, so that outside load hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ================================================================================================ shared setup
def reference_train_config() -> train.TrainConfig:
    """dots_jax's side of the reference's optimizer: a constant learning rate, no balance loss and no bias update
    (the reference has neither)."""
    return train.TrainConfig(learning_rate=LR, total_steps=10**6, warmup_steps=0, decay_steps=0, b1=BETAS[0],
                             b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY, grad_clip=CLIP, balance_loss_coef=0.0,
                             bias_update_rate=0.0)


def next_token_batch(ids: np.ndarray) -> train.Batch:
    """The batch the reference trains on with labels=ids: each position predicts the next; the last has none."""
    mask = np.ones(ids.shape, np.float32)
    mask[:, -1] = 0
    return jax.device_put(train.Batch(jnp.asarray(ids), jnp.asarray(np.roll(ids, -1, axis=1)), jnp.asarray(mask)))


def torch_adamw(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
    """(all parameters, AdamW) with weight decay on the matrices only, as dots_jax's optimizer. fused=True: torch's
    fastest AdamW on CPU and GPU (one kernel over all tensors)."""
    params = dict(model.named_parameters())
    decay = [p for n, p in params.items() if p.ndim >= 2 and not n.endswith("bias")]
    no_decay = [p for n, p in params.items() if not (p.ndim >= 2 and not n.endswith("bias"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS, fused=True)
    return list(params.values()), opt


# ================================================================================================ dots_jax side
class Ours:
    def __init__(self, path: Path, ids: np.ndarray, x: np.ndarray, attention_backend: str,
                 compare_attention: list[str]):
        self.model = dots_jax.from_pretrained(path, dtype=jnp.float32, attention_backend=attention_backend,
                                              progress=False)
        self.cfg = self.model.cfg
        self.tc = tc = reference_train_config()
        self.batch = next_token_batch(ids)
        self.graphdef, state = train.init_state(self.model, tc)
        self.state = jax.device_put(state, jax.devices()[0])
        gd = self.graphdef

        def loss(params, router_bias, batch):
            return train.loss_fn(params, router_bias, gd, batch, tc.balance_loss_coef)

        self._loss = jax.jit(lambda p, rb, b: loss(p, rb, b)[0])
        self._grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
        opt = train.make_optimizer(tc)

        def update(grads, opt_state, params):
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        self._update = jax.jit(update, donate_argnums=(1, 2))
        self.grads = None
        self._blocks(x, compare_attention)

    def first_loss(self) -> float:
        return float(self._loss(self.state.params, self.state.router_bias, self.batch))

    def forward(self) -> None:
        self._loss(self.state.params, self.state.router_bias, self.batch).block_until_ready()

    def fwd_bwd(self) -> None:
        (_, _), self.grads = self._grad(self.state.params, self.state.router_bias, self.batch)
        jax.block_until_ready(self.grads)

    def optimizer(self) -> None:
        if self.grads is None:
            self.fwd_bwd()
        if not hasattr(self, "_opt_params"):
            # Copies to update in place of the state's (the update donates them; the state stays for the step).
            self._opt_params = jax.tree.map(jnp.copy, self.state.params)
            self._opt_state = jax.tree.map(jnp.copy, self.state.opt_state)
        self._opt_params, self._opt_state = self._update(self.grads, self._opt_state, self._opt_params)
        jax.block_until_ready(self._opt_params)

    def step(self) -> None:
        self.state, metrics = train.jit_train_step(self.graphdef, self.tc, self.state, self.batch)
        metrics["loss"].block_until_ready()
        self.last_loss = metrics["loss"]

    # ---------------------------------------------------------------------------------------- sub-blocks
    def _blocks(self, x_np: np.ndarray, compare_attention: list[str]) -> None:
        """Jitted fwd+bwd (w.r.t. parameters and input) of one layer's MoE, attention and dense MLP, and of the
        head, on activations x [B, S, H]; the same attention layer with each compare_attention backend too."""
        cfg = self.cfg
        x = jnp.asarray(x_np)
        b, s, _ = x.shape
        ct = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape, np.float32))
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        valid = jnp.ones((b, s), jnp.bool_)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, jnp.float32)
        mask = (positions, positions, valid)

        def layer(stack):
            gd, st = nnx.split(stack)
            return nnx.merge(gd, jax.tree.map(lambda a: a[0], st))

        def vjp_fn(module, apply, *args):
            # Everything is an argument, nothing a closed-over constant (XLA would fold those at compile time).
            gd, params, rest = nnx.split(module, nnx.Param, ...)

            def f(params, x, ct, *args):
                return jnp.vdot(apply(nnx.merge(gd, params, rest), x, *args), ct)

            grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
            return lambda: jax.block_until_ready(grad(params, x, ct, *args))

        self.blocks = {}
        if self.model.moe_layers is not None:
            moe_layer = layer(self.model.moe_layers)
            self.blocks["moe"] = vjp_fn(moe_layer.mlp, lambda m, x, valid: m(x, valid)[0], valid)
            attn_layer = moe_layer
        if self.model.dense_layers is not None:
            dense_layer = layer(self.model.dense_layers)
            self.blocks["dense_mlp"] = vjp_fn(dense_layer.mlp, lambda m, x: m(x))
            attn_layer = dense_layer
        # The window and q_offset stay Python ints, as the model passes them (full attention, slots = positions).
        def attend(m, x, *a):
            return m(x, *a, NO_WINDOW, 0)[0]

        self.blocks["attention"] = vjp_fn(attn_layer.self_attn, attend, cos, sin, *mask)
        for backend in compare_attention:
            other = nnx.clone(attn_layer.self_attn)
            other.backend = backend
            self.blocks[f"attention {backend}"] = vjp_fn(other, attend, cos, sin, *mask)

        targets, loss_mask = self.batch.targets, self.batch.loss_mask
        norm_gd, norm_params = nnx.split(self.model.norm)
        head_params = {"norm": norm_params, "lm_head": self.model.lm_head[...]}

        def head_loss(params, x, targets, loss_mask):  # as train.loss_fn: the final norm, then the fused head loss
            h = nnx.merge(norm_gd, params["norm"])(x)
            nll = head_nll(h.reshape(-1, h.shape[-1]), params["lm_head"], targets.reshape(-1))
            return (nll.reshape(targets.shape) * loss_mask).sum() / loss_mask.sum()

        head_grad = jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1)))
        self.blocks["head"] = lambda: jax.block_until_ready(head_grad(head_params, x, targets, loss_mask))


# ================================================================================================ reference side
class Reference:
    def __init__(self, model: transformers.Dots1ForCausalLM, ids: np.ndarray, x: np.ndarray):
        self.model = model.train()
        self.cfg = model.config
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.params, self.opt = torch_adamw(model)
        self._blocks(x)

    def loss(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, labels=self.ids, use_cache=False).loss

    def first_loss(self) -> float:
        with torch.no_grad():
            return float(self.loss())

    def forward(self) -> None:
        with torch.no_grad():
            self.loss()

    def fwd_bwd(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()

    def optimizer(self) -> None:
        if self.params[0].grad is None:
            self.fwd_bwd()
        # The update changes the weights; timing is all that is wanted here (the step timing comes after).
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()
        self.last_loss = loss.detach()

    def _blocks(self, x_np: np.ndarray) -> None:
        cfg, model = self.cfg, self.model
        layers = model.model.layers
        k = cfg.first_k_dense_replace
        # Capture the attention kwargs the model itself passes (position embeddings, mask) in one forward.
        captured = {}

        def hook(module, args, kwargs):
            captured.setdefault("kwargs", {n: kwargs[n] for n in ("position_embeddings", "attention_mask")})

        handle = layers[-1].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
        with torch.no_grad():
            self.loss()
        handle.remove()
        attn_kwargs = captured["kwargs"]
        ct = torch.from_numpy(np.random.default_rng(1).standard_normal(x_np.shape, np.float32))
        labels = self.ids

        def vjp_fn(apply, params):
            def run():
                for p in params:
                    p.grad = None
                x = torch.from_numpy(x_np).requires_grad_(True)
                out = apply(x)
                (out * ct).sum().backward()
            return run

        self.blocks = {}
        if cfg.num_hidden_layers > k:
            moe = layers[k].mlp
            self.blocks["moe"] = vjp_fn(moe, list(moe.parameters()))
        if k:
            dense = layers[0].mlp
            self.blocks["dense_mlp"] = vjp_fn(dense, list(dense.parameters()))
        attn = layers[-1].self_attn
        self.blocks["attention"] = vjp_fn(lambda x: attn(x, **attn_kwargs)[0], list(attn.parameters()))
        norm, head = model.model.norm, model.lm_head

        def head_loss(x):
            logits = head(norm(x))
            return model.loss_function(logits, labels, vocab_size=cfg.vocab_size)

        def run_head():
            for p in (*norm.parameters(), *head.parameters()):
                p.grad = None
            x = torch.from_numpy(x_np).requires_grad_(True)
            head_loss(x).backward()

        self.blocks["head"] = run_head


# ================================================================================================ driver
def bench_config(name: str, batch: int, seq: int, runs: int, attention_backend: str,
                 compare_attention: list[str]) -> dict:
    cfg = transformers.Dots1Config(**{**COMMON, **CONFIGS[name], "max_position_embeddings": max(2048, seq)})
    torch.manual_seed(0)
    ref_model = transformers.Dots1ForCausalLM(cfg)  # transformers' own init (std 0.02), f32
    params = sum(p.numel() for p in ref_model.parameters())
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(batch, seq), dtype=np.int32)
    x = rng.standard_normal((batch, seq, cfg.hidden_size), np.float32)  # sub-block activations (unit RMS)
    resolved = default_backend(seq, seq) if attention_backend == "auto" else attention_backend
    with tempfile.TemporaryDirectory() as tmp:
        ref_model.save_pretrained(Path(tmp) / name)
        ours = Ours(Path(tmp) / name, ids, x, attention_backend, [b for b in compare_attention if b != resolved])
    ref = Reference(ref_model, ids, x)
    tokens = batch * seq

    loss_ours, loss_ref = ours.first_loss(), ref.first_loss()
    row = {"config": name, "params_M": round(params / 1e6, 1), "batch": batch, "seq": seq, "tokens": tokens,
           "first_loss": {"ours": loss_ours, "ref": loss_ref, "abs_diff": abs(loss_ours - loss_ref)},
           "experts_implementation": ref_model.config._experts_implementation,
           "attn_implementation": ref_model.config._attn_implementation, "moe_backend": "auto (loop on CPU)",
           "attention_backend": f"{attention_backend} ({resolved})" if attention_backend == "auto" else resolved}
    print(f"[{name}] {params / 1e6:.1f}M params, batch {batch}x{seq}, attention {row['attention_backend']}; "
          f"first-step loss ours {loss_ours:.6f} "
          f"ref {loss_ref:.6f} (|diff| {abs(loss_ours - loss_ref):.2e})", flush=True)
    if not abs(loss_ours - loss_ref) <= LOSS_TOLERANCE:
        raise SystemExit(f"first-step losses differ by more than {LOSS_TOLERANCE}: not the same computation")

    load = [os.getloadavg()[0]]
    pieces = {}
    for piece in ("forward", "fwd_bwd", "optimizer"):
        t = interleaved({"ours": getattr(ours, piece), "ref": getattr(ref, piece)}, runs)
        pieces[piece] = {k: 1e3 * v for k, v in t.items()}
        print(f"[{name}] {piece}: ours {pieces[piece]['ours']:.1f} ms, ref {pieces[piece]['ref']:.1f} ms", flush=True)
    counts = {"moe": cfg.num_hidden_layers - cfg.first_k_dense_replace, "dense_mlp": cfg.first_k_dense_replace,
              "attention": cfg.num_hidden_layers, "head": 1}
    blocks, attention_ms = {}, {}
    for block, count in counts.items():
        if block in ours.blocks:
            fns = {"ours": ours.blocks[block], "ref": ref.blocks[block]}
            if block == "attention":
                fns.update({b: fn for b, fn in ours.blocks.items() if b.startswith("attention ")})
            t = {k: 1e3 * v * count for k, v in interleaved(fns, runs).items()}
            blocks[block] = {"ours": t["ours"], "ref": t["ref"]}
            print(f"[{name}] {block} (x{count}) fwd+bwd: ours {t['ours']:.1f} ms, ref {t['ref']:.1f} ms"
                  + "".join(f", ours with {b[len('attention '):]} {ms:.1f} ms" for b, ms in t.items()
                            if b.startswith("attention ")), flush=True)
            if block == "attention":
                attention_ms = {resolved: t["ours"], "transformers sdpa": t["ref"]}
                attention_ms.update({b[len("attention "):]: ms for b, ms in t.items() if b.startswith("attention ")})
    blocks["other"] = {k: pieces["fwd_bwd"][k] - sum(b[k] for b in blocks.values()) for k in ("ours", "ref")}
    load.append(os.getloadavg()[0])

    # The full step last: it donates (dots_jax) / updates (torch) the weights.
    t = interleaved({"ours": ours.step, "ref": ref.step}, runs, warmup=2)
    load.append(os.getloadavg()[0])
    row["step_ms"] = {k: 1e3 * v for k, v in t.items()}
    row["tokens_per_s"] = {k: tokens / v for k, v in t.items()}
    row["ratio"] = row["tokens_per_s"]["ours"] / row["tokens_per_s"]["ref"]
    row["pieces_ms"] = pieces
    row["fwd_bwd_breakdown_ms"] = blocks
    row["attention_fwd_bwd_ms_by_backend"] = attention_ms
    row["load_average_1min"] = load
    print(f"[{name}] step: ours {row['step_ms']['ours']:.1f} ms, ref {row['step_ms']['ref']:.1f} ms "
          f"(ratio {row['ratio']:.2f})", flush=True)
    return row


def print_table(rows: list[dict], machine: dict) -> None:
    print(f"\nmachine: {machine['processor']}, {machine['cpus']} cpus; threads: XLA:CPU all cores (default), "
          f"torch.set_num_threads({machine['torch_threads']}); load average at start {machine['load_start']}")
    header = f"{'config':7} {'params':>7} {'batch':>7} {'ours tok/s':>11} {'ref tok/s':>10} {'ratio':>6} " \
             f"{'loss diff':>9} {'load':>5}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:7} {r['params_M']:>6}M {r['batch']:>2}x{r['seq']:<4} {r['tokens_per_s']['ours']:>11.0f} "
              f"{r['tokens_per_s']['ref']:>10.0f} {r['ratio']:>6.2f} {r['first_loss']['abs_diff']:>9.1e} "
              f"{max(r['load_average_1min']):>5.2f}")
    for r in rows:
        print(f"\n{r['config']} {r['batch']}x{r['seq']}, attention {r['attention_backend']}: where the time goes "
              "(ms per step, median)")
        print(f"  {'component':28} {'ours':>9} {'reference':>10} {'ratio':>6}")
        lines = [("step (fwd + bwd + optimizer)", r["step_ms"])]
        lines += [(f"  {p}", r["pieces_ms"][p]) for p in ("forward", "fwd_bwd", "optimizer")]
        lines += [(f"    fwd+bwd: {b}", v) for b, v in r["fwd_bwd_breakdown_ms"].items()]
        for label, v in lines:
            ratio = v["ref"] / v["ours"] if v["ours"] > 0 else float("nan")
            print(f"  {label:28} {v['ours']:>9.1f} {v['ref']:>10.1f} {ratio:>6.2f}")
        sdpa = r["attention_fwd_bwd_ms_by_backend"]["transformers sdpa"]
        for backend, ms in r["attention_fwd_bwd_ms_by_backend"].items():
            print(f"    attention fwd+bwd, {backend:17} {ms:>9.1f} ms   sdpa / it {sdpa / ms:>5.2f}")
        print("  (ratio = reference time / ours: > 1 means dots_jax is faster)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small config only, 3 timed runs, shape 4x128")
    parser.add_argument("--steps", type=int, default=None, help="timed runs per measurement (default 5, quick 3)")
    parser.add_argument("--configs", default="small", help=f"comma-separated, of {sorted(CONFIGS)}")
    parser.add_argument("--shapes", default="8x256,2x2048", help="comma-separated batch x seq shapes")
    parser.add_argument("--attention-backend", choices=["auto", *sorted(BACKENDS)], default="auto",
                        help="dots_jax's attention (auto: dots_jax.ops.attention's choice for the shape)")
    parser.add_argument("--compare-attention", default="flash,reference",
                        help="comma-separated backends also timed on the attention block alone, on the same "
                             "weights (the run's own is skipped; none: no others)")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                        help="torch intra-op threads (default os.cpu_count(): all cores, as XLA:CPU uses)")
    parser.add_argument("--out", default="benchmarks/results/train_cpu.json")
    args = parser.parse_args()
    runs = args.steps or (3 if args.quick else 5)
    shapes = []
    for shape in ("4x128" if args.quick else args.shapes).split(","):
        batch, _, seq = shape.partition("x")
        if not (batch.isdigit() and seq.isdigit()):
            parser.error(f"--shapes wants batch x seq pairs such as 8x256,2x2048, got {args.shapes!r}")
        shapes.append((int(batch), int(seq)))
    configs = ["small"] if args.quick else args.configs.split(",")
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"unknown config {c!r}; known: {sorted(CONFIGS)}")

    tune_allocator()  # as the dots_jax CLIs do (glibc malloc thresholds; the process's torch shares it)
    torch.set_num_threads(args.torch_threads)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
               "transformers": transformers.__version__, "device": str(jax.devices()[0]),
               "torch_threads": torch.get_num_threads(), "xla_threads": "all cores (XLA:CPU default)",
               "load_start": round(os.getloadavg()[0], 2), "timed_runs": runs}
    compare = [b for b in args.compare_attention.split(",") if b and b != "none"]
    for b in compare:
        if b not in BACKENDS:
            parser.error(f"--compare-attention: unknown backend {b!r}; known: {sorted(BACKENDS)}")
    rows = [bench_config(name, batch, seq, runs, args.attention_backend, compare)
            for name in configs for batch, seq in shapes]
    machine["load_end"] = round(os.getloadavg()[0], 2)
    print_table(rows, machine)

    print(f"wrote {write_results(args.out, {'machine': machine, 'results': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
