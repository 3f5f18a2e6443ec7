"""HF safetensors <-> dots_jax checkpoint converters (convert.hf_to_jax, convert.jax_to_hf): thin command lines over
dots_jax.weights, and what the two share."""

from __future__ import annotations

import os

import jax
from etils import epath

from dots_jax import cli
from dots_jax.files import overlapping
from dots_jax.weights.converted import DestinationError


def cpu_only() -> None:
    """Conversion is host work: never claim (or wait for) a TPU/GPU that a training job on this host may hold,
    unless the user chose the platforms (JAX_PLATFORMS). Called before any backend exists: imports create none."""
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")


def refuse_overlap(src: str | os.PathLike, dst: epath.Path, work: epath.Path) -> None:
    """Raise DestinationError when the source and DST (or the work directory beside DST) are the same directory,
    one inside the other, or a symlink to either: --overwrite (or a fresh start) deletes DST and its work
    directory, and with them the source. Checked on the resolved local paths before anything is touched."""
    if "://" in os.fspath(dst):  # a remote DST cannot be a local source
        return
    for target in (dst, work):
        if overlapping(src, target):
            raise DestinationError(f"--dst {dst} overlaps --src {src} (the same directory, one inside the other, "
                                   "or a symlink to it): writing there would destroy the source; choose a --dst "
                                   "outside the source")


def converter_parser(prog: str, description: str, src_help: str, dst_help: str) -> cli.Parser:
    """The options both converters take: --src, --dst, --no-progress."""
    parser = cli.Parser(prog=prog, description=description)
    parser.add_argument("--src", required=True, help=src_help)
    parser.add_argument("--dst", required=True, help=dst_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser
