"""Training (dots_jax.train) against independent oracles.

Gradients: torch autograd through transformers' Dots1ForCausalLM (the pinned oracle), every parameter kind.
Balancing, the schedule and AdamW (weight-decay mask, clipping, accumulation): numpy and hand-computed values.
Compiling a train step dominates the cost (10-30 s on this CPU), so the compiled configurations are few and
shared, and the train-step tests use a two-layer model (one dense, one MoE layer), which XLA compiles about twice
as fast as the three-layer one (a dense layer and a stack of two MoE layers) that the gradient test uses.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from conftest import hf_config, hf_model, random_ids, save, torch_one_thread
from flax import nnx

import dots_jax
from dots_jax import training as train
from dots_jax.model.modeling import RouterBias
from dots_jax.ops.head_loss import head_nll
from dots_jax.weights.hf import match_key

# First layer dense (TINY), GQA, group-limited routing (4 groups of 2, keep 2), normalised top-2, scaled 2.5.
CONFIG = dict(num_key_value_heads=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
VOCAB, EXPERTS, TOP_K = 160, 8, 2
STACKS = {"dense_layers", "moe_layers"}

# Balancing control and accumulation share one compiled f32 step (TC_OFF): a tiny learning rate (the weights
# barely move, so nothing but the balancing rule could change the routing), no clipping (so a summed instead of
# averaged accumulated gradient would show) and a large eps (so Adam's first update is a smooth function of the
# gradient).
TC_OFF = train.TrainConfig(learning_rate=1e-5, total_steps=100, warmup_steps=0, decay_steps=0, eps=1e-3,
                           grad_clip=1e3, balance_loss_coef=0.0, bias_update_rate=0.0)
TC_ACCUM = dataclasses.replace(TC_OFF, grad_accum_steps=2)
# The balancing run is also the bf16 smoke run (saves a train-step compile): bf16 compute, f32
# master weights, a learning rate that visibly fits the repeated batch, the balancing rule on, no balance loss.
RATE, SKEW, STEPS = 0.03, 1.0, 30
TC_BF16 = train.TrainConfig(learning_rate=3e-3, total_steps=100, warmup_steps=0, decay_steps=0,
                            balance_loss_coef=0.0, bias_update_rate=RATE)
BALANCE_IDS = random_ids(VOCAB, 4, 32, seed=41)
# The train-step tests run the MoE on ragged_dot: XLA:CPU compiles its backward about twice as fast as the CPU
# default's ("loop"), and what they check does not depend on the backend. The gradient test uses the default;
# test_grouped_matmul checks every backend's gradients, bf16 included.
FAST = dict(moe_backend="ragged_dot")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ref = hf_model(hf_config(**CONFIG), seed=7, bias_std=0.05)
    return ref, save(ref, tmp_path_factory.mktemp("train") / "tiny")


@pytest.fixture(scope="module")
def two_layer_path(tmp_path_factory):
    ref = hf_model(hf_config(**CONFIG, num_hidden_layers=2), seed=8, bias_std=0.05)
    return save(ref, tmp_path_factory.mktemp("train") / "two_layers")


def _load(path, **kwargs) -> dots_jax.Dots1ForCausalLM:
    return dots_jax.from_pretrained(path, progress=False, **{"dtype": jnp.float32, **kwargs})


def _next_token_batch(ids: np.ndarray) -> train.Batch:
    """Targets are the next tokens; the last position has none and is masked out."""
    mask = np.ones(ids.shape, np.float32)
    mask[:, -1] = 0
    return train.Batch(jnp.asarray(ids), jnp.asarray(np.roll(ids, -1, axis=1)), jnp.asarray(mask))


def _flat(state: nnx.State) -> dict[tuple, np.ndarray]:
    # Copies: a train step donates its input state, so views of those buffers would not survive it.
    return {path: np.array(var.get_value()) for path, var in nnx.to_flat_state(state)}


def _bias(state: train.TrainState) -> np.ndarray:
    (leaf,) = jax.tree.leaves(state.router_bias)
    return np.array(leaf)


# ---------------------------------------------------------------------------------------------------------------
# 1. Gradients against torch autograd


def _our_slots(key: str, grad: np.ndarray, cfg):
    """(path in our state, layer index in its stack or None, the gradient in our layout) for each target of the
    HF tensor `key`, through the key table's transforms (linear re-layouts, so valid for gradients too)."""
    m = match_key(key, cfg)
    assert m.expert is None, f"{key}: transformers 5.x should hold the experts fused"
    arrays = m.rule.to_jax(grad, cfg)
    for target, array in zip(m.rule.targets, arrays if isinstance(arrays, tuple) else (arrays,), strict=True):
        path = tuple(target.split("."))
        if m.layer is None:
            yield path, None, array
        elif m.layer < cfg.first_k_dense_replace:
            yield ("dense_layers", *path), m.layer, array
        else:
            yield ("moe_layers", *path), m.layer - cfg.first_k_dense_replace, array


