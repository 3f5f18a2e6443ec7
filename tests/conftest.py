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

# The suite runs on two pytest-xdist workers, and both may compile for TPU (libtpu) at once: libtpu's lock file,
# which keeps two processes off one TPU, would fail the second; there is no TPU here to share.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# Re-exported: test files import these from conftest.
from oracle import TINY, hf_config, hf_model, random_ids, save  # noqa: E402, F401

# Parity means the same thing tomorrow only against the same oracle.
ORACLE_VERSION = "5.23.0"
# DOTS_JAX_ANY_ORACLE=1 lets the suite run against another transformers, e.g. tests/test_gpu.py on a GPU machine
# whose image has its own (those tests use transformers only to write tiny checkpoints).
assert transformers.__version__ == ORACLE_VERSION or os.environ.get("DOTS_JAX_ANY_ORACLE") == "1", (
    f"tests expect transformers=={ORACLE_VERSION} (the pinned oracle), found {transformers.__version__}; "
    "set DOTS_JAX_ANY_ORACLE=1 to run anyway")

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
