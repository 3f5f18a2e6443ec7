"""Convert a Hugging Face dots.llm1 checkpoint (safetensors) into a converted dots_jax checkpoint.

    python -m convert.hf_to_jax --src rednote-hilab/dots.llm1.inst --dst /data/dots1-jax [--dtype bfloat16]

The whole checkpoint is checked first against hf_weights.KEY_TABLE and config.json (names, layers, experts,
shapes, every parameter slot filled exactly once) from the safetensors headers alone; then it is converted unit
by unit ("top", then each decoder layer), parameter by parameter: the tensors of one parameter are read, put in
our layout (experts stacked to [E, in, out]) and written as one Orbax item, and the memory is freed. Peak memory
is about one parameter (plus Orbax's write buffers), not a shard and not the model. See dots_jax/weights/converted.py
for the layout and the manifest.

Everything is written under <DST>.tmp-hf_to_jax and renamed to DST when complete, so DST never holds half a
checkpoint. Each unit is written to <unit>.partial, renamed, and then recorded in the manifest: --resume
continues an interrupted conversion in the temporary directory, skipping the recorded units.

Test hook: with DOTS_JAX_CONVERT_PAUSE_AFTER_UNITS=N in the environment the converter stops (sleeps) right after
the N-th unit it writes, so that a test can SIGKILL it at a known point.
"""

from __future__ import annotations

import os

# Conversion is host work: never claim (or wait for) a TPU/GPU that a training job on this host may hold.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from etils import epath  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from dots_jax.config import ConfigError, Dots1Config  # noqa: E402
from dots_jax.model.modeling import abstract_model  # noqa: E402
from dots_jax.training.checkpoint import overlapping  # noqa: E402
from dots_jax.weights import converted  # noqa: E402
from dots_jax.weights.hf import (  # noqa: E402
    CheckpointError,
    Plan,
    Rule,
    _target,
    check_coverage,
    plan_tensors,
    resolve,
)
from dots_jax.weights.safetensors_io import SafetensorsError, SafetensorsFile  # noqa: E402

PAUSE_ENV = "DOTS_JAX_CONVERT_PAUSE_AFTER_UNITS"
WORK_SUFFIX = ".tmp-hf_to_jax"
# Files copied beside the weights: the tokenizer's and the generation defaults (config.json is copied too).
EXTRA_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "tokenizer.model")
CHUNK_BYTES = 64 * 1024 * 1024  # Orbax chunk size: a host restoring its shard reads ~only its own chunks
DTYPES = ("bfloat16", "float16", "float32")
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class DestinationError(ValueError):
    """DST (or an interrupted conversion beside it) is in the way; the message says which flag to pass."""


