"""bf16 parity block by block: the same bf16 inputs through transformers' Dots1 blocks (the pinned oracle, loaded in
bf16 with eager attention) and through ours, compared element by element in bf16 ulps.

Both sides round to bf16 at the same points (transformers' casting order: RMSNorm statistics in f32 cast back
before the weight, f32 softmax, f32 router, f32 routed combine cast once, and every bf16 tensor of transformers
rounded in ours too, which ops.common.round_to keeps XLA from skipping), so on this machine every block
agrees bit for bit. The check still leaves room for a rounding flipped by a different f32 accumulation order or
rsqrt (torch's and XLA's f32 rsqrt differ in a third of the cases; one such flip at one token is why the logits
below are not all bit-identical): per element, K_ULPS ulps plus a floor of one ulp at the element's row scale (a
flipped input of the block's last reduction moves an output by about one ulp of that input's size, and an output
that cancels to near zero has no ulps of its own to absorb that), and at most MAX_DIFFERING of the elements not
bit-identical. A rounding done in the wrong place moves many elements: the negative controls below patch each
bf16 rule into its broken variant and assert that the check catches it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conftest import hf_config, hf_model, random_ids, save, torch_one_thread
from flax import nnx

import dots_jax
from dots_jax.model import modeling as model_module
from dots_jax.model import moe as moe_module
from dots_jax.model.attention import rope_tables
from dots_jax.ops.attention import NO_WINDOW
from dots_jax.ops.gmm import default_backend

# The released model's ratios at tiny size (test_parity's released_like): top-6 of 16 experts, two shared
# experts, scaling 2.5, theta 1e7, a random correction bias.
CONFIG = dict(n_routed_experts=16, num_experts_per_tok=6, n_shared_experts=2, routed_scaling_factor=2.5,
              rope_parameters={"rope_type": "default", "rope_theta": 1e7})
BATCH, SEQ = 2, 32
K_ULPS = 2
# A rounding flipped by a different accumulation order is rare (f32's error is 2**-16 of a bf16 ulp), so few
# elements may differ at all; a rounding done in the wrong place moves a large share of them by an ulp, which a
# few-ulp bound alone lets through.
MAX_DIFFERING = 0.01


def bf16_ulp(a: np.ndarray) -> np.ndarray:
    """The spacing of bf16 numbers at |a| (8 significant bits), down to bf16's smallest normal."""
    a = np.maximum(np.abs(np.asarray(a, np.float64)), 2.0**-126)
    return 2.0 ** (np.floor(np.log2(a)) - 7)


def bf16_mismatch(got, want) -> tuple[float, float]:
    """(worst, differing): worst = max over elements of |got - want| / (K_ULPS ulp(|want|) + ulp(row rms of
    want)), and differing = the fraction of elements that are not bit-identical. The check fails when
    worst > 1 or differing > MAX_DIFFERING."""
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    want = np.asarray(want.detach().float().numpy() if isinstance(want, torch.Tensor) else want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    row_rms = np.sqrt(np.mean(want**2, axis=-1, keepdims=True))
    bound = K_ULPS * bf16_ulp(want) + bf16_ulp(row_rms)
    return float(np.max(np.abs(got - want) / bound)), float(np.mean(got != want))


def f32_excess(got, want, terms) -> float:
    """For f32 outputs of an f32 dot from identical inputs: |got - want| <= 8 eps_f32 * sum|terms| per element
    (a dot's rounding bound, for any summation order, is n eps sum|terms|; in practice far less). > 1 fails."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want) / (8 * 2.0**-23 * terms + 1e-30)))


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers bf16, ours bf16, transformers f32) on one tiny released-like checkpoint."""
    ref32 = hf_model(hf_config(**CONFIG), seed=11, bias_std=0.05)
    path = save(ref32, tmp_path_factory.mktemp("bf16") / "ckpt")
    # from_pretrained, not ref32.to(bfloat16): like our loader it keeps the correction bias and RoPE's inverse
    # frequencies in f32 (.to() would round both to bf16).
    ref = transformers.Dots1ForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                        attn_implementation="eager").eval()
    assert ref.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert ref.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ours = dots_jax.from_pretrained(path, dtype=jnp.bfloat16, progress=False)
    return ref, ours, ref32


def our_layer(stack, i: int):
    """Layer i of one of our stacked layer groups, as a plain DecoderLayer."""
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def bf16_input(seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Hidden states [B, S, H] of about the residual stream's size, exactly bf16, for both sides."""
    x = (np.random.default_rng(seed).standard_normal((BATCH, SEQ, 64)) * 2).astype(ml_dtypes.bfloat16)
    return x, torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)


