"""Weights in and out: safetensors, Hub resolution, the HF key table, the converted format, from_pretrained."""

from dots_jax.weights.load import from_pretrained, load_config

__all__ = ["from_pretrained", "load_config"]
