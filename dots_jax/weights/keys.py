"""The ONE key table between Hugging Face dots1 tensors and our parameters, used in both directions, and the ONE
layer addressing (HF layer index <-> (layer stack, index in the stack)).

Reading (weights.hf.load_hf, convert.hf_to_jax) applies each rule's `to_jax`; writing (weights.hf.export_hf,
convert.jax_to_hf) applies its `to_hf`, which sits beside it in the same Layout and is checked against it tensor
by tensor on export.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from dots_jax.config import Dots1Config

Transform = Callable[[np.ndarray, Dots1Config], np.ndarray | tuple[np.ndarray, ...]]
StatePath = tuple[str, ...]  # a parameter's path in the model state, e.g. ("moe_layers", "mlp", "gate_proj")

DENSE, MOE = "dense_layers", "moe_layers"  # the model's two scanned layer stacks
STACKS = (DENSE, MOE)


# ------------------------------------------------------------------------------------------ layer addressing
def stack_of(layer: int, cfg: Dots1Config) -> tuple[str, int]:
    """HF layer index -> (the stack holding it, its index in that stack). Inverse: stack_layers."""
    if layer < cfg.first_k_dense_replace:
        return DENSE, layer
    return MOE, layer - cfg.first_k_dense_replace


def stack_layers(stack: str, cfg: Dots1Config) -> range:
    """The HF layer indices of `stack` in stack order: stack_layers(s, cfg)[i] is the HF layer at (s, i)."""
    k = cfg.first_k_dense_replace
    return range(k) if stack == DENSE else range(k, cfg.num_hidden_layers)


# ---------------------------------------------------------------------------------------------- layouts
@dataclasses.dataclass(frozen=True)
class Layout:
    """How an HF tensor's layout maps to ours: `to_jax` reads it (one array per target of the rule), `to_hf` is
    its inverse for writing (None: a layout we read but never write)."""
    to_jax: Transform
    to_hf: Callable[[np.ndarray, Dots1Config], np.ndarray] | None


def _fused_gate_up(x: np.ndarray, cfg: Dots1Config) -> tuple[np.ndarray, np.ndarray]:
    # transformers 5.x: [E, 2*I, H] with the gate rows first, then up.
    i = cfg.moe_intermediate_size
    return x[:, :i, :].transpose(0, 2, 1), x[:, i:, :].transpose(0, 2, 1)


SAME = Layout(lambda x, cfg: x, lambda x, cfg: x)
LINEAR = Layout(lambda x, cfg: x.T, lambda x, cfg: x.T)  # torch nn.Linear [out, in] <-> our [in, out]
HEADS_IN = Layout(lambda x, cfg: x.T.reshape(x.shape[1], -1, cfg.head_dim),  # [n*d, H] -> [H, n, d]
                  lambda x, cfg: x.reshape(x.shape[0], -1).T)  # [H, n, d] -> [n*d, H]
HEADS_OUT = Layout(lambda x, cfg: x.T.reshape(-1, cfg.head_dim, x.shape[0]),  # [H, n*d] -> [n, d, H]
                   lambda x, cfg: x.reshape(-1, x.shape[-1]).T)  # [n, d, H] -> [H, n*d]
HEADS_BIAS = Layout(lambda x, cfg: x.reshape(-1, cfg.head_dim),  # [n*d] -> [n, d]
                    lambda x, cfg: x.reshape(-1))  # [n, d] -> [n*d]
# transformers 5.x's fused expert tensors: read only, we write the per-expert layout that every version loads.
FUSED_GATE_UP = Layout(_fused_gate_up, None)
FUSED_DOWN = Layout(lambda x, cfg: x.transpose(0, 2, 1), None)  # [E, H, I] -> [E, I, H]


# -------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF name template; {layer} and {expert} are integers
    hf_shape: tuple[str, ...]  # each dim a config field or a product "a*b" of fields
    layers: str  # which layers hold it: "none" (top level), "all", "dense", "moe"
    targets: tuple[str, ...]  # our parameter(s), relative to the layer stack for per-layer tensors
    layout: Layout = SAME

    @property
    def to_jax(self) -> Transform:
        return self.layout.to_jax

    @functools.cached_property
    def pattern(self) -> re.Pattern[str]:
        escaped = re.escape(self.hf).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
        return re.compile(escaped + "$")

    @property
    def is_attention_bias(self) -> bool:
        return ".bias" in self.hf and ATTN in self.hf


ATTN = "self_attn"
H, V, E, I_MOE = "hidden_size", "vocab_size", "n_routed_experts", "moe_intermediate_size"
Q_OUT, KV_OUT = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"
LM_HEAD = "lm_head.weight"

# HF tensor -> our parameter(s). Targets under a layer are relative to that layer's stack.
KEY_TABLE: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", (V, H), "none", ("embed_tokens",)),
    Rule("model.norm.weight", (H,), "none", ("norm.weight",)),
    Rule(LM_HEAD, (V, H), "none", ("lm_head",), LINEAR),
    Rule("model.layers.{layer}.input_layernorm.weight", (H,), "all", ("input_layernorm.weight",)),
    Rule("model.layers.{layer}.post_attention_layernorm.weight", (H,), "all",
         ("post_attention_layernorm.weight",)),
    Rule("model.layers.{layer}.self_attn.q_proj.weight", (Q_OUT, H), "all", (f"{ATTN}.q_proj",), HEADS_IN),
    Rule("model.layers.{layer}.self_attn.k_proj.weight", (KV_OUT, H), "all", (f"{ATTN}.k_proj",), HEADS_IN),
    Rule("model.layers.{layer}.self_attn.v_proj.weight", (KV_OUT, H), "all", (f"{ATTN}.v_proj",), HEADS_IN),
    Rule("model.layers.{layer}.self_attn.o_proj.weight", (H, Q_OUT), "all", (f"{ATTN}.o_proj",), HEADS_OUT),
    Rule("model.layers.{layer}.self_attn.q_proj.bias", (Q_OUT,), "all", (f"{ATTN}.q_bias",), HEADS_BIAS),
    Rule("model.layers.{layer}.self_attn.k_proj.bias", (KV_OUT,), "all", (f"{ATTN}.k_bias",), HEADS_BIAS),
    Rule("model.layers.{layer}.self_attn.v_proj.bias", (KV_OUT,), "all", (f"{ATTN}.v_bias",), HEADS_BIAS),
    Rule("model.layers.{layer}.self_attn.o_proj.bias", (H,), "all", (f"{ATTN}.o_bias",)),
    Rule("model.layers.{layer}.self_attn.q_norm.weight", ("head_dim",), "all", (f"{ATTN}.q_norm.weight",)),
    Rule("model.layers.{layer}.self_attn.k_norm.weight", ("head_dim",), "all", (f"{ATTN}.k_norm.weight",)),
    # Dense SwiGLU (layers < first_k_dense_replace).
    Rule("model.layers.{layer}.mlp.gate_proj.weight", ("intermediate_size", H), "dense",
         ("mlp.gate_proj",), LINEAR),
    Rule("model.layers.{layer}.mlp.up_proj.weight", ("intermediate_size", H), "dense", ("mlp.up_proj",), LINEAR),
    Rule("model.layers.{layer}.mlp.down_proj.weight", (H, "intermediate_size"), "dense",
         ("mlp.down_proj",), LINEAR),
    # MoE: router, correction bias, shared experts, routed experts in either layout.
    Rule("model.layers.{layer}.mlp.gate.weight", (E, H), "moe", ("mlp.router",), LINEAR),
    Rule("model.layers.{layer}.mlp.gate.e_score_correction_bias", (E,), "moe", ("mlp.correction_bias",)),
    Rule("model.layers.{layer}.mlp.shared_experts.gate_proj.weight", ("shared_intermediate_size", H), "moe",
         ("mlp.shared_experts.gate_proj",), LINEAR),
    Rule("model.layers.{layer}.mlp.shared_experts.up_proj.weight", ("shared_intermediate_size", H), "moe",
         ("mlp.shared_experts.up_proj",), LINEAR),
    Rule("model.layers.{layer}.mlp.shared_experts.down_proj.weight", (H, "shared_intermediate_size"), "moe",
         ("mlp.shared_experts.down_proj",), LINEAR),
    Rule("model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight", (I_MOE, H), "moe",
         ("mlp.gate_proj",), LINEAR),
    Rule("model.layers.{layer}.mlp.experts.{expert}.up_proj.weight", (I_MOE, H), "moe", ("mlp.up_proj",), LINEAR),
    Rule("model.layers.{layer}.mlp.experts.{expert}.down_proj.weight", (H, I_MOE), "moe",
         ("mlp.down_proj",), LINEAR),
    Rule("model.layers.{layer}.mlp.experts.gate_up_proj", (E, f"2*{I_MOE}", H), "moe",
         ("mlp.gate_proj", "mlp.up_proj"), FUSED_GATE_UP),
    Rule("model.layers.{layer}.mlp.experts.down_proj", (E, H, I_MOE), "moe", ("mlp.down_proj",), FUSED_DOWN),
)


def dim(spec: str, cfg: Dots1Config) -> int:
    """One dim of a rule's hf_shape: a config field, an integer, or their product "a*b"."""
    return math.prod(int(part) if part.isdigit() else getattr(cfg, part) for part in spec.split("*"))


def rule_layers(rule: Rule, cfg: Dots1Config) -> Sequence[int | None]:
    """The HF layers holding a rule's tensors ([None] for a top-level tensor)."""
    return {"none": [None], "all": range(cfg.num_hidden_layers), "dense": stack_layers(DENSE, cfg),
            "moe": stack_layers(MOE, cfg)}[rule.layers]


def target(name: str, layer: int | None, expert: int | None, cfg: Dots1Config) -> tuple[StatePath, tuple[int, ...]]:
    """(path in the model state, leading index into that parameter) of a rule's target `name` for the tensor of
    HF layer `layer` (None: top level) and routed expert `expert` (None: not per expert)."""
    path = tuple(name.split("."))
    if layer is None:
        return path, ()
    stack, index = stack_of(layer, cfg)
    return (stack, *path), (index,) if expert is None else (index, expert)
