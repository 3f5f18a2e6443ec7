"""Grouped matmul backends against an independent float64 numpy oracle: values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dots_jax.ops.cpu_loops import expert_ffn_loop, gmm_loop, loop_row_tile
from dots_jax.ops.gmm import BACKENDS, default_backend, gmm, gmm_dense, register_backend

BUILTIN_BACKENDS = ["ragged_dot", "dense", "loop", "gather"]
F32_RTOL = 1e-5


# ------------------------------------------------------------------------------------------------ oracle
# Plain loops over groups in float64; shares no code with dots_jax.


def oracle_forward(lhs: np.ndarray, rhs: np.ndarray, group_sizes: np.ndarray) -> np.ndarray:
    lhs, rhs = lhs.astype(np.float64), rhs.astype(np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for group, size in enumerate(group_sizes):
        out[start:start + size] = lhs[start:start + size] @ rhs[group]
        start += size
    return out  # rows past sum(group_sizes) stay zero


def oracle_grads(lhs: np.ndarray, rhs: np.ndarray, group_sizes: np.ndarray,
                 d_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of sum(out * d_out).

    d_lhs[i] = d_out[i] @ rhs[g_i]^T (zero for rows in no group);
    d_rhs[g] = sum over the rows i of group g of x_i^T d_out_i.
    """
    lhs, rhs, d_out = lhs.astype(np.float64), rhs.astype(np.float64), d_out.astype(np.float64)
    d_lhs = np.zeros_like(lhs)
    d_rhs = np.zeros_like(rhs)
    start = 0
    for group, size in enumerate(group_sizes):
        rows = slice(start, start + size)
        d_lhs[rows] = d_out[rows] @ rhs[group].T
        d_rhs[group] = lhs[rows].T @ d_out[rows]
        start += size
    return d_lhs, d_rhs


# ------------------------------------------------------------------------------------------------ helpers


