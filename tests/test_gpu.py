"""The GPU grouped-matmul kernels compiled and run natively on a GPU: the Triton-lowered Pallas kernels
(pallas_kernels/gmm_gpu.py, the "pallas" backend) and the Mosaic GPU ones (pallas_kernels/gmm_mgpu.py, the
"mosaic_gpu" backend, Hopper and later). Forward and both gradients against the float64 numpy oracle of
test_pallas_gmm.py, at test sizes and at dots1 sizes, bf16 and f32, an int8 rhs against the dequantised float64
weight, and the model's logits with each backend against transformers'. Skipped where JAX sees no GPU (CI has none;
run it on a GPU machine with `pytest tests/test_gpu.py`; benchmarks/gpu_session.sh does).

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
from test_grouped_matmul import oracle_forward, oracle_grads
from test_pallas_gmm import CASES, F32_RTOL, assert_close, check
from test_quant import BF16_RTOL, gmm_inputs, run_gmm

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


def native_mosaic(lhs, rhs, group_sizes, **kwargs):
    kwargs["interpret"] = False
    return pallas_gmm.gmm(lhs, rhs, group_sizes, platform="mosaic_gpu", **kwargs)


needs_hopper = pytest.mark.skipif(
    jax.default_backend() != "gpu" or float(getattr(jax.devices()[0], "compute_capability", "0")) < 9.0,
    reason="the Mosaic GPU kernels need wgmma (compute capability 9.0, Hopper, or later)")


# The kernel families, natively: Triton (pallas_kernels/gmm_gpu.py) and Mosaic GPU (gmm_mgpu.py).
KERNELS = [pytest.param(native_gpu, id="triton"), pytest.param(native_mosaic, id="mosaic_gpu", marks=needs_hopper)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_kernel_matches_oracle(case: str) -> None:
    group_sizes, m, offset, num_local = CASES[case]
    check(group_sizes, m, 32, 32, tiling=(16, 16, 16), offset=offset, num_local=num_local, kernel=native_gpu)


@pytest.mark.parametrize("seed", [1, 2])
def test_native_kernel_bf16(seed: int) -> None:
    check([6, 0, 13, 9, 40], 80, 64, 32, tiling=(16, 32, 16), dtype=ml_dtypes.bfloat16, seed=seed,
          kernel=native_gpu)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("direction", [(512, 256), (256, 512)])
def test_native_kernel_default_tiling_large(direction: tuple[int, int], kernel) -> None:
    # The tiling choose_tiling picks, many tiles per group, uneven groups with empties.
    k, n = direction
    rng = np.random.default_rng(7)
    sizes = (rng.integers(0, 300, size=8) * (rng.random(8) > 0.25)).tolist()
    check(sizes, sum(sizes) + 13, k, n, tiling=None, dtype=ml_dtypes.bfloat16, seed=4, kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_native_kernel_f32_is_exact(kernel) -> None:
    # f32 operands must not silently drop to TF32 (a 1e-3 relative error): held to the f32 bound (Triton runs
    # full-precision dots, Mosaic GPU six bf16 passes).
    check([100, 0, 156], 260, 128, 128, tiling=None, seed=5, kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_native_kernel_int8_rhs(kernel) -> None:
    # An expert-parallel shard (groups 1..2 of 4) with int8 weights: out and d_lhs against the float64 product with
    # the dequantised weight.
    lhs, q, scale, rhs64, gs, d_out = gmm_inputs(k=256, n=128)
    shard64 = rhs64.copy()
    shard64[[0, 3]] = 0.0
    for dtype in (np.float32, ml_dtypes.bfloat16):
        rows = lhs.astype(dtype)
        out, d_lhs = run_gmm(lambda a, b, g, s: kernel(a, b[1:3], g, group_offset=1, rhs_scale=s[1:3]),
                             rows, q, scale, gs, d_out)
        rtol = F32_RTOL if dtype == np.float32 else BF16_RTOL
        assert_close(out, oracle_forward(rows, shard64, gs), rtol, f"{np.dtype(dtype).name} out")
        assert_close(d_lhs, oracle_grads(rows, shard64, gs, d_out)[0], rtol, f"{np.dtype(dtype).name} d_lhs")


# ------------------------------------------------------------------------------------------------ Mosaic GPU


@needs_hopper
@pytest.mark.parametrize("case", sorted(CASES))
def test_mosaic_native_matches_oracle(case: str) -> None:
    group_sizes, m, offset, num_local = CASES[case]
    check(group_sizes, m, 32, 32, tiling=None, offset=offset, num_local=num_local, dtype=ml_dtypes.bfloat16,
          kernel=native_mosaic)


@needs_hopper
@pytest.mark.parametrize("direction", [(512, 256), (256, 512)])
def test_mosaic_native_warp_specialized(direction: tuple[int, int]) -> None:
    # 256-wide column tiles: two compute warpgroups and one issuing the copies (gmm_mgpu._gmm_ws_body).
    k, n = direction
    rng = np.random.default_rng(8)
    sizes = (rng.integers(0, 300, size=8) * (rng.random(8) > 0.25)).tolist()
    check(sizes, sum(sizes) + 13, k, n, tiling=(128, 64, 256), dtype=ml_dtypes.bfloat16, seed=6,
          kernel=native_mosaic)


# ------------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("backend", ["pallas", pytest.param("mosaic_gpu", marks=needs_hopper)])
@pytest.mark.parametrize("name", sorted(test_parity.CONFIGS))
def test_model_logits_match_reference_on_gpu(name: str, backend: str, tmp_path) -> None:
    ref, path = test_parity._build(name, tmp_path)
    ids = random_ids(160, 2, 32, seed=1)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids).long()).logits.double().numpy()
    logits = np.asarray(dots_jax.from_pretrained(path, dtype=jnp.float32, progress=False,
                                                 moe_backend=backend)(jnp.asarray(ids)))
    assert np.isfinite(logits).all()
    err = np.abs(logits - expected).max() / np.abs(expected).max()
    assert err <= 1e-4, f"{name} on {backend}: logits {err:.2e} of max|logit| from transformers'"
