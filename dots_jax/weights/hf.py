"""The Hugging Face dots.llm1 format (safetensors + config.json), read and written through the ONE key table
(weights/keys.py).

Reading (load_hf): every checkpoint tensor must match exactly one rule, have the shape config.json implies, and
fill target slots that nothing else fills; every slot must be filled. Tensors are read one at a time from
memory-mapped files and written in place into preallocated (donated) device buffers: peak memory is the model plus
one tensor.

Writing (export_hf, and convert.jax_to_hf through export_entries): transformers' per-expert tensor names, each
tensor put back through the table's inverse layout and checked against its forward one.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from dots_jax.config import Dots1Config
from dots_jax.errors import UserError
from dots_jax.files import atomic_path
from dots_jax.model.layers import SCALE_SUFFIX, contracted_axes
from dots_jax.model.modeling import Dots1ForCausalLM, abstract_model
from dots_jax.ops.quant import quantize_int8
from dots_jax.weights.keys import (
    DENSE,
    KEY_TABLE,
    LM_HEAD,
    MOE,
    STACKS,
    Rule,
    StatePath,
    dim,
    rule_layers,
    stack_layers,
    target,
)
from dots_jax.weights.safetensors_io import SafetensorsFile, save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The files of an HF checkpoint that make up its tokenizer (and chat template), as glob patterns: fetched from the
# Hub, copied by the converters and shipped beside a trained model.
TOKENIZER_FILES = ("tokenizer*", "chat_template.jinja", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt")
HF_FILE_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", INDEX_FILE, *TOKENIZER_FILES]


class CheckpointError(UserError):
    """A checkpoint that does not fit its config.json: the message names the tensor, file or field."""


class QuantizedExportError(UserError):
    """An export to the HF format of int8-quantised weights, which it cannot hold (and dequantised weights would
    pass for the original ones)."""


@dataclasses.dataclass(frozen=True)
class Match:
    """The rule that consumes one HF tensor, and the layer and expert its name gives."""
    rule: Rule
    layer: int | None
    expert: int | None

    def targets(self, cfg: Dots1Config) -> list[tuple[StatePath, tuple[int, ...]]]:
        """(path in the model state, leading index into that parameter) of each output of the rule, in order."""
        return [target(name, self.layer, self.expert, cfg) for name in self.rule.targets]


def absent_by_config(rule: Rule, cfg: Dots1Config) -> str | None:
    """The config.json setting under which a checkpoint has no tensor for `rule`, or None when it has one."""
    if rule.hf == LM_HEAD and cfg.tie_word_embeddings:
        return "tie_word_embeddings=true"
    if rule.is_attention_bias and not cfg.attention_bias:
        return "attention_bias=false"
    return None


def match_key(key: str, cfg: Dots1Config) -> Match:
    """The rule that consumes `key`, or a CheckpointError saying why none does."""
    for rule in KEY_TABLE:
        m = rule.pattern.match(key)
        if not m:
            continue
        layer = int(m["layer"]) if "layer" in m.groupdict() else None
        expert = int(m["expert"]) if "expert" in m.groupdict() else None
        if layer is not None:
            if layer >= cfg.num_hidden_layers:
                raise CheckpointError(f"tensor {key!r}: layer {layer} but config.json has "
                                      f"num_hidden_layers={cfg.num_hidden_layers}")
            if layer not in rule_layers(rule, cfg):
                kind = "dense" if layer in stack_layers(DENSE, cfg) else "MoE"
                raise CheckpointError(f"tensor {key!r}: layer {layer} is a {kind} layer by config.json "
                                      f"(first_k_dense_replace={cfg.first_k_dense_replace})")
        if expert is not None and expert >= cfg.n_routed_experts:
            raise CheckpointError(f"tensor {key!r}: expert {expert} but config.json has "
                                  f"n_routed_experts={cfg.n_routed_experts}")
        setting = absent_by_config(rule, cfg)
        if setting is not None:
            raise CheckpointError(f"tensor {key!r} is present but config.json says {setting}")
        return Match(rule, layer, expert)
    raise CheckpointError(f"unexpected tensor {key!r}: it is not part of a dots1 checkpoint")


@functools.partial(jax.jit, donate_argnums=0)
def _write(buffer: jax.Array, value: jax.Array, index: jax.Array) -> jax.Array:
    """buffer[index...] = value, in place (the buffer is donated)."""
    lead = index.shape[0]
    value = value.reshape((1,) * lead + value.shape[value.ndim - (buffer.ndim - lead):])
    start = tuple(index) + (0,) * (buffer.ndim - lead)
    return jax.lax.dynamic_update_slice(buffer, value.astype(buffer.dtype), start)


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it, from the index or the single file."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {key: directory / name for key, name in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise CheckpointError(f"{index} names shard {path.name}, which is missing from {directory}")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        return {key: single for key in SafetensorsFile(single)}
    raise CheckpointError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def resolve(path_or_repo: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id, fetched (only the files needed) into the HF
    cache by huggingface_hub, which honours HF_HUB_OFFLINE."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected an HF model directory (config.json + safetensors)")
        return path
    repo = str(path_or_repo)
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise CheckpointError(f"{repo}: no such directory, and not a Hugging Face repo id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=HF_FILE_PATTERNS))
    except LocalEntryNotFoundError as e:  # no network (or HF_HUB_OFFLINE=1) and not in the HF cache
        from huggingface_hub import constants

        why = ("HF_HUB_OFFLINE forbids downloading it" if constants.HF_HUB_OFFLINE
               else f"the Hugging Face Hub cannot be reached ({e.__cause__ or 'no network'})")
        raise CheckpointError(f"{repo}: not a local directory, not in the Hugging Face cache, and {why}: "
                              f"fetch it with network access (hf download {repo}) or pass a local directory"
                              ) from None
    except Exception as e:  # repository not found, gated, an invalid id, ...: the hub's message, on one line
        if not isinstance(e, HfHubHTTPError) and not type(e).__module__.startswith("huggingface_hub"):
            raise
        raise CheckpointError(f"{repo}: {' '.join(str(e).split())}") from None


def scale_path(path: StatePath) -> StatePath:
    """The path of the int8 scale beside weight `path` (present in the model state only when it is quantised)."""
    return (*path[:-1], path[-1] + SCALE_SUFFIX)


def is_scale(path: StatePath) -> bool:
    return path[-1].endswith(SCALE_SUFFIX)


# One compiled program per shape (quantize_int8 run op by op compiles each of its ops per shape).
_quantize = jax.jit(quantize_int8, static_argnums=1)


def quantize_slice(value: np.ndarray, path: StatePath, chunk_bytes: int = 256 * 2**20
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(int8, scale) of one checkpoint tensor in our layout, `value`, bound for quantised weight `path`: the whole
    weight or one layer's / one expert's slice of it, which holds whole output channels (the slices cut leading
    axes, never a contracted one), so quantising it alone gives that slice of the weight's quantisation.

    Quantised in blocks of output channels along the last axis (never contracted) of at most chunk_bytes in
    f32: a large tensor (a fused [E, H, I] expert tensor, the LM head) then needs no f32 copy of itself."""
    axes = contracted_axes(path[-1], value.ndim)
    columns = max(1, chunk_bytes // (4 * max(1, value[..., :1].size)))
    parts = [_quantize(value[..., i:i + columns], axes) for i in range(0, value.shape[-1], columns)]
    return (np.concatenate([np.asarray(q) for q, _ in parts], axis=-1),
            np.concatenate([np.asarray(scale) for _, scale in parts], axis=-1))


def load_hf(path: str | os.PathLike, *, dtype: jnp.dtype | type = jnp.float32,
            param_dtype: jnp.dtype | type | None = None, moe_backend: str = "auto",
            attention_backend: str = "auto", progress: bool = True, quantize: str | None = None,
            quantize_head: bool = False) -> Dots1ForCausalLM:
    """Load an HF dots1 checkpoint (local directory or repo id) onto one device (weights.from_pretrained loads
    any source, onto a mesh too).

    dtype is the activation dtype; param_dtype (default: dtype) the weights' dtype. The router's correction
    bias is kept in f32 whatever they are. quantize="int8" (and quantize_head) as Dots1ForCausalLM: each linear
    weight is quantised tensor by tensor as it is read, from the checkpoint's own values (so peak memory is the
    int8 model plus one tensor).
    """
    directory = resolve(path)
    cfg = Dots1Config.from_hf(directory)
    opened, plan = plan_tensors(directory, cfg)
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend,
                              attention_backend=attention_backend, quantize=quantize, quantize_head=quantize_head)
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    check_coverage(plan, cfg, {p: v.get_value().shape for p, v in flat.items() if not is_scale(p)}, directory)
    buffers: dict[StatePath, jax.Array] = {}

    def put(path: StatePath, index: tuple[int, ...], array: np.ndarray) -> None:
        var = flat[path].get_value()
        if not index:
            buffers[path] = jnp.asarray(np.asarray(array, var.dtype))
            return
        if path not in buffers:
            buffers[path] = jnp.zeros(var.shape, var.dtype)
        buffers[path] = _write(buffers[path], np.asarray(array, var.dtype), jnp.asarray(index, jnp.int32))

    for key, file, m in tqdm(plan, desc="loading weights", unit="tensor", disable=not progress):
        arrays = m.rule.to_jax(opened[file][key], cfg)
        arrays = arrays if isinstance(arrays, tuple) else (arrays,)
        for (path, index), value in zip(m.targets(cfg), arrays, strict=True):
            if scale_path(path) in flat:
                q, scale = quantize_slice(np.asarray(value), path)
                put(path, index, q)
                put(scale_path(path), index, scale)
            else:
                put(path, index, np.asarray(value))

    for path, var in flat.items():
        var.set_value(buffers[path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


Plan = list[tuple[str, Path, Match]]  # (tensor name, the file holding it, the rule consuming it)


def plan_tensors(directory: Path, cfg: Dots1Config) -> tuple[dict[Path, SafetensorsFile], Plan]:
    """(opened shards, [(tensor name, its file, its rule match)] in file order): the whole checkpoint checked
    against KEY_TABLE and config.json (names, layers, experts, shapes) from the headers alone, before any data
    is read, so a bad checkpoint fails fast."""
    files = checkpoint_files(directory)
    opened = {path: SafetensorsFile(path) for path in sorted(set(files.values()))}
    plan = []
    for key, file in sorted(files.items(), key=lambda kv: (str(kv[1]), kv[0])):
        m = match_key(key, cfg)
        if key not in opened[file]:
            raise CheckpointError(f"tensor {key!r} is listed in the index but missing from {file}")
        stored, expected = opened[file].shape(key), tuple(dim(d, cfg) for d in m.rule.hf_shape)
        if stored != expected:
            raise CheckpointError(f"tensor {key!r} in {file.name} has shape {stored}, but config.json implies "
                                  f"{expected} = ({', '.join(m.rule.hf_shape)})")
        plan.append((key, file, m))
    return opened, plan


def check_coverage(plan: Plan, cfg: Dots1Config,
                   shapes: dict[StatePath, tuple[int, ...]], directory: Path) -> None:
    """Every slot of every parameter (`shapes`: path in the model state -> shape) filled by exactly one tensor
    of the plan, or a CheckpointError naming the tensor(s): decided from names alone, before reading data."""
    filled_by: dict[StatePath, np.ndarray] = {}  # path -> per-slot name of the tensor that fills it
    for key, _, m in plan:
        for path, index in m.targets(cfg):
            if path not in shapes:
                raise CheckpointError(f"tensor {key!r} maps to {'.'.join(path)}, which this config lacks")
            if path not in filled_by:
                filled_by[path] = np.full(shapes[path][:_slot_dims(path)], "", dtype=object)
            owners = filled_by[path][index] if index else filled_by[path]
            already = [o for o in np.ravel(owners) if o]
            if already:
                raise CheckpointError(f"tensor {key!r} fills {'.'.join(path)}{list(index)}, already filled by "
                                      f"{already[0]!r} (two expert layouts mixed?)")
            filled_by[path][index] = key
    missing = [_hf_name(path, slot, cfg) for path in shapes for slot in _empty_slots(path, filled_by, shapes)]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {directory} is missing tensors: {', '.join(missing[:5])}{more}")


def _slot_dims(path: StatePath) -> int:
    """How many leading dims of a parameter one checkpoint tensor addresses: (layer, expert), (layer) or ()."""
    if path[0] not in STACKS:
        return 0
    routed = path[0] == MOE and path[1] == "mlp" and path[-1] in ("gate_proj", "up_proj", "down_proj")
    return 2 if routed and len(path) == 3 else 1


def _empty_slots(path: StatePath, filled_by: dict, shapes: dict) -> list[tuple[int, ...]]:
    if path not in filled_by:
        lead = shapes[path][:_slot_dims(path)]
        return [tuple(s) for s in np.ndindex(*lead)] if lead else [()]
    return [tuple(int(i) for i in s) for s in np.argwhere(filled_by[path] == "")]


def _hf_name(path: StatePath, slot: tuple[int, ...], cfg: Dots1Config) -> str:
    """The HF name (per-expert layout) of an empty parameter slot, for the error message."""
    if path[0] in STACKS:
        layer = stack_layers(path[0], cfg)[slot[0]]
        inner = ".".join(path[1:])
        rules = [r for r in KEY_TABLE if inner in r.targets and ("{expert}" in r.hf) == (len(slot) == 2)]
        return rules[0].hf.format(layer=layer, expert=slot[-1]) if rules else f"model.layers.{layer}.{inner}"
    rules = [r for r in KEY_TABLE if ".".join(path) in r.targets]
    return rules[0].hf if rules else ".".join(path)


# ------------------------------------------------------------------------------------------------ writing
@dataclasses.dataclass(frozen=True)
class ExportEntry:
    """One tensor of an HF export (per-expert layout): its HF name and where it lives in our model state."""
    name: str
    path: StatePath  # our parameter in the model state
    index: tuple[int, ...]  # leading index into that parameter: (), (layer-in-stack,) or (layer-in-stack, expert)
    layer: int | None  # the HF layer index (None for the top-level tensors)
    rule: Rule

    def to_hf(self, ours: np.ndarray, cfg: Dots1Config) -> np.ndarray:
        """Our slice -> the HF tensor, through the rule's inverse layout; the forward one must give back our array
        exactly, so a table change whose inverse is wrong fails here rather than exporting garbage."""
        assert self.rule.layout.to_hf is not None  # export_entries holds only the rules we write
        tensor = np.ascontiguousarray(self.rule.layout.to_hf(ours, cfg))
        if not np.array_equal(np.asarray(self.rule.to_jax(tensor, cfg)), ours):
            raise AssertionError(f"export of {self.name!r} does not invert the key table's layout")
        return tensor


def export_entries(cfg: Dots1Config) -> list[ExportEntry]:
    """Every tensor an HF export of a model with `cfg` holds, in KEY_TABLE order: the one inverse of the table,
    shared by export_hf and the converter (convert.jax_to_hf). The read-only layouts (transformers 5.x's fused
    experts) are left out: the per-expert ones hold the same parameters."""
    entries = []
    for rule in KEY_TABLE:
        if rule.layout.to_hf is None or absent_by_config(rule, cfg) is not None:
            continue
        experts = range(cfg.n_routed_experts) if "{expert}" in rule.hf else [None]
        for layer in rule_layers(rule, cfg):
            for expert in experts:
                (path, index), = Match(rule, layer, expert).targets(cfg)
                entries.append(ExportEntry(rule.hf.format(layer=layer, expert=expert), path, index, layer, rule))
    return entries


def hf_tensors(model: Dots1ForCausalLM) -> dict[str, np.ndarray]:
    """Every parameter of `model` under its HF name (per-expert layout) in torch's layout and the params' dtype.

    Each tensor is checked against KEY_TABLE's forward layout (ExportEntry.to_hf), and every element of the model
    must be written exactly once.
    """
    cfg = model.cfg
    if getattr(model, "quantize", None) is not None:
        raise QuantizedExportError(f"this model's weights are {model.quantize}-quantised: an HF export holds float "
                                   "weights; export the model it was quantised from")
    flat = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}
    tensors: dict[str, np.ndarray] = {}
    written = 0
    for entry in export_entries(cfg):
        ours = flat[entry.path][entry.index] if entry.index else flat[entry.path]
        tensors[entry.name] = entry.to_hf(ours, cfg)
        written += ours.size
    total = sum(value.size for value in flat.values())
    if written != total:
        raise AssertionError(f"exported {written} of the model's {total} parameter elements")
    return tensors


def export_hf(model: Dots1ForCausalLM, directory: str | os.PathLike, *,
              extra_files: Sequence[str | os.PathLike] = ()) -> Path:
    """Write `model` as an HF dots1 checkpoint directory: config.json + model.safetensors (per-expert names), plus
    copies of `extra_files` (e.g. the tokenizer's). Loadable by from_pretrained and by transformers.

    Written beside `directory` first and renamed into place, so `directory` never holds half an export; an
    existing `directory` is replaced.
    """
    directory = Path(directory)
    tensors = hf_tensors(model)
    dtypes = {str(t.dtype) for t in tensors.values()}
    config = model.cfg.to_hf()
    # The dtype the weights are stored in (f32 master weights when trained here), as transformers expects.
    config["torch_dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / SINGLE_FILE, metadata={"format": "pt"})
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
    return directory


def tokenizer_files(directory: str | os.PathLike) -> list[Path]:
    """The tokenizer's files in an HF checkpoint directory (TOKENIZER_FILES), sorted."""
    return sorted(p for p in Path(directory).expanduser().iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in TOKENIZER_FILES))
