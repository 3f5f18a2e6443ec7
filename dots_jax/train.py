"""`python -m dots_jax.train`: train or fine-tune a dots1 model on text files (the loop around dots_jax.training's
step).

  python -m dots_jax.train --config tiny --data corpus/ --steps 200 --batch 8 --seq-len 128 --out runs/tiny
  python -m dots_jax.train --init ./dots-checkpoint --tokenizer ./dots-checkpoint --data notes.txt --steps 50 \\
      --lr 1e-5 --out runs/ft
  python -m dots_jax.train --config tiny --data corpus/ --steps 200 --batch 8 --seq-len 128 --out runs/tiny \\
      --resume  # after Ctrl-C: continues exactly where it stopped
  python -m dots_jax.train --init ./dots-checkpoint --tokenizer ./dots-checkpoint --data notes.txt --steps 200 \\
      --lora-rank 16 --lora-targets attn,experts --lr 1e-4 --out runs/lora  # LoRA: the base stays frozen

Writes into --out: checkpoints/<step>/ (Orbax; the newest few are kept), metrics.jsonl (one JSON object per step,
plus eval records), loss_curve.png and hf/ (the final model as an HF checkpoint: config.json + model.safetensors).
A checkpoint is saved every --save-every steps, at the end, and on Ctrl-C (SIGINT) or SIGTERM, after the step
in progress. --resume continues from the newest checkpoint exactly as if the run had not stopped (same data order
and learning-rate schedule; bit for bit on CPU): the settings that define the run (--steps, --batch, --lr,
--warmup, --decay, ...) must be those it was started with. To train on past --steps, --resume --extend with a
larger --steps lengthens the schedule's stable phase (warmup, peak and decay length stay), before the decay has
begun; for a new schedule, start a new run from the weights: --init <out>/hf. Bad input prints one `error: ...`
line and exits with 2.

LoRA (--lora-rank): low-rank adapters on --init's frozen weights (float in --dtype, or int8 with --quantize int8)
train alone; checkpoints hold the adapters and their optimizer state (on --resume the base is read again from
--init, or the path the run started from, and checked against the checksum the checkpoint records). The run also
writes adapter/ (adapter_config.json + adapter_model.safetensors in PEFT's layout: peft.PeftModel.from_pretrained
applies it to the base in transformers; `from_pretrained(base, lora=...)` and --lora on sample and serve here), and
hf/ is the merged model. The router's correction bias stays as the base has it unless --bias-update-rate is given;
then it changes with training, which hf/ holds and a PEFT adapter cannot, so adapter/ is not written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from dots_jax import cli, files
from dots_jax.config import Dots1Config, preset
from dots_jax.errors import UserError
from dots_jax.inference.tokenizer import Tokenizer
from dots_jax.model.layers import QUANTIZE_MODES
from dots_jax.model.lora import TARGETS, LoraConfig, attach_lora, merge_lora
from dots_jax.model.modeling import random_model
from dots_jax.parallel.cpu_tuning import tune_allocator
from dots_jax.parallel.distributed import is_main_process, maybe_initialize
from dots_jax.parallel.sharding import check_shardable, make_mesh, param_shardings, shard_state, with_shardings
from dots_jax.training import checkpoint
from dots_jax.training.data import (
    BYTE_VOCAB,
    Batch,
    TokenStream,
    eval_batches,
    fingerprint,
    load_tokens,
    split_eval,
)
from dots_jax.training.step import TrainConfig, TrainState, init_state, jit_train_step, load_cv, loss_fn
from dots_jax.weights import from_pretrained, load_config
from dots_jax.weights.hf import export_hf, tokenizer_files
from dots_jax.weights.peft import PEFT_TARGETS, save_adapter, written_targets


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m dots_jax.train", description=__doc__)
    p.add_argument("--config", metavar="PRESET_OR_PATH",
                   help="model config: a preset name from configs/ (e.g. tiny) or an HF config.json (or its "
                        "directory). Not needed with --init or --resume, which carry their own.")
    p.add_argument("--init", metavar="DIR_OR_REPO",
                   help="fine-tune from this dots1 checkpoint (HF directory or repo id, or a converted dots_jax "
                        "checkpoint from convert.hf_to_jax); default: random init from --seed")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="training text: a file, a directory (its *.txt and *.py files) or a glob pattern")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="directory with tokenizer.json or tokenizer.model; default: raw UTF-8 bytes as ids 0..255")
    p.add_argument("--steps", type=int, required=True,
                   help="total optimizer steps; they define the learning-rate schedule (with --resume: the run's "
                        "--steps, or a larger one with --extend)")
    p.add_argument("--batch", type=int, default=8, help="sequences per micro-batch (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--warmup", type=int, help="linear warmup steps (default: 10%% of --steps)")
    p.add_argument("--decay", type=int, help="final linear decay steps, to 0.1 x --lr (default: 20%% of --steps)")
    p.add_argument("--bias-update-rate", type=float,
                   help="auxiliary-loss-free balancing: router bias step per update; 0 turns it off (default 1e-3, "
                        "and 0 with --lora-rank: the base's routers stay as they are)")
    p.add_argument("--balance-loss-coef", type=float, default=1e-4,
                   help="weight of the sequence-wise balance loss (default 1e-4)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (default 1); tokens per step = grad-accum x batch x "
                        "seq-len")
    p.add_argument("--remat", action="store_true",
                   help="recompute each layer's activations in the backward pass: activation memory of one layer "
                        "instead of all, for about one more forward pass of compute (long sequences)")
    p.add_argument("--dtype", choices=cli.COMPUTE_DTYPES, default="float32",
                   help="compute dtype; the master weights and optimizer state are always float32")
    p.add_argument("--lora-rank", type=int, metavar="R",
                   help="LoRA fine-tuning of --init: train rank-R adapters, the base frozen; writes adapter/ (PEFT's "
                        "layout) beside the merged hf/")
    p.add_argument("--lora-alpha", type=float, metavar="A",
                   help="with --lora-rank: the adapters' output is scaled by A / R (default A = R)")
    p.add_argument("--lora-dropout", type=float, metavar="P",
                   help="with --lora-rank: dropout on the adapters' input while training (default 0)")
    p.add_argument("--lora-targets", metavar="LIST",
                   help=f"with --lora-rank: what to adapt, a comma list of {', '.join(TARGETS)} (attention q/k/v/o, "
                        "the dense layers' MLP, the shared experts, the routed experts; default all)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="with --lora-rank: hold the frozen base in int8 (one f32 scale per output channel)")
    p.add_argument("--eval-every", type=int, default=100, help="eval loss every N steps, and at the end")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per eval (default 8)")
    p.add_argument("--eval-fraction", type=float, default=0.05,
                   help="the last fraction of the tokens held out for eval (default 0.05; 0 = no eval)")
    p.add_argument("--save-every", type=int, default=500,
                   help="checkpoint every N steps (default 500); also at the end and on Ctrl-C or SIGTERM")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init and of the data order (default 0)")
    cli.add_moe_backend(p)
    cli.add_attention_backend(p)
    p.add_argument("--mesh", metavar="AXIS=SIZE,...",
                   help="shard the weights, optimizer state and batches over a device mesh with axes data, fsdp, "
                        "expert, tensor, e.g. data=8 or fsdp=4,expert=16 (the sizes multiply to the device count; "
                        "needed with several processes); default: one device")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out, with the settings the run was started with")
    p.add_argument("--extend", action="store_true",
                   help="with --resume: train on to a larger --steps by lengthening the run's stable learning-rate "
                        "phase (its warmup, peak --lr and decay length stay as saved); only before its decay began")
    cli.add_distributed(p, "writes metrics.jsonl, loss_curve.png and hf/ and prints the summary")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Out-of-range values, named by their option (written so that NaN fails too)."""
    for name in ("steps", "batch", "seq_len", "grad_accum", "eval_every", "eval_batches", "save_every", "keep"):
        if not getattr(args, name) >= 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.eval_fraction < 1:
        raise UserError(f"--eval-fraction must lie in [0, 1), got {args.eval_fraction}")
    if args.extend and not args.resume:
        raise UserError("--extend lengthens a saved run: it needs --resume")
    # On --resume, an unset --warmup or --decay means the run's own (adopt_schedule), not a share of --steps.
    args.schedule_given = {"warmup": args.warmup is not None, "decay": args.decay is not None}
    args.warmup = args.steps // 10 if args.warmup is None else args.warmup
    args.decay = args.steps // 5 if args.decay is None else args.decay
    if not (args.warmup >= 0 and args.decay >= 0 and args.warmup + args.decay <= args.steps):
        raise UserError(f"--warmup {args.warmup} and --decay {args.decay} must be >= 0 and fit in --steps "
                        f"{args.steps}")
    args.lora = lora_config(args)
    if args.bias_update_rate is None:
        args.bias_update_rate = 0.0 if args.lora is not None else 1e-3
    if not (args.bias_update_rate >= 0 and args.balance_loss_coef >= 0):
        raise UserError("--bias-update-rate and --balance-loss-coef must be >= 0")
    if args.mesh is not None:
        try:
            args.mesh = make_mesh(args.mesh)
        except ValueError as e:
            raise UserError(f"--mesh {args.mesh}: {e}") from None
    elif jax.process_count() > 1:  # one device's state cannot be one state of every process
        raise UserError(f"{jax.process_count()} processes need --mesh over all their devices, e.g. --mesh "
                        f"data={jax.device_count()}")


