"""Convert a Hugging Face dots.llm1 checkpoint (safetensors) into a converted dots_jax checkpoint.

    python -m convert.hf_to_jax --src rednote-hilab/dots.llm1.inst --dst /data/dots1-jax [--dtype bfloat16]
        [--quantize int8 [--quantize-head]]

The whole checkpoint is checked first against the key table (dots_jax/weights/keys.py) and config.json (names,
layers, experts, shapes, every parameter slot filled exactly once) from the safetensors headers alone; then it is
converted unit by unit ("top", then each decoder layer), parameter by parameter: the tensors of one parameter are
read, put in our layout (experts stacked to [E, in, out]) and written as one Orbax item, and the memory is freed.
Peak memory is about one parameter (plus Orbax's write buffers), not a shard and not the model. The format, its
manifest and the work directory that --resume continues are dots_jax/weights/converted.py's.

--quantize int8 writes every linear weight (attention, dense and shared MLPs, routed experts; the LM head too with
--quantize-head) as int8 with its f32 per-output-channel scale beside it, quantised from the checkpoint's own
values tensor by tensor as they are read (peak memory: the int8 parameter plus one HF tensor). Such a checkpoint
loads as an int8 model and cannot be exported back (convert.jax_to_hf refuses it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from convert import converter_parser, cpu_only, refuse_overlap
from dots_jax import cli
from dots_jax.config import Dots1Config
from dots_jax.errors import UserError
from dots_jax.model.layers import QUANTIZE_MODES, SCALE_SUFFIX
from dots_jax.model.modeling import abstract_model
from dots_jax.weights import converted
from dots_jax.weights.hf import (
    Plan,
    Rule,
    check_coverage,
    is_scale,
    plan_tensors,
    quantize_slice,
    resolve,
    scale_path,
    tokenizer_files,
)
from dots_jax.weights.keys import StatePath
from dots_jax.weights.safetensors_io import SafetensorsFile

_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


# --------------------------------------------------------------------------------------------- planning
@dataclasses.dataclass(frozen=True)
class Source:
    key: str  # HF tensor name
    file: Path
    rule: Rule  # the KEY_TABLE rule that consumes it
    output: int  # which output of the rule's transform (the fused gate_up tensor has two)
    slot: tuple[int, ...]  # where in the per-layer parameter it goes: () or (expert,)


@dataclasses.dataclass
class ParamPlan:
    shape: tuple[int, ...]  # per layer: the stacked parameter's shape without the layer axis
    dtype: np.dtype
    hf_dtype: str  # the dtype the HF checkpoint stores it in (jax_to_hf writes it back in this dtype)
    sources: list[Source]
    path: StatePath  # the parameter in the model state
    scale_shape: tuple[int, ...] | None = None  # per layer, when the parameter is written int8 with a scale

    @property
    def nbytes(self) -> int:
        """The bytes written: the parameter, or its int8 values and f32 scale."""
        if self.scale_shape is None:
            return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        return int(np.prod(self.shape, dtype=np.int64)) + 4 * int(np.prod(self.scale_shape, dtype=np.int64))


def param_shapes(cfg: Dots1Config, quantize: str | None = None, quantize_head: bool = False
                 ) -> dict[StatePath, tuple[int, ...]]:
    """Every parameter of the model (path in the state -> shape), without computing a weight; with quantize,
    the int8 weights' scales too."""
    model = abstract_model(cfg, quantize=quantize, quantize_head=quantize_head)
    return {path: tuple(var.get_value().shape) for path, var in nnx.to_flat_state(nnx.state(model))}


