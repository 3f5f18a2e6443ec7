"""Tensor-parallel padding: zero-pad the widths that a mesh's tensor axis cannot split evenly (or into lane-sized
slices), so that the model runs on that mesh and computes exactly what the unpadded model computes.

`sharding.padding_plan(cfg, mesh)` says which widths to pad and to what; `pad_for_mesh(model, mesh)` pads them:
  - the dense SwiGLU width (intermediate_size): zero columns of gate_proj and up_proj, zero rows of down_proj. A
    padded unit computes silu(0) * 0 = 0 and adds 0 x down = 0, and its gradients are zero, so training keeps it 0.
  - the vocabulary (vocab_size): zero rows of embed_tokens (no token id reaches them) and zero columns of lm_head,
    whose logits the padded model cuts off before returning them: sampling and the loss see the real vocabulary.
An int8 model's scales are padded with zeros beside their zero weights (a zero weight dequantises to zero whatever
its scale). LoRA adapters are padded with zeros too (a padded unit's A row or B column adds nothing).
The shared experts' width (n_shared_experts x moe_intermediate_size) is not padded: it would take every routed
expert's width with it. It is lane-aligned for dots1 up to tensor=2 and divides every tensor size up to 256.

Lives beside sharding.py, not in it: it builds models, and model.py imports sharding.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dots_jax.config import Dots1Config
from dots_jax.model.modeling import Dots1ForCausalLM
from dots_jax.parallel.sharding import PADDABLE, padding_plan


class PaddedDots1ForCausalLM(Dots1ForCausalLM):
    """A Dots1ForCausalLM whose `cfg` holds padded widths; `unpadded_cfg` is the real model's config. Its logits
    are cut back to the real vocabulary, so every caller (generate, the loss) sees the unpadded model's."""

    def __init__(self, cfg: Dots1Config, *, unpadded_cfg: Dots1Config, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.unpadded_cfg = unpadded_cfg

    def logits(self, hidden: jax.Array) -> jax.Array:
        return super().logits(hidden)[..., :self.unpadded_cfg.vocab_size]

    def options(self) -> dict:
        return {**super().options(), "unpadded_cfg": self.unpadded_cfg}


def unpadded_config(model: Dots1ForCausalLM) -> Dots1Config:
    """The real model's config (model.cfg unless the model is padded)."""
    return model.unpadded_cfg if isinstance(model, PaddedDots1ForCausalLM) else model.cfg


def pad_for_mesh(model: Dots1ForCausalLM, mesh: Mesh | str | Mapping[str, int], lane: int = 128
                 ) -> Dots1ForCausalLM:
    """`model` with intermediate_size and vocab_size zero-padded as padding_plan(cfg, mesh, lane) says (a
    PaddedDots1ForCausalLM), or `model` itself when nothing needs padding. Its logits equal the unpadded model's.
    lane=1 pads only to what the tensor axis divides; the default 128 also makes each device's slice a multiple
    of the TPU lane width."""
    real = unpadded_config(model)
    plan = {field: padded for field, (_, padded) in padding_plan(real, mesh, lane).items() if field in PADDABLE}
    cfg = dataclasses.replace(real, **plan)
    return model if cfg == model.cfg else _refit(model, cfg, real)


def unpad(model: Dots1ForCausalLM) -> Dots1ForCausalLM:
    """The plain Dots1ForCausalLM with the padding cut off (e.g. to export a model trained padded); `model`
    itself when it is not padded."""
    real = unpadded_config(model)
    return model if real == model.cfg else _refit(model, real, real)


def _refit(model: Dots1ForCausalLM, cfg: Dots1Config, real: Dots1Config) -> Dots1ForCausalLM:
    """`model`'s weights in a model built for `cfg`: every array cut or zero-padded at the end of each dimension
    whose size differs (dtypes kept); a padded model when cfg differs from the real config."""
    moe_backend = model.moe_layers.mlp.moe_backend if model.moe_layers is not None else "auto"
    stack = model.dense_layers if model.dense_layers is not None else model.moe_layers
    attention_backend = stack.self_attn.backend

    def build() -> Dots1ForCausalLM:
        kwargs = dict(dtype=model.dtype, moe_backend=moe_backend, attention_backend=attention_backend,
                      rngs=nnx.Rngs(0), quantize=model.quantize, quantize_head=model.quantize_head, lora=model.lora)
        if cfg == real:
            return Dots1ForCausalLM(cfg, **kwargs)
        return PaddedDots1ForCausalLM(cfg, unpadded_cfg=real, **kwargs)

    graphdef, target = nnx.split(nnx.eval_shape(build))  # shapes only: no weight is computed

    def fit(x: jax.Array, want: jax.ShapeDtypeStruct) -> jax.Array:
        if x.shape == want.shape:
            return x
        x = x[tuple(slice(0, n) for n in want.shape)]
        return jnp.pad(x, [(0, n - m) for m, n in zip(x.shape, want.shape, strict=True)])

    return nnx.merge(graphdef, jax.tree.map(fit, nnx.state(model), target))