def lora_config(args: argparse.Namespace) -> LoraConfig | None:
    """The LoRA settings of the command line (None: full training), each bad value named by its option."""
    given = [f"--{name.replace('_', '-')}" for name in ("lora_alpha", "lora_dropout", "lora_targets", "quantize")
             if getattr(args, name) is not None]
    if args.lora_rank is None:
        if given:
            raise UserError(f"{given[0]} is a LoRA setting: it needs --lora-rank")
        return None
    if not args.lora_rank >= 1:
        raise UserError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise UserError(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    dropout = 0.0 if args.lora_dropout is None else args.lora_dropout
    if not 0 <= dropout < 1:
        raise UserError(f"--lora-dropout must lie in [0, 1), got {dropout}")
    targets = TARGETS
    if args.lora_targets is not None:
        names = [t.strip() for t in args.lora_targets.split(",")]
        unknown = [t for t in names if t not in TARGETS]
        if unknown or not names:
            raise UserError(f"--lora-targets {args.lora_targets!r}: {unknown[0] if unknown else 'empty'} is not a "
                            f"target; give a comma list of {', '.join(TARGETS)}")
        targets = tuple(t for t in TARGETS if t in names)
    if args.init is None and not args.resume:
        raise UserError("--lora-rank adapts a trained model: give it with --init")
    try:
        return LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=dropout, targets=targets)
    except ValueError as e:
        raise UserError(f"--lora-*: {e}") from None