def _check_gradients_against_torch(ref: transformers.Dots1ForCausalLM, path, remat: bool = False
                                   ) -> dict[tuple[str, str], float]:
    """Loss, expert load and the gradient of every parameter against torch autograd; returns the relative errors
    (max |ours - oracle| / max |oracle|) per (HF tensor, our parameter)."""
    model = _load(path)
    cfg = model.cfg
    ids = random_ids(VOCAB, 3, 16, seed=11)
    labels = ids.astype(np.int64)
    labels[np.random.default_rng(12).random(ids.shape) < 0.25] = -100  # masked targets (prompt, padding)

    # The oracle: transformers' own causal-LM loss (shifts the labels, ignores -100) and torch autograd. Each MoE
    # router's chosen experts are recorded for the expert-load check.
    chosen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, args, out: chosen.append(out[2].numpy().copy()))
             for layer in ref.model.layers[cfg.first_k_dense_replace:]]
    ref.zero_grad(set_to_none=True)
    try:
        with torch_one_thread(grad=True):
            out = ref(torch.from_numpy(ids).long(), labels=torch.from_numpy(labels))
            out.loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    ref_grads = {name: p.grad.double().numpy() for name, p in ref.named_parameters()}
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in ref_grads), "expected fused experts"

    # Ours: the same function, written as targets = next token and a loss mask.
    targets = np.zeros_like(ids)
    targets[:, :-1] = np.where(labels[:, 1:] >= 0, labels[:, 1:], 0)
    mask = np.zeros(ids.shape, np.float32)
    mask[:, :-1] = labels[:, 1:] >= 0
    batch = train.Batch(jnp.asarray(ids), jnp.asarray(targets), jnp.asarray(mask))
    graphdef, state = train.init_state(model, TC_OFF)
    grad_fn = jax.value_and_grad(train.loss_fn, has_aux=True)
    # With remat the layer bodies are rematerialised (recomputed in the backward pass); without, none is.
    jaxpr = str(jax.make_jaxpr(grad_fn, static_argnums=(2, 4, 5))(state.params, state.router_bias, graphdef, batch,
                                                                  0.0, remat))
    assert ("remat" in jaxpr or "checkpoint" in jaxpr) == remat
    grad_fn = jax.jit(grad_fn, static_argnums=(2, 4, 5))
    (loss, aux), grads = grad_fn(state.params, state.router_bias, graphdef, batch, 0.0, remat)

    ref_loss = out.loss.item()
    assert abs(float(loss) - ref_loss) <= 1e-5 * ref_loss
    # Expert load: the oracle's chosen experts, counted.
    expected_load = np.stack([np.bincount(c.reshape(-1), minlength=EXPERTS) for c in chosen])
    np.testing.assert_array_equal(np.asarray(aux["expert_load"]), expected_load)

    ours = _flat(grads)
    unchecked = {(p, i) for p, g in ours.items() for i in ([None] if p[0] not in STACKS else range(g.shape[0]))}
    errors = {}
    for name, ref_grad in ref_grads.items():
        for p, layer, expected in _our_slots(name, ref_grad, cfg):
            got = ours[p] if layer is None else ours[p][layer]
            assert got.shape == expected.shape, (name, p)
            scale = np.abs(expected).max()
            assert scale > 0, f"{name}: the oracle's gradient is all zero, the check would be empty"
            errors[(name, p[-1])] = np.abs(got.astype(np.float64) - expected).max() / scale
            unchecked.discard((p, layer))
    assert not unchecked, f"our parameters without an oracle gradient: {sorted(unchecked, key=str)}"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"worst relative gradient error {errors[worst]:.2e} at {worst}"
    return errors


