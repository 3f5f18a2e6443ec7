"""Pallas grouped-matmul kernels (pallas_kernels/) on CPU in interpret mode: forward and gradients against a
float64 numpy oracle and the pure-jnp reference, the race detector on tiny cases, the "pallas" MoE backend,
and the model's logits with it against transformers'.

Poisoning: the Pallas interpreter (interpret=True) starts every output buffer as NaN (checked below by
test_interpreter_poisons_unwritten_output), so a row the kernel forgets to write is NaN and fails the
comparison; rows that must be zero are also checked to be exactly zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import test_parity
import torch
from conftest import random_ids, torch_one_thread
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from test_grouped_matmul import assert_close_bf16

import dots_jax
from dots_jax.ops import gmm as grouped_matmul
from pallas_kernels import gmm as pallas_gmm
from pallas_kernels import gmm_gpu, reference

F32_RTOL = 1e-5


# ------------------------------------------------------------------------------------------------ oracle
# float64 loops over groups; shares no code with pallas_kernels.


def oracle(lhs: np.ndarray, rhs_local: np.ndarray, group_sizes: np.ndarray, d_out: np.ndarray,
           offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out, d_lhs, d_rhs) of out = gmm(lhs, rhs_local, group_sizes, group_offset=offset), loss <out, d_out>."""
    lhs, rhs, d_out = (a.astype(np.float64) for a in (lhs, rhs_local, d_out))
    out, d_lhs, d_rhs = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros_like(lhs), np.zeros_like(rhs)
    start = 0
    for group, size in enumerate(group_sizes):
        rows, local = slice(start, start + size), group - offset
        if 0 <= local < rhs.shape[0]:
            out[rows] = lhs[rows] @ rhs[local]
            d_lhs[rows] = d_out[rows] @ rhs[local].T
            d_rhs[local] = lhs[rows].T @ d_out[rows]
        start += size
    return out, d_lhs, d_rhs


