"""HF safetensors <-> dots_jax checkpoint converter (convert.hf_to_jax, convert.jax_to_hf)."""