def lora_record(lora: LoraConfig | None, quantize: str | None) -> dict | None:
    """The LoRA settings as the checkpoint's metadata records them (None: full training)."""
    if lora is None:
        return None
    return {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
            "quantize": quantize}


def model_config(args: argparse.Namespace, resume_meta: dict | None) -> Dots1Config:
    """The model config: the checkpoint's on --resume, else --init's, else --config; a --config given as well
    must agree."""
    given = None
    if args.config is not None:
        looks_like_path = args.config.endswith(".json") or "/" in args.config or args.config.startswith(".")
        given = Dots1Config.from_hf(args.config) if looks_like_path else preset(args.config)
    if resume_meta is not None:
        cfg, source = Dots1Config.from_hf(resume_meta["model_config"]), "the checkpoint's"
    elif args.init is not None:
        cfg, source = load_config(args.init), f"--init {args.init}'s"
    elif given is not None:
        return given
    else:
        raise UserError("give --config (a preset such as tiny, or an HF config.json), --init or --resume")
    if given is not None and given != cfg:
        raise UserError(f"--config {args.config} differs from {source} model config; leave --config out")
    return cfg


def load_data(args: argparse.Namespace, cfg: Dots1Config) -> tuple[np.ndarray, list[Path]]:
    """(all tokens of --data, the tokenizer's files to ship with the exported model)."""
    tokenizer, shipped = None, []
    if args.tokenizer is not None:
        try:
            tokenizer = Tokenizer.from_dir(args.tokenizer)
        except (OSError, ValueError) as e:
            raise UserError(f"--tokenizer: {e}") from None
        shipped = tokenizer_files(args.tokenizer)
    elif cfg.vocab_size < BYTE_VOCAB:
        raise UserError(f"byte-level data (no --tokenizer) needs a vocabulary of >= {BYTE_VOCAB}; the model has "
                        f"{cfg.vocab_size}")
    tokens = load_tokens(args.data, tokenizer)
    if tokens.max() >= cfg.vocab_size:
        raise UserError(f"the data encodes to token id {tokens.max()}, outside the model's vocabulary of "
                        f"{cfg.vocab_size}: the tokenizer does not fit the model")
    return tokens, shipped