def plan_units(plan: Plan, opened: dict[Path, SafetensorsFile], cfg: Dots1Config, dtype: str | None,
               quantize: str | None = None, quantize_head: bool = False) -> dict[str, dict[str, ParamPlan]]:
    """unit -> parameter name -> what to read for it, in conversion order ("top" first, then layer by layer).
    With quantize, the weights the model quantises (those with a scale in its state) are planned int8 + scale."""
    shapes = param_shapes(cfg, quantize, quantize_head)
    units: dict[str, dict[str, ParamPlan]] = {}
    for key, file, m in plan:
        for output, (path, index) in enumerate(m.targets(cfg)):
            unit, name = converted.place(path, m.layer)
            shape = shapes[path] if m.layer is None else shapes[path][1:]
            stored = opened[file].dtype(key)
            if name not in units.setdefault(unit, {}):
                scale = shapes.get(scale_path(path))
                if scale is None:
                    units[unit][name] = ParamPlan(shape, _out_dtype(path, stored, dtype), str(stored), [], path)
                else:  # quantised from the checkpoint's own values, uncast
                    units[unit][name] = ParamPlan(shape, np.dtype(stored), str(stored), [], path,
                                                  scale if m.layer is None else scale[1:])
            param = units[unit][name]
            param.hf_dtype = str(np.result_type(np.dtype(param.hf_dtype), stored))
            param.sources.append(Source(key, file, m.rule, output, index[1:]))
    order = sorted(units, key=lambda u: (u != converted.TOP, u))
    return {u: dict(sorted(units[u].items())) for u in order}


def _out_dtype(path: StatePath, stored: np.dtype, dtype: str | None) -> np.dtype:
    # The router's correction bias is f32 in the model whatever the weights are (selection is that sensitive).
    if path[-1] == "correction_bias":
        return np.dtype(np.float32)
    if dtype is None or not np.issubdtype(stored, np.floating):
        return np.dtype(stored)
    return np.dtype(cli.DTYPES[dtype])


# ---------------------------------------------------------------------------------------------- reading
def assemble(param: ParamPlan, opened: dict[Path, SafetensorsFile], cfg: Dots1Config, label: str
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """One per-layer parameter in our layout, from its HF tensors (e.g. experts stacked to [E, in, out]), and its
    scale when it is written int8 (else None): each HF tensor is quantised as it is read (its slot holds whole
    output channels), so no float copy of the whole parameter is ever made."""
    quantized = param.scale_shape is not None
    out = np.empty(param.shape, np.int8 if quantized else param.dtype)
    scale = np.empty(param.scale_shape, np.float32) if quantized else None
    for src in param.sources:
        raw = opened[src.file].read(src.key)  # read(), not the map: RSS stays bounded
        value = src.rule.to_jax(raw, cfg)
        value = value[src.output] if isinstance(value, tuple) else value
        dest = out[src.slot] if src.slot else out
        if value.shape != dest.shape:  # the table and the model disagree: a bug here, not in the checkpoint
            raise AssertionError(f"{src.key} -> {label}{list(src.slot)}: shape {value.shape} != {dest.shape}")
        if quantized:
            q, s = quantize_slice(value, param.path)
            dest[...] = q
            if src.slot:
                scale[src.slot] = s
            else:
                scale[...] = s
        elif value.dtype == dest.dtype:  # a bit copy; as unsigned ints numpy's strided copy is ~40% faster (bf16)
            dest.view(_BITS[dest.dtype.itemsize])[...] = value.view(_BITS[dest.dtype.itemsize])
        else:
            dest[...] = value  # casts to the dtype --dtype asks for
        del raw, value
    return out, scale


# ------------------------------------------------------------------------------------------------- main
def _source_fingerprint(directory: Path, opened: dict[Path, SafetensorsFile]) -> dict[str, Any]:
    return {"path": str(directory), "files": {p.name: p.stat().st_size for p in opened}}


def copy_extra_files(directory: Path, work: epath.Path) -> list[str]:
    """Copy config.json, the generation defaults and the tokenizer's files; the names copied besides
    config.json."""
    extra = ([directory / "generation_config.json"] if (directory / "generation_config.json").is_file() else [])
    names = ["config.json"] + [p.name for p in extra + tokenizer_files(directory)]
    for name in names:
        (work / name).write_bytes((directory / name).read_bytes())
    return names[1:]


def convert(src: str, dst: str | os.PathLike, *, dtype: str | None = None, resume: bool = False,
            overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = print,
            quantize: str | None = None, quantize_head: bool = False) -> epath.Path:
    """Convert HF checkpoint `src` (directory or repo id) to a converted dots_jax checkpoint at `dst`; quantize
    "int8" writes the linear weights int8 with their scales (quantize_head: the LM head too)."""
    if quantize_head and quantize is None:
        raise UserError("--quantize-head needs --quantize")
    dst_path = converted.as_path(dst)
    work = converted.work_dir(dst_path)
    if Path(os.path.expanduser(src)).exists():  # a local source: refused before anything else is looked at
        refuse_overlap(src, dst_path, work)
    if not converted.check_destination(dst_path, resume, overwrite):
        log(f"{dst_path} is already a complete conversion: nothing to do")
        return dst_path
    directory = resolve(src)
    refuse_overlap(directory, dst_path, work)  # a repo id resolves into the HF cache
    cfg = Dots1Config.from_hf(directory)
    opened, plan = plan_tensors(directory, cfg)
    check_coverage(plan, cfg, {p: s for p, s in param_shapes(cfg, quantize).items() if not is_scale(p)}, directory)
    units = plan_units(plan, opened, cfg, dtype, quantize, quantize_head)

    fresh = converted.new_manifest(_source_fingerprint(directory, opened), dtype, list(units), quantize)
    if quantize_head and not cfg.tie_word_embeddings:
        fresh["quantize_head"] = True
    manifest = converted.start_or_resume(work, fresh, resume)
    done = [u for u in units if u in manifest["units"]]
    if done:
        log(f"resuming in {work}: {len(done)} of {len(units)} units already written, skipping them")
    manifest["extra_files"] = copy_extra_files(directory, work)

    total = sum(p.nbytes for params in units.values() for p in params.values())
    initial = sum(p.nbytes for u in done for p in units[u].values())
    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
              disable=not progress, file=sys.stderr) as bar:
        for unit, params in units.items():
            if unit in manifest["units"]:
                continue
            with converted.write_unit(work, unit) as writer:
                for name, param in params.items():
                    bar.set_postfix_str(f"{unit}/{name}", refresh=False)
                    array, scale = assemble(param, opened, cfg, f"{unit}/{name}")
                    writer.save(name, array, hf_dtype=param.hf_dtype, hf_tensors=len(param.sources))
                    if scale is not None:
                        writer.save(name + SCALE_SUFFIX, scale)
                    bar.update(param.nbytes)
                    del array, scale  # free before the next parameter: peak memory is one parameter
            converted.record_unit(work, manifest, unit, writer.entry)  # the unit counts as done from here on
    converted.finish(work, dst_path, manifest)
    log(f"wrote {dst_path}: {len(units)} units, {total / 2**30:.2f} GiB")
    return dst_path


