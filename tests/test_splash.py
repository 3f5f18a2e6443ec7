"""The fused-kernel attention backends of dots_jax.ops.splash on CPU: "splash" in the Pallas interpreter and the
masking of "cudnn" through jax.nn.dot_product_attention's "xla" implementation (its cuDNN kernel needs a GPU).
Values and q/k/v gradients against a float64 numpy attention written here from the contract, and against the
"reference" backend, 1e-5 relative in f32; which cases reach the kernel and which fall back.

The interpreter is slow (about 15-30 s per shape, forward and both backward kernels): one splash shape here, covering
several features at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dots_jax.ops.attention import NO_WINDOW, attention

TOL = 1e-5


def case(b: int, s: int, t: int, n: int, kv: int, d: int, lengths: list[int], *, start: int = 0,
         left_pad: list[int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Queries at slots start.. of a T-slot sequence (positions = slots); row r's valid keys are slots
    [left_pad[r], start + lengths[r]) (earlier cache slots valid, then lengths[r] real new tokens)."""
    rng = np.random.default_rng(seed)
    slots = np.arange(t)
    first = np.asarray(left_pad or [0] * b)[:, None]
    return {"q": rng.standard_normal((b, s, n, d)).astype(np.float32),
            "k": rng.standard_normal((b, t, kv, d)).astype(np.float32),
            "v": rng.standard_normal((b, t, kv, d)).astype(np.float32),
            "q_pos": np.broadcast_to(start + np.arange(s, dtype=np.int32), (b, s)).copy(),
            "k_pos": np.broadcast_to(slots.astype(np.int32), (b, t)).copy(),
            "key_valid": (slots >= first) & (slots < start + np.asarray(lengths)[:, None])}


def attendable(c: dict, window: int) -> np.ndarray:
    delta = c["q_pos"][:, :, None].astype(np.int64) - c["k_pos"][:, None, :]
    return (delta >= 0) & (delta < window) & c["key_valid"][:, None, :]


