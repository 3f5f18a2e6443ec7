"""The numerical oracle's tiny models: random dots1 checkpoints built and saved by transformers.

Shared by the tests (through conftest.py) and the benchmarks. Importing it has no side effects: it sets no
environment variables and no XLA flags, so a benchmark that uses it measures the build users run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

TINY = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
    routed_scaling_factor=1.0, rms_norm_eps=1e-5, max_position_embeddings=512, sliding_window=None,
    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def hf_config(**overrides) -> transformers.Dots1Config:
    return transformers.Dots1Config(**{**TINY, **overrides})


def hf_model(config: transformers.Dots1Config, seed: int = 0, bias_std: float = 0.0) -> transformers.Dots1ForCausalLM:
    """A random reference model. Weights get std 0.1 (not the 0.02 init) so that every block visibly matters,
    norms get random non-unit weights, and the correction bias is random with `bias_std`."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = transformers.Dots1ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
        for layer in model.model.layers[config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, bias_std)
    return model


def save(model: transformers.Dots1ForCausalLM, path: Path, *, fused: bool = False,
         max_shard_size: str | None = None) -> Path:
    kwargs = {"save_original_format": not fused}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return path


def random_ids(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int32)