def build_parser() -> cli.Parser:
    parser = converter_parser(
        "python -m convert.hf_to_jax",
        "Convert a Hugging Face dots.llm1 checkpoint (safetensors) into a dots_jax checkpoint: Orbax items per layer "
        "plus config.json, tokenizer files and manifest.json. Streams layer by layer (peak memory about one "
        "parameter), writes to DST.tmp-hf_to_jax and renames it to DST when complete.",
        src_help="HF repo id (fetched with huggingface_hub into the HF cache; HF_HUB_OFFLINE is honoured) or a "
                 "local directory with config.json and safetensors",
        dst_help="output directory (a local path or any path Orbax/tensorstore accepts, e.g. gs://bucket/dots1)")
    parser.add_argument("--dtype", choices=list(cli.DTYPES), default=None,
                        help="cast floating-point weights to this dtype (default: keep each tensor's stored dtype; "
                             "the router's correction bias is always stored f32)")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                        help="write every linear weight (attention, dense and shared MLPs, routed experts) as int8 "
                             "with an f32 scale per output channel: about half the bytes of bf16. Such a checkpoint "
                             "loads as an int8 model and cannot be exported back to HF")
    parser.add_argument("--quantize-head", action="store_true",
                        help="with --quantize, the LM head too (off by default)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted conversion, skipping the layers already written")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace DST and discard any interrupted conversion")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    cpu_only()
    convert(args.src, args.dst, dtype=args.dtype, resume=args.resume, overwrite=args.overwrite,
            progress=not args.no_progress, quantize=args.quantize, quantize_head=args.quantize_head)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m convert.hf_to_jax ...`; returns the exit code (2 for bad input, with one `error:` line)."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