USER_ERRORS = (CheckpointError, ConfigError, SafetensorsError, DestinationError)


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

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def param_shapes(cfg: Dots1Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter of the model (path in the state -> shape), without computing a weight."""
    model = abstract_model(cfg)
    return {path: tuple(var.get_value().shape) for path, var in nnx.to_flat_state(nnx.state(model))}


def plan_units(plan: Plan, opened: dict[Path, SafetensorsFile], cfg: Dots1Config, dtype: str | None
               ) -> dict[str, dict[str, ParamPlan]]:
    """unit -> parameter name -> what to read for it, in conversion order ("top" first, then layer by layer)."""
    shapes = param_shapes(cfg)
    units: dict[str, dict[str, ParamPlan]] = {}
    for key, file, m in plan:
        for output, target in enumerate(m.rule.targets):
            path, index = _target(m, target, cfg)
            unit = converted.unit_name(m.layer)
            name = ".".join(path if m.layer is None else path[1:])
            shape = shapes[path] if m.layer is None else shapes[path][1:]
            stored = opened[file].dtype(key)
            if name not in units.setdefault(unit, {}):
                units[unit][name] = ParamPlan(shape, _out_dtype(path, stored, dtype), str(stored), [])
            param = units[unit][name]
            param.hf_dtype = str(np.result_type(np.dtype(param.hf_dtype), stored))
            param.sources.append(Source(key, file, m.rule, output, index[1:]))
    order = sorted(units, key=lambda u: (u != converted.TOP, u))
    return {u: dict(sorted(units[u].items())) for u in order}


def _out_dtype(path: tuple[str, ...], stored: np.dtype, dtype: str | None) -> np.dtype:
    # The router's correction bias is f32 in the model whatever the weights are (selection is that sensitive).
    if path[-1] == "correction_bias":
        return np.dtype(np.float32)
    if dtype is None or not np.issubdtype(stored, np.floating):
        return np.dtype(stored)
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


# ---------------------------------------------------------------------------------------------- reading
def assemble(param: ParamPlan, opened: dict[Path, SafetensorsFile], cfg: Dots1Config, label: str) -> np.ndarray:
    """One per-layer parameter in our layout, from its HF tensors (e.g. experts stacked to [E, in, out])."""
    out = np.empty(param.shape, param.dtype)
    for src in param.sources:
        raw = opened[src.file].read(src.key)  # read(), not the map: RSS stays bounded
        value = src.rule.to_jax(raw, cfg)
        value = value[src.output] if isinstance(value, tuple) else value
        dest = out[src.slot] if src.slot else out
        if value.shape != dest.shape:  # the table and the model disagree: a bug here, not in the checkpoint
            raise AssertionError(f"{src.key} -> {label}{list(src.slot)}: shape {value.shape} != {dest.shape}")
        if value.dtype == dest.dtype:  # a bit copy; as unsigned ints numpy's strided copy is ~40% faster (bf16)
            dest.view(_BITS[dest.dtype.itemsize])[...] = value.view(_BITS[dest.dtype.itemsize])
        else:
            dest[...] = value  # casts to the dtype --dtype asks for
        del raw, value
    return out


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))).hexdigest()


# ---------------------------------------------------------------------------------------------- writing
def write_json(path: epath.Path, value: Any) -> None:
    """Write JSON atomically (temporary name, then rename) so an interruption never leaves half a manifest."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)


def write_unit(work: epath.Path, unit: str, params: dict[str, ParamPlan], opened: dict[Path, SafetensorsFile],
               cfg: Dots1Config, bar: tqdm) -> dict[str, Any]:
    """Write one unit's parameters (one Orbax item each) to <unit>.partial, rename it to <unit>, and return its
    manifest entry. A leftover .partial from an interrupted run is discarded first."""
    partial = work / converted.UNITS / f"{unit}.partial"
    final = work / converted.UNITS / unit
    for stale in (partial, final):
        if stale.exists():
            stale.rmtree()
    partial.mkdir(parents=True)
    ckptr = converted.checkpointer()
    entry: dict[str, Any] = {"params": {}}
    for name, param in params.items():
        bar.set_postfix_str(f"{unit}/{name}", refresh=False)
        array = assemble(param, opened, cfg, f"{unit}/{name}")
        entry["params"][name] = {"shape": list(array.shape), "dtype": str(array.dtype), "sha256": sha256(array),
                                 "hf_dtype": param.hf_dtype, "hf_tensors": len(param.sources)}
        args = ocp.args.StandardSave({"value": array}, save_args={"value": ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES)})
        ckptr.save(partial / name, args=args)
        bar.update(array.nbytes)
        del array  # free before the next parameter: peak memory is one parameter
    partial.rename(final)
    return entry


# ------------------------------------------------------------------------------------------ destination
def work_dir(dst: epath.Path) -> epath.Path:
    return dst.parent / (dst.name + WORK_SUFFIX)


def _is_nonempty(path: epath.Path) -> bool:
    return path.exists() and (not path.is_dir() or any(True for _ in path.iterdir()))


def check_destination(dst: epath.Path, resume: bool, overwrite: bool) -> bool:
    """Raise DestinationError when DST or an interrupted conversion is in the way; False when --resume finds DST
    already complete (nothing to do)."""
    work = work_dir(dst)
    if _is_nonempty(dst) and not overwrite:
        if resume and (dst / converted.MANIFEST).exists() and not work.exists():
            converted.read_manifest(dst)  # complete? (raises if not)
            return False
        raise DestinationError(f"destination {dst} exists and is not empty: pass --overwrite to replace it"
                               + (" (--resume only continues an interrupted conversion)" if resume else ""))
    if work.exists() and not (resume or overwrite):
        raise DestinationError(f"{work} holds an interrupted conversion: pass --resume to continue it, or "
                               "--overwrite to start again")
    return True


def _source_fingerprint(directory: Path, opened: dict[Path, SafetensorsFile]) -> dict[str, Any]:
    return {"path": str(directory), "files": {p.name: p.stat().st_size for p in opened}}


def start_or_resume(work: epath.Path, manifest: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any]:
    """The manifest to continue from: the interrupted one under --resume (if it is the same conversion), else
    `manifest` in a fresh work directory."""
    if work.exists() and resume and (work / converted.MANIFEST).exists():
        old = json.loads((work / converted.MANIFEST).read_text())
        for field in ("source", "dtype", "unit_order"):
            if old.get(field) != manifest[field]:
                raise DestinationError(f"{work} holds an interrupted conversion with a different {field} "
                                       f"({old.get(field)!r}); pass --overwrite to start again")
        return old
    if work.exists():
        work.rmtree()
    work.mkdir(parents=True)
    write_json(work / converted.MANIFEST, manifest)
    return manifest


