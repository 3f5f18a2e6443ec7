"""int8 weight-only quantisation (dots_jax.ops.quant) and the int8 rhs of every gmm backend, against float64 numpy.

quantize_int8 / dequantize against numpy's own per-channel quantisation; qeinsum, every gmm backend and expert_ffn
with int8 weights against the float64 product on the dequantised weights (values and lhs gradients), and against the
"dense" backend, which dequantises up front; negative controls show that a scale on the wrong axis is caught.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_grouped_matmul import assert_close, oracle_ffn, oracle_forward, oracle_grads

from dots_jax.ops import gmm as grouped_matmul
from dots_jax.ops.quant import chunk_rows, dequantize, qeinsum, quantize_int8
from pallas_kernels import gmm as pallas_gmm

F32_RTOL = 1e-5
# bf16: the output's rounding and, in gradients, the cotangent's (2^-8 each) times sums of |terms| that may exceed
# the array's largest entry a few times; a scale on a wrong axis is off by O(1).
BF16_RTOL = 2.0**-5
GMM_BACKENDS = ["dense", "ragged_dot", "gather", "loop", "pallas"]  # "pallas": the TPU kernel, interpreted

# name: (shape, reduce_axes), as the model quantises its weights (the reduce axes are the contracted ones).
WEIGHTS = {
    "q_proj": ((16, 4, 8), (0,)),
    "o_proj": ((4, 8, 16), (0, 1)),
    "mlp_down": ((24, 16), (0,)),
    "wide": ((200, 600), (0,)),  # k = 200 > the decode form's chunk: whole chunks and a shorter last one
    "experts_gate": ((3, 16, 24), (1,)),
}


def np_quantize(w: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, w / scale) in float64: scale = max|w| / 127 per channel (1 where the channel is zero)."""
    w = w.astype(np.float64)
    amax = np.abs(w).max(axis=axes)
    scale = np.where(amax > 0, amax / 127, 1.0)
    ratio = w / np.expand_dims(scale, axes)
    return np.clip(np.rint(ratio), -127, 127), scale, ratio


def np_dequantize(q, scale, axes: tuple[int, ...]) -> np.ndarray:
    return np.asarray(q).astype(np.float64) * np.expand_dims(np.asarray(scale).astype(np.float64), axes)


