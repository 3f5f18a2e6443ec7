"""Weights in and out: safetensors, Hub resolution, the HF key table, the converted format, from_pretrained."""