def make_inputs(group_sizes: list[int], m: int, k: int, n: int, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((m, k)).astype(np.float32)
    # Rows past the last group get large values so that any leak into the output or d_rhs is obvious.
    lhs[sum(group_sizes):] = 1e3
    rhs = rng.standard_normal((len(group_sizes), k, n)).astype(np.float32)
    d_out = rng.standard_normal((m, n)).astype(np.float32)  # random weights of the summed output
    return lhs, rhs, np.asarray(group_sizes, np.int32), d_out


def run_backend(backend: str, lhs: np.ndarray, rhs: np.ndarray, group_sizes: np.ndarray, d_out: np.ndarray,
                *, jit: bool = True, tile: int | None = None, preferred_element_type=None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out, d_lhs, d_rhs) from gmm, the gradients by jax.grad of sum(out * d_out)."""

    def matmul(a: jax.Array, b: jax.Array, gs: jax.Array) -> jax.Array:
        if tile is not None:  # only the loop backend takes a tile
            out_dtype = preferred_element_type if preferred_element_type is not None else a.dtype
            return gmm_loop(a, b, gs, out_dtype, tile=tile)
        return gmm(a, b, gs, backend=backend, preferred_element_type=preferred_element_type)

    def loss(a: jax.Array, b: jax.Array, gs: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = matmul(a, b, gs)
        return jnp.vdot(out.astype(jnp.float32), jnp.asarray(d_out, jnp.float32)), out

    # One function for the output and both gradients: one compilation per case keeps the file fast.
    out_and_grads = jax.grad(loss, argnums=(0, 1), has_aux=True)
    if jit:  # group_sizes is an argument, so it is traced, not baked into the compiled function
        out_and_grads = jax.jit(out_and_grads)
    (d_lhs, d_rhs), out = out_and_grads(lhs, rhs, group_sizes)
    return out, d_lhs, d_rhs


def assert_close(actual, expected: np.ndarray, rtol: float, what: str) -> None:
    """Elementwise |actual - expected| <= rtol * max(1, max|expected|): relative to the array's scale, so that
    entries near zero (cancellation) do not need more precision than f32 can give."""
    actual = np.asarray(np.asarray(actual).astype(np.float64))
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale, err_msg=what)


BF16_U, F32_U = 2.0**-8, 2.0**-24  # unit roundoffs: rounding to nearest moves a value by at most this fraction


def assert_close_bf16(actual, expected: np.ndarray, terms: np.ndarray, reduction: int, what: str) -> None:
    """Per element, for a bf16 result of a sum of `reduction` products accumulated in f32 and rounded once:
    |actual - expected| <= BF16_U |expected| + 2 reduction F32_U terms. expected is the float64 sum on the same
    bf16 inputs and terms the float64 sum of the products' absolute values (the oracle run on |inputs|): the f32
    accumulation is within reduction F32_U terms of exact in any order, and the final rounding moves it by at most
    BF16_U of itself. No scaling by the array's maximum: a small entry must be as right as a large one."""
    actual = np.asarray(np.asarray(actual).astype(np.float64))
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite entries"
    bound = BF16_U * np.abs(expected) + 2 * reduction * F32_U * terms
    excess = np.abs(actual - expected) / np.maximum(bound, np.finfo(np.float64).tiny)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 1.0, (f"{what}: {excess[worst]:.2f} x the per-element bound at {worst}: "
                                  f"{actual[worst]!r} vs {expected[worst]!r}")


def check_against_oracle(backend: str, group_sizes: list[int], m: int, k: int = 24, n: int = 16, *,
                         jit: bool = True, tile: int | None = None, seed: int = 0) -> None:
    lhs, rhs, gs, d_out = make_inputs(group_sizes, m, k, n, seed)
    out, d_lhs, d_rhs = run_backend(backend, lhs, rhs, gs, d_out, jit=jit, tile=tile)
    assert out.dtype == jnp.float32 and d_lhs.dtype == jnp.float32 and d_rhs.dtype == jnp.float32
    expected_d_lhs, expected_d_rhs = oracle_grads(lhs, rhs, gs, d_out)
    assert_close(out, oracle_forward(lhs, rhs, gs), F32_RTOL, f"{backend} output")
    assert_close(d_lhs, expected_d_lhs, F32_RTOL, f"{backend} d_lhs")
    assert_close(d_rhs, expected_d_rhs, F32_RTOL, f"{backend} d_rhs")
    # Rows past the last group: exactly zero, not merely small.
    total = sum(group_sizes)
    assert np.all(np.asarray(out)[total:] == 0.0), "rows past sum(group_sizes) must be exactly zero"
    assert np.all(np.asarray(d_lhs)[total:] == 0.0), "their lhs gradient must be exactly zero"


# ------------------------------------------------------------------------------------------------ cases

CASES = {
    # name: (group_sizes, m)
    "random": ([9, 3, 11, 6, 8], 37),  # 37 is not a multiple of the loop's tile (16)
    "empty_groups": ([0, 7, 0, 0, 12, 0], 19),
    "all_in_one_group": ([0, 0, 23, 0], 23),
    "single_row": ([0, 1, 0], 1),
    "rows_past_the_end": ([4, 0, 9, 3], 30),  # sum 16 < m = 30
    "no_rows_used": ([0, 0, 0], 5),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", BUILTIN_BACKENDS)
def test_backend_matches_oracle(backend: str, case: str) -> None:
    group_sizes, m = CASES[case]
    check_against_oracle(backend, group_sizes, m)


def test_random_case_is_not_tile_aligned() -> None:
    # Keeps the "random" case honest: its m must leave a partial last tile in the loop backend.
    group_sizes, m = CASES["random"]
    assert m % loop_row_tile(m, len(group_sizes)) != 0


@pytest.mark.parametrize("backend", BUILTIN_BACKENDS)
def test_backend_matches_oracle_without_jit(backend: str) -> None:
    check_against_oracle(backend, [5, 0, 8, 2], 17)


@pytest.mark.parametrize("tile", [1, 8, 16, 128])
def test_loop_tiles(tile: int) -> None:
    # Groups spanning several tiles (their d_rhs is summed over tiles), partial tiles, an empty group, and
    # trailing rows; tile 128 is larger than m.
    check_against_oracle("loop", [45, 0, 30, 19], 100, k=20, n=12, tile=tile)


@pytest.mark.parametrize("backend", BUILTIN_BACKENDS)
def test_one_compiled_function_serves_different_group_sizes(backend: str) -> None:
    m, k, n = 24, 16, 8
    lhs, rhs, _, d_out = make_inputs([8, 8, 8], m, k, n)
    traces = 0

    @jax.jit
    def forward(a: jax.Array, b: jax.Array, gs: jax.Array) -> jax.Array:
        nonlocal traces
        traces += 1  # runs only while tracing
        return gmm(a, b, gs, backend=backend)

    for sizes in ([8, 8, 8], [0, 20, 1], [24, 0, 0], [1, 1, 1]):
        gs = np.asarray(sizes, np.int32)
        assert_close(forward(lhs, rhs, gs), oracle_forward(lhs, rhs, gs), F32_RTOL, f"{backend} {sizes}")
    assert traces == 1, "new group sizes must not retrace (they are a traced argument)"


def test_backends_agree_with_each_other() -> None:
    # The oracle tests pin each backend; this one checks them side by side on a larger random problem.
    rng = np.random.default_rng(7)
    group_sizes = rng.multinomial(90, np.full(12, 1 / 12)).tolist()
    lhs, rhs, gs, d_out = make_inputs(group_sizes, 96, 40, 24, seed=7)
    results = {backend: run_backend(backend, lhs, rhs, gs, d_out) for backend in BUILTIN_BACKENDS}
    expected = (oracle_forward(lhs, rhs, gs), *oracle_grads(lhs, rhs, gs, d_out))
    for backend, result in results.items():
        names = ("out", "d_lhs", "d_rhs")
        for name, got, want, dense in zip(names, result, expected, results["dense"], strict=True):
            assert_close(got, want, F32_RTOL, f"{backend} {name} vs oracle")
            assert_close(got, np.asarray(dense, np.float64), F32_RTOL, f"{backend} {name} vs dense")


# ------------------------------------------------------------------------------------------------ dtypes


def bf16_round(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("backend", BUILTIN_BACKENDS)
def test_bf16_inputs(backend: str) -> None:
    group_sizes, m, k, n = [6, 0, 13, 9], 31, 32, 16
    lhs, rhs, gs, d_out = make_inputs(group_sizes, m, k, n, seed=3)
    lhs, rhs = bf16_round(lhs), bf16_round(rhs)
    out, d_lhs, d_rhs = run_backend(backend, lhs, rhs, gs, d_out)
    assert out.dtype == jnp.bfloat16 and d_lhs.dtype == jnp.bfloat16 and d_rhs.dtype == jnp.bfloat16
    # The oracle sees the same bf16-rounded inputs and (for the gradients) the cotangent rounded to bf16 as the
    # backward receives it, so what remains is the f32 accumulation and the one rounding to bf16.
    d_out_bf16 = bf16_round(d_out).astype(np.float64)
    expected_d_lhs, expected_d_rhs = oracle_grads(lhs, rhs, gs, d_out_bf16)
    abs_in = [np.abs(a.astype(np.float64)) for a in (lhs, rhs)]
    terms_d_lhs, terms_d_rhs = oracle_grads(*abs_in, gs, np.abs(d_out_bf16))
    assert_close_bf16(out, oracle_forward(lhs, rhs, gs), oracle_forward(*abs_in, gs), k, f"{backend} bf16 output")
    assert_close_bf16(d_lhs, expected_d_lhs, terms_d_lhs, n, f"{backend} bf16 d_lhs")
    assert_close_bf16(d_rhs, expected_d_rhs, terms_d_rhs, m, f"{backend} bf16 d_rhs")
    assert np.all(np.asarray(out)[sum(group_sizes):] == 0)


def test_bf16_bound_catches_bf16_partial_sums() -> None:
    # Negative control: a kernel that keeps its partial sums in bf16 (two halves of k, each rounded, then added)
    # fails the per-element bound, where the old 1e-2 * max|expected| bound let it through.
    group_sizes, m, k, n = [6, 0, 13, 9], 31, 256, 16
    lhs, rhs, gs, _ = make_inputs(group_sizes, m, k, n, seed=3)
    lhs, rhs = (bf16_round(a).astype(np.float64) for a in (lhs, rhs))
    half = k // 2
    partial = [bf16_round(oracle_forward(lhs[:, part], rhs[:, part], gs)).astype(np.float64)
               for part in (slice(0, half), slice(half, k))]
    broken = bf16_round(partial[0] + partial[1])
    expected = oracle_forward(lhs, rhs, gs)
    assert_close(broken, expected, 1e-2, "bf16 partial sums under the old bound")
    with pytest.raises(AssertionError, match="per-element bound"):
        assert_close_bf16(broken, expected, oracle_forward(np.abs(lhs), np.abs(rhs), gs), k, "bf16 partial sums")


@pytest.mark.parametrize("backend", BUILTIN_BACKENDS)
def test_bf16_inputs_with_f32_output(backend: str) -> None:
    # With an f32 output nothing is rounded to bf16 after the products (a product of two bf16 numbers is
    # exact in f32), so the f32 tolerance applies: this checks that accumulation really happens in f32.
    group_sizes, m, k, n = [6, 0, 13, 9], 31, 256, 16
    lhs, rhs, gs, _ = make_inputs(group_sizes, m, k, n, seed=4)
    lhs, rhs = bf16_round(lhs), bf16_round(rhs)
    forward = jax.jit(lambda a, b, g: gmm(a, b, g, backend=backend, preferred_element_type=jnp.float32))
    out = forward(lhs, rhs, gs)
    assert out.dtype == jnp.float32
    assert_close(out, oracle_forward(lhs, rhs, gs), F32_RTOL, f"{backend} bf16 -> f32 output")


@pytest.mark.parametrize("backend", BUILTIN_BACKENDS)
def test_output_dtype_follows_preferred_element_type(backend: str) -> None:
    lhs, rhs, gs, _ = make_inputs([2, 3], 6, 4, 3)
    for preferred, expected in ((None, jnp.float32), (jnp.bfloat16, jnp.bfloat16)):
        out = jax.eval_shape(lambda a, b, g, p=preferred: gmm(a, b, g, backend=backend,
                                                              preferred_element_type=p), lhs, rhs, gs)
        assert out.dtype == expected and out.shape == (6, 3)


# ------------------------------------------------------------------------------------------------ registry


def test_unknown_backend_lists_known_ones() -> None:
    lhs, rhs, gs, _ = make_inputs([2, 3], 6, 4, 3)
    with pytest.raises(ValueError, match="unknown gmm backend 'nope'.*dense.*loop.*ragged_dot"):
        gmm(lhs, rhs, gs, backend="nope")


def test_shape_mismatch_is_an_error() -> None:
    lhs, rhs, gs, _ = make_inputs([2, 3], 6, 4, 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        gmm(lhs[:, :3], rhs, gs)
    with pytest.raises(ValueError, match="shape mismatch"):
        gmm(lhs, rhs, gs[:1])


def test_default_backend_on_cpu() -> None:
    assert jax.default_backend() == "cpu"
    assert default_backend() == "loop"
    assert default_backend(m=6, g=32) == "gather"  # decode-sized: read only the chosen groups
    assert default_backend(m=48, g=64) == "loop"
    lhs, rhs, gs, _ = make_inputs([2, 3], 6, 4, 3)
    assert_close(jax.jit(gmm)(lhs, rhs, gs), oracle_forward(lhs, rhs, gs), F32_RTOL, "auto")


def test_register_backend_reaches_callers() -> None:
    calls: list[jnp.dtype] = []

    def recording_backend(lhs, rhs, group_sizes, preferred_element_type):
        calls.append(preferred_element_type)
        return gmm_dense(lhs, rhs, group_sizes, preferred_element_type)

    register_backend("recording", recording_backend)
    try:
        lhs, rhs, gs, _ = make_inputs([2, 0, 3], 6, 4, 3)
        out = gmm(lhs, rhs, gs, backend="recording")
        assert_close(out, oracle_forward(lhs, rhs, gs), F32_RTOL, "registered backend")
        assert calls == [jnp.dtype(jnp.float32)]  # the resolved dtype, never None
    finally:
        del BACKENDS["recording"]
    with pytest.raises(ValueError, match="auto"):
        register_backend("auto", recording_backend)


@pytest.mark.parametrize(("m", "g"), [(1, 1), (37, 5), (384, 16), (3072, 128), (3072, 16), (10**6, 2)])
def test_loop_row_tile_is_a_clamped_power_of_two(m: int, g: int) -> None:
    tile = loop_row_tile(m, g)
    assert 16 <= tile <= 64 and tile & (tile - 1) == 0


# ------------------------------------------------------------------------------------------------ fused SwiGLU
# expert_ffn_loop(rows, gate, up, down, group_sizes) = (silu(rows @ gate[g]) * (rows @ up[g])) @ down[g] per group,
# in one loop forward and one hand-written backward. Oracle: the same per group in float64, with the SwiGLU
# derivative written out by hand.


def _np_silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def _np_silu_grad(z: np.ndarray) -> np.ndarray:
    sigmoid = 1.0 / (1.0 + np.exp(-z))
    return sigmoid * (1.0 + z * (1.0 - sigmoid))


def oracle_ffn(rows: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, group_sizes: np.ndarray,
               d_out: np.ndarray) -> tuple[np.ndarray, ...]:
    """(out, d_rows, d_gate, d_up, d_down) in float64; the gradients are those of sum(out * d_out)."""
    rows, gate, up, down, d_out = (a.astype(np.float64) for a in (rows, gate, up, down, d_out))
    out, d_rows = np.zeros_like(rows), np.zeros_like(rows)
    d_gate, d_up, d_down = np.zeros_like(gate), np.zeros_like(up), np.zeros_like(down)
    start = 0
    for group, size in enumerate(group_sizes):
        x, dy = rows[start:start + size], d_out[start:start + size]
        a, b = x @ gate[group], x @ up[group]
        h = _np_silu(a) * b
        out[start:start + size] = h @ down[group]
        dh = dy @ down[group].T
        da, db = dh * b * _np_silu_grad(a), dh * _np_silu(a)
        d_rows[start:start + size] = da @ gate[group].T + db @ up[group].T
        d_gate[group], d_up[group], d_down[group] = x.T @ da, x.T @ db, h.T @ dy
        start += size
    return out, d_rows, d_gate, d_up, d_down  # rows past sum(group_sizes) stay zero


def make_ffn_inputs(group_sizes: list[int], m: int, hidden: int, inner: int, seed: int = 0
                    ) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((m, hidden)).astype(np.float32)
    rows[sum(group_sizes):] = 1e3  # rows past the last group: any leak into outputs or gradients is obvious
    g = len(group_sizes)
    # Scaled so that the pre-activations are O(1): SiLU's both regimes are exercised, nothing saturates.
    gate, up = (rng.standard_normal((g, hidden, inner)).astype(np.float32) / np.sqrt(hidden) for _ in range(2))
    down = rng.standard_normal((g, inner, hidden)).astype(np.float32) / np.sqrt(inner)
    d_out = rng.standard_normal((m, hidden)).astype(np.float32)
    return rows, gate, up, down, np.asarray(group_sizes, np.int32), d_out


def run_ffn(ffn, rows, gate, up, down, group_sizes, d_out) -> tuple[np.ndarray, ...]:
    """(out, d_rows, d_gate, d_up, d_down) of ffn(rows, gate, up, down, group_sizes), jitted, by jax.grad."""

    def loss(*args: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = ffn(*args)
        return jnp.vdot(out.astype(jnp.float32), jnp.asarray(d_out, jnp.float32)), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(rows, gate, up, down, group_sizes)
    return (out, *grads)


FFN_CASES = {
    # name: (group_sizes, m)
    "random": ([9, 3, 11, 6, 8], 37),
    "empty_groups_and_rows_past_the_end": ([0, 7, 0, 0, 12, 0], 30),
    "all_in_one_group": ([0, 0, 23, 0], 23),
    "no_rows_used": ([0, 0, 0], 5),
}


@pytest.mark.parametrize("tile", [None, 1, 8, 16, 64])
@pytest.mark.parametrize("case", sorted(FFN_CASES))
def test_expert_ffn_loop_matches_oracle(case: str, tile: int | None) -> None:
    # tile 8 and 16 are larger than some groups (3, 6, 7): partial tiles; 64 is larger than m.
    group_sizes, m = FFN_CASES[case]
    rows, gate, up, down, gs, d_out = make_ffn_inputs(group_sizes, m, hidden=24, inner=20)
    got = run_ffn(lambda *a: expert_ffn_loop(*a, tile=tile), rows, gate, up, down, gs, d_out)
    want = oracle_ffn(rows, gate, up, down, gs, d_out)
    for name, g, w in zip(("out", "d_rows", "d_gate", "d_up", "d_down"), got, want, strict=True):
        assert g.dtype == jnp.float32, name
        assert_close(g, w, F32_RTOL, f"expert_ffn_loop {name} (tile {tile})")
    total = sum(group_sizes)
    assert np.all(np.asarray(got[0])[total:] == 0.0), "rows past sum(group_sizes) must be exactly zero"
    assert np.all(np.asarray(got[1])[total:] == 0.0), "their row gradient must be exactly zero"
    # Undifferentiated, the forward keeps no activations (another code path): same values.
    forward = jax.jit(lambda *a: expert_ffn_loop(*a, tile=tile))(rows, gate, up, down, gs)
    assert_close(forward, want[0], F32_RTOL, f"expert_ffn_loop forward only (tile {tile})")
    assert np.all(np.asarray(forward)[total:] == 0.0)


def test_expert_ffn_loop_groups_spanning_many_tiles() -> None:
    # Weight gradients summed over several tiles of one group, at a larger width.
    group_sizes = [45, 0, 30, 19]
    rows, gate, up, down, gs, d_out = make_ffn_inputs(group_sizes, 100, hidden=64, inner=48, seed=5)
    got = run_ffn(lambda *a: expert_ffn_loop(*a, tile=16), rows, gate, up, down, gs, d_out)
    want = oracle_ffn(rows, gate, up, down, gs, d_out)
    for name, g, w in zip(("out", "d_rows", "d_gate", "d_up", "d_down"), got, want, strict=True):
        assert_close(g, w, F32_RTOL, f"expert_ffn_loop {name}")


def test_expert_ffn_loop_bf16_matches_unfused_loop_path() -> None:
    # bf16 against the three-gmm path it replaces (its numerics are pinned to the oracle above and by the gmm
    # tests): both round the same intermediates to bf16, so they differ only where the fused backward keeps a
    # sum in f32 (dx) that the unfused one adds in bf16, and by the order of f32 accumulations. Hence ~1e-2.
    from dots_jax.ops.common import silu

    group_sizes, m = [6, 0, 13, 9, 1], 33
    rows, gate, up, down, gs, d_out = make_ffn_inputs(group_sizes, m, hidden=32, inner=24, seed=9)
    rows, gate, up, down = (bf16_round(a) for a in (rows, gate, up, down))

    def unfused(x, wg, wu, wd, sizes):
        h = silu(gmm(x, wg, sizes, backend="loop")) * gmm(x, wu, sizes, backend="loop")
        return gmm(h, wd, sizes, backend="loop")

    got = run_ffn(expert_ffn_loop, rows, gate, up, down, gs, d_out)
    want = run_ffn(unfused, rows, gate, up, down, gs, d_out)
    for name, g, w in zip(("out", "d_rows", "d_gate", "d_up", "d_down"), got, want, strict=True):
        assert g.dtype == jnp.bfloat16, name
        assert_close(g, np.asarray(w, np.float64), 1e-2, f"bf16 {name}")
    assert np.all(np.asarray(got[0])[sum(group_sizes):] == 0)