def numpy_attention(c: dict, window: int, dout: np.ndarray) -> tuple[np.ndarray, ...]:
    """(out, dq, dk, dv) in float64 from the contract's definition; rows with no key give 0."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (c["q"], c["k"], c["v"], dout))
    b, t, kv, d = k.shape
    g = q.shape[2] // kv
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    mask = attendable(c, window)[:, None]
    scores = np.where(mask, np.einsum("bsnd,btnd->bnst", q, kr) * d**-0.5, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - np.where(np.isfinite(top), top, 0.0))
    p /= np.maximum(p.sum(axis=-1, keepdims=True), 1e-300)
    dp = np.einsum("bsnd,btnd->bnst", dout, vr)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True)) * d**-0.5
    return (np.einsum("bnst,btnd->bsnd", p, vr), np.einsum("bnst,btnd->bsnd", ds, kr),
            np.einsum("bnst,bsnd->btnd", ds, q).reshape(b, t, kv, g, d).sum(axis=3),
            np.einsum("bnst,bsnd->btnd", p, dout).reshape(b, t, kv, g, d).sum(axis=3))


@functools.cache
def _jitted(backend: str, window: int, q_offset: int | None, traced: bool):
    def f(q, k, v, q_pos, k_pos, key_valid, dout, offset):
        def attend(q, k, v):
            return attention(q, k, v, q_pos, k_pos, key_valid, window=window,
                             q_offset=offset if traced else q_offset, backend=backend)

        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(dout))

    return jax.jit(f)


def run(backend: str, c: dict, window: int, q_offset, dout: np.ndarray) -> tuple[np.ndarray, ...]:
    """(out, dq, dk, dv) under jit; q_offset "traced=N" passes N traced, as cache.index (one compile for all N)."""
    traced = isinstance(q_offset, str)
    offset = jnp.int32(int(q_offset.split("=")[1]) if traced else 0)
    f = _jitted(backend, window, None if traced else q_offset, traced)
    return tuple(np.asarray(x) for x in f(c["q"], c["k"], c["v"], c["q_pos"], c["k_pos"], c["key_valid"], dout,
                                          offset))


def check(backend: str, c: dict, window: int, q_offset) -> None:
    has_key = attendable(c, window).any(axis=-1)
    dout = (np.random.default_rng(7).standard_normal(c["q"].shape) * has_key[:, :, None, None]).astype(np.float32)
    got = run(backend, c, window, q_offset, dout)
    assert all(np.isfinite(x).all() for x in got), "non-finite values or gradients"
    for name, want in (("float64", numpy_attention(c, window, dout)),
                       ("reference", run("reference", c, window, q_offset, dout))):
        for what, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            if what in ("out", "dq"):  # rows without a key: values unspecified
                g, w = g[has_key], w[has_key]
            err = np.abs(g - np.asarray(w, np.float64)).max() / (np.abs(w).max() or 1.0)
            assert err <= TOL, f"{backend} {what} against {name}: {err:.2e}"


# GQA (4 query heads on 2), odd length 9 off the 128-slot block, a window of 3, right padding: row 1's padding
# queries past slot 6 have no key.
GQA_WINDOW_PADDED = dict(b=2, s=9, t=9, n=4, kv=2, d=16, lengths=[9, 4])


@pytest.mark.parametrize("q_offset", ["traced=0", "traced=5"])
def test_splash_prefill_into_a_cache(q_offset: str) -> None:
    """GQA (4 query heads on 2), a window of 4, S = 7 new tokens (off the 128-slot block) into T = 20 slots,
    right-padded (row 1: 3 real tokens, so its last padding queries have no key); q_offset traced as cache.index:
    0 (a fresh cache) runs splash, 5 (a filled one) the exact fallback, from one compile. The registry-wide cases
    of tests/test_attention.py (MHA, one token, two blocks, ...) hold every backend, splash included, to the same
    bar; this one keeps splash's own mask logic checked in one interpreted compile."""
    start = int(q_offset.split("=")[1])
    check("splash", case(2, 7, 20, 4, 2, 16, [7, 3], start=start, seed=1), 4, q_offset)


def _kernels(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("pallas_call")


def test_splash_reaches_the_kernel_only_where_its_masks_are_exact() -> None:
    c = case(1, 9, 9, 2, 2, 16, [9])
    args = [c[x] for x in ("q", "k", "v", "q_pos", "k_pos", "key_valid")]

    def splash(q_offset, window=NO_WINDOW):
        return lambda *a: attention(*a, window=window, q_offset=q_offset, backend="splash")

    assert _kernels(splash(0), *args) > 0
    assert _kernels(lambda *a: splash(jnp.int32(0))(*a), *args) > 0  # inside the cond
    assert _kernels(splash(None), *args) == 0  # explicit positions (decode): the fallback
    assert _kernels(lambda *a: splash(0, jnp.int32(3))(*a), *args) == 0  # a traced window: the fallback


# ------------------------------------------------------------------------------------------------------ cudnn
@pytest.mark.parametrize("name, kwargs, window", [
    ("gqa_right_padded_window", GQA_WINDOW_PADDED, 3),  # valid keys a prefix: key_value_seq_lengths
    ("left_padded", dict(b=2, s=9, t=9, n=4, kv=1, d=16, lengths=[9, 9], left_pad=[0, 3]), 4),  # a mask
])
def test_cudnn_masks_on_cpu(name: str, kwargs: dict, window: int) -> None:
    """On CPU the backend runs jax.nn.dot_product_attention's "xla" implementation with the masks it would give
    cuDNN: lengths for right padding, a boolean mask otherwise."""
    check("cudnn", case(**kwargs), window, 0)


def test_cudnn_falls_back_without_a_static_zero_offset() -> None:
    """A cache (traced q_offset, T > S) or explicit positions go to the exact fallback."""
    check("cudnn", case(2, 7, 20, 2, 2, 16, [7, 3], start=5, seed=1), NO_WINDOW, "traced=5")
