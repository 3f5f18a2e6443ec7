"""dots_jax: dots.llm1 (Rednote's MoE LLM) in JAX / Flax NNX.

The public API: Dots1Config, Dots1ForCausalLM, from_pretrained, generate, Tokenizer. The rooms (model, ops,
weights, inference, training, parallel) are described in docs/architecture.md.
"""

# First, before anything creates a JAX backend: importing it keeps libtpu from probing for a TPU on a machine
# without one (see the module).
from dots_jax.parallel import platforms as platforms  # isort: skip
from dots_jax.config import ConfigError, Dots1Config
from dots_jax.inference.generate import generate
from dots_jax.inference.tokenizer import Tokenizer
from dots_jax.model.modeling import Dots1ForCausalLM
from dots_jax.weights import from_pretrained
from dots_jax.weights.hf import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "Dots1Config", "Dots1ForCausalLM", "Tokenizer", "from_pretrained",
           "generate"]