def make_inputs(group_sizes: list[int], m: int, k: int, n: int, num_local: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((m, k)).astype(np.float32)
    lhs[sum(group_sizes):] = 1e3  # rows past the last group: any leak into out or d_rhs is obvious
    rhs = rng.standard_normal((num_local, k, n)).astype(np.float32)
    d_out = rng.standard_normal((m, n)).astype(np.float32)
    return lhs, rhs, np.asarray(group_sizes, np.int32), d_out


def run(fn, lhs, rhs, group_sizes, d_out, **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out, d_lhs, d_rhs) of fn, the gradients by jax.grad of <out, d_out>, all under one jit."""

    def loss(a, b, gs):
        out = fn(a, b, gs, **kwargs)
        return jnp.vdot(out.astype(jnp.float32), jnp.asarray(d_out, jnp.float32)), out

    (d_lhs, d_rhs), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(lhs, rhs, group_sizes)
    return np.asarray(out), np.asarray(d_lhs), np.asarray(d_rhs)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    """|actual - expected| <= rtol * max(1, max|expected|), and no NaN (an unwritten, poisoned entry)."""
    actual = np.asarray(actual).astype(np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite entries (rows the kernel never wrote?)"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale, err_msg=what)


def check(group_sizes: list[int], m: int, k: int, n: int, *, tiling, offset: int = 0, num_local: int | None = None,
          dtype=np.float32, seed: int = 0, interpret=True, kernel=pallas_gmm.gmm) -> None:
    num_local = len(group_sizes) - offset if num_local is None else num_local
    lhs, rhs, gs, d_out = make_inputs(group_sizes, m, k, n, num_local, seed)
    if dtype != np.float32:  # the oracle sees the same rounded inputs (and cotangent)
        lhs, rhs, d_out = (a.astype(dtype) for a in (lhs, rhs, d_out))
    kwargs = dict(group_offset=offset, tiling=tiling, interpret=interpret)
    got = run(kernel, lhs, rhs, gs, d_out, **kwargs)
    ref = run(reference.gmm, lhs, rhs, gs, d_out, group_offset=offset)
    expected = oracle(lhs, rhs, gs, d_out, offset)
    if dtype == np.float32:
        for name, g, r, o in zip(("out", "d_lhs", "d_rhs"), got, ref, expected, strict=True):
            assert g.dtype == dtype, f"{name} dtype {g.dtype}"
            assert_close(g, o, F32_RTOL, f"{name} vs float64 oracle")
            assert_close(g, np.asarray(r, np.float64), F32_RTOL, f"{name} vs reference")
            assert_close(np.asarray(r), o, F32_RTOL, f"reference {name} vs float64 oracle")
    else:
        # Per element against the float64 oracle, kernel and reference alike (so within two roundings of each
        # other): terms is the oracle on |inputs|; out sums k products, d_lhs n, d_rhs up to m.
        terms = oracle(*(np.abs(a.astype(np.float64)) for a in (lhs, rhs)), gs, np.abs(d_out.astype(np.float64)),
                       offset)
        for name, g, r, o, t, length in zip(("out", "d_lhs", "d_rhs"), got, ref, expected, terms, (k, n, m),
                                            strict=True):
            assert g.dtype == dtype, f"{name} dtype {g.dtype}"
            assert_close_bf16(g, o, t, length, f"{name} vs float64 oracle")
            assert_close_bf16(np.asarray(r), o, t, length, f"reference {name} vs float64 oracle")
    # Rows outside our groups: exactly zero output and lhs gradient.
    ends = np.cumsum(gs)
    owned = np.zeros(m, bool)
    for j in range(offset, offset + num_local):
        owned[ends[j] - gs[j]:ends[j]] = True
    assert np.all(got[0][~owned] == 0) and np.all(got[1][~owned] == 0), "rows outside our groups must be 0"


# ------------------------------------------------------------------------------------------------ TPU kernel

CASES = {
    # name: (group_sizes, m, offset, num_local); tiling (8, k, n) unless stated, so most cases span many tiles.
    "random": ([9, 3, 11, 6, 8], 37, 0, None),  # m = 37 is not a multiple of the 8-row tile
    "empty_groups": ([0, 7, 0, 0, 12, 0], 19, 0, None),
    "all_in_one_group": ([0, 0, 23, 0], 23, 0, None),
    "rows_past_the_end": ([4, 0, 9, 3], 30, 0, None),
    "no_rows_used": ([0, 0, 0], 5, 0, None),
    "offset_middle": ([5, 0, 8, 2, 7, 4], 30, 2, 3),  # groups 2..4 of 6, plus trailing rows
    "offset_last": ([5, 9, 1, 6], 21, 3, 1),
    "offset_empty_local": ([6, 0, 0, 10], 16, 1, 2),  # our groups hold no rows: all zeros
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tpu_kernel_matches_oracle(case: str) -> None:
    group_sizes, m, offset, num_local = CASES[case]
    check(group_sizes, m, 24, 16, tiling=(8, 24, 16), offset=offset, num_local=num_local)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tpu_kernel_random_shapes(seed: int) -> None:
    # Random group count, sizes (with zeros), m, row tile and offset subset.
    rng = np.random.default_rng(seed)
    g = int(rng.integers(2, 9))
    sizes = rng.integers(0, 12, size=g) * (rng.random(g) > 0.3)
    m = int(sizes.sum() + rng.integers(0, 10))
    offset = int(rng.integers(0, g))
    num_local = int(rng.integers(1, g - offset + 1))
    tm = int(rng.choice([8, 16, 32]))
    check(sizes.tolist(), max(m, 1), 24, 16, tiling=(tm, 24, 16), offset=offset, num_local=num_local, seed=seed)


def test_tpu_kernel_several_k_and_n_tiles() -> None:
    # Mosaic-legal 128-multiples: the accumulator runs over two k steps, the output over two column tiles,
    # and the backward pass swaps them (its d_lhs contracts over n).
    check([13, 0, 20, 7], 45, 256, 256, tiling=(16, 128, 128), offset=0)


def test_tpu_kernel_default_tiling() -> None:
    check([13, 0, 20, 7], 45, 256, 384, tiling=None)


def test_tpu_kernel_bf16() -> None:
    check([6, 0, 13, 9], 31, 32, 16, tiling=(16, 32, 16), dtype=ml_dtypes.bfloat16, seed=3)
    check([6, 0, 13, 9], 31, 32, 16, tiling=(16, 32, 16), dtype=ml_dtypes.bfloat16, offset=1, num_local=2)


def test_tgmm_writes_every_group() -> None:
    # tgmm alone (the weight gradient), empty groups included: they must come back as zeros, not NaN.
    lhs, _, gs, d_out = make_inputs([0, 9, 0, 14, 0], 27, 24, 16, 5, seed=4)
    for offset, num_local in ((0, 5), (2, 3)):
        got = pallas_gmm.tgmm(lhs, d_out, gs, group_offset=offset, num_local=num_local, tiling=(8, 24, 16),
                              interpret=True)
        want = reference.tgmm(lhs, d_out, gs, group_offset=offset, num_local=num_local)
        assert_close(np.asarray(got), np.asarray(want, np.float64), F32_RTOL, f"tgmm offset {offset}")
        assert np.all(np.asarray(got)[[j - offset for j in (0, 2, 4) if j >= offset]] == 0)


@pytest.mark.parametrize("case", ["random", "offset_middle"])
def test_tpu_kernel_race_detector(case: str) -> None:
    """The TPU interpreter with its race detector, simulating the DMA pipeline and two cores (the "parallel"
    column axis is split between them): no race, and the same numbers."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter

    group_sizes, m, offset, num_local = CASES[case]
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    check(group_sizes, m, 24, 256, tiling=(8, 24, 128), offset=offset, num_local=num_local, interpret=params)
    assert tpu_interpreter.races is not None and not tpu_interpreter.races.races_found


def test_interpreter_poisons_unwritten_output() -> None:
    # The premise of the poisoning: a kernel that skips a block leaves NaN there.
    def copy_first_block(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    out = pl.pallas_call(copy_first_block, out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32), grid=(2,),
                         in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                         out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)), interpret=True)(jnp.ones((16, 128)))
    assert np.all(np.asarray(out)[:8] == 1) and np.all(np.isnan(np.asarray(out)[8:]))