def test_gradients_match_torch_autograd(checkpoint):
    errors = _check_gradients_against_torch(*checkpoint)
    checked = {ours for _, ours in errors}
    assert {"router", "gate_proj", "up_proj", "down_proj", "q_proj", "o_proj", "weight", "lm_head"} <= checked


def test_remat_gradients_match_torch_autograd(checkpoint):
    """TrainConfig.remat (train --remat): each layer recomputed in the backward pass, the same gradients."""
    errors = _check_gradients_against_torch(*checkpoint, remat=True)
    assert {"router", "q_proj", "down_proj"} <= {ours for _, ours in errors}


def test_tied_embedding_and_attention_bias_gradients_match_torch_autograd(tmp_path):
    # Tied: the embedding's gradient sums its two uses (lookup and output head). Two layers keep the compile short.
    config = hf_config(**CONFIG, num_hidden_layers=2, tie_word_embeddings=True, attention_bias=True)
    ref = hf_model(config, seed=9, bias_std=0.05)
    errors = _check_gradients_against_torch(ref, save(ref, tmp_path / "tied"))
    checked = {ours for _, ours in errors}
    assert "lm_head" not in checked and "embed_tokens" in checked
    assert {"q_bias", "k_bias", "v_bias", "o_bias"} <= checked


# ---------------------------------------------------------------------------------------------------------------
# 2. Auxiliary-loss-free balancing


def test_update_router_bias_matches_numpy(checkpoint):
    _, path = checkpoint
    graphdef, params, router_bias = nnx.split(_load(path), nnx.Param, RouterBias)
    bias = np.random.default_rng(3).normal(0.0, 0.1, (2, EXPERTS)).astype(np.float32)
    router_bias = jax.tree.map(lambda _: jnp.asarray(bias), router_bias)
    # Layer 0 has mean load 5 and two experts exactly at the mean (no change); layer 1 is one-sided.
    load = np.array([[9, 0, 5, 5, 1, 12, 4, 4], [16, 0, 0, 0, 0, 0, 0, 0]], np.float32)
    new = train.update_router_bias(router_bias, jnp.asarray(load), 0.25)

    mean = load.astype(np.float64).mean(axis=-1, keepdims=True)
    expected = bias + 0.25 * np.sign(mean - load)
    assert jax.tree.structure(new) == jax.tree.structure(router_bias)
    (got,) = jax.tree.leaves(new)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6)
    assert np.asarray(got)[0, 2] == bias[0, 2]  # at the mean: untouched
    # The model built from the updated state routes with the new bias; its router weights are the old ones.
    merged = nnx.merge(graphdef, params, new)
    np.testing.assert_array_equal(np.asarray(merged.moe_layers.mlp.correction_bias[...]), np.asarray(got))
    before = _flat(params)[("moe_layers", "mlp", "router")]
    np.testing.assert_array_equal(np.asarray(merged.moe_layers.mlp.router[...]), before)


def _skewed_run(model: dots_jax.Dots1ForCausalLM, tc: train.TrainConfig) -> dict:
    """STEPS steps on one repeated batch from a routing skewed onto experts 0 and 1 (together one group, so
    every token picks exactly them): the expert load of each step, the bias before each step and after the last,
    the losses, and the final state."""
    graphdef, state = train.init_state(model, tc)
    skew = np.zeros(EXPERTS, np.float32)
    skew[:2] = SKEW
    state.router_bias = jax.tree.map(lambda b: b + skew, state.router_bias)
    batch = _next_token_batch(BALANCE_IDS)
    loads, biases, losses = [], [_bias(state)], []
    for _ in range(STEPS):
        state, metrics = train.jit_train_step(graphdef, tc, state, batch)
        loads.append(np.asarray(metrics["expert_load"]))
        biases.append(_bias(state))
        losses.append(float(metrics["loss"]))
    cv = np.stack([np.asarray(train.load_cv(jnp.asarray(load))) for load in loads])  # [steps, moe layers]
    return dict(loads=np.stack(loads), biases=np.stack(biases), losses=np.array(losses), cv=cv,
                graphdef=graphdef, state=state)


