"""What every command line (python -m dots_jax.sample / train / plan / demo, convert.*) shares: one parser whose
mistakes are user errors, one `error: ...` line and exit code 2 for any UserError, one dtype map,
the embedded demo model's path.

A CLI's `main(argv) -> int` is `return cli.run(_main, argv)`; `_main` parses with `cli.Parser`, raises UserError
(or a room's own subclass: ConfigError, CheckpointError, DataError, ...) for input the user can fix, and turns a
third-party error into a UserError where it catches it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec

import jax.numpy as jnp

from dots_jax.config import Dots1Config
from dots_jax.errors import UserError
from dots_jax.inference.tokenizer import Tokenizer
from dots_jax.model.layers import QUANTIZE_MODES
from dots_jax.ops.attention import BACKENDS as ATTENTION_BACKENDS
from dots_jax.ops.gmm import BACKENDS
from dots_jax.ops.kv_int8 import KV_CACHE_DTYPES
from dots_jax.weights.hf import resolve

EXIT_USER_ERROR = 2
# The dtypes a user can name on a command line: storage (convert) and, of those, compute (sample, train).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
COMPUTE_DTYPES = ("float32", "bfloat16")
# The embedded demo model (package data, see dots_jax.demo): sample's and demo evaluate's default --model.
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"

P = ParamSpec("P")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as a UserError (one line, exit 2) instead of printing the usage.
    Subcommand parsers (add_subparsers) are of this class too."""

    def __init__(self, prog: str, description: str | None = None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=prog, description=description, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


def one_line(error: BaseException) -> str:
    """The error's message with its line breaks and runs of spaces folded, for the one `error:` line."""
    return " ".join(str(error).split())


def run(body: Callable[P, int], *args: P.args, **kwargs: P.kwargs) -> int:
    """body(*args, **kwargs)'s exit code, or 2 with one `error:` line on stderr when it raises a UserError."""
    try:
        return body(*args, **kwargs)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


def add_moe_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--moe-backend", choices=["auto", *sorted(BACKENDS)], default="auto",
                        help="grouped-matmul implementation of the routed experts; auto (default) lets "
                             "dots_jax.ops.gmm choose for the device")


def add_attention_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attention-backend", choices=["auto", *sorted(ATTENTION_BACKENDS)], default="auto",
                        help="attention implementation; auto (default) lets dots_jax.ops.attention choose for the "
                             "device and sequence length")


def add_kv_cache_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=None,
                        help="dtype of the KV cache: int8 keeps keys and values in int8 with one f32 scale per token "
                             "and head (dequantised when attention reads them; about half of bf16's bytes); "
                             "default: the activation dtype (--dtype)")


def add_quantize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                        help="int8: weight-only int8 for every linear layer (attention, dense and shared MLPs, routed "
                             "experts), one f32 scale per output channel: about half the weight bytes of bf16, which "
                             "memory-bound decoding reads. A checkpoint converted with --quantize int8 is int8 "
                             "without this flag")


def add_distributed(parser: argparse.ArgumentParser, main_process_does: str) -> None:
    parser.add_argument("--distributed", action="store_true",
                        help="one of several processes (a TPU pod slice, a multi-node job): call "
                             "jax.distributed.initialize() first. Not needed where the environment says so "
                             "(JAX_COORDINATOR_ADDRESS, a multi-worker TPU slice, srun, mpirun); only process 0 "
                             f"{main_process_does}")


@dataclass
class Checkpoint:
    directory: Path
    cfg: Dots1Config
    tokenizer: Tokenizer
    stop_token_ids: set[int]


def open_checkpoint(model: str) -> Checkpoint:
    """Find the checkpoint and read its config and tokenizer (cheap), before any weights are read."""
    try:
        directory = resolve(model)
        cfg = Dots1Config.from_hf(directory)
        tokenizer = Tokenizer.from_dir(directory)
    except (ValueError, OSError) as e:  # the library's errors, the tokenizer's and huggingface_hub's (OSErrors)
        # Most messages already name the path; hub errors do not.
        raise UserError(f"--model: {e}" if model in str(e) else f"--model {model}: {e}") from None
    stops = set(cfg.eos_token_id)
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    # transformers' generate stops at generation_config.json's eos ids: so do we.
    generation_config = directory / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        stops.update([eos] if isinstance(eos, int) else eos or [])
    return Checkpoint(directory, cfg, tokenizer, stops)