def random_weight(shape: tuple[int, ...], axes: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Gaussian, with channels of very different magnitudes (so a shared scale would be visibly wrong) and channel
    0 all zero."""
    rng = np.random.default_rng(seed)
    channels = tuple(d for i, d in enumerate(shape) if i not in axes)
    magnitude = np.exp(2 * rng.standard_normal(channels))
    magnitude.reshape(-1)[0] = 0.0
    return (rng.standard_normal(shape) * np.expand_dims(magnitude, axes)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ quantize


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_quantize_and_dequantize_match_numpy(name: str, dtype) -> None:
    shape, axes = WEIGHTS[name]
    w = random_weight(shape, axes).astype(dtype)
    q, scale = quantize_int8(jnp.asarray(w), axes)
    want_q, want_scale, ratio = np_quantize(w.astype(np.float64), axes)
    q, scale = np.asarray(q), np.asarray(scale)

    assert q.dtype == np.int8 and q.shape == shape
    assert scale.dtype == np.float32 and scale.shape == want_scale.shape  # w's shape without the reduce axes
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    assert scale.reshape(-1)[0] == 1.0 and np.all(q[w.astype(np.float64) == 0] == 0)  # channel 0 is all zero
    # Equal to numpy's rounding except within f32 noise of a tie (w / scale is divided in f32 there).
    near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4
    assert np.all((q == want_q) | near_tie) and np.all(np.abs(q - want_q) <= 1)
    assert np.abs(q).max() == 127
    assert np.all(np.abs(q).max(axis=axes)[want_scale != 1.0] == 127)  # every channel uses its full range

    # Round trip: within half a step of the weight, per channel, plus the f32 rounding of the scale times |q| <= 127
    # (bf16 weights hit exact ties, where the half step is attained).
    back = np.asarray(dequantize(jnp.asarray(q), jnp.asarray(scale), axes)).astype(np.float64)
    step = np.expand_dims(scale.astype(np.float64), axes)
    assert np.all(np.abs(back - w.astype(np.float64)) <= step * (0.5 + 127 * 2.0**-23))
    np.testing.assert_allclose(back, np_dequantize(q, scale, axes), rtol=1e-7)
    assert dequantize(jnp.asarray(q), jnp.asarray(scale), axes, jnp.bfloat16).dtype == jnp.bfloat16


def test_dequantize_rejects_a_scale_of_the_wrong_shape() -> None:
    shape, axes = WEIGHTS["q_proj"]
    q, scale = quantize_int8(jnp.asarray(random_weight(shape, axes)), axes)
    with pytest.raises(ValueError, match="does not fit"):
        dequantize(q, scale, (2,))
    with pytest.raises(ValueError, match="repeat"):
        quantize_int8(jnp.zeros(shape), (0, -3))


# ------------------------------------------------------------------------------------------------ qeinsum
# name: (equation, x shape, weight name, the gradient's equation: d_out, w -> d_x)
QEINSUM_CASES = {
    "q_proj_decode": ("bsh,hnd->bsnd", (1, 1, 16), "q_proj", "bsnd,hnd->bsh"),
    "q_proj_batch8": ("bsh,hnd->bsnd", (8, 1, 16), "q_proj", "bsnd,hnd->bsh"),
    "q_proj_prefill": ("bsh,hnd->bsnd", (2, 40, 16), "q_proj", "bsnd,hnd->bsh"),
    "o_proj_decode": ("bsnd,ndh->bsh", (1, 1, 4, 8), "o_proj", "bsh,ndh->bsnd"),
    "o_proj_prefill": ("bsnd,ndh->bsh", (2, 40, 4, 8), "o_proj", "bsh,ndh->bsnd"),
    "mlp_decode": ("...h,hi->...i", (3, 1, 24), "mlp_down", "...i,hi->...h"),
    "mlp_prefill": ("...h,hi->...i", (2, 40, 24), "mlp_down", "...i,hi->...h"),
    "wide_decode": ("...h,hi->...i", (3, 1, 200), "wide", "...i,hi->...h"),
    "x_contracted_first": ("hb,hi->bi", (24, 3), "mlp_down", "bi,hi->hb"),  # not x [..., K] @ w [K, N]: einsum
}


def run_qeinsum(equation: str, x: np.ndarray, q, scale, d_out: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out, d_x, d_scale) of qeinsum, the gradients by jax.grad of <out, d_out>, under one jit."""

    def loss(a, s):
        out = qeinsum(equation, a, q, s)
        return jnp.vdot(out.astype(jnp.float32), jnp.asarray(d_out, jnp.float32)), out

    (d_x, d_scale), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(jnp.asarray(x), scale)
    return np.asarray(out), np.asarray(d_x), np.asarray(d_scale)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", sorted(QEINSUM_CASES))
def test_qeinsum_matches_einsum_on_the_dequantised_weight(case: str, dtype) -> None:
    equation, x_shape, weight, grad_equation = QEINSUM_CASES[case]
    shape, axes = WEIGHTS[weight]
    if case == "wide_decode":
        assert 200 % chunk_rows(3, 200, 600) != 0  # the chunked loop runs, with a shorter last chunk
    q, scale = quantize_int8(jnp.asarray(random_weight(shape, axes, seed=1)), axes)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(x_shape).astype(dtype)
    want = np.einsum(equation, x.astype(np.float64), np_dequantize(q, scale, axes))
    d_out = rng.standard_normal(want.shape).astype(np.float32)
    out, d_x, d_scale = run_qeinsum(equation, x, q, scale, d_out)
    want_d_x = np.einsum(grad_equation, d_out.astype(np.float64), np_dequantize(q, scale, axes))
    # out = (x . q) * scale over the output's trailing axes: d_scale sums (x . q) * d_out over the leading ones.
    unscaled = np.einsum(equation, x.astype(np.float64), np.asarray(q).astype(np.float64))
    want_d_scale = (unscaled * d_out).reshape(-1, *scale.shape).sum(axis=0)
    assert out.dtype == dtype and d_x.dtype == dtype
    rtol = F32_RTOL if dtype == np.float32 else BF16_RTOL
    assert_close(out, want, rtol, f"qeinsum {case}")
    assert_close(d_x, want_d_x, rtol, f"qeinsum {case} d_x")
    assert_close(d_scale, want_d_scale, rtol, f"qeinsum {case} d_scale")


def test_qeinsum_without_a_scale_is_the_plain_einsum() -> None:
    w = jnp.asarray(random_weight((16, 4, 8), (0,)), jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 16)), jnp.float32)
    got = qeinsum("bsh,hnd->bsnd", x, w, None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.einsum("bsh,hnd->bsnd", x, w.astype(x.dtype))))
    with pytest.raises(ValueError, match="needs its scale"):
        qeinsum("bsh,hnd->bsnd", x, w.astype(jnp.int8), None)