@pytest.fixture(scope="module")
def bf16_run(two_layer_path) -> dict:
    return _skewed_run(_load(two_layer_path, dtype=jnp.bfloat16, param_dtype=jnp.float32, **FAST), TC_BF16)


@pytest.fixture(scope="module")
def control_run(two_layer_path) -> dict:
    return _skewed_run(_load(two_layer_path, **FAST), TC_OFF)


def test_bias_balancing_evens_out_a_skewed_load(bf16_run, control_run):
    on, off = bf16_run, control_run
    for run in (on, off):
        np.testing.assert_array_equal(run["loads"].sum(axis=-1), BALANCE_IDS.size * TOP_K)  # k per token
        # The skew works: all tokens on two of eight experts is cv = sqrt(3), in every MoE layer.
        np.testing.assert_allclose(run["cv"][0], np.sqrt(3.0), rtol=1e-5)
    assert np.all(on["cv"][-5:].mean(axis=0) < 0.6 * on["cv"][0]), on["cv"].round(2).tolist()
    assert np.all(off["cv"][-5:].mean(axis=0) > 0.9 * off["cv"][0]), off["cv"].round(2).tolist()

    # The rule, step by step, from each step's own load (numpy); without it the bias never moves.
    for load, before, after in zip(on["loads"], on["biases"][:-1], on["biases"][1:], strict=True):
        step = RATE * np.sign(load.mean(axis=-1, keepdims=True) - load)
        np.testing.assert_allclose(after, before + step, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(off["biases"], np.broadcast_to(off["biases"][0], off["biases"].shape))
    assert not any("correction_bias" in p for p in _flat(on["state"].params))  # the optimizer never sees it


# ---------------------------------------------------------------------------------------------------------------
# 3. Schedule and optimizer


def test_wsd_schedule_hand_values():
    tc = train.TrainConfig(learning_rate=2.0, total_steps=100, warmup_steps=10, decay_steps=20, min_lr_ratio=0.1)
    schedule = train.wsd_schedule(tc)
    # warmup 0 -> 2 over steps 0..10; stable to step 80; linear 2 -> 0.2 over steps 80..100; then held.
    expected = {0: 0.0, 5: 1.0, 10: 2.0, 50: 2.0, 80: 2.0, 90: 1.1, 95: 0.65, 100: 0.2, 130: 0.2}
    got = {step: float(schedule(step)) for step in expected}
    np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-6, atol=1e-7)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="decay_steps"):
        train.TrainConfig(total_steps=100, warmup_steps=60, decay_steps=50)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        train.TrainConfig(grad_accum_steps=0)


def test_zero_gradient_step_decays_matrices_but_not_norms_or_biases(checkpoint):
    """With a zero gradient Adam's direction is 0, so the update is exactly -lr * wd * w where decay applies."""
    _, path = checkpoint
    tc = train.TrainConfig(learning_rate=0.5, total_steps=10, warmup_steps=0, decay_steps=0, weight_decay=0.1)
    shrink = 1 - 0.5 * 0.1
    _, params, _ = nnx.split(_load(path), nnx.Param, RouterBias)
    # A toy tree (names as in the model: a leading "layers" axis under a layer stack) and the real parameters.
    toy = {"w": jnp.full((3, 4), 2.0), "scale": jnp.full((4,), 2.0),
           "moe_layers": {"norm": jnp.full((2, 4), 2.0), "proj": jnp.full((2, 3, 4), 2.0),
                          "q_bias": jnp.full((2, 2, 4), 2.0)}}
    opt = train.make_optimizer(tc)

    @jax.jit
    def zero_gradient_step(tree):
        updates, _ = opt.update(jax.tree.map(jnp.zeros_like, tree), opt.init(tree), tree)
        return optax.apply_updates(tree, updates)

    for tree in (toy, params):
        new = zero_gradient_step(tree)
        before = jax.tree_util.tree_leaves_with_path(tree)
        for (p, old), new_leaf in zip(before, jax.tree.leaves(new), strict=True):
            name = jax.tree_util.keystr(p)
            # Norm weights and biases are 1-D per layer ([layers, dim] when stacked, a q/k/v bias [layers, heads,
            # head_dim]); everything else is a matrix.
            kept = any(word in name for word in ("norm", "scale", "bias"))
            np.testing.assert_allclose(np.asarray(new_leaf), np.asarray(old) * (1.0 if kept else shrink),
                                       rtol=1e-6, err_msg=name)