def attention_inputs(ref, cfg):
    """Ours: (cos, sin, q_pos, k_pos, key_valid, window, q_offset); transformers: ((cos, sin), additive causal
    mask), for positions 0..S-1."""
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ))
    cos, sin = rope_tables(jnp.asarray(positions), cfg.head_dim, cfg.rope_theta, jnp.bfloat16)
    pos = jnp.asarray(positions)
    mask = (pos, pos, jnp.ones((BATCH, SEQ), bool), NO_WINDOW, 0)
    ref_rope = ref.model.rotary_emb(torch.zeros((), dtype=torch.bfloat16), torch.from_numpy(positions.copy()).long())
    ref_mask = torch.full((SEQ, SEQ), torch.finfo(torch.bfloat16).min, dtype=torch.bfloat16).triu(1)
    return (cos, sin, *mask), (ref_rope, ref_mask[None, None].expand(BATCH, 1, SEQ, SEQ))


# ------------------------------------------------------------------------------------------------ blocks
# Each returns (ours, transformers') outputs of one block for the same bf16 input. Ours runs under jit, as in the
# model: XLA's fusion decides where bf16 roundings survive (see ops.common.round_to).


def block_norm(ref, ours):
    x, xt = bf16_input(1)
    layer = our_layer(ours.dense_layers, 0)
    return jax.jit(lambda a: layer.input_layernorm(a))(x), ref.model.layers[0].input_layernorm(xt)


def block_attention(ref, ours):
    x, xt = bf16_input(2)
    args, (ref_rope, ref_mask) = attention_inputs(ref, ours.cfg)
    layer, ref_layer = our_layer(ours.moe_layers, 0), ref.model.layers[1]
    got = jax.jit(lambda a: layer.self_attn(a, *args)[0])(x)
    want = ref_layer.self_attn(hidden_states=xt, position_embeddings=ref_rope, attention_mask=ref_mask)[0]
    return got, want


def block_moe(ref, ours):
    x, xt = bf16_input(3)
    layer = our_layer(ours.moe_layers, 0)
    ref_mlp = ref.model.layers[1].mlp
    # Routing is discrete: the comparison means something only if both sides chose the same experts, which they
    # do for this input (the router test holds the two routers to f32 agreement).
    _, ref_idx = ref_mlp.gate(xt)[1:]
    _, idx, _ = jax.jit(lambda a: layer.mlp.router_outputs(a))(x)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(ref_idx.numpy(), -1))
    got = jax.jit(lambda a: layer.mlp(a, jnp.ones((BATCH, SEQ), bool))[0])(x)
    return got, ref_mlp(xt)


def block_layer(ref, ours, moe_layer: bool):
    x, xt = bf16_input(4)
    args, (ref_rope, ref_mask) = attention_inputs(ref, ours.cfg)
    layer = our_layer(ours.moe_layers, 0) if moe_layer else our_layer(ours.dense_layers, 0)
    ref_layer = ref.model.layers[1 if moe_layer else 0]
    got = jax.jit(lambda a: layer(a, *args, jnp.ones((BATCH, SEQ), bool))[0])(x)
    return got, ref_layer(xt, attention_mask=ref_mask, position_embeddings=ref_rope)


BLOCKS = {
    "rmsnorm": block_norm,
    "attention": block_attention,
    "moe": block_moe,
    "decoder_layer_dense": lambda ref, ours: block_layer(ref, ours, moe_layer=False),
    "decoder_layer_moe": lambda ref, ours: block_layer(ref, ours, moe_layer=True),
}


@pytest.mark.parametrize("block", list(BLOCKS))
def test_block_matches_reference_bf16(pair, block: str) -> None:
    ref, ours, _ = pair
    with torch_one_thread():
        got, want = BLOCKS[block](ref, ours)
    assert got.dtype == jnp.bfloat16 and want.dtype == torch.bfloat16
    worst, differing = bf16_mismatch(got, want)
    assert worst <= 1.0, f"{block}: {worst:.2f} x the per-element bound"
    assert differing <= MAX_DIFFERING, f"{block}: {differing:.1%} of the elements differ"


