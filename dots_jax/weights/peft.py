"""LoRA adapters in PEFT's file layout, written and read: `OUT/adapter/` of a LoRA run is what
`PeftModel.save_pretrained` writes (peft 0.21.2), so `peft.PeftModel.from_pretrained(Dots1ForCausalLM, OUT/adapter)`
applies it to transformers' model (5.x), and `from_pretrained(base, lora=DIR)` applies it (or one trained with PEFT)
here.

  adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, target_parameters, ...
  adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r]

Our adapters (dots_jax.model.lora) sit beside each weight in our layout; PEFT's follow torch's:
- attention q/k/v/o, the dense MLP and the shared experts are nn.Linear modules in target_modules: one lora_A and
  one lora_B per layer, delta W = scaling * B @ A ([out, in]).
- the routed experts are, in transformers 5.x, the fused parameters mlp.experts.gate_up_proj [E, 2I, H] and
  mlp.experts.down_proj [E, H, I], which PEFT adapts through target_parameters (its ParamWrapper): lora_A [E*r, in]
  holds expert e's rank rows at e*r .. e*r + r - 1, lora_B [out, r*E] its columns at e, E + e, 2E + e, ... (the
  order of ParamWrapper.get_delta_weight); gate and up share one A, as our gate_up_proj_lora_a. The two wrappers
  nest on the one experts module: gate_up_proj's (wrapped first) becomes `experts.base_layer`.
PEFT refuses lora_dropout != 0 with target_parameters; dropout only acts in training, so an adapter on the experts is
written with lora_dropout 0 (the applied model is the same).

What PEFT cannot apply (peft 0.21.2, transformers 5.x): the dense layers' MLP and the shared experts. For dots1 PEFT
rewrites every target_modules entry whose name ends in gate_proj, up_proj or down_proj into target_parameters on the
routed experts (its conversion of transformers 4.x's per-expert adapters, peft/utils/transformers_weight_conversion.py
_convert_peft_config_moe), and would then drop those tensors as unexpected keys without a word. So the adapter
written holds the targets PEFT applies whole (PEFT_TARGETS); the others live in the merged export only. Reading, we
take all of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dots_jax.config import Dots1Config
from dots_jax.errors import UserError
from dots_jax.files import atomic_path
from dots_jax.model.lora import TARGETS, LoraConfig, attach_lora
from dots_jax.model.modeling import Dots1ForCausalLM, abstract_model
from dots_jax.weights.keys import DENSE, MOE, StatePath, stack_layers, stack_of
from dots_jax.weights.safetensors_io import SafetensorsFile, save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's wrapper (base_model) around the LoRA model (model) around transformers'
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # target_parameters for "experts"
PEFT_TARGETS = ("attn", "experts")  # the LoRA targets PEFT applies to transformers' Dots1 (see above)


class AdapterError(UserError):
    """An adapter directory we cannot apply: the message names the file, tensor or setting."""


# ------------------------------------------------------------------------------------------------ layouts
# Each converts one layer's adapter between our layout and PEFT's: to_peft(a, bs) -> (lora_A, lora_B) and
# from_peft(lora_A, lora_B, a_shape, b_shapes) -> (a, bs), where a/bs are our A and B(s) of that layer.
ToPeft = Callable[[np.ndarray, list[np.ndarray]], tuple[np.ndarray, np.ndarray]]
FromPeft = Callable[[np.ndarray, np.ndarray, tuple, list[tuple]], tuple[np.ndarray, list[np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class Layout:
    to_peft: ToPeft
    from_peft: FromPeft


def _matrix_from_peft(lora_a: np.ndarray, lora_b: np.ndarray, a_shape: tuple, b_shapes: list[tuple]
                      ) -> tuple[np.ndarray, list[np.ndarray]]:
    return lora_a.T.reshape(a_shape), [lora_b.T.reshape(b_shapes[0])]


# q/k/v: A [H, r], B [r, n, d]; o: A [n, d, r], B [r, H]; MLPs: A [in, r], B [r, out]. PEFT's are [r, in], [out, r].
MATRIX = Layout(lambda a, bs: (a.reshape(-1, a.shape[-1]).T, bs[0].reshape(bs[0].shape[0], -1).T),
                _matrix_from_peft)


def _experts_to_peft(a: np.ndarray, bs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    e, fan_in, r = a.shape
    b = np.concatenate(bs, axis=-1)  # [E, r, out]: gate's columns, then up's, as gate_up_proj's rows
    return a.transpose(0, 2, 1).reshape(e * r, fan_in), b.transpose(2, 1, 0).reshape(b.shape[-1], r * e)


def _experts_from_peft(lora_a: np.ndarray, lora_b: np.ndarray, a_shape: tuple, b_shapes: list[tuple]
                       ) -> tuple[np.ndarray, list[np.ndarray]]:
    e, fan_in, r = a_shape
    a = lora_a.reshape(e, r, fan_in).transpose(0, 2, 1)
    b = lora_b.reshape(lora_b.shape[0], r, e).transpose(2, 1, 0)  # [E, r, out]
    splits = np.cumsum([s[-1] for s in b_shapes])[:-1]
    return a, list(np.split(b, splits, axis=-1))


EXPERTS = Layout(_experts_to_peft, _experts_from_peft)


# -------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Entry:
    """One adapted module (or, for the routed experts, parameter) of transformers' layer, and our adapter."""
    target: str  # the LoraConfig target it belongs to
    stack: str  # "all" layers, or only the DENSE / MOE stack's
    hf: str  # under model.layers.{layer}: the module (target_modules) or parameter (target_parameters)
    a: str  # our A, relative to the layer stack
    b: tuple[str, ...]  # our B(s)
    layout: Layout = MATRIX

    def stacks(self) -> tuple[str, ...]:
        return (DENSE, MOE) if self.stack == "all" else (self.stack,)