def test_qeinsum_catches_a_scale_on_the_wrong_axis() -> None:
    """Negative controls. A scale over the wrong axes has the wrong shape: refused. A square weight quantised along
    the wrong axis has a scale of the right shape: the comparison with the dequantised reference catches it."""
    shape, axes = WEIGHTS["q_proj"]
    w = random_weight(shape, axes)
    q_wrong, scale_wrong = quantize_int8(jnp.asarray(w), (2,))  # scale [H, N] instead of [N, D]
    x = np.random.default_rng(0).standard_normal((1, 1, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="output"):
        qeinsum("bsh,hnd->bsnd", x, q_wrong, scale_wrong)

    w = random_weight((16, 16), (0,))
    q, scale = quantize_int8(jnp.asarray(w), (1,))  # per input row: the wrong axis, the same shape
    out, _, _ = run_qeinsum("bh,hi->bi", x[0], q, scale, np.zeros((1, 16), np.float32))
    want = x[0].astype(np.float64) @ np_dequantize(q, scale, (1,))
    with pytest.raises(AssertionError):
        assert_close(out, want, F32_RTOL, "scale on the wrong axis")


# ------------------------------------------------------------------------------------------------ gmm


K, N = 32, 16
# name: (group sizes, rows m). Both have empty groups and rows past the end. "decode" has m <= g, where the CPU
# backends run one row per tile (cpu_loops.int8_row_tile); "prefill" has several rows per group.
ROUTINGS = {"prefill": ([5, 0, 9, 6], 24), "decode": ([1, 0, 2, 0, 1, 0, 0, 1], 6)}
GROUP_SIZES, M = ROUTINGS["prefill"]


def gmm_inputs(k: int = K, n: int = N, seed: int = 0, routing: str = "prefill") -> tuple[np.ndarray, ...]:
    """lhs [m, k] (rows past the groups 1e3: a leak is obvious), int8 rhs [g, k, n] with its scale [g, n], the
    dequantised rhs in float64, group sizes, and a random cotangent."""
    group_sizes, m = ROUTINGS[routing]
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((m, k)).astype(np.float32)
    lhs[sum(group_sizes):] = 1e3
    q, scale = quantize_int8(jnp.asarray(random_weight((len(group_sizes), k, n), (1,), seed)), (1,))
    d_out = rng.standard_normal((m, n)).astype(np.float32)
    return lhs, q, scale, np_dequantize(q, scale, (1,)), np.asarray(group_sizes, np.int32), d_out


def run_gmm(fn, lhs, q, scale, group_sizes, d_out) -> tuple[np.ndarray, np.ndarray]:
    """(out, d_lhs) of fn(lhs, q, group_sizes, rhs_scale), d_lhs by jax.grad of <out, d_out>, under one jit."""

    def loss(a):
        out = fn(a, q, group_sizes, scale)
        return jnp.vdot(out.astype(jnp.float32), jnp.asarray(d_out, jnp.float32)), out

    d_lhs, out = jax.jit(jax.grad(loss, has_aux=True))(jnp.asarray(lhs))
    return np.asarray(out), np.asarray(d_lhs)


# The interpreted Pallas kernel is slow: one case of it here (bf16 and a group offset in the next test).
GMM_CASES = [(backend, routing, dtype) for backend in GMM_BACKENDS
             for routing, dtype in (("prefill", np.float32), ("prefill", ml_dtypes.bfloat16), ("decode", np.float32))
             if backend != "pallas" or (routing, dtype) == ("prefill", np.float32)]


@pytest.mark.parametrize(("backend", "routing", "dtype"), GMM_CASES,
                         ids=[f"{b}-{r}-{np.dtype(d).name}" for b, r, d in GMM_CASES])
def test_gmm_with_int8_rhs_matches_the_dequantised_reference(backend: str, routing: str, dtype) -> None:
    lhs, q, scale, rhs64, gs, d_out = gmm_inputs(routing=routing)
    lhs = lhs.astype(dtype)
    out, d_lhs = run_gmm(lambda a, b, g, s: grouped_matmul.gmm(a, b, g, backend=backend, rhs_scale=s),
                         lhs, q, scale, gs, d_out)
    assert out.dtype == dtype and d_lhs.dtype == dtype
    rtol = F32_RTOL if dtype == np.float32 else BF16_RTOL
    assert_close(out, oracle_forward(lhs, rhs64, gs), rtol, f"{backend} out")
    assert_close(d_lhs, oracle_grads(lhs, rhs64, gs, d_out)[0], rtol, f"{backend} d_lhs")
    dense_out, dense_d_lhs = run_gmm(lambda a, b, g, s: grouped_matmul.gmm(a, b, g, backend="dense", rhs_scale=s),
                                     lhs, q, scale, gs, d_out)
    assert_close(out, dense_out.astype(np.float64), rtol, f"{backend} out vs dense")
    assert_close(d_lhs, dense_d_lhs.astype(np.float64), rtol, f"{backend} d_lhs vs dense")
    past = int(gs.sum())
    assert np.all(out[past:] == 0) and np.all(d_lhs[past:] == 0), "rows past the groups must be exactly zero"


def test_pallas_kernels_with_int8_rhs_and_a_group_offset() -> None:
    """The TPU, Triton GPU and Mosaic GPU kernels (interpreted) on an expert-parallel shard, groups 1..2 of 4, int8
    with their scales, f32 and bf16 rows."""
    lhs, q, scale, rhs64, gs, d_out = gmm_inputs()
    shard64 = rhs64.copy()
    shard64[[0, 3]] = 0.0  # rows of groups this shard does not own get zeros
    for platform, dtype in (("tpu", np.float32), ("gpu", ml_dtypes.bfloat16), ("mosaic_gpu", np.float32),
                            ("mosaic_gpu", ml_dtypes.bfloat16)):
        rows = lhs.astype(dtype)
        out, d_lhs = run_gmm(lambda a, b, g, s, p=platform: pallas_gmm.gmm(
            a, b[1:3], g, group_offset=1, rhs_scale=s[1:3], interpret=True, platform=p), rows, q, scale, gs, d_out)
        assert out.dtype == dtype and d_lhs.dtype == dtype
        rtol = F32_RTOL if dtype == np.float32 else BF16_RTOL
        assert_close(out, oracle_forward(rows, shard64, gs), rtol, f"{platform} {np.dtype(dtype).name} out")
        assert_close(d_lhs, oracle_grads(rows, shard64, gs, d_out)[0], rtol, f"{platform} {np.dtype(dtype).name} d_lhs")


def test_gmm_int8_arguments_are_checked_and_the_scale_is_a_constant() -> None:
    lhs, q, scale, _, gs, d_out = gmm_inputs()
    with pytest.raises(ValueError, match="needs its rhs_scale"):
        grouped_matmul.gmm(lhs, q, gs, backend="loop")
    with pytest.raises(ValueError, match="one scale per group"):
        grouped_matmul.gmm(lhs, q, gs, backend="loop", rhs_scale=scale[:, None, :])
    with pytest.raises(ValueError, match="int8"):
        grouped_matmul.gmm(lhs, q.astype(jnp.float32), gs, backend="loop", rhs_scale=scale)

    def loss(s):
        out = grouped_matmul.gmm(lhs, q, gs, backend="loop", rhs_scale=s)
        return jnp.vdot(out, jnp.asarray(d_out))

    assert np.all(np.asarray(jax.jit(jax.grad(loss))(scale)) == 0)  # documented: the scales get a zero cotangent


def test_gmm_catches_a_scale_on_the_wrong_axis() -> None:
    """Negative control: a square rhs quantised along k instead of n has a scale of the right shape [g, n], which gmm
    applies per output column; the comparison with the product of the weight that q and scale represent (scaled per
    row) catches it."""
    lhs, _, _, _, gs, d_out = gmm_inputs(k=16, n=16)
    rhs = random_weight((len(GROUP_SIZES), 16, 16), (1,))
    q, scale = quantize_int8(jnp.asarray(rhs), (2,))  # per (group, input row): the wrong axis
    out, _ = run_gmm(lambda a, b, g, s: grouped_matmul.gmm(a, b, g, backend="gather", rhs_scale=s),
                     lhs, q, scale, gs, d_out)
    with pytest.raises(AssertionError):
        assert_close(out, oracle_forward(lhs, np_dequantize(q, scale, (2,)), gs), F32_RTOL, "wrong axis")


# ------------------------------------------------------------------------------------------------ expert_ffn


# The decode routing matters to the CPU backends' row tiles; the interpreted Pallas kernel runs the prefill one.
FFN_CASES = [(backend, routing, np.float32) for backend in GMM_BACKENDS for routing in sorted(ROUTINGS)
             if backend != "pallas" or routing == "prefill"] + [("loop", "decode", ml_dtypes.bfloat16)]


@pytest.mark.parametrize(("backend", "routing", "dtype"), FFN_CASES,
                         ids=[f"{b}-{r}-{np.dtype(d).name}" for b, r, d in FFN_CASES])
def test_expert_ffn_with_int8_weights_matches_the_dequantised_reference(backend: str, routing: str, dtype) -> None:
    hidden, inner = 32, 16
    group_sizes, m = ROUTINGS[routing]
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((m, hidden)).astype(dtype)
    rows[sum(group_sizes):] = 1e3
    g = len(group_sizes)
    # Scaled so that the pre-activations are O(1) (both regimes of SiLU).
    gate, up = (random_weight((g, hidden, inner), (1,), seed) / np.sqrt(hidden) for seed in (4, 5))
    down = random_weight((g, inner, hidden), (1,), 6) / np.sqrt(inner)
    quantised = [quantize_int8(jnp.asarray(w), (1,)) for w in (gate, up, down)]
    weights = tuple(q for q, _ in quantised)
    scales = tuple(s for _, s in quantised)
    gs = np.asarray(group_sizes, np.int32)
    d_out = rng.standard_normal((m, hidden)).astype(np.float32)

    def loss(x):
        out = grouped_matmul.expert_ffn(x, *weights, gs, backend=backend, scales=scales)
        return jnp.vdot(out.astype(jnp.float32), jnp.asarray(d_out)), out

    d_rows, out = jax.jit(jax.grad(loss, has_aux=True))(jnp.asarray(rows))
    assert out.dtype == dtype and d_rows.dtype == dtype
    want = oracle_ffn(rows, *(np_dequantize(q, s, (1,)) for q, s in quantised), gs, d_out)
    rtol = F32_RTOL if dtype == np.float32 else BF16_RTOL
    assert_close(out, want[0], rtol, f"expert_ffn {backend} out")
    assert_close(d_rows, want[1], rtol, f"expert_ffn {backend} d_rows")
    past = sum(group_sizes)
    assert np.all(np.asarray(out)[past:] == 0) and np.all(np.asarray(d_rows)[past:] == 0)