def copy_extra_files(directory: Path, work: epath.Path) -> list[str]:
    names = ["config.json"] + [n for n in EXTRA_FILES if (directory / n).is_file()]
    for name in names:
        (work / name).write_bytes((directory / name).read_bytes())
    return names[1:]


def finish(work: epath.Path, dst: epath.Path, manifest: dict[str, Any]) -> None:
    """Mark the manifest complete and move the work directory to DST (replacing an empty or --overwrite DST)."""
    manifest["complete"] = True
    write_json(work / converted.MANIFEST, manifest)
    if dst.exists():
        dst.rmtree() if dst.is_dir() else dst.unlink()
    work.rename(dst)


# ------------------------------------------------------------------------------------------------- main
def convert(src: str, dst: str | os.PathLike, *, dtype: str | None = None, resume: bool = False,
            overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> epath.Path:
    """Convert HF checkpoint `src` (directory or repo id) to a converted dots_jax checkpoint at `dst`."""
    dst_path = converted.as_path(dst)
    if Path(os.path.expanduser(src)).exists():  # a local source: refused before anything else is looked at
        refuse_overlap(src, dst_path, work_dir(dst_path))
    if not check_destination(dst_path, resume, overwrite):
        log(f"{dst_path} is already a complete conversion: nothing to do")
        return dst_path
    directory = resolve(src)
    refuse_overlap(directory, dst_path, work_dir(dst_path))  # a repo id resolves into the HF cache
    cfg = Dots1Config.from_hf(directory)
    opened, plan = plan_tensors(directory, cfg)
    check_coverage(plan, cfg, param_shapes(cfg), directory)
    units = plan_units(plan, opened, cfg, dtype)

    work = work_dir(dst_path)
    fresh = {"format": converted.FORMAT, "version": converted.VERSION, "complete": False,
             "source": _source_fingerprint(directory, opened), "dtype": dtype, "unit_order": list(units),
             "units": {}, "extra_files": []}
    manifest = start_or_resume(work, fresh, resume, overwrite)
    done = [u for u in units if u in manifest["units"]]
    if done:
        log(f"resuming in {work}: {len(done)} of {len(units)} units already written, skipping them")
    manifest["extra_files"] = copy_extra_files(directory, work)

    total = sum(p.nbytes for params in units.values() for p in params.values())
    initial = sum(p.nbytes for u in done for p in units[u].values())
    pause_after = int(os.environ.get(PAUSE_ENV, "0"))
    written = 0
    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
              disable=not progress, file=sys.stderr) as bar:
        for unit, params in units.items():
            if unit in manifest["units"]:
                continue
            manifest["units"][unit] = write_unit(work, unit, params, opened, cfg, bar)
            write_json(work / converted.MANIFEST, manifest)  # the unit counts as done from here on
            written += 1
            if written == pause_after:  # the test hook (module docstring)
                log(f"paused after {written} units ({PAUSE_ENV})")
                sys.stdout.flush()
                time.sleep(3600)
    finish(work, dst_path, manifest)
    log(f"wrote {dst_path}: {len(units)} units, {total / 2**30:.2f} GiB")
    return dst_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m convert.hf_to_jax",
        description="Convert a Hugging Face dots.llm1 checkpoint (safetensors) into a dots_jax checkpoint: "
                    "Orbax items per layer plus config.json, tokenizer files and manifest.json. Streams layer by "
                    "layer (peak memory about one parameter), writes to DST.tmp-hf_to_jax and renames it to DST "
                    "when complete.")
    parser.add_argument("--src", required=True, help="HF repo id (fetched with huggingface_hub into the HF cache; "
                        "HF_HUB_OFFLINE is honoured) or a local directory with config.json and safetensors")
    parser.add_argument("--dst", required=True, help="output directory (a local path or any path Orbax/tensorstore "
                        "accepts, e.g. gs://bucket/dots1)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="cast floating-point weights to this dtype (default: keep each tensor's stored dtype; "
                             "the router's correction bias is always stored f32)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted conversion, skipping the layers already written")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace DST and discard any interrupted conversion")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        convert(args.src, args.dst, dtype=args.dtype, resume=args.resume, overwrite=args.overwrite,
                progress=not args.no_progress)
    except USER_ERRORS as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:  # huggingface_hub's errors (repo not found, offline): one line, no traceback
        if type(e).__module__.startswith("huggingface_hub"):
            print(f"error: {args.src}: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