def _attn(name: str) -> Entry:
    return Entry("attn", "all", f"self_attn.{name}", f"self_attn.{name}_lora_a", (f"self_attn.{name}_lora_b",))


def _mlp(target: str, stack: str, module: str, name: str) -> Entry:
    return Entry(target, stack, f"{module}.{name}", f"{module}.{name}_lora_a", (f"{module}.{name}_lora_b",))


ENTRIES: tuple[Entry, ...] = (
    *(_attn(n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *(_mlp("mlp", DENSE, "mlp", n) for n in ("gate_proj", "up_proj", "down_proj")),
    *(_mlp("shared", MOE, "mlp.shared_experts", n) for n in ("gate_proj", "up_proj", "down_proj")),
    Entry("experts", MOE, EXPERT_PARAMETERS[0], "mlp.gate_up_proj_lora_a",
          ("mlp.gate_proj_lora_b", "mlp.up_proj_lora_b"), EXPERTS),
    Entry("experts", MOE, EXPERT_PARAMETERS[1], "mlp.down_proj_lora_a", ("mlp.down_proj_lora_b",), EXPERTS),
)


def _present(entry: Entry, cfg: Dots1Config) -> bool:
    """Whether a model with `cfg` has the weight `entry` adapts (a dense layer, shared experts)."""
    if entry.target == "shared" and not cfg.n_shared_experts:
        return False
    return any(len(stack_layers(s, cfg)) for s in entry.stacks())


def entries(cfg: Dots1Config, targets: tuple[str, ...]) -> list[Entry]:
    return [e for e in ENTRIES if e.target in targets and _present(e, cfg)]


def _layers(entry: Entry, cfg: Dots1Config) -> list[int]:
    return [layer for s in entry.stacks() for layer in stack_layers(s, cfg)]


def _module_key(entry: Entry, expert_parameters: list[str]) -> str:
    """The module under model.layers.{layer} whose lora_A/lora_B adapt `entry`: PEFT wraps the parameters of the
    one experts module in nested ParamWrappers, the first in parameter order (gate_up_proj) innermost."""
    if entry.hf not in EXPERT_PARAMETERS:
        return entry.hf
    depth = sum(1 for p in EXPERT_PARAMETERS[EXPERT_PARAMETERS.index(entry.hf) + 1:] if p in expert_parameters)
    return "mlp.experts" + ".base_layer" * depth


def _tensor_name(module: str, layer: int, which: str) -> str:
    return f"{PREFIX}model.layers.{layer}.{module}.lora_{which}.weight"


def _path(stack: str, relative: str) -> StatePath:
    return (stack, *relative.split("."))


# ------------------------------------------------------------------------------------------------ writing
def written_targets(lora: LoraConfig) -> tuple[str, ...]:
    """The targets of `lora` an adapter directory holds: those PEFT applies."""
    return tuple(t for t in lora.targets if t in PEFT_TARGETS)


def adapter_config(cfg: Dots1Config, lora: LoraConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """adapter_config.json for PEFT's LoraConfig: attention's modules by their name suffix, the routed experts as
    target_parameters (only written_targets)."""
    adapted = entries(cfg, written_targets(lora))
    parameters = [e.hf for e in adapted if e.hf in EXPERT_PARAMETERS]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank, "lora_alpha": lora.rank if lora.alpha is None else lora.alpha,
        "lora_dropout": 0.0 if parameters else lora.dropout,
        "target_modules": [e.hf for e in adapted if e.hf not in EXPERT_PARAMETERS],
        "target_parameters": parameters or None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }


def adapter_tensors(model: Dots1ForCausalLM) -> dict[str, np.ndarray]:
    """The adapters of `model` on written_targets under their PEFT names, in PEFT's layout (f32); every element of
    those adapters written once."""
    lora: LoraConfig | None = getattr(model, "lora", None)
    if lora is None:
        raise ValueError("this model has no LoRA adapters (attach_lora)")
    if not written_targets(lora):
        raise ValueError(f"PEFT applies none of the targets {lora.targets} (it applies {', '.join(PEFT_TARGETS)})")
    cfg = model.cfg
    adapted = entries(cfg, written_targets(lora))
    ours = {path for e in adapted for s in e.stacks() for path in (_path(s, e.a), *(_path(s, b) for b in e.b))}
    flat = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
            if path in ours}
    parameters = [e.hf for e in adapted if e.hf in EXPERT_PARAMETERS]
    tensors, written = {}, 0
    for entry in adapted:
        module = _module_key(entry, parameters)
        for layer in _layers(entry, cfg):
            stack, index = stack_of(layer, cfg)
            a = flat[_path(stack, entry.a)][index]
            bs = [flat[_path(stack, b)][index] for b in entry.b]
            lora_a, lora_b = entry.layout.to_peft(a, bs)
            tensors[_tensor_name(module, layer, "A")] = np.ascontiguousarray(lora_a, np.float32)
            tensors[_tensor_name(module, layer, "B")] = np.ascontiguousarray(lora_b, np.float32)
            written += a.size + sum(b.size for b in bs)
    total = sum(v.size for v in flat.values())
    if written != total:
        raise AssertionError(f"wrote {written} of the model's {total} adapter elements")
    return tensors


def save_adapter(model: Dots1ForCausalLM, directory: str | os.PathLike, *,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write `model`'s adapters on the targets PEFT applies (written_targets) as a PEFT adapter directory
    (adapter_config.json + adapter_model.safetensors), atomically (beside it, then renamed into place); an existing
    `directory` is replaced."""
    directory = Path(directory)
    tensors = adapter_tensors(model)
    config = adapter_config(model.cfg, model.lora, base_model_name_or_path)
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    return directory


# ------------------------------------------------------------------------------------------------ reading
_UNSUPPORTED = {  # PEFT settings that change what an adapter computes, and which we do not implement
    "use_dora": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None),
    "modules_to_save": (None, []), "layers_to_transform": (None, []),
}
_NAME = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What we read of a PEFT adapter_config.json: the rank and alpha, per module where rank_pattern or alpha_pattern
    say so (PEFT writes them itself when it maps gate_proj/up_proj/down_proj targets onto dots1's fused experts)."""
    rank: int
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_parameters: list[str]

    def rank_and_scaling(self, key: str) -> tuple[int, float]:
        """(r, scaling) of the module or parameter `key` (model.layers.{layer}.<module>), PEFT's way:
        peft.utils.other.get_pattern_key, then scaling alpha / r (alpha / sqrt(r) with use_rslora)."""
        def pattern(patterns: dict, default: Any) -> Any:
            return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", key)), default)

        rank, alpha = pattern(self.rank_pattern, self.rank), pattern(self.alpha_pattern, self.alpha)
        return rank, alpha / (math.sqrt(rank) if self.rslora else rank)


def read_adapter_config(directory: Path) -> AdapterConfig:
    """An adapter directory's adapter_config.json, checked."""
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{directory}: no {CONFIG_FILE}: not a PEFT adapter directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type') if isinstance(config, dict) else None!r}, "
                           "but only LORA adapters can be applied")
    for field, allowed in _UNSUPPORTED.items():
        if config.get(field, allowed[0]) not in allowed:
            raise AdapterError(f"{path}: {field}={config[field]!r} is not supported (only {allowed[0]!r})")
    rank, alpha = config.get("r"), config.get("lora_alpha", 8)
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not (all(_is_rank(r) for r in [rank, *ranks.values()])
            and all(isinstance(a, int | float) and a > 0 for a in [alpha, *alphas.values()])):
        raise AdapterError(f"{path}: r={rank!r}, lora_alpha={alpha!r}, rank_pattern={ranks!r} and alpha_pattern="
                           f"{alphas!r}: ranks must be positive integers, alphas positive numbers")
    return AdapterConfig(rank, float(alpha), bool(config.get("use_rslora")), ranks,
                         {k: float(v) for k, v in alphas.items()}, list(config.get("target_parameters") or []))


def _is_rank(r: Any) -> bool:
    return isinstance(r, int) and not isinstance(r, bool) and r >= 1


def open_adapter(directory: str | os.PathLike) -> tuple[Path, AdapterConfig, SafetensorsFile]:
    """(directory, its config, its weights file) of an adapter directory, checked from the config and the file's
    header alone (cheap: before a base model is loaded)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such adapter directory ({CONFIG_FILE} + {WEIGHTS_FILE})")
    config = read_adapter_config(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{directory}: no {WEIGHTS_FILE} (adapters saved as .bin are not read: save them with "
                           "safe_serialization=True)")
    return directory, config, SafetensorsFile(directory / WEIGHTS_FILE)


def load_adapter(directory: str | os.PathLike, cfg: Dots1Config
                 ) -> tuple[LoraConfig, dict[StatePath, np.ndarray]]:
    """(LoraConfig, {path in the model state: stacked array}) of the PEFT adapter in `directory` for a model with
    `cfg`: every adapter the LoraConfig's targets give the model, f32, in our layout. The targets are those its
    tensors touch; an adapted target's modules without a tensor (PEFT's common q_proj/v_proj-only adapters) get
    zero adapters, which change nothing. One rank and alpha for every module give LoraConfig(rank, alpha); an adapter
    whose modules differ (rank_pattern, alpha_pattern) gets the largest rank R and scaling 1: each module's A and B
    zero-padded to rank R (the same product) and its scaling folded into B. A tensor we cannot place (another
    module, a layer the config lacks, a wrong shape) is an AdapterError naming it."""
    directory, config, weights = open_adapter(directory)
    # PEFT matches target_parameters by suffix ("gate_up_proj" names mlp.experts.gate_up_proj too).
    parameters = [p for p in EXPERT_PARAMETERS if any(p == t or p.endswith(f".{t}") for t in config.target_parameters)]
    by_module = {_module_key(e, parameters): e for e in ENTRIES}
    found: dict[tuple[Entry, int], dict[str, np.ndarray]] = {}
    for name in weights:
        m = _NAME.fullmatch(name.removeprefix(PREFIX))
        entry = by_module.get(m["module"]) if m else None
        if entry is None:
            raise AdapterError(f"{directory / WEIGHTS_FILE}: tensor {name!r} adapts no module dots_jax's LoRA "
                               f"adapts (attention q/k/v/o, dense and shared MLPs, routed experts)")
        layer = int(m["layer"])
        if layer not in _layers(entry, cfg) or not _present(entry, cfg):
            raise AdapterError(f"{directory / WEIGHTS_FILE}: tensor {name!r}: layer {layer} has no {entry.hf} in "
                               "this model's config")
        found.setdefault((entry, layer), {})[m["which"]] = weights[name]
    targets = tuple(t for t in TARGETS if any(e.target == t for e, _ in found))
    if not targets:
        raise AdapterError(f"{directory / WEIGHTS_FILE}: holds no adapter tensors")
    per_module = {(e, layer): config.rank_and_scaling(f"model.layers.{layer}.{e.hf}") for e, layer in found}
    if len(set(per_module.values())) <= 1 and not config.rank_pattern and not config.alpha_pattern:
        scaling = config.rank_and_scaling("")[1]  # one rank, one alpha: kept, and no scaling folded into B
        lora = LoraConfig(rank=config.rank, alpha=scaling * config.rank, targets=targets)
        fold = 1.0
    else:
        rank = max(r for r, _ in per_module.values())
        lora = LoraConfig(rank=rank, alpha=float(rank), targets=targets)
        fold = None
    shapes = {path: var.get_value().shape for path, var in
              nnx.to_flat_state(nnx.state(abstract_model(cfg, lora=lora), nnx.LoRAParam))}
    arrays = {path: np.zeros(shape, np.float32) for path, shape in shapes.items()}
    for (entry, layer), pair in found.items():
        stack, index = stack_of(layer, cfg)
        a_path, b_paths = _path(stack, entry.a), [_path(stack, b) for b in entry.b]
        a_shape, b_shapes = shapes[a_path][1:], [shapes[p][1:] for p in b_paths]
        want_a, want_b = entry.layout.to_peft(np.zeros(a_shape, np.float32),
                                              [np.zeros(s, np.float32) for s in b_shapes])
        rank, scaling = per_module[entry, layer]
        experts = a_shape[0] if entry.layout is EXPERTS else 1
        for which, want in (("A", want_a), ("B", want_b)):
            name = _tensor_name(_module_key(entry, parameters), layer, which)
            if which not in pair:
                raise AdapterError(f"{directory / WEIGHTS_FILE}: {name!r} is missing (its lora_"
                                   f"{'B' if which == 'A' else 'A'} is there)")
            want = (rank * experts, want.shape[1]) if which == "A" else (want.shape[0], rank * experts)
            if pair[which].shape != want:
                raise AdapterError(f"{directory / WEIGHTS_FILE}: tensor {name!r} has shape {pair[which].shape}, "
                                   f"but rank {rank} on this model's config needs {want}")
        lora_a, lora_b = _pad_rank(np.asarray(pair["A"], np.float32), np.asarray(pair["B"], np.float32), rank,
                                   lora.rank, experts)
        a, bs = entry.layout.from_peft(lora_a, lora_b * np.float32(scaling if fold is None else fold),
                                       a_shape, b_shapes)
        arrays[a_path][index] = a
        for path, b in zip(b_paths, bs, strict=True):
            arrays[path][index] = b
    return lora, arrays


def _pad_rank(lora_a: np.ndarray, lora_b: np.ndarray, rank: int, to: int, experts: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's lora_A [experts * rank, in] and lora_B [out, rank * experts] (experts 1 for a module) with zero rank
    rows and columns up to rank `to`, in ParamWrapper's order (A expert-major, B rank-major): B @ A is unchanged."""
    if rank == to:
        return lora_a, lora_b
    a = np.zeros((experts, to, lora_a.shape[-1]), np.float32)
    a[:, :rank] = lora_a.reshape(experts, rank, -1)
    b = np.zeros((lora_b.shape[0], to, experts), np.float32)
    b[:, :rank] = lora_b.reshape(lora_b.shape[0], rank, experts)
    return a.reshape(experts * to, -1), b.reshape(lora_b.shape[0], to * experts)


def with_adapter(model: Dots1ForCausalLM, directory: str | os.PathLike, seed: int = 0) -> Dots1ForCausalLM:
    """`model` (no adapters) with the adapter in `directory` attached (dots_jax.model.lora.attach_lora), its
    values read from the file; merge_lora of it is the adapted model."""
    lora, arrays = load_adapter(directory, model.cfg)
    graphdef, adapters, base = nnx.split(attach_lora(model, lora, seed=seed), nnx.LoRAParam, ...)
    flat = nnx.to_flat_state(adapters)
    for path, var in flat:
        var.set_value(jnp.asarray(arrays[path], var.get_value().dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), base)
