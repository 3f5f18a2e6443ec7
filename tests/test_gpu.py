"""The Triton-lowered Pallas kernels (pallas_kernels/gmm_gpu.py) compiled and run natively on a GPU: forward and
both gradients against the float64 numpy oracle of test_pallas_gmm.py, at test sizes and at dots1 sizes, and the
model's logits with the "pallas" backend against transformers'. Skipped where JAX sees no GPU (CI has none; run it
on a GPU machine with `pytest tests/test_gpu.py`).

Natively the output is not NaN-poisoned as in the interpreter: an unwritten tile holds whatever the allocator left
there. check() asserts exact zeros on rows outside our groups and closeness to the oracle elsewhere, which such a
tile fails unless the memory happened to hold the right answer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import test_parity
import torch
from conftest import random_ids
from test_pallas_gmm import CASES, check

import dots_jax
from pallas_kernels import gmm as pallas_gmm

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX sees none)")


@pytest.fixture(autouse=True)
def f32_reference_in_f32():
    """XLA's f32 dots on GPU default to TF32 (1e-3 relative): the pure-jnp reference that check() also compares
    with must run in full f32. The kernel sets its own precision and is unaffected."""
    with jax.default_matmul_precision("highest"):
        yield


def native_gpu(lhs, rhs, group_sizes, **kwargs):
    kwargs["interpret"] = False
    return pallas_gmm.gmm(lhs, rhs, group_sizes, platform="gpu", **kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_kernel_matches_oracle(case: str) -> None:
    group_sizes, m, offset, num_local = CASES[case]
    check(group_sizes, m, 32, 32, tiling=(16, 16, 16), offset=offset, num_local=num_local, kernel=native_gpu)


@pytest.mark.parametrize("seed", [1, 2])
def test_native_kernel_bf16(seed: int) -> None:
    check([6, 0, 13, 9, 40], 80, 64, 32, tiling=(16, 32, 16), dtype=ml_dtypes.bfloat16, seed=seed,
          kernel=native_gpu)


@pytest.mark.parametrize("direction", [(512, 256), (256, 512)])
def test_native_kernel_default_tiling_large(direction: tuple[int, int]) -> None:
    # The tiling choose_tiling picks (64 x 64 x 128 tiles), many tiles per group, uneven groups with empties.
    k, n = direction
    rng = np.random.default_rng(7)
    sizes = (rng.integers(0, 300, size=8) * (rng.random(8) > 0.25)).tolist()
    check(sizes, sum(sizes) + 13, k, n, tiling=None, dtype=ml_dtypes.bfloat16, seed=4, kernel=native_gpu)


def test_native_kernel_f32_is_exact() -> None:
    # f32 operands must not silently drop to TF32 (a 1e-3 relative error): held to the f32 bound.
    check([100, 0, 156], 260, 128, 128, tiling=None, seed=5, kernel=native_gpu)


@pytest.mark.parametrize("name", sorted(test_parity.CONFIGS))
def test_model_logits_pallas_match_reference_on_gpu(name: str, tmp_path) -> None:
    ref, path = test_parity._build(name, tmp_path)
    ids = random_ids(160, 2, 32, seed=1)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids).long()).logits.double().numpy()
    logits = np.asarray(dots_jax.from_pretrained(path, dtype=jnp.float32, progress=False,
                                                 moe_backend="pallas")(jnp.asarray(ids)))
    assert np.isfinite(logits).all()
    err = np.abs(logits - expected).max() / np.abs(expected).max()
    assert err <= 1e-4, f"{name}: logits {err:.2e} of max|logit| from transformers'"
