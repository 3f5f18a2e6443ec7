"""dots_jax: dots.llm1 (Rednote's MoE LLM) in JAX / Flax NNX."""

from dots_jax import _platforms

_platforms.steer()  # first, before anything creates a JAX backend: no libtpu probing on a machine without a TPU

from dots_jax.config import ConfigError, Dots1Config  # noqa: E402
from dots_jax.converted import from_pretrained  # noqa: E402
from dots_jax.hf_weights import CheckpointError  # noqa: E402
from dots_jax.model import Dots1ForCausalLM  # noqa: E402

__all__ = ["CheckpointError", "ConfigError", "Dots1Config", "Dots1ForCausalLM", "from_pretrained"]
