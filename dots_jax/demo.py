"""The recipe of the embedded demo model: `python -m dots_jax.demo --out runs/demo [--steps N]`.

A small dots1-architecture model (dense first layer, MoE layers with shared experts, 16 routed experts, top-2:
the same code path as the released model) trained with this project's own `python -m dots_jax.train` on a corpus
that exists offline on every machine: the Python standard library's own top-level source files, with a byte-level
BPE tokenizer trained on the same files. The result is an HF directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) under OUT/hf.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
VOCAB_SIZE = 4096
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.json"


def build_corpus(directory: Path) -> list[Path]:
    """Copy the running Python's top-level stdlib *.py files (sorted) into `directory`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    directory.mkdir(parents=True, exist_ok=True)
    files = sorted(stdlib.glob("*.py"))
    for f in files:
        shutil.copyfile(f, directory / f.name)
    return [directory / f.name for f in files]


def train_tokenizer(files: list[Path], directory: Path) -> None:
    """Byte-level BPE (the dots.llm1 tokenizer's kind) with EOS as its one special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "model_max_length": 2048}))


def to_bfloat16(directory: Path) -> None:
    """Store the weights in bf16 (half the bytes; what the released checkpoints use), the bias in f32."""
    import ml_dtypes
    import numpy as np

    from dots_jax.safetensors_io import SafetensorsFile, save_file

    path = directory / "model.safetensors"
    source = SafetensorsFile(path)
    tensors = {k: np.asarray(source[k], np.float32 if k.endswith("e_score_correction_bias") else ml_dtypes.bfloat16)
               for k in source}
    del source
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dots_jax.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="work directory (corpus/, tokenizer/, the training run)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    from dots_jax import train

    out = Path(args.out)
    files = build_corpus(out / "corpus")
    train_tokenizer(files, out / "tokenizer")
    config = json.loads(DEMO_CONFIG.read_text())
    config["vocab_size"] = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json")).get_vocab_size()
    config["eos_token_id"] = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json")).token_to_id(EOS)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    code = train.main(["--config", str(out / "config.json"), "--data", str(out / "corpus"),
                       "--tokenizer", str(out / "tokenizer"), "--steps", str(args.steps), "--batch", str(args.batch),
                       "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--eval-every", "200",
                       "--save-every", "200", "--out", str(out / "run")])
    if code:
        return code
    hf = out / "run" / "hf"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(out / "tokenizer" / name, hf / name)
    to_bfloat16(hf)
    print(f"demo model written to {hf} (Python {sys.version.split()[0]} stdlib corpus)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