def test_tiling_table_covers_dots1_shapes() -> None:
    for k, n in ((4096, 1408), (1408, 4096), (4096, 2816), (2816, 4096)):
        for m in (6 * 64, 6 * 8192):  # a decode step and a prefill
            tm, tk, tn = pallas_gmm.choose_tiling(m, k, n, 128)
            assert k % tk == 0 and n % tn == 0 and tm % 16 == 0
            assert all(t % 128 == 0 or t == d for t, d in ((tk, k), (tn, n)))
    assert pallas_gmm.choose_tiling(6 * 64, 4096, 1408, 128)[0] < pallas_gmm.choose_tiling(6 * 8192, 4096, 1408,
                                                                                            128)[0]
    with pytest.raises(ValueError, match="multiple of 128"):
        pallas_gmm.gmm(np.zeros((16, 384)), np.zeros((2, 384, 16)), np.array([8, 8]), tiling=(8, 192, 16),
                       interpret=True)


# ------------------------------------------------------------------------------------------------ GPU kernel
# Written for the Triton lowering; here it runs in the generic Pallas interpreter (never run on a GPU here).
# Triton blocks must be powers of two, hence k, n and tiles below.


@pytest.mark.parametrize("case", ["random", "empty_groups", "rows_past_the_end", "offset_middle",
                                  "offset_empty_local"])
def test_gpu_kernel_matches_oracle(case: str) -> None:
    group_sizes, m, offset, num_local = CASES[case]
    check(group_sizes, m, 32, 32, tiling=(8, 16, 16), offset=offset, num_local=num_local,
          kernel=gmm_gpu_entry)


def test_gpu_kernel_bf16() -> None:
    check([6, 0, 13, 9], 31, 32, 16, tiling=(16, 16, 16), dtype=ml_dtypes.bfloat16, seed=3, kernel=gmm_gpu_entry)


def gmm_gpu_entry(lhs, rhs, group_sizes, **kwargs):
    """pallas_kernels.gmm forced onto the GPU kernels (on a GPU that is what it picks by itself)."""
    return pallas_gmm.gmm(lhs, rhs, group_sizes, platform="gpu", **kwargs)


def test_gpu_tiling_is_power_of_two() -> None:
    assert gmm_gpu.choose_tiling(6 * 4096, 4096, 1408) == (64, 64, 128)
    assert all(t & (t - 1) == 0 for t in gmm_gpu.choose_tiling(6 * 4096, 1408, 4096))


# ------------------------------------------------------------------------------------------------ MoE backend


def test_pallas_backend_registered(monkeypatch) -> None:
    assert "pallas" in grouped_matmul.BACKENDS
    lhs, rhs, gs, d_out = make_inputs([5, 0, 12, 3], 23, 24, 16, 4, seed=5)
    got = run(grouped_matmul.gmm, lhs, rhs, gs, d_out, backend="pallas")
    for name, g, o in zip(("out", "d_lhs", "d_rhs"), got, oracle(lhs, rhs, gs, d_out, 0), strict=True):
        assert_close(g, o, F32_RTOL, f"backend pallas {name}")
    # "auto" picks pallas on TPU and GPU; CPU keeps its fast backends (Pallas only interprets there).
    assert grouped_matmul.default_backend(600, 128) in ("loop", "gather")
    for platform, want in (("tpu", "pallas"), ("gpu", "pallas")):
        monkeypatch.setattr(jax, "default_backend", lambda platform=platform: platform)
        assert grouped_matmul.default_backend(600, 128) == want


# ------------------------------------------------------------------------------------------------ model parity
# The parity configs of test_parity.py (tiny dots1 models, random weights written by transformers): the model
# with the "pallas" backend (interpreted) gives transformers' logits, with test_parity's bound.


@pytest.mark.parametrize("name", sorted(test_parity.CONFIGS))
def test_model_logits_pallas_match_reference(name: str, tmp_path, monkeypatch) -> None:
    calls = []
    kernel = pallas_gmm.gmm
    monkeypatch.setattr(pallas_gmm, "gmm", lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
    ref, path = test_parity._build(name, tmp_path)
    ids = random_ids(160, 2, 32, seed=1)
    with torch_one_thread():
        expected = ref(torch.from_numpy(ids).long()).logits.double().numpy()
    logits = np.asarray(dots_jax.from_pretrained(path, dtype=jnp.float32, progress=False,
                                                 moe_backend="pallas")(jnp.asarray(ids)))
    # All platform branches are traced; the interpreted one (CPU) is what runs here.
    assert any(kw["interpret"] for kw in calls), "the pallas backend must run the (interpreted) kernel"
    assert np.isfinite(logits).all()
    err = np.abs(logits - expected).max() / np.abs(expected).max()
    assert err <= 1e-4, f"{name}: logits {err:.2e} of max|logit| from transformers'"