def _numpy_adamw(params, grads_seq, lrs, tc, decay, clip=True):
    """float64 AdamW (optax conventions: bias-corrected moments, eps outside the sqrt, decoupled decay on the
    current weights, scaled by the step's learning rate) after global-norm clipping."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
        norm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g.values()))
        factor = min(1.0, tc.grad_clip / norm) if clip else 1.0
        for k in p:
            gk = g[k] * factor
            m[k] = tc.b1 * m[k] + (1 - tc.b1) * gk
            v[k] = tc.b2 * v[k] + (1 - tc.b2) * gk**2
            direction = (m[k] / (1 - tc.b1**t)) / (np.sqrt(v[k] / (1 - tc.b2**t)) + tc.eps)
            p[k] = p[k] - lr * (direction + (tc.weight_decay * p[k] if decay[k] else 0.0))
    return p


def test_adamw_clipping_and_schedule_match_numpy():
    tc = train.TrainConfig(learning_rate=0.1, total_steps=10, warmup_steps=2, decay_steps=0, weight_decay=0.1)
    rng = np.random.default_rng(5)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "scale": rng.normal(size=4).astype(np.float32)}
    decay = {"w": True, "scale": False}

    def grads(scale):
        g = {k: rng.normal(size=x.shape).astype(np.float32) for k, x in params.items()}
        norm = np.sqrt(sum((x**2).sum() for x in g.values()))
        return {k: x * np.float32(scale / norm) for k, x in g.items()}

    # Global norms 0.5 (kept), 1e4 (clipped to 1), 0.3 (kept). Learning rates: warmup 0, 0.05, then 0.1.
    grads_seq = [grads(0.5), grads(1e4), grads(0.3)]
    lrs = [0.0, 0.05, 0.1]
    opt = train.make_optimizer(tc)
    tree = {k: jnp.asarray(v) for k, v in params.items()}
    state = opt.init(tree)
    for g in grads_seq:
        updates, state = opt.update({k: jnp.asarray(v) for k, v in g.items()}, state, tree)
        tree = optax.apply_updates(tree, updates)

    expected = _numpy_adamw(params, grads_seq, lrs, tc, decay)
    unclipped = _numpy_adamw(params, grads_seq, lrs, tc, decay, clip=False)
    for k in params:
        step = np.abs(expected[k] - params[k]).max()
        assert np.abs(np.asarray(tree[k]) - expected[k]).max() <= 1e-4 * step, k
        # The clip matters here: without it the huge gradient dominates Adam's moments.
        assert np.abs(unclipped[k] - expected[k]).max() > 0.05 * step, k


def test_grad_accumulation_equals_one_step_on_the_concatenated_batch(two_layer_path):
    path = two_layer_path
    ids = random_ids(VOCAB, 4, 32, seed=21)
    graphdef, full = train.init_state(_load(path, **FAST), TC_OFF)
    p0 = _flat(full.params)
    full, _ = train.jit_train_step(graphdef, TC_OFF, full, _next_token_batch(ids))

    graphdef, acc = train.init_state(_load(path, **FAST), TC_ACCUM)
    acc, _ = train.jit_train_step(graphdef, TC_ACCUM, acc, _next_token_batch(ids[:2]))
    for p, value in _flat(acc.params).items():  # the first micro-step only accumulates
        np.testing.assert_array_equal(value, p0[p], err_msg=str(p))
    acc, _ = train.jit_train_step(graphdef, TC_ACCUM, acc, _next_token_batch(ids[2:]))

    # Adam's moments after the update are linear in the (mean) gradient: 0.1 g and 0.05 g^2; a sum would be 2x.
    for moment in ("mu", "nu"):
        got, want = (_flat(optax.tree_utils.tree_get(s.opt_state, moment)) for s in (acc, full))
        for p in want:
            scale = np.abs(want[p]).max()
            assert np.abs(got[p] - want[p]).max() <= 1e-4 * scale, (moment, p)
    got, want = _flat(acc.params), _flat(full.params)
    for p in want:
        moved = np.abs(want[p] - p0[p]).max()
        assert moved > 0, p
        assert np.abs(got[p] - want[p]).max() <= 0.02 * moved + 1e-7, p


def test_grad_accumulation_moves_the_router_bias_once_per_optimizer_step(two_layer_path):
    """The balancing rule runs once per optimizer step, on the load of all its micro-batches (as the paper
    does once per training step): nothing after the first micro-step, then rate * sign(mean - summed load)."""
    rate = 0.01
    tc = dataclasses.replace(TC_ACCUM, bias_update_rate=rate)
    ids = random_ids(VOCAB, 4, 32, seed=22)
    graphdef, state = train.init_state(_load(two_layer_path, **FAST), tc)
    bias0 = _bias(state)
    state, m1 = train.jit_train_step(graphdef, tc, state, _next_token_batch(ids[:2]))
    np.testing.assert_array_equal(_bias(state), bias0)
    state, m2 = train.jit_train_step(graphdef, tc, state, _next_token_batch(ids[2:]))
    load = np.asarray(m1["expert_load"], np.float64) + np.asarray(m2["expert_load"], np.float64)
    want = bias0 + rate * np.sign(load.mean(axis=-1, keepdims=True) - load)
    np.testing.assert_allclose(_bias(state), want, rtol=0, atol=1e-7)
    assert not np.array_equal(_bias(state), bias0)


# ---------------------------------------------------------------------------------------------------------------
# 4. bf16 compute with f32 master weights


def test_bf16_compute_trains_with_f32_master_weights(bf16_run):
    graphdef, state, losses = bf16_run["graphdef"], bf16_run["state"], bf16_run["losses"]
    ids = jnp.asarray(BALANCE_IDS)
    logits = jax.eval_shape(lambda s: nnx.merge(graphdef, s.params, s.router_bias)(ids), state)
    assert logits.dtype == jnp.bfloat16  # the compute really is bf16 ...
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))  # ... the weights f32
    assert _bias(state).dtype == np.float32
    assert np.all(np.isfinite(losses)), losses
    # The repeated batch is fitted: the loss falls within 10 steps and keeps falling.
    assert losses[9] < 0.8 * losses[0] and losses[-1] < 0.5 * losses[0], losses.round(3).tolist()


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_head_nll_and_its_custom_gradient_match_float64(dtype, rtol):
    # head_nll has a hand-written backward; hold it and the forward to float64 numpy, with a per-token cotangent
    # (a loss mask) so that d_nll is not uniform.
    rng = np.random.default_rng(3)
    n, h, v = 37, 24, 50
    x = rng.standard_normal((n, h)).astype(np.float32)
    w = (rng.standard_normal((h, v)) * 0.3).astype(np.float32)
    targets = rng.integers(0, v, n).astype(np.int32)
    ct = rng.random(n).astype(np.float32) * (rng.random(n) > 0.2)
    xj, wj = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    nll, vjp = jax.vjp(lambda a, b: head_nll(a, b, jnp.asarray(targets)), xj, wj)
    d_x, d_w = vjp(jnp.asarray(ct))
    xd, wd = np.asarray(xj, np.float64), np.asarray(wj, np.float64)  # the rounded inputs the kernel saw
    logits = xd @ wd
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    want_nll = lse - logits[np.arange(n), targets]
    d_logits = (np.exp(logits - lse[:, None]) - np.eye(v)[targets]) * ct[:, None]
    for name, got, want in (("nll", nll, want_nll), ("d_x", d_x, d_logits @ wd.T), ("d_head", d_w, xd.T @ d_logits)):
        got = np.asarray(got, np.float64)
        assert got.dtype == np.float64 and np.isfinite(got).all(), name
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= rtol, f"{name}: relative error {err:.2e}"
    assert d_x.dtype == xj.dtype and d_w.dtype == wj.dtype
