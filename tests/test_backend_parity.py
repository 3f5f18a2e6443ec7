"""Every MoE dispatch backend's model logits against transformers' (the pinned oracle), not against another of our
backends: "loop" (on CPU the fused SwiGLU expert loop, ops.gmm.expert_ffn -> cpu_loops.expert_ffn_loop; "auto"
picks it here), "gather", "dense", "ragged_dot", and "pallas" (the Mosaic kernel in the Pallas interpreter: in
f32 on every parity config in tests/test_pallas_gmm.py, in bf16 here). f32 with test_parity's bound; bf16 with
test_bf16_blocks' model-level bound against transformers' bf16. One tiny released-like checkpoint serves every
case; each case also asserts that its backend really ran.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import test_bf16_blocks
import test_parity
import torch
import transformers
from conftest import random_ids, torch_one_thread

import dots_jax
from dots_jax.ops import gmm as grouped_matmul

BACKENDS = ["loop", "gather", "dense", "ragged_dot"]
BATCH, SEQ = 2, 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(path, ids, transformers f32 logits, transformers bf16 logits), float64."""
    ref, path = test_parity._build("released_like", tmp_path_factory.mktemp("backends"))
    ids = random_ids(ref.config.vocab_size, BATCH, SEQ, seed=3)
    ref16 = transformers.Dots1ForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                          attn_implementation="eager").eval()
    with torch_one_thread():
        f32 = ref(torch.from_numpy(ids).long()).logits.double().numpy()
        bf16 = ref16(torch.from_numpy(ids).long()).logits.double().numpy()
    return path, ids, f32, bf16


def record_backends(monkeypatch) -> list[str]:
    """Wrap what the model dispatches to so that the test sees which backend ran: the fused loop for "loop",
    else the gmm backend."""
    calls: list[str] = []
    fused = grouped_matmul.expert_ffn_loop
    monkeypatch.setattr(grouped_matmul, "expert_ffn_loop", lambda *a, **kw: calls.append("loop") or fused(*a, **kw))
    for name, fn in list(grouped_matmul.BACKENDS.items()):
        monkeypatch.setitem(grouped_matmul.BACKENDS, name,
                            lambda *a, name=name, fn=fn: calls.append(name) or fn(*a))
    return calls


def run(path, ids, backend: str, dtype, monkeypatch) -> np.ndarray:
    calls = record_backends(monkeypatch)
    model = dots_jax.from_pretrained(path, dtype=dtype, progress=False, moe_backend=backend)
    logits = np.asarray(model(jnp.asarray(ids)).astype(jnp.float32), np.float64)
    assert calls and set(calls) == {backend}, f"backend {backend!r} dispatched to {sorted(set(calls))}"
    assert np.isfinite(logits).all()
    return logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_logits_match_reference_f32(checkpoint, backend: str, monkeypatch) -> None:
    path, ids, f32, _ = checkpoint
    got = run(path, ids, backend, jnp.float32, monkeypatch)
    err = np.abs(got - f32).max() / np.abs(f32).max()
    assert err <= 1e-4, f"{backend}: logits {err:.2e} of max|logit| from transformers'"


# "loop" in bf16 is the default CPU path of test_bf16_blocks' model-level test.
@pytest.mark.parametrize("backend", ["gather", "dense", "ragged_dot", "pallas"])
def test_backend_logits_match_reference_bf16(checkpoint, backend: str, monkeypatch) -> None:
    path, ids, f32, bf16 = checkpoint
    got = run(path, ids, backend, jnp.bfloat16, monkeypatch)
    ratios = test_bf16_blocks.logit_error_ratios(np.abs(got - bf16), np.abs(bf16 - f32))
    for q, ratio in ratios.items():
        bound = test_bf16_blocks.LOGIT_RATIO[q]
        assert ratio <= bound, f"{backend} p{q}: {ratio:.2f} x transformers' bf16 error (bound {bound})"
