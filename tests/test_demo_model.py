"""The embedded demo model (dots_jax/demo_model): transformers reads it and agrees with us, it predicts held-out
Python far better than token frequencies alone, and `python -m dots_jax.sample` with no arguments completes code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from conftest import run_cli, torch_one_thread

from dots_jax.demo import DEMO_MODEL_DIR, main
from dots_jax.weights import from_pretrained

MAX_SHIPPED_BYTES = 20 * 2**20


def test_shipped_directory_is_a_small_hf_checkpoint():
    names = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir())
    assert size <= MAX_SHIPPED_BYTES, f"{size / 2**20:.1f} MB shipped, the budget is 20 MB"
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    # The released model's code path: a dense first layer, then MoE layers with shared experts and top-k >= 2.
    assert config["model_type"] == "dots1" and config["first_k_dense_replace"] == 1
    assert config["n_routed_experts"] >= 8 and config["num_experts_per_tok"] >= 2 and config["n_shared_experts"] >= 1
    assert config["num_hidden_layers"] > config["first_k_dense_replace"]


def test_transformers_loads_it_and_the_logits_equal_ours():
    ids = np.random.default_rng(0).integers(0, 4096, size=(2, 96))
    with torch_one_thread():
        reference = transformers.Dots1ForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
        assert reference.config.vocab_size <= 4096
        expected = reference(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(from_pretrained(DEMO_MODEL_DIR, dtype=jnp.float32, progress=False)(jnp.asarray(ids)))
    error = np.abs(ours - expected).max() / np.abs(expected).max()
    assert error <= 1e-4, f"relative max error {error:.2e}"


def test_held_out_loss_is_clearly_below_the_unigram_baseline():
    code, out, err = run_cli(main, ["evaluate"])
    assert code == 0, err
    model = float(re.search(r"demo model\s+([\d.]+) nats", out).group(1))
    unigram = float(re.search(r"unigram model\s+([\d.]+) nats", out).group(1))
    # A uniform guess over the vocabulary would score ln(4096) = 8.3; token frequencies alone about 6.3.
    assert unigram > 5.0
    # "Clearly": at least 2 nats, a factor e^2 = 7.4 in perplexity.
    assert model < unigram - 2.0, out


def test_sample_with_no_arguments_prints_a_completion():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "dots_jax.sample"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    completion = done.stdout
    # stdout carries only the generated text: some dozens of characters of it, printable.
    assert len(completion.strip()) >= 40, completion
    assert all(c.isprintable() or c in "\n\t" for c in completion), completion
    assert "demo model" in done.stderr and "tokens/s" in done.stderr