def adopt_schedule(args: argparse.Namespace, meta: dict) -> None:
    """On --resume, the run's own --warmup and --decay where none is given (a default share of a larger --steps
    would be another schedule)."""
    saved_tc = meta["train_config"]
    for name, field in (("warmup", "warmup_steps"), ("decay", "decay_steps")):
        if not args.schedule_given[name]:
            setattr(args, name, saved_tc[field])


def check_resume(args: argparse.Namespace, meta: dict, fp: str, tc: TrainConfig, out: Path) -> None:
    """What must not change between a run and its resumption: the data position would mean other windows, the
    optimizer state another structure, or the learning-rate schedule (fixed by --steps, --lr, --warmup, --decay)
    another run. Only --extend may raise --steps, and only while the schedule has not begun to decay."""
    data, saved_tc = meta["data"], meta["train_config"]
    checks = [("--data (or --tokenizer): the tokens", data["fingerprint"], fp),
              ("--seq-len", data["seq_len"], args.seq_len), ("--seed", meta["rng"]["seed"], args.seed),
              ("--eval-fraction", data["eval_fraction"], args.eval_fraction),
              ("--grad-accum", saved_tc["grad_accum_steps"], tc.grad_accum_steps),
              ("--batch", data["batch"], args.batch), ("--lr", saved_tc["learning_rate"], tc.learning_rate),
              ("--warmup", saved_tc["warmup_steps"], tc.warmup_steps),
              ("--decay", saved_tc["decay_steps"], tc.decay_steps),
              ("--bias-update-rate", saved_tc["bias_update_rate"], tc.bias_update_rate),
              ("--balance-loss-coef", saved_tc["balance_loss_coef"], tc.balance_loss_coef),
              ("--dtype", meta["dtype"], args.dtype),
              ("the LoRA settings (--lora-rank, --lora-alpha, --lora-dropout, --lora-targets, --quantize)",
               _lora_settings(meta.get("lora")), lora_record(args.lora, args.quantize))]
    for what, saved, now in checks:
        if saved != now:
            raise UserError(f"--resume: {what} differ from the checkpoint's ({saved!r} there, {now!r} now): resume "
                            f"with the run's own setting, or start a new run from its weights with --init {out}/hf")
    saved_steps, step = saved_tc["total_steps"], meta["step"]
    new_run = f"start a new run from its weights with --init {out}/hf and another --out"
    if args.steps == saved_steps:
        return
    if not args.extend:
        raise UserError(f"--resume: --steps {args.steps} differs from the run's --steps {saved_steps}, which fixes "
                        f"its learning-rate schedule: pass --steps {saved_steps} to continue the run, add --extend to "
                        f"lengthen its stable phase to {args.steps} steps, or {new_run}")
    decay_start = saved_steps - saved_tc["decay_steps"]
    if args.steps < saved_steps:
        raise UserError(f"--extend: --steps {args.steps} is below the run's --steps {saved_steps}; --extend only "
                        "lengthens a run")
    if step > decay_start:
        raise UserError(f"--extend: the checkpoint (step {step}) is already in the run's decay (after step "
                        f"{decay_start}), so its stable phase cannot be lengthened; {new_run}")


def adapter_output(model: nnx.Module, directory: Path, base_path: str, tc: TrainConfig) -> str:
    """Write adapter/ (PEFT's layout) where PEFT can apply what was trained; the summary's line about it."""
    lora = model.lora
    if tc.bias_update_rate > 0:
        return ("\nno adapter/: --bias-update-rate changed the routers' correction bias, which a PEFT adapter cannot "
                "hold (hf/ has it)")
    written = written_targets(lora)
    if not written:
        return (f"\nno adapter/: PEFT applies none of the targets {','.join(lora.targets)} to transformers' Dots1 "
                f"(it applies {', '.join(PEFT_TARGETS)}); hf/ is the trained model")
    line = f"\nLoRA adapter (PEFT): {save_adapter(model, directory, base_model_name_or_path=base_path)}"
    left_out = [t for t in lora.targets if t not in written]
    if left_out:
        line += (f" (holds {','.join(written)}; PEFT cannot apply {','.join(left_out)} to transformers' Dots1, so "
                 "their adapters are in hf/ only)")
    return line


def _lora_settings(record: dict | None) -> dict | None:
    """A checkpoint's LoRA record without what identifies the base (compared apart: base_checksum)."""
    return None if record is None else {k: v for k, v in record.items() if k not in ("init", "base_checksum")}


