"""Load Hugging Face dots.llm1 checkpoints (safetensors) into Dots1ForCausalLM through ONE key table.

Every checkpoint tensor must match exactly one rule, have the shape config.json implies, and fill target slots
that nothing else fills; every slot must be filled. Tensors are read one at a time from memory-mapped files and
written in place into preallocated (donated) device buffers: peak memory is the model plus one tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from dots_jax.config import Dots1Config
from dots_jax.errors import UserError
from dots_jax.model.modeling import Dots1ForCausalLM, abstract_model
from dots_jax.weights.safetensors_io import SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HF_FILE_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", INDEX_FILE, "tokenizer*",
                    "chat_template.jinja", "vocab.json", "merges.txt", "special_tokens_map.json"]


class CheckpointError(UserError):
    """A checkpoint that does not fit its config.json: the message names the tensor, file or field."""


Transform = Callable[[np.ndarray, Dots1Config], np.ndarray | tuple[np.ndarray, ...]]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF name template; {layer} and {expert} are integers
    hf_shape: tuple[str, ...]  # each dim a config field or a product "a*b" of fields
    layers: str  # which layers hold it: "none" (top level), "all", "dense", "moe"
    targets: tuple[str, ...]  # our parameter(s), relative to the layer stack for per-layer tensors
    to_jax: Transform = lambda x, cfg: x  # stored array -> array(s) in our layout, one per target

    @functools.cached_property
    def pattern(self) -> re.Pattern[str]:
        escaped = re.escape(self.hf).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
        return re.compile(escaped + "$")


def _linear(x: np.ndarray, cfg: Dots1Config) -> np.ndarray:  # torch nn.Linear [out, in] -> [in, out]
    return x.T


def _heads_in(x: np.ndarray, cfg: Dots1Config) -> np.ndarray:  # [n*d, H] -> [H, n, d]
    return x.T.reshape(x.shape[1], -1, cfg.head_dim)


def _heads_out(x: np.ndarray, cfg: Dots1Config) -> np.ndarray:  # [H, n*d] -> [n, d, H]
    return x.T.reshape(-1, cfg.head_dim, x.shape[0])


def _heads_bias(x: np.ndarray, cfg: Dots1Config) -> np.ndarray:  # [n*d] -> [n, d]
    return x.reshape(-1, cfg.head_dim)


def _fused_gate_up(x: np.ndarray, cfg: Dots1Config) -> tuple[np.ndarray, np.ndarray]:
    # transformers 5.x: [E, 2*I, H] with the gate rows first, then up.
    i = cfg.moe_intermediate_size
    return x[:, :i, :].transpose(0, 2, 1), x[:, i:, :].transpose(0, 2, 1)


def _experts_linear(x: np.ndarray, cfg: Dots1Config) -> np.ndarray:  # [E, out, in] -> [E, in, out]
    return x.transpose(0, 2, 1)


_ATTN = "self_attn"
H, V, E, I_MOE = "hidden_size", "vocab_size", "n_routed_experts", "moe_intermediate_size"
Q_OUT, KV_OUT = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"

# The key table: HF tensor -> our parameter(s). Targets under a layer are relative to that layer's stack.
KEY_TABLE: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", (V, H), "none", ("embed_tokens",)),
    Rule("model.norm.weight", (H,), "none", ("norm.weight",)),
    Rule("lm_head.weight", (V, H), "none", ("lm_head",), _linear),
    Rule("model.layers.{layer}.input_layernorm.weight", (H,), "all", ("input_layernorm.weight",)),
    Rule("model.layers.{layer}.post_attention_layernorm.weight", (H,), "all",
         ("post_attention_layernorm.weight",)),
    Rule("model.layers.{layer}.self_attn.q_proj.weight", (Q_OUT, H), "all", (f"{_ATTN}.q_proj",), _heads_in),
    Rule("model.layers.{layer}.self_attn.k_proj.weight", (KV_OUT, H), "all", (f"{_ATTN}.k_proj",), _heads_in),
    Rule("model.layers.{layer}.self_attn.v_proj.weight", (KV_OUT, H), "all", (f"{_ATTN}.v_proj",), _heads_in),
    Rule("model.layers.{layer}.self_attn.o_proj.weight", (H, Q_OUT), "all", (f"{_ATTN}.o_proj",), _heads_out),
    Rule("model.layers.{layer}.self_attn.q_proj.bias", (Q_OUT,), "all", (f"{_ATTN}.q_bias",), _heads_bias),
    Rule("model.layers.{layer}.self_attn.k_proj.bias", (KV_OUT,), "all", (f"{_ATTN}.k_bias",), _heads_bias),
    Rule("model.layers.{layer}.self_attn.v_proj.bias", (KV_OUT,), "all", (f"{_ATTN}.v_bias",), _heads_bias),
    Rule("model.layers.{layer}.self_attn.o_proj.bias", (H,), "all", (f"{_ATTN}.o_bias",)),
    Rule("model.layers.{layer}.self_attn.q_norm.weight", ("head_dim",), "all", (f"{_ATTN}.q_norm.weight",)),
    Rule("model.layers.{layer}.self_attn.k_norm.weight", ("head_dim",), "all", (f"{_ATTN}.k_norm.weight",)),
    # Dense SwiGLU (layers < first_k_dense_replace).
    Rule("model.layers.{layer}.mlp.gate_proj.weight", ("intermediate_size", H), "dense",
         ("mlp.gate_proj",), _linear),
    Rule("model.layers.{layer}.mlp.up_proj.weight", ("intermediate_size", H), "dense", ("mlp.up_proj",), _linear),
    Rule("model.layers.{layer}.mlp.down_proj.weight", (H, "intermediate_size"), "dense",
         ("mlp.down_proj",), _linear),
    # MoE: router, correction bias, shared experts, routed experts in either layout.
    Rule("model.layers.{layer}.mlp.gate.weight", (E, H), "moe", ("mlp.router",), _linear),
    Rule("model.layers.{layer}.mlp.gate.e_score_correction_bias", (E,), "moe", ("mlp.correction_bias",)),
    Rule("model.layers.{layer}.mlp.shared_experts.gate_proj.weight", ("shared_intermediate_size", H), "moe",
         ("mlp.shared_experts.gate_proj",), _linear),
    Rule("model.layers.{layer}.mlp.shared_experts.up_proj.weight", ("shared_intermediate_size", H), "moe",
         ("mlp.shared_experts.up_proj",), _linear),
    Rule("model.layers.{layer}.mlp.shared_experts.down_proj.weight", (H, "shared_intermediate_size"), "moe",
         ("mlp.shared_experts.down_proj",), _linear),
    Rule("model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight", (I_MOE, H), "moe",
         ("mlp.gate_proj",), _linear),
    Rule("model.layers.{layer}.mlp.experts.{expert}.up_proj.weight", (I_MOE, H), "moe", ("mlp.up_proj",), _linear),
    Rule("model.layers.{layer}.mlp.experts.{expert}.down_proj.weight", (H, I_MOE), "moe",
         ("mlp.down_proj",), _linear),
    Rule("model.layers.{layer}.mlp.experts.gate_up_proj", (E, f"2*{I_MOE}", H), "moe",
         ("mlp.gate_proj", "mlp.up_proj"), _fused_gate_up),
    Rule("model.layers.{layer}.mlp.experts.down_proj", (E, H, I_MOE), "moe",
         ("mlp.down_proj",), lambda x, c: x.transpose(0, 2, 1)),
)


def _dim(spec: str, cfg: Dots1Config) -> int:
    return math.prod(int(part) if part.isdigit() else getattr(cfg, part) for part in spec.split("*"))


@dataclasses.dataclass(frozen=True)
class _Match:
    rule: Rule
    layer: int | None
    expert: int | None


def match_key(key: str, cfg: Dots1Config) -> _Match:
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
            is_dense = layer < cfg.first_k_dense_replace
            if (rule.layers == "moe" and is_dense) or (rule.layers == "dense" and not is_dense):
                kind = "dense" if is_dense else "MoE"
                raise CheckpointError(f"tensor {key!r}: layer {layer} is a {kind} layer by config.json "
                                      f"(first_k_dense_replace={cfg.first_k_dense_replace})")
        if expert is not None and expert >= cfg.n_routed_experts:
            raise CheckpointError(f"tensor {key!r}: expert {expert} but config.json has "
                                  f"n_routed_experts={cfg.n_routed_experts}")
        if rule.hf == "lm_head.weight" and cfg.tie_word_embeddings:
            raise CheckpointError(f"tensor {key!r} is present but config.json says tie_word_embeddings=true")
        if ".bias" in rule.hf and _ATTN in rule.hf and not cfg.attention_bias:
            raise CheckpointError(f"tensor {key!r} is present but config.json says attention_bias=false")
        return _Match(rule, layer, expert)
    raise CheckpointError(f"unexpected tensor {key!r}: it is not part of a dots1 checkpoint")


def _target(match: _Match, name: str, cfg: Dots1Config) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(path in the model state, leading index into that parameter) for one output of a rule."""
    path = tuple(name.split("."))
    if match.layer is None:
        return path, ()
    if match.layer < cfg.first_k_dense_replace:
        stack, index = "dense_layers", match.layer
    else:
        stack, index = "moe_layers", match.layer - cfg.first_k_dense_replace
    return (stack, *path), (index,) if match.expert is None else (index, match.expert)


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
    except HfHubHTTPError as e:  # repository not found, gated, ...: the hub's message, on one line
        raise CheckpointError(f"{repo}: {' '.join(str(e).split())}") from None


