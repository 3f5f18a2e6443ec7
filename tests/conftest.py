"""Shared fixtures: tiny random dots1 checkpoints written by transformers (the oracle) with save_pretrained."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling dominates this suite's time on CPU. LLVM's cheaper optimisation level about halves it; the HLO, which is
# what the numerics depend on, is unchanged (XLA's own optimisation passes still run). Child processes inherit it.
CHEAP_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CHEAP_COMPILE}".strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# Parity means the same thing tomorrow only against the same oracle.
ORACLE_VERSION = "5.23.0"
# DOTS_JAX_ANY_ORACLE=1 lets the suite run against another transformers, e.g. tests/test_gpu.py on a GPU machine
# whose image has its own (those tests use transformers only to write tiny checkpoints).
assert transformers.__version__ == ORACLE_VERSION or os.environ.get("DOTS_JAX_ANY_ORACLE") == "1", (
    f"tests expect transformers=={ORACLE_VERSION} (the pinned oracle), found {transformers.__version__}; "
    "set DOTS_JAX_ANY_ORACLE=1 to run anyway")

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


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> tuple[Path, transformers.Dots1ForCausalLM]:
    model = hf_model(hf_config(), bias_std=0.05)
    return save(model, tmp_path / "tiny"), model


@contextlib.contextmanager
def torch_one_thread(grad: bool = False):
    """The reference on one thread: next to JAX's CPU thread pool, torch's default intra-op threads can make
    a tiny forward 100x slower. Autograd is off unless `grad`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.set_grad_enabled(grad):
            yield
    finally:
        torch.set_num_threads(threads)


# CI installs libtpu (the [test] extra) so that the ahead-of-time TPU compiles run; skipping them when it is missing
# would let those tests vanish with the run still green. Opting out has to be explicit.
NO_TPU_COMPILE_ENV = "DOTS_JAX_NO_TPU_COMPILE"


def require_libtpu() -> None:
    """Fail (not skip) a test that compiles for TPU when libtpu is missing, unless DOTS_JAX_NO_TPU_COMPILE=1."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        if os.environ.get(NO_TPU_COMPILE_ENV) == "1":
            pytest.skip(f"needs libtpu; skipped because {NO_TPU_COMPILE_ENV}=1")
        pytest.fail(f"libtpu is not installed: install the [test] extra (pip install -e '.[test]', which brings "
                    f"jax[tpu]), or set {NO_TPU_COMPILE_ENV}=1 to skip the TPU compile tests on purpose",
                    pytrace=False)


def run_cli(main, argv: list[str]) -> tuple[int, str, str]:
    """A command-line main(argv) with stdout and stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()
