"""The Mosaic GPU grouped-matmul kernels (pallas_kernels/gmm_mgpu.py) on a CPU, two ways:

- run in the Pallas GPU interpreter against the float64 oracle of test_pallas_gmm.py: forward and both gradients,
  ragged, empty and offset groups, bf16 and f32 (an int8 rhs against the dequantised float64 weight: test_quant.py);
- lowered for a Hopper GPU at dots1's shapes, which runs the Mosaic GPU compiler's own checks (layouts, wgmma
  operands, shared memory within the 227 KiB of an H100 / H200).

Natively on a GPU: tests/test_gpu.py. The interpreter starts every output as NaN (test below), so a row the kernel
forgets to store fails the finiteness check of assert_close.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import test_parity
import torch
from conftest import random_ids, torch_one_thread
from jax.experimental.pallas import mosaic_gpu as plgpu
from test_grouped_matmul import oracle_forward
from test_pallas_gmm import CASES, assert_close, check
from test_quant import BF16_RTOL, gmm_inputs

import dots_jax
from dots_jax.ops import gmm as grouped_matmul
from pallas_kernels import gmm as pallas_gmm
from pallas_kernels import gmm_mgpu


def mosaic(lhs, rhs, group_sizes, **kwargs):
    """pallas_kernels.gmm on the Mosaic GPU kernels (interpreted unless interpret=False)."""
    return pallas_gmm.gmm(lhs, rhs, group_sizes, platform="mosaic_gpu", **kwargs)


# ------------------------------------------------------------------------------------------------ interpreter


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_oracle_bf16(case: str) -> None:
    group_sizes, m, offset, num_local = CASES[case]
    check(group_sizes, m, 24, 16, tiling=None, offset=offset, num_local=num_local, dtype=ml_dtypes.bfloat16,
          kernel=mosaic)


@pytest.mark.parametrize("case", ["random", "offset_middle"])
def test_kernel_f32_is_held_to_the_f32_bound(case: str) -> None:
    # wgmma would take f32 as TF32 (1e-3): the six bf16 passes must meet test_pallas_gmm's f32 bound of 1e-5.
    group_sizes, m, offset, num_local = CASES[case]
    check(group_sizes, m, 24, 16, tiling=None, offset=offset, num_local=num_local, kernel=mosaic)


def test_kernel_many_tiles() -> None:
    # 64-row tiles with groups straddling them, an empty group between, three k steps, two column tiles; the
    # backward pass swaps k and n (d_lhs contracts over n) and tgmm runs several row blocks per group.
    check([70, 0, 130, 1, 64, 0, 40], 320, 192, 256, tiling=(64, 64, 128), dtype=ml_dtypes.bfloat16, seed=2,
          kernel=mosaic)


def test_warp_specialized_kernel() -> None:
    # A 256-wide column tile runs _gmm_ws_body (two compute warpgroups, one issuing the copies, the output stored in
    # 64-row chunks): forward and d_lhs there, tgmm for d_rhs.
    check([30, 0, 70, 9], 120, 128, 256, tiling=(128, 64, 256), dtype=ml_dtypes.bfloat16, seed=3, kernel=mosaic)


def test_moe_backend_is_registered() -> None:
    lhs, q, scale, rhs64, gs, _ = gmm_inputs()
    rows = jnp.asarray(lhs, jnp.bfloat16)
    out = grouped_matmul.gmm(rows, q, gs, backend="mosaic_gpu", rhs_scale=scale)
    assert out.dtype == jnp.bfloat16
    assert_close(np.asarray(out.astype(jnp.float32)), oracle_forward(np.asarray(rows), rhs64, gs), BF16_RTOL,
                 "backend mosaic_gpu")
    assert grouped_matmul.default_backend(600, 128) in ("loop", "gather")  # never auto's choice on a CPU


def test_model_logits_match_reference(tmp_path) -> None:
    """The model on the mosaic_gpu backend (interpreted) gives transformers' logits, with test_parity's bound, on the
    "released_like" parity config (top-6 of 16 experts; tiny widths: every product's k and n are padded up to the
    kernels' tiles)."""
    ref, path = test_parity._build("released_like", tmp_path)
    ids = random_ids(160, 2, 32, seed=1)
    with torch_one_thread():
        expected = ref(torch.from_numpy(ids).long()).logits.double().numpy()
    logits = np.asarray(dots_jax.from_pretrained(path, dtype=jnp.float32, progress=False,
                                                 moe_backend="mosaic_gpu")(jnp.asarray(ids)))
    err = np.abs(logits - expected).max() / np.abs(expected).max()
    assert err <= 1e-4, f"logits {err:.2e} of max|logit| from transformers'"


def test_interpreter_poisons_unwritten_output() -> None:
    # The premise of the finiteness checks: a Mosaic GPU kernel that stores nothing leaves NaN.
    def store_nothing(x_gmem, o_gmem) -> None:
        del x_gmem, o_gmem

    out = plgpu.kernel(store_nothing, out_type=jax.ShapeDtypeStruct((8, 128), jnp.float32), grid=(1,),
                       grid_names=("sm",), interpret=gmm_mgpu._interpret_params(True))(jnp.ones((8, 128)))
    assert np.all(np.isnan(np.asarray(out)))


def test_tiling_is_checked() -> None:
    with pytest.raises(ValueError, match="must be 64 or 128"):
        mosaic(np.zeros((16, 64), np.float32), np.zeros((2, 64, 64), np.float32), np.array([8, 8]),
               tiling=(32, 64, 64), interpret=True)
    assert gmm_mgpu.choose_tiling(6, 4096, 1408, 128)[0] == 64  # decode: the smallest wgmma row block
    assert gmm_mgpu.choose_tiling(8192 * 16, 4096, 1408, 16)[0] == 128


# ------------------------------------------------------------------------------------------------ lowered for Hopper


def lower_for_cuda(fn, *shapes: jax.ShapeDtypeStruct) -> str:
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def forward_and_grads(lhs, rhs, gs, tiling=None):
    def loss(a, b):
        return jnp.vdot(mosaic(a, b, gs, tiling=tiling).astype(jnp.float32), jnp.ones((lhs.shape[0], rhs.shape[2])))

    return mosaic(lhs, rhs, gs, tiling=tiling), jax.grad(loss, argnums=(0, 1))(lhs, rhs)


def int8_forward_and_grad(lhs, q, scale, gs, tiling=None):
    def loss(a):
        return mosaic(a, q, gs, rhs_scale=scale, tiling=tiling).astype(jnp.float32).sum()

    return mosaic(lhs, q, gs, rhs_scale=scale, tiling=tiling), jax.grad(loss)(lhs)


@pytest.mark.parametrize(("k", "n"), [(4096, 1408), (1408, 4096)], ids=["gate_up", "down"])
@pytest.mark.parametrize(("rows", "dtype", "tiling"),
                         [(8192 * 16, jnp.bfloat16, None), (6, jnp.bfloat16, None), (512, jnp.float32, None),
                          (8192 * 16, jnp.bfloat16, (128, 64, 256))],
                         ids=["prefill-bf16", "decode-bf16", "f32", "prefill-bf16-warp-specialized"])
def test_kernels_lower_for_hopper_at_dots1_shapes(k: int, n: int, rows: int, dtype, tiling) -> None:
    """gmm, its transposed use for d_lhs and tgmm for d_rhs, at 16 experts a shard (prefill) or all 128 (decode)."""
    g = 16 if rows > 128 else 128
    shapes = (jax.ShapeDtypeStruct((rows, k), dtype), jax.ShapeDtypeStruct((g, k, n), dtype),
              jax.ShapeDtypeStruct((g,), jnp.int32))
    text = lower_for_cuda(functools.partial(forward_and_grads, tiling=tiling), *shapes)
    # Three kernels (forward, d_lhs, d_rhs), each once per pass (six for f32).
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 3 * (6 if dtype == jnp.float32 else 1)


@pytest.mark.parametrize(("rows", "tiling"), [(8192 * 16, None), (6, None), (8192 * 16, (128, 64, 256))],
                         ids=["prefill", "decode", "prefill-warp-specialized"])
def test_int8_kernel_lowers_for_hopper(rows: int, tiling) -> None:
    g = 16 if rows > 128 else 128
    shapes = (jax.ShapeDtypeStruct((rows, 4096), jnp.bfloat16), jax.ShapeDtypeStruct((g, 4096, 1408), jnp.int8),
              jax.ShapeDtypeStruct((g, 1408), jnp.float32), jax.ShapeDtypeStruct((g,), jnp.int32))
    text = lower_for_cuda(functools.partial(int8_forward_and_grad, tiling=tiling), *shapes)
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 2  # forward and d_lhs; an int8 rhs has no gradient


def test_lowering_checks_shared_memory() -> None:
    # Negative control for the lowering tests: tiles whose buffers exceed the GPU's shared memory are refused there.
    shapes = (jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16), jax.ShapeDtypeStruct((16, 4096, 1408), jnp.bfloat16),
              jax.ShapeDtypeStruct((16,), jnp.int32))
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        lower_for_cuda(lambda a, b, gs: mosaic(a, b, gs, tiling=(128, 512, 128)), *shapes)
