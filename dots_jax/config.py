"""Dots1Config: every field that changes the math of dots.llm1, read from any HF config.json variant."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from dots_jax.errors import UserError

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# The transformers class defaults (configuration_dots1.py), used when config.json omits a field, so that a
# sparse config means here what it means to the reference. Note hidden_size 4608 is NOT the released model.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 4608,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 62,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,  # only an explicit null means "same as num_attention_heads"
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 0,
    "norm_topk_prob": False,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "routed_scaling_factor": 1.0,
    "sliding_window": 4096,
    "max_window_layers": 62,
    "rope_theta": 10000.0,
}


class ConfigError(UserError):
    """A config.json that the reference would misread or reject; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Dots1Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense SwiGLU width (layers < first_k_dense_replace)
    moe_intermediate_size: int  # per routed expert; the shared experts are one MLP of n_shared x this
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    first_k_dense_replace: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # one of FULL_ATTENTION / SLIDING_ATTENTION per layer
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: str = "bfloat16"  # the dtype the checkpoint was saved in; the model's dtype is chosen at load
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL_ATTENTION,) * self.num_hidden_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    # ----------------------------------------------------------------------------------------- derived
    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer, or None for full attention."""
        return self.sliding_window if self.layer_types[layer] == SLIDING_ATTENTION else None

    # -------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config field {field!r}: {msg}")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                      "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                      "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                      "max_position_embeddings"):
            value = getattr(self, field)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, field,
                 f"must be a positive integer, got {value!r}")
        need(isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0, "n_shared_experts",
             f"must be a non-negative integer, got {self.n_shared_experts!r}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be between 0 and num_hidden_layers={self.num_hidden_layers}, got {self.first_k_dense_replace}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"num_attention_heads={self.num_attention_heads} must be a multiple of it "
             f"({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, "head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
        need(self.n_routed_experts % self.n_group == 0, "n_group",
             f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        need(self.topk_group <= self.n_group, "topk_group",
             f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"top-k {self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1:
            # A group's score is the sum of its two best experts, and top-k must fit in the kept groups.
            need(per_group >= 2, "n_group",
                 f"each group needs >= 2 experts, got {per_group} (n_routed_experts / n_group)")
            need(self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
                 f"top-k {self.num_experts_per_tok} exceeds the experts left in topk_group={self.topk_group} "
                 f"groups of {per_group}")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"has {len(self.layer_types)} entries for num_hidden_layers={self.num_hidden_layers}")
        for kind in self.layer_types:
            need(kind in (FULL_ATTENTION, SLIDING_ATTENTION), "layer_types",
                 f"unknown layer type {kind!r}; expected {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r}")
        if SLIDING_ATTENTION in self.layer_types:
            need(isinstance(self.sliding_window, int) and self.sliding_window > 0, "sliding_window",
                 f"sliding-attention layers need a positive sliding_window, got {self.sliding_window!r}")

    # ----------------------------------------------------------------------------------------- reading
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any]) -> Dots1Config:
        """Read an HF config.json (a path to the file, to its directory, or the parsed dict).

        Accepts what transformers 4.5x and 5.x write: `torch_dtype` or `dtype`; top-level `rope_theta` or
        `rope_parameters.rope_theta`; null `n_group`/`topk_group`; no `head_dim`. Cosmetic fields are ignored.
        """
        if isinstance(source, dict):
            raw, where = dict(source), "config dict"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"{path}: no such config file (pass an HF model directory or its config.json)")
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            where = str(path)
        try:
            return cls._from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> Dots1Config:
        model_type = raw.get("model_type", "dots1")
        if model_type != "dots1":
            raise ConfigError(f"config field 'model_type': expected 'dots1', got {model_type!r}")

        def get(key: str) -> Any:
            value = raw.get(key)
            return _HF_DEFAULTS.get(key) if value is None else value

        for key in ("n_routed_experts", "num_experts_per_tok", "n_shared_experts"):
            if raw.get(key) is None:
                raise ConfigError(f"config field {key!r} is required (transformers has no usable default)")

        act = get("hidden_act")
        if act != "silu":
            raise ConfigError(f"config field 'hidden_act': only 'silu' is supported, got {act!r}")

        rope_theta, rope_type = _read_rope(raw)
        if rope_type not in (None, "default"):
            raise ConfigError(f"config field 'rope_scaling'/'rope_parameters': rope_type {rope_type!r} is not "
                              "supported (dots.llm1 uses plain RoPE)")

        hidden, heads = get("hidden_size"), get("num_attention_heads")
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"config field 'num_attention_heads': hidden_size={hidden} is not divisible "
                                  f"by num_attention_heads={heads} and no head_dim is given")
            head_dim = hidden // heads

        kv_heads = raw.get("num_key_value_heads", _HF_DEFAULTS["num_key_value_heads"])
        num_layers = get("num_hidden_layers")
        sliding_window = raw.get("sliding_window", _HF_DEFAULTS["sliding_window"])
        layer_types = raw.get("layer_types")
        if layer_types is None:  # the rule of Dots1Config.__post_init__ in transformers
            max_window_layers = get("max_window_layers")
            layer_types = [SLIDING_ATTENTION if sliding_window is not None and i >= max_window_layers
                           else FULL_ATTENTION for i in range(num_layers)]
        if SLIDING_ATTENTION not in layer_types:
            sliding_window = None

        eos = raw.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            moe_intermediate_size=get("moe_intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads if kv_heads is None else kv_heads,
            head_dim=head_dim,
            n_routed_experts=raw["n_routed_experts"],
            num_experts_per_tok=raw["num_experts_per_tok"],
            n_shared_experts=raw["n_shared_experts"],
            first_k_dense_replace=get("first_k_dense_replace"),
            n_group=get("n_group"),
            topk_group=get("topk_group"),
            norm_topk_prob=bool(get("norm_topk_prob")),
            routed_scaling_factor=float(get("routed_scaling_factor")),
            rms_norm_eps=float(get("rms_norm_eps")),
            rope_theta=float(rope_theta),
            max_position_embeddings=get("max_position_embeddings"),
            sliding_window=sliding_window,
            layer_types=tuple(layer_types),
            attention_bias=bool(get("attention_bias")),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            initializer_range=float(get("initializer_range")),
            dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=raw.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """An HF config.json dict that transformers' Dots1Config reads back to the same math."""
        eos = list(self.eos_token_id)
        return {
            "architectures": ["Dots1ForCausalLM"],
            "model_type": "dots1",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_shared_experts": self.n_shared_experts,
            "first_k_dense_replace": self.first_k_dense_replace,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "torch_dtype": self.dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
        }


def _read_rope(raw: dict[str, Any]) -> tuple[float, str | None]:
    """(theta, rope type) from either the 4.5x layout (top-level rope_theta, rope_scaling) or 5.x's
    rope_parameters."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        theta = _HF_DEFAULTS["rope_theta"]
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    return theta, rope_type


# A wheel ships the presets as package data in dots_jax/configs/; in a checkout they are configs/ beside the package.
_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = next((d for d in (_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs") if d.is_dir()),
                   _PACKAGE_DIR / "configs")


def preset(name: str) -> Dots1Config:
    """A config shipped in configs/: e.g. "tiny", "dots.llm1.base", "dots.llm1.inst"."""
    path = CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
        raise ConfigError(f"no preset {name!r} in {CONFIGS_DIR}; known: {', '.join(known)}")
    return Dots1Config.from_hf(path)
