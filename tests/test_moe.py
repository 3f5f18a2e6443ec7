"""Routed-expert dispatch (sort, grouped matmul, unsort, combine) for every backend, against float64 numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dots_jax.model.moe import moe_experts, route
from dots_jax.ops.gmm import BACKENDS

E, H, I, K = 8, 16, 12, 3


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _numpy_moe(x, weights, indices, gate, up, down):
    """The definition, token by token, in float64."""
    x, weights, gate, up, down = (np.asarray(a, np.float64) for a in (x, weights, gate, up, down))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            out[t] += weights[t, j] * (_silu(x[t] @ gate[e]) * (x[t] @ up[e])) @ down[e]
    return out


def _inputs(tokens: int, seed: int, skip_experts: tuple[int, ...] = ()):
    rng = np.random.default_rng(seed)
    allowed = np.array([e for e in range(E) if e not in skip_experts])
    indices = np.stack([rng.choice(allowed, size=K, replace=False) for _ in range(tokens)]).astype(np.int32)
    arrays = dict(
        x=rng.normal(size=(tokens, H)), weights=rng.uniform(0.1, 1.0, size=(tokens, K)),
        gate=rng.normal(size=(E, H, I)) / 4, up=rng.normal(size=(E, H, I)) / 4, down=rng.normal(size=(E, I, H)) / 4)
    return {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}, jnp.asarray(indices)


CASES = {"many_tokens": (37, ()), "one_token": (1, ()), "idle_experts": (20, (0, 3, 7))}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_experts_values(backend, case):
    tokens, skip = CASES[case]
    a, indices = _inputs(tokens, seed=tokens, skip_experts=skip)
    got = moe_experts(a["x"], a["weights"], indices, a["gate"], a["up"], a["down"], backend=backend)
    want = _numpy_moe(a["x"], a["weights"], np.asarray(indices), a["gate"], a["up"], a["down"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_experts_gradients_agree_across_backends(case):
    """Gradients w.r.t. tokens, routing weights and every expert matrix: each backend against the float64
    numpy gradient obtained by central differences along a random direction (a directional derivative),
    and against each other exactly to f32 rounding."""
    tokens, skip = CASES[case]
    a, indices = _inputs(tokens, seed=100 + tokens, skip_experts=skip)
    probe = jnp.asarray(np.random.default_rng(1).normal(size=(tokens, H)), jnp.float32)
    names = ("x", "weights", "gate", "up", "down")

    def loss(backend):
        return lambda *p: jnp.sum(probe * moe_experts(p[0], p[1], indices, p[2], p[3], p[4], backend=backend))

    # The Mosaic GPU kernels' f32 runs six interpreted bf16 passes per product here (about 45 s a case): their
    # gradients are checked against the float64 oracle in test_mosaic_gpu.py and test_quant.py instead.
    grads = {b: jax.jit(jax.grad(loss(b), argnums=tuple(range(5))))(*(a[n] for n in names)) for b in BACKENDS
             if b != "mosaic_gpu"}
    # Oracle: the directional derivative of the float64 numpy loss.
    rng = np.random.default_rng(2)
    direction = [rng.normal(size=a[n].shape) for n in names]

    def np_loss(params):
        return float(np.sum(np.asarray(probe, np.float64) * _numpy_moe(params[0], params[1], np.asarray(indices),
                                                                      params[2], params[3], params[4])))
    base = [np.asarray(a[n], np.float64) for n in names]
    eps = 1e-6
    plus = np_loss([p + eps * d for p, d in zip(base, direction, strict=True)])
    minus = np_loss([p - eps * d for p, d in zip(base, direction, strict=True)])
    want = (plus - minus) / (2 * eps)
    for backend, g in grads.items():
        got = sum(float(np.sum(np.asarray(gi, np.float64) * d)) for gi, d in zip(g, direction, strict=True))
        assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (backend, got, want)
        for idle in skip:  # experts that received no token get exactly zero gradient
            for gi in g[2:]:
                assert not np.any(np.asarray(gi)[idle]), backend
    first = grads[sorted(grads)[0]]
    for backend, g in grads.items():
        for name, gi, fi in zip(names, g, first, strict=True):
            np.testing.assert_allclose(np.asarray(gi), np.asarray(fi), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{backend} d{name}")


def _numpy_route(x, w, bias, top_k, n_group, topk_group, norm, scale):
    scores = 1.0 / (1.0 + np.exp(-(np.asarray(x, np.float64) @ np.asarray(w, np.float64))))
    choice = scores + np.asarray(bias, np.float64)
    t, e = choice.shape
    if n_group > 1:
        grouped = choice.reshape(t, n_group, e // n_group)
        group_score = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
        keep = np.argsort(-group_score, axis=-1)[:, :topk_group]
        mask = np.zeros((t, n_group), bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        choice = np.where(np.repeat(mask, e // n_group, axis=-1), choice, -np.inf)
    idx = np.argsort(-choice, axis=-1)[:, :top_k]
    weights = np.take_along_axis(scores, idx, -1)
    if norm:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * scale, idx


@pytest.mark.parametrize("n_group,topk_group,norm,scale", [(1, 1, True, 1.0), (4, 2, False, 2.5), (2, 1, True, 2.5)])
def test_route_matches_numpy(n_group, topk_group, norm, scale):
    """Negative biased scores included (bias ~ N(0, 1)): masked groups must lose even then (the -inf fill)."""
    rng = np.random.default_rng(n_group)
    x, w, bias = rng.normal(size=(50, H)), rng.normal(size=(H, E)), rng.normal(size=E)
    weights, idx, logits = route(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                 jnp.asarray(bias, jnp.float32), top_k=K, n_group=n_group, topk_group=topk_group,
                                 norm_topk_prob=norm, routed_scaling_factor=scale)
    want_w, want_idx = _numpy_route(np.float32(x), np.float32(w), np.float32(bias), K, n_group, topk_group,
                                    norm, scale)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(want_idx, -1))
    order, want_order = np.argsort(np.asarray(idx), -1), np.argsort(want_idx, -1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), order, -1),
                               np.take_along_axis(want_w, want_order, -1), rtol=1e-6, atol=1e-7)
    assert weights.dtype == jnp.float32 and logits.shape == (50, E)


def test_routing_stats_match_numpy():
    """Expert load and the sequence-wise balance loss (DeepSeek-V3's definition) against float64 numpy,
    with padding left out; and the loss is exactly 1 when every expert gets the same share."""
    from dots_jax.model.moe import routing_stats

    rng = np.random.default_rng(5)
    b, s = 3, 11
    logits = rng.normal(size=(b, s, E))
    indices = np.stack([[rng.choice(E, K, replace=False) for _ in range(s)] for _ in range(b)])
    valid = np.ones((b, s), bool)
    valid[1, 7:] = False
    valid[2, 2:] = False
    stats = routing_stats(jnp.asarray(logits, jnp.float32), jnp.asarray(indices), jnp.asarray(valid))

    load = np.zeros(E)
    losses = []
    for i in range(b):
        counts = np.zeros(E)
        for t in np.flatnonzero(valid[i]):
            counts[indices[i, t]] += 1
        load += counts
        n = valid[i].sum()
        sig = 1 / (1 + np.exp(-logits[i]))
        p = (sig / sig.sum(-1, keepdims=True))[valid[i]].mean(0)
        losses.append(np.sum(E / (K * n) * counts * p))
    np.testing.assert_allclose(np.asarray(stats.expert_load), load)
    np.testing.assert_allclose(float(stats.balance_loss), np.mean(losses), rtol=1e-5)

    # Perfect balance: uniform scores and every expert chosen equally often -> f_i = 1, P_i = 1/E, loss = 1.
    uniform = routing_stats(jnp.zeros((1, E, E)), jnp.asarray((np.arange(E)[:, None] + np.arange(K)) % E)[None],
                            jnp.ones((1, E), bool))
    np.testing.assert_allclose(float(uniform.balance_loss), 1.0, rtol=1e-6)


@pytest.mark.parametrize("backend,fused", [("loop", True), ("auto", True), ("ragged_dot", False), ("dense", False)])
def test_expert_ffn_uses_the_fused_loop_for_the_loop_backend(monkeypatch, backend, fused):
    """"loop" (and "auto", which is "loop" on CPU at this size) runs the fused SwiGLU loop; the other backends
    keep the three gmm calls. The values of both paths are checked against numpy above."""
    import dots_jax.ops.gmm as ops_gmm

    calls = []
    fused_loop = ops_gmm.expert_ffn_loop

    def recording(*args, **kwargs):
        calls.append(args[0].shape)
        return fused_loop(*args, **kwargs)

    monkeypatch.setattr(ops_gmm, "expert_ffn_loop", recording)
    a, indices = _inputs(20, seed=3)
    got = moe_experts(a["x"], a["weights"], indices, a["gate"], a["up"], a["down"], backend=backend)
    want = _numpy_moe(a["x"], a["weights"], np.asarray(indices), a["gate"], a["up"], a["down"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert calls == ([(20 * K, H)] if fused else [])