def router_check(ref, ours) -> tuple[float, bool]:
    """The router's f32 logits and weights against transformers' (same bf16 input): (the worst ratio to the f32
    bound, > 1 fails; whether both chose the same experts for every token)."""
    x, xt = bf16_input(5)
    layer = our_layer(ours.moe_layers, 0)
    weights, idx, logits = jax.jit(lambda a: layer.mlp.router_outputs(a))(x)
    gate = ref.model.layers[1].mlp.gate
    ref_logits, ref_weights, ref_idx = gate(xt)
    assert logits.dtype == jnp.float32 and weights.dtype == jnp.float32
    # Compare as sets: sort each token's choices by expert id, carrying the weights along.
    our_order, ref_order = np.argsort(np.asarray(idx), -1), torch.argsort(ref_idx, -1).numpy()
    same_experts = bool(np.array_equal(np.take_along_axis(np.asarray(idx), our_order, -1),
                                       np.take_along_axis(ref_idx.numpy(), ref_order, -1)))
    terms = np.abs(x.astype(np.float64)).reshape(-1, 64) @ np.abs(gate.weight.detach().double().numpy()).T
    worst = f32_excess(logits, ref_logits.numpy(), terms)
    if same_experts:
        # The weights are sigmoid(logit) / sum, times the scaling: within a few f32 eps of themselves.
        ref_w = np.take_along_axis(ref_weights.numpy(), ref_order, -1)
        worst = max(worst, f32_excess(np.take_along_axis(np.asarray(weights), our_order, -1), ref_w, np.abs(ref_w)))
    return worst, same_experts


def test_router_matches_reference_in_f32(pair) -> None:
    ref, ours, _ = pair
    with torch_one_thread():
        worst, same_experts = router_check(ref, ours)
    assert same_experts, "the routers chose different experts"
    assert worst <= 1.0, f"router: {worst:.2f} x the f32 bound"


# ------------------------------------------------------------------------------------------------ model level


def logit_errors(ref, ours, ref32) -> tuple[np.ndarray, np.ndarray]:
    """|ours_bf16 - transformers_bf16| and transformers' own |bf16 - f32|, per logit."""
    ids = random_ids(ref.config.vocab_size, BATCH, SEQ, seed=6)
    with torch_one_thread():
        want = ref(torch.from_numpy(ids).long()).logits.double().numpy()
        truth = ref32(torch.from_numpy(ids).long()).logits.double().numpy()
    got = np.asarray(ours(jnp.asarray(ids)).astype(jnp.float32), np.float64)
    return np.abs(got - want), np.abs(want - truth)


# Ours against transformers' bf16, as a fraction of transformers' own bf16-vs-f32 error, per percentile. A rounding
# put elsewhere grows, layer by layer, to the size of bf16's own error (measured 0.7 of it in median with the
# roundings left to XLA); a rare flipped rounding (torch's and XLA's f32 rsqrt differ in a third of the cases)
# changes only the tokens after it (measured 0 in median, 0.18 at the 99th percentile).
LOGIT_RATIO = {50: 0.1, 99: 0.5}


def logit_error_ratios(ours_err: np.ndarray, bf16_err: np.ndarray) -> dict[int, float]:
    assert np.median(bf16_err) > 0, "bf16 must visibly differ from f32, or this bound tests nothing"
    return {q: float(np.percentile(ours_err, q) / np.percentile(bf16_err, q)) for q in LOGIT_RATIO}


def test_model_logits_median_and_p99_bf16(pair) -> None:
    """The median says the bulk of the logits agree; the 99th percentile is not one outlier's max. The model runs
    the CPU default, the fused bf16 expert loop (tests/test_backend_parity.py covers the other backends)."""
    cfg = pair[1].cfg
    assert default_backend(BATCH * SEQ * cfg.num_experts_per_tok, cfg.n_routed_experts) == "loop"
    ratios = logit_error_ratios(*logit_errors(*pair))
    for q, ratio in ratios.items():
        assert ratio <= LOGIT_RATIO[q], f"p{q}: {ratio:.2f} x transformers' bf16 error (bound {LOGIT_RATIO[q]})"


# ------------------------------------------------------------------------------------------------ negative controls
# Each patches one bf16 rule of ours into its broken variant, at run time, and asserts that the check above
# catches it: a check that cannot fail proves nothing.


def bf16(a: jax.Array) -> jax.Array:
    """a rounded to bf16 where a bf16 kernel would round it. A plain cast is not enough for a control: XLA:CPU
    drops a bf16 rounding whose result the next fused op upcasts again (ops.common.round_to)."""
    return moe_module.round_to(a.astype(jnp.float32), jnp.bfloat16)


def rmsnorm_bf16_statistics(self, x):
    """Mean square in bf16, and the weight applied in f32 before the cast back."""
    mean_square = bf16(jnp.mean(bf16(x * x), axis=-1, keepdims=True))
    normed = x.astype(jnp.float32) * jax.lax.rsqrt(mean_square.astype(jnp.float32) + self.eps)
    return (self.weight[...].astype(jnp.float32) * normed).astype(x.dtype)