def lora_state(args: argparse.Namespace, tc: TrainConfig, dtype: Any, meta: dict | None, ckpt_dir: Path,
               latest: int | None) -> tuple[nnx.GraphDef, TrainState, dict | None, str, dict]:
    """(graphdef, state, the restored checkpoint's metadata or None, what happened, the LoRA record for the
    checkpoints: settings, base path and base checksum) of a LoRA run:
    the base loaded (from --init, or on --resume from the path the run started from unless --init is given), fresh
    adapters attached, and on --resume the checkpoint's adapters, optimizer state and router bias restored over
    them once the base's checksum matches the one the run started with."""
    base_path = args.init if args.init is not None else meta["lora"]["init"]
    base = from_pretrained(base_path, dtype=dtype, param_dtype=dtype, quantize=args.quantize,
                           moe_backend=args.moe_backend, attention_backend=args.attention_backend, progress=False)
    graphdef, state = init_state(attach_lora(base, args.lora, seed=args.seed), tc)
    del base
    state = shard_state(state, args.mesh) if args.mesh is not None else jax.device_put(state, jax.devices()[0])
    count = sum(x.size for x in jax.tree.leaves(state.params))
    what = (f"loaded {base_path}, LoRA rank {args.lora.rank} on {','.join(args.lora.targets)}: {count} trainable "
            f"parameters ({count / (count + sum(x.size for x in jax.tree.leaves(state.frozen))):.2%})")
    checksum = checkpoint.base_checksum(state.frozen)
    record = {**lora_record(args.lora, args.quantize), "init": str(base_path), "base_checksum": checksum}
    if meta is None:
        return graphdef, state, None, what, record
    if checksum != meta["lora"]["base_checksum"]:
        raise UserError(f"--resume: the base model {base_path} is not the one the run started from "
                        f"({meta['lora']['init']}, checksum {meta['lora']['base_checksum']}; now {checksum}): give "
                        "that model with --init")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state, meta = checkpoint.restore(ckpt_dir, abstract, latest, frozen=state.frozen)
    return graphdef, state, meta, f"{what}; resumed from step {meta['step']}", record


class _StopSignals:
    """While training: the first SIGINT (Ctrl-C) or SIGTERM is noted, and the loop saves after the step in
    progress and stops, so that any run can be resumed exactly; a second SIGINT interrupts at once. Left
    uninstalled off the main thread (Python delivers signals there only) and with several processes (one
    process's signal would stop it alone, inside a collective save)."""

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt now

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()


def _eval_ce(graphdef: nnx.GraphDef, params: nnx.State, router_bias: nnx.State, frozen: nnx.State, batch: Batch
             ) -> jax.Array:
    """Mean cross-entropy of one held-out batch (no balance term: eval measures the language model only)."""
    return loss_fn(params, router_bias, graphdef, batch, 0.0, frozen=frozen)[1]["ce"]


_jit_eval_ce = jax.jit(_eval_ce, static_argnums=0)


