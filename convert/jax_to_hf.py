"""Export a converted dots_jax checkpoint (from convert.hf_to_jax) as a Hugging Face dots.llm1 checkpoint.

    python -m convert.jax_to_hf --src /data/dots1-jax --dst /data/dots1-hf [--max-shard-size 5GB]

Writes safetensors shards (model-0000i-of-0000n.safetensors + model.safetensors.index.json, or one
model.safetensors when everything fits one shard) with transformers' per-expert tensor names, each tensor in the
dtype the original HF checkpoint stored it in (recorded in the manifest), plus config.json and the tokenizer
files. The names and layouts come from weights.hf.export_entries, the one inverse of the key table
(dots_jax/weights/keys.py). Every parameter read back is checked against the manifest's sha256 first
(weights.converted.read_param). Unit by unit: peak memory is about
one shard plus one layer. Written to <DST>.tmp-jax_to_hf and renamed to DST when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from convert import converter_parser, cpu_only, refuse_overlap
from dots_jax import cli
from dots_jax.config import Dots1Config
from dots_jax.weights import converted
from dots_jax.weights.converted import DestinationError
from dots_jax.weights.hf import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    ExportEntry,
    QuantizedExportError,
    export_entries,
)
from dots_jax.weights.safetensors_io import save_file

WORK_SUFFIX = ".tmp-jax_to_hf"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclasses.dataclass(frozen=True)
class Planned:
    entry: ExportEntry
    unit: str
    param: str  # the parameter's name in its unit
    slot: tuple[int, ...]  # index into the per-layer parameter: () or (expert,)
    dtype: np.dtype  # the dtype to write: the one the original HF checkpoint used
    nbytes: int


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 2GiB")
    return int(float(m[1]) * _UNITS[m[2] or "B"])


def plan_export(manifest: dict[str, Any], cfg: Dots1Config) -> list[Planned]:
    """Every HF tensor to write, grouped by unit in conversion order (so each unit is read once)."""
    by_unit: dict[str, list[Planned]] = {}
    for entry in export_entries(cfg):
        unit, param = converted.place(entry.path, entry.layer)
        info = manifest["units"].get(unit, {}).get("params", {}).get(param)
        if info is None:
            raise CheckpointError(f"converted checkpoint lacks {unit}/{param}, needed for {entry.name!r}")
        slot = entry.index[1:] if entry.layer is not None else ()
        dtype = np.dtype(jnp.dtype(info["hf_dtype"]))  # jnp knows "bfloat16" too
        size = int(np.prod(info["shape"][len(slot):], dtype=np.int64)) * dtype.itemsize
        by_unit.setdefault(unit, []).append(Planned(entry, unit, param, slot, dtype, size))
    return [p for unit in manifest["unit_order"] for p in by_unit.get(unit, [])]


def assign_shards(planned: list[Planned], max_bytes: int) -> list[list[Planned]]:
    """Consecutive tensors into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for p in planned:
        if shards[-1] and size + p.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def tensors_in_order(root: epath.Path, manifest: dict[str, Any], cfg: Dots1Config, planned: list[Planned]
                     ) -> Iterator[tuple[Planned, np.ndarray]]:
    """(plan, HF tensor) for every planned tensor in order, reading each unit's parameters once."""
    loaded: dict[str, np.ndarray] = {}
    current = None
    for p in planned:
        if p.unit != current:
            loaded.clear()  # the previous unit is done: free it
            current = p.unit
        if p.param not in loaded:
            loaded[p.param] = converted.read_param(root, p.unit, p.param, manifest["units"][p.unit]["params"][p.param])
        ours = loaded[p.param][p.slot] if p.slot else loaded[p.param]
        yield p, p.entry.to_hf(ours, cfg).astype(p.dtype, copy=False)


def export(src: str | os.PathLike, dst: str | os.PathLike, *, max_shard_bytes: int = 5 * 10**9,
           overwrite: bool = False, progress: bool = True) -> epath.Path:
    root, out = converted.as_path(src), converted.as_path(dst)
    work = out.parent / (out.name + WORK_SUFFIX)
    if "://" not in os.fspath(src):
        refuse_overlap(root, out, work)
    manifest = converted.read_manifest(root)
    quantize, _ = converted.stored_quantization(manifest)
    if quantize is not None:
        raise QuantizedExportError(f"{root} holds {quantize}-quantised weights (converted with --quantize "
                                   f"{quantize}); the HF format holds the original float weights: export the "
                                   "checkpoint converted without --quantize, or the HF checkpoint it came from")
    cfg = converted.read_config(root)
    if out.exists() and any(True for _ in out.iterdir()) and not overwrite:
        raise DestinationError(f"destination {out} exists and is not empty: pass --overwrite to replace it")
    planned = plan_export(manifest, cfg)
    shards = assign_shards(planned, max_shard_bytes)
    names = shard_names(len(shards))
    shard_of = {id(p): names[i] for i, shard in enumerate(shards) for p in shard}

    if work.exists():
        work.rmtree()
    work.mkdir(parents=True)
    for name in ["config.json", *manifest.get("extra_files", [])]:
        (work / name).write_bytes((root / name).read_bytes())

    pending: dict[str, np.ndarray] = {}
    remaining = {name: len(shard) for name, shard in zip(names, shards, strict=True)}
    total = sum(p.nbytes for p in planned)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="exporting", disable=not progress,
              file=sys.stderr) as bar:
        for p, tensor in tensors_in_order(root, manifest, cfg, planned):
            name = shard_of[id(p)]
            pending[p.entry.name] = tensor
            remaining[name] -= 1
            bar.update(p.nbytes)
            if remaining[name] == 0:  # the shard is complete: write it and let its tensors go
                save_file(pending, work / name, metadata={"format": "pt"})
                pending.clear()
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {p.entry.name: shard_of[id(p)] for p in planned}}
        (work / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if out.exists():
        out.rmtree()
    work.rename(out)
    return out


def build_parser() -> cli.Parser:
    parser = converter_parser(
        "python -m convert.jax_to_hf",
        "Export a converted dots_jax checkpoint as an HF dots.llm1 checkpoint (safetensors shards with per-expert "
        "names and the original dtypes, index, config.json, tokenizer files) that transformers loads.",
        src_help="converted dots_jax checkpoint (from convert.hf_to_jax)", dst_help="output directory")
    parser.add_argument("--max-shard-size", type=parse_size, default=5 * 10**9,
                        help="largest shard, e.g. 5GB (default), 500MB, 2GiB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cpu_only()
    out = export(args.src, args.dst, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
                 progress=not args.no_progress)
    shards = [p for p in out.iterdir() if p.name.endswith(".safetensors")]
    size = sum(p.stat().length for p in shards)
    print(f"wrote {out}: {len(shards)} safetensors shard{'s' * (len(shards) > 1)}, {size / 2**30:.2f} GiB")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m convert.jax_to_hf ...`; returns the exit code (2 for bad input, with one `error:` line)."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
