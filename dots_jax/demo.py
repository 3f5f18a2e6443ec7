"""The embedded demo model: its recipe and its evaluation.

  python -m dots_jax.demo train --out runs/demo      # the exact command that produced dots_jax/demo_model
  python -m dots_jax.demo evaluate                   # its held-out loss against a unigram baseline

A small dots1-architecture model (dense first layer, MoE layers with shared experts, 16 routed experts, top-2:
the same code path as the released model) trained with this project's own `python -m dots_jax.train` on a corpus
that exists offline on every machine: the Python standard library's own top-level source files, with a byte-level
BPE tokenizer trained on the same files. The result is an HF directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) under OUT/run/hf. Bad input prints one `error: ...` line and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dots_jax import cli, files
from dots_jax.cli import DEMO_MODEL_DIR
from dots_jax.config import CONFIGS_DIR
from dots_jax.errors import UserError

if TYPE_CHECKING:  # imported lazily below: `demo train` needs no JAX
    import numpy as np

    from dots_jax.model.modeling import Dots1ForCausalLM

EOS = "<|endoftext|>"
VOCAB_SIZE = 4096
SEQ_LEN = 256
EVAL_FRACTION = 0.05  # the training CLI's default: the corpus's last 5% of tokens are held out
DEMO_CONFIG = CONFIGS_DIR / "demo.json"


def build_corpus(directory: Path) -> list[Path]:
    """Copy the running Python's top-level stdlib *.py files (sorted) into `directory`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    directory.mkdir(parents=True, exist_ok=True)
    sources = sorted(stdlib.glob("*.py"))
    for f in sources:
        shutil.copyfile(f, directory / f.name)
    return [directory / f.name for f in sources]


def train_tokenizer(sources: list[Path], directory: Path) -> None:
    """Byte-level BPE (the dots.llm1 tokenizer's kind) with EOS as its one special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in sources], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(directory / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    files.write_atomic(directory / "tokenizer_config.json", json.dumps({"eos_token": EOS, "model_max_length": 2048}))


def to_bfloat16(directory: Path) -> None:
    """Store the weights in bf16 (half the bytes; what the released checkpoints use), the bias in f32."""
    import ml_dtypes
    import numpy as np

    from dots_jax.weights.safetensors_io import SafetensorsFile, save_file

    path = directory / "model.safetensors"
    source = SafetensorsFile(path)
    tensors = {k: np.asarray(source[k], np.float32 if k.endswith("e_score_correction_bias") else ml_dtypes.bfloat16)
               for k in source}
    del source
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    files.write_atomic(directory / "config.json", json.dumps(config, indent=2))


def evaluate(model_dir: Path = DEMO_MODEL_DIR, *, seq_len: int = SEQ_LEN, batch: int = 16,
             quantize: str | None = None) -> dict:
    """Held-out cross-entropy (nats/token) of the model and of a unigram baseline on the same tokens.

    The held-out text is what training held out: the last EVAL_FRACTION of the stdlib corpus, tokenized with the
    model's own tokenizer (held_out_windows). The unigram model is the training split's token frequencies with
    add-one smoothing over the vocabulary: the best a model can do that ignores context. Both are scored on the
    same targets (the next tokens of the held-out windows), in float64 for the baseline and f32 for the model.
    quantize="int8": the model with int8 weights (from_pretrained's quantize).
    """
    import jax.numpy as jnp
    import numpy as np

    from dots_jax.weights import from_pretrained

    inputs, targets, train_tokens = held_out_windows(model_dir, seq_len)
    model = from_pretrained(model_dir, dtype=jnp.float32, progress=False, quantize=quantize)
    model_loss = held_out_loss(model, inputs, targets, batch)

    counts = np.bincount(train_tokens, minlength=model.cfg.vocab_size).astype(np.float64) + 1.0
    unigram_logp = np.log(counts / counts.sum())
    unigram_loss = float(-unigram_logp[targets.reshape(-1)].mean())
    return {"model_loss": model_loss, "unigram_loss": unigram_loss, "held_out_tokens": int(targets.size),
            "train_tokens": int(train_tokens.size), "python": sys.version.split()[0], "model_dir": str(model_dir)}


def held_out_windows(model_dir: Path = DEMO_MODEL_DIR, seq_len: int = SEQ_LEN
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, train_tokens): the held-out split of the stdlib corpus (what training held out) cut into
    windows of seq_len tokens, int [windows, seq_len] each (targets are the inputs shifted by one), and the
    training split's tokens."""
    import numpy as np

    from dots_jax.inference.tokenizer import Tokenizer as DotsTokenizer
    from dots_jax.training.data import load_tokens, num_windows, split_eval

    tokens = load_tokens(stdlib_glob(), DotsTokenizer.from_dir(model_dir))
    train_tokens, held = split_eval(tokens, EVAL_FRACTION, seq_len)
    windows = num_windows(held, seq_len)
    starts = np.arange(windows) * seq_len
    inputs = held[starts[:, None] + np.arange(seq_len)]
    targets = held[starts[:, None] + np.arange(1, seq_len + 1)]
    return inputs, targets, train_tokens


def held_out_loss(model: Dots1ForCausalLM, inputs: np.ndarray, targets: np.ndarray, batch: int = 16) -> float:
    """The model's mean cross-entropy (nats/token, f32) of `targets` after `inputs` (held_out_windows)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    @jax.jit
    def row_nll(ids: jax.Array, tgt: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(model(ids).astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0].sum(axis=-1)

    total = 0.0
    windows = len(inputs)
    for i in range(0, windows, batch):
        ids, tgt = inputs[i:i + batch], targets[i:i + batch]
        pad = ((0, batch - len(ids)), (0, 0))  # one compiled shape: pad the last batch, drop the padded rows
        total += float(row_nll(np.pad(ids, pad), np.pad(tgt, pad))[:len(ids)].sum())
    return total / targets.size


def stdlib_glob() -> str:
    """The corpus: the running Python's top-level stdlib source files (a glob, sorted like build_corpus)."""
    return str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")


def _train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    train_tokenizer(build_corpus(out / "corpus"), out / "tokenizer")
    config = json.loads(DEMO_CONFIG.read_text())
    tokenizer = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    config["vocab_size"] = tokenizer.get_vocab_size()
    config["eos_token_id"] = tokenizer.token_to_id(EOS)
    files.write_atomic(out / "config.json", json.dumps(config, indent=2))
    # The training CLI itself, as a user would run it (a CLI does not import another CLI).
    code = subprocess.run([sys.executable, "-m", "dots_jax.train", "--config", str(out / "config.json"),
                           "--data", str(out / "corpus"), "--tokenizer", str(out / "tokenizer"),
                           "--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                           "--lr", str(args.lr), "--eval-every", "200", "--eval-fraction", str(EVAL_FRACTION),
                           "--save-every", "200", "--out", str(out / "run")]).returncode
    if code:
        return code
    hf = out / "run" / "hf"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with files.atomic_path(hf / name) as tmp:
            shutil.copyfile(out / "tokenizer" / name, tmp)
    to_bfloat16(hf)
    print(f"demo model written to {hf} (Python {sys.version.split()[0]} stdlib corpus); to ship it: "
          f"cp {hf}/* {DEMO_MODEL_DIR}/")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from dots_jax.inference.tokenizer import Tokenizer as DotsTokenizer

    model = Path(args.model).expanduser()
    try:  # the tokenizer's own errors (a missing directory or file, a corrupt one) are plain OSError / ValueError
        DotsTokenizer.from_dir(model)
    except (OSError, ValueError) as e:
        raise UserError(f"--model: {e}") from None
    result = evaluate(model, quantize=args.quantize)
    print(f"held-out cross-entropy, {result['held_out_tokens']} tokens of the Python {result['python']} stdlib "
          f"corpus's last {EVAL_FRACTION:.0%} (never trained on):")
    print(f"  demo model      {result['model_loss']:.3f} nats/token (perplexity {math.exp(result['model_loss']):.1f})")
    print(f"  unigram model   {result['unigram_loss']:.3f} nats/token (perplexity "
          f"{math.exp(result['unigram_loss']):.1f}; add-one smoothed counts of the {result['train_tokens']} "
          "training tokens)")
    return 0


def _main(argv: list[str] | None) -> int:
    parser = cli.Parser(prog="python -m dots_jax.demo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="build the corpus and tokenizer, train, export OUT/run/hf")
    train_cmd.add_argument("--out", required=True, help="work directory (corpus/, tokenizer/, the training run)")
    train_cmd.add_argument("--steps", type=int, default=1200)
    train_cmd.add_argument("--batch", type=int, default=16)
    train_cmd.add_argument("--seq-len", type=int, default=SEQ_LEN)
    train_cmd.add_argument("--lr", type=float, default=3e-3)
    eval_cmd = commands.add_parser("evaluate", help="held-out loss of a demo model against a unigram baseline")
    eval_cmd.add_argument("--model", default=str(DEMO_MODEL_DIR),
                          help="the model directory: an HF checkpoint or a converted one (default: the shipped "
                               "demo model)")
    cli.add_quantize(eval_cmd)
    args = parser.parse_args(argv)
    return _train(args) if args.command == "train" else _evaluate(args)


def main(argv: list[str] | None = None) -> int:
    """`python -m dots_jax.demo ...`; returns the exit code (2 for bad input, with one `error:` line)."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
