"""The ONE from_pretrained: dots.llm1 from any source (HF directory, HF repo id, converted checkpoint), on one
device or placed on a mesh."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dots_jax.config import Dots1Config
from dots_jax.model.lora import merge_lora
from dots_jax.model.modeling import Dots1ForCausalLM, abstract_model
from dots_jax.parallel.sharding import shard_state
from dots_jax.weights.converted import as_path, is_converted, load_converted, read_config
from dots_jax.weights.hf import is_scale, load_hf, quantize_slice, resolve, scale_path
from dots_jax.weights.peft import open_adapter, with_adapter


def from_pretrained(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: Any = jnp.float32,
                    param_dtype: Any = None, moe_backend: str = "auto", attention_backend: str = "auto",
                    progress: bool = True, quantize: str | None = None, quantize_head: bool = False,
                    lora: str | os.PathLike | None = None) -> Dots1ForCausalLM:
    """Load dots.llm1 from a converted dots_jax checkpoint (a directory with manifest.json, restored straight
    into its shardings), or from an HF checkpoint (local directory or repo id).

    dtype is the activation dtype, param_dtype (default: dtype) the weights'; the router's correction bias stays
    f32. mesh: place every parameter by the sharding table (dots_jax.parallel.sharding); None = one device. An HF
    checkpoint is read on the host and then placed, so a whole-model host copy exists there: convert it first
    for meshes. moe_backend and attention_backend choose the kernels (dots_jax.ops.gmm, dots_jax.ops.attention;
    "auto" picks by device and shape).

    quantize="int8": weight-only int8 for every linear layer, quantize_head=True for the LM head too
    (Dots1ForCausalLM's arguments); the weights are quantised tensor by tensor as they are read. A checkpoint
    converted with `convert.hf_to_jax --quantize int8` is int8 already and loads as int8 whatever quantize says.

    lora: a LoRA adapter directory in PEFT's layout (OUT/adapter of `dots_jax.train --lora-rank`, or one PEFT
    saved), merged into the weights as they load: W + scaling * A @ B (dots_jax.model.lora.merge_lora). The base
    loads as float for the merge (an int8-converted one is dequantised, merge_lora's rule) and, with quantize, the
    merged model is quantised then; its float copy costs the float model's memory once.
    """
    if lora is not None:
        open_adapter(lora)  # a bad adapter fails before the model loads
        model = from_pretrained(path, dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend,
                                attention_backend=attention_backend, progress=progress)
        model = merge_lora(with_adapter(model, lora))
        if quantize is not None:
            model = quantized(model, quantize, quantize_head, moe_backend=moe_backend,
                              attention_backend=attention_backend)
        if mesh is not None:
            nnx.update(model, shard_state(nnx.state(model), mesh))
        return model
    if is_converted(path):
        return load_converted(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend,
                              attention_backend=attention_backend, progress=progress, quantize=quantize,
                              quantize_head=quantize_head)
    model = load_hf(path, dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend,
                    attention_backend=attention_backend, progress=progress, quantize=quantize,
                    quantize_head=quantize_head)
    if mesh is not None:
        nnx.update(model, shard_state(nnx.state(model), mesh))
    return model


def quantized(model: Dots1ForCausalLM, quantize: str, quantize_head: bool = False, *, moe_backend: str = "auto",
              attention_backend: str = "auto") -> Dots1ForCausalLM:
    """A float model with its linear weights quantised as Dots1ForCausalLM(quantize=) holds them (the HF loader's
    quantize_slice, weight by weight); the rest as is."""
    int8 = abstract_model(model.cfg, dtype=model.dtype, moe_backend=moe_backend, attention_backend=attention_backend,
                          quantize=quantize, quantize_head=quantize_head)
    graphdef, state = nnx.split(int8)
    flat = dict(nnx.to_flat_state(state))
    floats = dict(nnx.to_flat_state(nnx.state(model)))
    for path, var in flat.items():
        if is_scale(path):
            continue
        value = floats[path].get_value()
        if scale_path(path) in flat:
            q, scale = quantize_slice(np.asarray(value), path)
            var.set_value(jnp.asarray(q))
            flat[scale_path(path)].set_value(jnp.asarray(scale))
        else:
            var.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_config(path: str | os.PathLike) -> Dots1Config:
    """The model config of any source from_pretrained takes, without reading a weight."""
    if is_converted(path):
        return read_config(as_path(path))
    return Dots1Config.from_hf(resolve(path))