def softmax_in_input_dtype(real_softmax):
    """jax.nn.softmax run on the bf16 scores (ours upcasts them to f32 first)."""
    def softmax(scores, axis=-1):
        return real_softmax(scores.astype(jnp.bfloat16), axis=axis)
    return softmax


def router_in_bf16(x, router_weight, correction_bias, *, top_k, n_group, topk_group, norm_topk_prob,
                   routed_scaling_factor):
    """The router's matmul, sigmoid, normalisation and scaling in bf16 (no groups: CONFIG has n_group 1)."""
    assert n_group == 1
    logits = bf16(jnp.dot(x.astype(jnp.bfloat16), router_weight.astype(jnp.bfloat16)))
    scores = bf16(jax.nn.sigmoid(logits))
    _, indices = jax.lax.top_k(bf16(scores + correction_bias), top_k)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if norm_topk_prob:
        weights = bf16(weights / bf16(weights.sum(axis=-1, keepdims=True)))
    weights = bf16(weights * routed_scaling_factor)
    return weights.astype(jnp.float32), indices.astype(jnp.int32), logits.astype(jnp.float32)


def combine_in_bf16(x, weights, indices, gate, up, down, *, first_expert, backend="auto", scales=None, lora=None,
                    dropout=None):
    """moe.local_experts with the weighted sum of expert outputs in bf16: each weighted copy rounded and added in
    bf16, one expert slot after another, as an in-place bf16 index_add_ does (a model without adapters)."""
    assert lora is None and dropout is None
    num_tokens, top_k = indices.shape
    copy_token = jnp.arange(num_tokens * top_k, dtype=jnp.int32) // top_k
    out = moe_module.expert_ffn(x, copy_token, indices.reshape(-1) - first_expert, gate, up, down, backend=backend,
                                scales=scales)
    out = out.reshape(num_tokens, top_k, -1)
    total = jnp.zeros(out.shape[::2], jnp.float32)
    for k in range(top_k):
        total = bf16(total + bf16(out[:, k].astype(jnp.float32) * weights[:, k, None]))
    return total


def unpin_roundings(mp) -> None:
    mp.setattr(model_module, "rounded_add", lambda x, y: x + y)
    mp.setattr(moe_module, "round_to", lambda a, dtype: a.astype(dtype))


CONTROLS = {
    # name: (what to patch, block check that must fail)
    "rmsnorm_bf16_statistics": (lambda mp: mp.setattr(model_module.RMSNorm, "__call__", rmsnorm_bf16_statistics),
                                "rmsnorm"),
    "attention_softmax_bf16": (lambda mp: mp.setattr(jax.nn, "softmax", softmax_in_input_dtype(jax.nn.softmax)),
                               "attention"),
    "router_bf16": (lambda mp: mp.setattr(model_module, "route", router_in_bf16), "router"),
    "routed_combine_bf16": (lambda mp: mp.setattr(moe_module, "local_experts", combine_in_bf16), "moe"),
    # The model before round_to: plain bf16 adds and casts, XLA free to drop the roundings it fuses away.
    "roundings_left_to_xla": (unpin_roundings, "decoder_layer_moe"),
    "roundings_left_to_xla_model": (unpin_roundings, "model"),
}


@pytest.mark.parametrize("control", list(CONTROLS))
def test_negative_control_fails_the_block_check(pair, control: str, monkeypatch) -> None:
    ref, ours, ref32 = pair
    patch, block = CONTROLS[control]
    patch(monkeypatch)
    with torch_one_thread():
        if block == "model":
            ours_err, bf16_err = logit_errors(ref, ours, ref32)
            ratios = logit_error_ratios(ours_err, bf16_err)
            caught = any(ratio > LOGIT_RATIO[q] for q, ratio in ratios.items())
            seen = ", ".join(f"p{q} {ratio:.2f} x transformers' bf16 error (bound {LOGIT_RATIO[q]})"
                             for q, ratio in ratios.items())
        elif block == "router":
            worst, same_experts = router_check(ref, ours)
            caught = worst > 1.0 or not same_experts
            seen = f"{worst:.3g} x the f32 bound, same experts: {same_experts}"
        else:
            worst, differing = bf16_mismatch(*BLOCKS[block](ref, ours))
            caught = worst > 1.0 or differing > MAX_DIFFERING
            seen = f"{worst:.2f} x the per-element bound, {differing:.1%} of the elements differ"
    print(f"{control} on {block}: {seen}")
    assert caught, f"{control} passed the {block} check ({seen}): the check is too loose"
