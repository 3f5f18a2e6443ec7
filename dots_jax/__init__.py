"""dots_jax: dots.llm1 (Rednote's MoE LLM) in JAX / Flax NNX."""

from dots_jax.config import ConfigError, Dots1Config
from dots_jax.converted import from_pretrained
from dots_jax.hf_weights import CheckpointError
from dots_jax.model import Dots1ForCausalLM

__all__ = ["CheckpointError", "ConfigError", "Dots1Config", "Dots1ForCausalLM", "from_pretrained"]