def from_pretrained(path: str | os.PathLike, *, dtype: jnp.dtype | type = jnp.float32,
                    param_dtype: jnp.dtype | type | None = None, moe_backend: str = "auto",
                    progress: bool = True) -> Dots1ForCausalLM:
    """Load an HF dots1 checkpoint (local directory or repo id).

    dtype is the activation dtype; param_dtype (default: dtype) the weights' dtype. The router's correction
    bias is kept in f32 whatever they are.
    """
    directory = resolve(path)
    cfg = Dots1Config.from_hf(directory)
    opened, plan = plan_tensors(directory, cfg)
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend)
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    check_coverage(plan, cfg, {p: v.get_value().shape for p, v in flat.items()}, directory)
    buffers: dict[tuple[str, ...], jax.Array] = {}

    for key, file, m in tqdm(plan, desc="loading weights", unit="tensor", disable=not progress):
        arrays = m.rule.to_jax(opened[file][key], cfg)
        arrays = arrays if isinstance(arrays, tuple) else (arrays,)
        for name, value in zip(m.rule.targets, arrays, strict=True):
            target, index = _target(m, name, cfg)
            var = flat[target]
            if target not in buffers:
                buffers[target] = jnp.zeros(var.get_value().shape, var.get_value().dtype)
            array = np.asarray(value, dtype=var.get_value().dtype)
            if index:
                buffers[target] = _write(buffers[target], array, jnp.asarray(index, jnp.int32))
            else:
                buffers[target] = jnp.asarray(array)

    for path, var in flat.items():
        var.set_value(buffers[path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


Plan = list[tuple[str, Path, _Match]]  # (tensor name, the file holding it, the rule consuming it)


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
        stored, expected = opened[file].shape(key), tuple(_dim(d, cfg) for d in m.rule.hf_shape)
        if stored != expected:
            raise CheckpointError(f"tensor {key!r} in {file.name} has shape {stored}, but config.json implies "
                                  f"{expected} = ({', '.join(m.rule.hf_shape)})")
        plan.append((key, file, m))
    return opened, plan


def check_coverage(plan: Plan, cfg: Dots1Config,
                   shapes: dict[tuple[str, ...], tuple[int, ...]], directory: Path) -> None:
    """Every slot of every parameter (`shapes`: path in the model state -> shape) filled by exactly one tensor
    of the plan, or a CheckpointError naming the tensor(s): decided from names alone, before reading data."""
    filled_by: dict[tuple[str, ...], np.ndarray] = {}  # path -> per-slot name of the tensor that fills it
    for key, _, m in plan:
        for name in m.rule.targets:
            target, index = _target(m, name, cfg)
            if target not in shapes:
                raise CheckpointError(f"tensor {key!r} maps to {'.'.join(target)}, which this config lacks")
            if target not in filled_by:
                filled_by[target] = np.full(shapes[target][:_slot_dims(target)], "", dtype=object)
            owners = filled_by[target][index] if index else filled_by[target]
            already = [o for o in np.ravel(owners) if o]
            if already:
                raise CheckpointError(f"tensor {key!r} fills {'.'.join(target)}{list(index)}, already filled by "
                                      f"{already[0]!r} (two expert layouts mixed?)")
            filled_by[target][index] = key
    missing = [_hf_name(path, slot, cfg) for path in shapes for slot in _empty_slots(path, filled_by, shapes)]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {directory} is missing tensors: {', '.join(missing[:5])}{more}")


def _slot_dims(path: tuple[str, ...]) -> int:
    """How many leading dims of a parameter one checkpoint tensor addresses: (layer, expert), (layer) or ()."""
    if path[0] not in ("dense_layers", "moe_layers"):
        return 0
    routed = path[0] == "moe_layers" and path[1] == "mlp" and path[-1] in ("gate_proj", "up_proj", "down_proj")
    return 2 if routed and len(path) == 3 else 1


def _empty_slots(path: tuple[str, ...], filled_by: dict, shapes: dict) -> list[tuple[int, ...]]:
    if path not in filled_by:
        lead = shapes[path][:_slot_dims(path)]
        return [tuple(s) for s in np.ndindex(*lead)] if lead else [()]
    return [tuple(int(i) for i in s) for s in np.argwhere(filled_by[path] == "")]


def _hf_name(path: tuple[str, ...], slot: tuple[int, ...], cfg: Dots1Config) -> str:
    """The HF name (per-expert layout) of an empty parameter slot, for the error message."""
    if path[0] in ("dense_layers", "moe_layers"):
        layer = slot[0] + (cfg.first_k_dense_replace if path[0] == "moe_layers" else 0)
        inner = ".".join(path[1:])
        rules = [r for r in KEY_TABLE if inner in r.targets and ("{expert}" in r.hf) == (len(slot) == 2)]
        return rules[0].hf.format(layer=layer, expert=slot[-1]) if rules else f"model.layers.{layer}.{inner}"
    rules = [r for r in KEY_TABLE if ".".join(path) in r.targets]
    return rules[0].hf if rules else ".".join(path)