def plot_losses(records: list[dict], path: Path) -> None:
    """Train and eval cross-entropy against the step, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    train = [(r["step"], r["ce"]) for r in records if "ce" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train, strict=True), label="train cross-entropy", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval cross-entropy", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def run_training(args: argparse.Namespace) -> int:
    tune_allocator()
    out = Path(args.out).expanduser()
    if args.init is not None and Path(args.init).expanduser().exists() and files.overlapping(args.init, out):
        raise UserError(f"--out {args.out} overlaps --init {args.init} (the same directory, one inside the other, or "
                        "a symlink to it): the run would write over the checkpoint it starts from; choose another "
                        "--out")
    ckpt_dir = out / checkpoint.CHECKPOINTS
    latest = checkpoint.latest_step(ckpt_dir)
    meta = None
    if args.resume:
        if latest is None:
            raise UserError(f"--resume: no checkpoint in {ckpt_dir}")
        meta = checkpoint.read_metadata(ckpt_dir, latest)
        adopt_schedule(args, meta)
        if args.init is not None and args.lora is None:
            print("note: --init is ignored with --resume: the weights come from the checkpoint", file=sys.stderr)
    elif latest is not None:
        raise UserError(f"--out {out} already holds checkpoints (up to step {latest}): pass --resume to continue, "
                        "or choose another --out")

    cfg = model_config(args, meta)
    if args.mesh is not None:
        try:
            check_shardable(cfg, args.mesh)
        except ValueError as e:
            raise UserError(f"--mesh: {e}") from None
    if args.seq_len > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's context of {cfg.max_position_embeddings}")
    tokens, shipped_files = load_data(args, cfg)
    fp = fingerprint(tokens)
    train_tokens, eval_tokens = split_eval(tokens, args.eval_fraction, args.seq_len)
    stream = TokenStream(train_tokens, args.batch, args.seq_len, args.seed)
    evals = eval_batches(eval_tokens, args.batch, args.seq_len, args.eval_batches)
    try:
        tc = TrainConfig(learning_rate=args.lr, total_steps=args.steps, warmup_steps=args.warmup,
                         decay_steps=args.decay, balance_loss_coef=args.balance_loss_coef,
                         bias_update_rate=args.bias_update_rate, grad_accum_steps=args.grad_accum,
                         remat=args.remat, seed=args.seed if args.lora is not None else 0)
    except ValueError as e:
        raise UserError(str(e)) from None
    dtype = cli.DTYPES[args.dtype]

    # The model and its training state: restored, loaded, or initialised at random.
    start = time.perf_counter()
    if meta is not None:
        check_resume(args, meta, fp, tc, out)
        if meta["step"] >= args.steps:  # a finished run, resumed again: like the converter, nothing to do
            print(f"{out} is complete at step {meta['step']} of {args.steps}: nothing to do")
            return 0
    lora_meta = None
    if args.lora is not None:
        graphdef, state, meta, what, lora_meta = lora_state(args, tc, dtype, meta, ckpt_dir, latest)
        first_step, position = (0, 0) if meta is None else (meta["step"], meta["data"]["position"])
    elif meta is not None:
        graphdef, abstract = checkpoint.abstract_train_state(cfg, tc, dtype=dtype, moe_backend=args.moe_backend,
                                                             attention_backend=args.attention_backend)
        if args.mesh is not None:  # restored straight into the mesh's shardings (one per array, in order)
            abstract = with_shardings(abstract, param_shardings(abstract, args.mesh))
        state, meta = checkpoint.restore(ckpt_dir, abstract, latest)
        first_step, position, what = meta["step"], meta["data"]["position"], f"resumed from step {meta['step']}"
    else:
        if args.init is not None:
            if args.tokenizer is None:
                print("note: no --tokenizer, so the data is fed as raw byte ids 0..255; pass --tokenizer with the "
                      "checkpoint's directory to train on its tokens", file=sys.stderr)
            model = from_pretrained(args.init, dtype=dtype, param_dtype=jnp.float32, moe_backend=args.moe_backend,
                                    attention_backend=args.attention_backend, progress=False)
            what = f"loaded {args.init}"
        else:
            model = random_model(cfg, args.seed, dtype=dtype, param_dtype=jnp.float32, moe_backend=args.moe_backend,
                                 attention_backend=args.attention_backend)
            what = f"random init (seed {args.seed})"
        graphdef, state = init_state(model, tc)
        del model
        # Committed to the device like restored arrays: jit keys its cache on that, so a fresh and a resumed run
        # in one process (the tests) share one compiled step.
        state = shard_state(state, args.mesh) if args.mesh is not None else jax.device_put(state, jax.devices()[0])
        first_step, position = 0, 0
    if args.mesh is not None:
        # From here on every step runs under the mesh (the model reads it: activation shardings, expert
        # parallelism); not while the model was built, where nnx would read its logical axis names as mesh axes.
        jax.set_mesh(args.mesh)
    print(f"{what} in {time.perf_counter() - start:.1f} s on {jax.devices()[0].platform}; "
          f"{train_tokens.size} training and {eval_tokens.size} held-out tokens ({stream.num_windows} windows)",
          file=sys.stderr)

    # metrics.jsonl: on resume, drop what was logged after the checkpoint (those steps run again now). Only
    # process 0 writes files here (Orbax's checkpoints are written by all processes together).
    main_process = is_main_process()
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    records = []
    if meta is not None and metrics_path.is_file():
        text = metrics_path.read_text()
        text = text[:text.rfind("\n") + 1]  # complete lines only: a kill may have torn the last append
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        records = [r for r in records if r["step"] <= first_step]
    if main_process:
        files.write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in records))

    def metadata(step: int) -> dict:
        return {"step": step, "micro_step": step * tc.grad_accum_steps,
                "data": {"position": position, "seq_len": args.seq_len, "batch": args.batch,
                         "fingerprint": fp, "num_tokens": int(tokens.size), "source": str(args.data),
                         "tokenizer": args.tokenizer, "eval_fraction": args.eval_fraction},
                "rng": {"seed": args.seed},  # the init, the data order and LoRA dropout (with the step)
                "model_config": cfg.to_hf(), "train_config": dataclasses.asdict(tc), "dtype": args.dtype,
                "lora": lora_meta}

    def evaluate() -> float:
        losses = [_jit_eval_ce(graphdef, state.params, state.router_bias, state.frozen, b) for b in evals]
        return float(np.mean(jax.device_get(losses)))

    def log(record: dict) -> None:
        records.append(record)
        if main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    if evals and first_step == 0:
        log({"step": 0, "eval_loss": evaluate()})
    tokens_per_step = tc.grad_accum_steps * args.batch * args.seq_len
    saved = first_step
    bar = tqdm(total=args.steps, initial=first_step, desc="train", unit="step", file=sys.stderr)
    step = first_step
    stop = _StopSignals()
    try:
        for step in range(first_step + 1, args.steps + 1):
            t0 = time.perf_counter()
            micro = []
            for _ in range(tc.grad_accum_steps):
                batch = stream.batch_at(position)
                position += args.batch
                state, m = jit_train_step(graphdef, tc, state, batch)
                micro.append(m)
            micro = jax.device_get(micro)  # waits for the step
            seconds = time.perf_counter() - t0
            load = np.sum([m["expert_load"] for m in micro], axis=0)
            record = {"step": step, **{k: float(np.mean([m[k] for m in micro]))
                                       for k in ("loss", "ce", "balance_loss", "grad_norm")},
                      "learning_rate": float(micro[-1]["learning_rate"]),
                      "tokens_per_s": tokens_per_step / seconds,
                      "load_cv": np.asarray(load_cv(load)).round(5).tolist() if load.size else []}
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if evals and (step % args.eval_every == 0 or step == args.steps):
                eval_loss = evaluate()
                log({"step": step, "eval_loss": eval_loss})
                if main_process:
                    bar.write(f"step {step}: eval loss {eval_loss:.4f}")  # to stdout, with the final summary
            if step % args.save_every == 0 or step == args.steps or stop.signum:
                checkpoint.save(ckpt_dir, step, state, metadata(step), max_to_keep=args.keep)
                saved = step
            if stop.signum:
                bar.close()
                print(f"stopped by {signal.Signals(stop.signum).name} after step {step}, saved: continue with the "
                      "same command and --resume", file=sys.stderr)
                return 128 + stop.signum
    except KeyboardInterrupt:  # a second Ctrl-C, which does not wait for the step
        bar.close()
        print(f"\ninterrupted at step {step}; the newest checkpoint is step {saved}: continue with --resume",
              file=sys.stderr)
        return 130
    finally:
        stop.restore()
    bar.close()
    weights = (state.params, state.router_bias, state.frozen)
    if jax.process_count() > 1:  # every process takes part; then each holds the whole model
        weights = multihost_utils.process_allgather(weights, tiled=True)
    if not main_process:
        return 0

    plot_losses(records, out / "loss_curve.png")
    model = nnx.merge(graphdef, *weights)
    hf_dir = export_hf(model if args.lora is None else merge_lora(model), out / "hf", extra_files=shipped_files)
    adapter_line = ""
    if args.lora is not None:
        adapter_line = adapter_output(model, out / "adapter", lora_meta["init"], tc)
    last = [r for r in records if "ce" in r][-1]
    last_eval = [r["eval_loss"] for r in records if "eval_loss" in r]
    print(f"step {args.steps}: train loss {last['loss']:.4f}"
          + (f", eval loss {last_eval[-1]:.4f}" if last_eval else ""))
    print(f"checkpoints: {ckpt_dir}\nmetrics: {metrics_path}\nloss curve: {out / 'loss_curve.png'}\n"
          f"HF model: {hf_dir}{adapter_line}")
    return 0


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    maybe_initialize(args.distributed)  # before any other JAX call
    check_args(args)
    try:
        return run_training(args)
    finally:
        if args.mesh is not None:
            jax.set_mesh(None)  # run_training set it; main() may run again in this process (the tests do)


def main(argv: list[str] | None = None) -> int:
    """`python -m dots_jax.train ...`; returns the exit code (2 for bad input, with one `error:` line)."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
