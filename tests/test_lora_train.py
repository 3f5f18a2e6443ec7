"""LoRA fine-tuning (issue 20), the training side:

- the train step on a model with adapters trains them alone: the trainable leaves are the nnx.LoRAParams (as many
  elements as lora_param_count's arithmetic), gradients and AdamW moments exist for them only, the base (int8 here)
  is bit-identical after training, and the router's correction bias still follows the balancing rule;
- `python -m dots_jax.train --lora-rank` on the demo model and a small task: the held-out task loss, measured by
  transformers on the base and on the merged OUT/hf, goes down (acceptance 3); PEFT applies OUT/adapter to the base
  in transformers to OUT/hf's logits (acceptance 2); N + N steps resumed equal 2N steps, bit for bit (the adapter
  file's bytes), dropout included;
- bad LoRA options: one `error:` line, exit 2.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import random_ids, run_cli, torch_one_thread
from flax import nnx

from dots_jax import from_pretrained, train
from dots_jax.demo import DEMO_MODEL_DIR
from dots_jax.inference.tokenizer import Tokenizer
from dots_jax.model.lora import LoraConfig, attach_lora, lora_param_count
from dots_jax.train import main
from dots_jax.training import checkpoint
from dots_jax.training.data import Batch, load_tokens, num_windows, split_eval
from dots_jax.training.step import TrainConfig, init_state, jit_train_step, loss_fn

SEQ, BATCH, EVAL_FRACTION = 64, 4, 0.2


def flat(state: nnx.State) -> dict[tuple, np.ndarray]:
    return {path: np.array(var.get_value()) for path, var in nnx.to_flat_state(state)}  # copies: steps donate


def test_step_trains_the_adapters_alone_on_an_int8_base(tiny_checkpoint):
    path, _ = tiny_checkpoint
    base = from_pretrained(path, quantize="int8", progress=False)
    lora = LoraConfig(rank=2, alpha=4.0)  # dropout: the CLI run below (its keys must survive a resume)
    tc = TrainConfig(learning_rate=1e-2, total_steps=3, warmup_steps=0, decay_steps=0, bias_update_rate=1e-2)
    graphdef, state = init_state(attach_lora(base, lora), tc)

    params = nnx.to_flat_state(state.params)
    assert all(type(var) is nnx.LoRAParam for _, var in params)
    assert sum(var.get_value().size for _, var in params) == lora_param_count(base.cfg, lora)
    assert not any(isinstance(var, nnx.LoRAParam) for _, var in nnx.to_flat_state(state.frozen))
    assert {var.get_value().dtype for _, var in nnx.to_flat_state(state.frozen)} >= {jnp.dtype(jnp.int8)}
    # AdamW's two moments are the adapters' shapes, nothing else is a float array of the optimizer.
    moments = [x.shape for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert sorted(moments) == sorted(2 * [var.get_value().shape for _, var in params])
    ids = random_ids(base.cfg.vocab_size, 2, 16, seed=1)
    mask = np.ones(ids.shape, np.float32)
    mask[:, -1] = 0
    batch = Batch(jnp.asarray(ids), jnp.asarray(np.roll(ids, -1, axis=1)), jnp.asarray(mask))
    grads = jax.eval_shape(jax.grad(lambda p: loss_fn(p, state.router_bias, graphdef, batch, 0.0,
                                                       frozen=state.frozen)[0]), state.params)
    assert jax.tree.structure(grads) == jax.tree.structure(state.params)

    frozen, bias = flat(state.frozen), flat(state.router_bias)
    losses = []
    for _ in range(tc.total_steps):
        state, metrics = jit_train_step(graphdef, tc, state, batch)
        losses.append(float(metrics["loss"]))
    after = flat(state.frozen)
    assert after.keys() == frozen.keys()
    for key, value in frozen.items():
        assert after[key].dtype == value.dtype and np.array_equal(after[key], value), key
    assert losses[-1] < losses[0]
    assert all(np.abs(v).max() > 0 for k, v in flat(state.params).items() if k[-1].endswith("_lora_b"))
    assert not all(np.array_equal(v, flat(state.router_bias)[k]) for k, v in bias.items())


# ------------------------------------------------------------------------------------------ the CLI, demo model
def task_text() -> str:
    """A small task the demo model (trained on Python's standard library) has not seen: converter functions of one
    made-up form."""
    rng = np.random.default_rng(0)
    units = ["meters", "feet", "inches", "miles", "grams", "pounds", "ounces", "liters", "gallons", "cups"]
    lines = []
    for _ in range(300):
        a, b = rng.choice(units, 2, replace=False)
        lines.append(f"def {a}_to_{b}(value):\n    return value * RATIO['{a}']['{b}']\n\n")
    return "".join(lines)


def train_args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--init", str(DEMO_MODEL_DIR), "--tokenizer", str(DEMO_MODEL_DIR), "--data", str(data),
            "--steps", str(steps), "--batch", str(BATCH), "--seq-len", str(SEQ), "--lr", "3e-3", "--warmup", "1",
            "--decay", "0", "--eval-every", "3", "--save-every", "3", "--eval-batches", "2",
            "--eval-fraction", str(EVAL_FRACTION), "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.05",
            "--lora-targets", "attn,experts",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("task") / "task.txt"
    path.write_text(task_text())
    return path


@pytest.fixture(scope="module")
def straight(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "straight"
    code, _, err = run_cli(main, train_args(data, out, 6))
    assert code == 0, err
    return out


def held_out_nll(model: torch.nn.Module, data: Path) -> float:
    """transformers' mean next-token cross-entropy on the held-out windows of the task (what training held out)."""
    tokens = load_tokens(str(data), Tokenizer.from_dir(DEMO_MODEL_DIR))
    _, held = split_eval(tokens, EVAL_FRACTION, SEQ)
    starts = np.arange(num_windows(held, SEQ)) * SEQ
    ids = torch.from_numpy(held[starts[:, None] + np.arange(SEQ + 1)]).long()
    with torch_one_thread():
        logits = model(ids[:, :-1]).logits
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), ids[:, 1:].flatten()))


def hf(directory: Path) -> torch.nn.Module:
    return transformers.Dots1ForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                         attn_implementation="eager").eval()


def test_lora_run_lowers_the_held_out_task_loss_and_peft_applies_its_adapter(straight: Path, data: Path):
    assert sorted(p.name for p in (straight / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    meta = checkpoint.read_metadata(straight / "checkpoints")
    assert meta["lora"]["rank"] == 4 and meta["lora"]["init"] == str(DEMO_MODEL_DIR)
    base, merged = hf(DEMO_MODEL_DIR), hf(straight / "hf")
    before, after = held_out_nll(base, data), held_out_nll(merged, data)
    assert after < before - 0.05, (before, after)
    evals = [r["eval_loss"] for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r]
    assert evals[-1] < evals[0]

    tuned = peft.PeftModel.from_pretrained(base, straight / "adapter").eval()
    ids = torch.from_numpy(random_ids(merged.config.vocab_size, 2, 16, seed=2)).long()
    with torch_one_thread():
        want, got = merged(ids).logits.double().numpy(), tuned(ids).logits.double().numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_resumed_lora_run_equals_the_uninterrupted_one(straight: Path, data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    """3 steps, stopped by SIGTERM (the run saves and exits), then --resume for 3 more: the 6 straight steps."""
    real_step, calls = train.jit_train_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(train, "jit_train_step", step_then_signal)
    code, _, err = run_cli(main, train_args(data, out, 6))
    monkeypatch.setattr(train, "jit_train_step", real_step)
    assert code == 128 + signal.SIGTERM and checkpoint.latest_step(out / "checkpoints") == 3, err
    code, _, err = run_cli(main, [*train_args(data, out, 6, "--resume"), "--lora-rank", "8"])
    assert code == 2 and "LoRA settings" in err
    code, _, err = run_cli(main, train_args(data, out, 6, "--resume"))
    assert code == 0, err
    assert "resumed from step 3" in err
    for name in ("adapter/adapter_model.safetensors", "hf/model.safetensors"):
        assert (out / name).read_bytes() == (straight / name).read_bytes(), name


@pytest.mark.parametrize("extra, message", [
    (["--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["--lora-rank", "2", "--lora-alpha", "nan"], "--lora-alpha must be > 0"),
    (["--lora-rank", "2", "--lora-dropout", "1"], "--lora-dropout must lie in [0, 1)"),
    (["--lora-rank", "2", "--lora-targets", "attn,router"], "router is not a target"),
    (["--lora-alpha", "4"], "--lora-alpha is a LoRA setting: it needs --lora-rank"),
    (["--quantize", "int8"], "--quantize is a LoRA setting"),
])
def test_bad_lora_options_are_one_error_line(data: Path, tmp_path: Path, extra: list[str], message: str):
    argv = ["--init", str(DEMO_MODEL_DIR), "--data", str(data), "--steps", "2", "--out", str(tmp_path), *extra]
    code, _, err = run_cli(main, argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and message in err, err


def test_lora_needs_a_model_to_adapt(data: Path, tmp_path: Path):
    code, _, err = run_cli(main, ["--config", "tiny", "--data", str(data), "--steps", "2", "--out", str(tmp_path),
                                  "--lora-rank", "2"])
    assert code == 2 and "give it with --init" in err


def test_sample_and_serve_take_lora(tmp_path: Path):
    from dots_jax import sample, serve

    assert serve.build_parser().parse_args(["--lora", "adapter"]).lora == "adapter"
    code, _, err = run_cli(sample.main, ["--model", str(DEMO_MODEL_DIR), "--prompt", "def f(", "--lora",
                                         str(tmp_path / "none")])
    assert code == 2 and err.count("\n") == 1 and "no such adapter directory" in err, err


def test_sample_with_the_adapter_equals_sample_of_the_merged_export(straight: Path):
    """`sample --model BASE --lora OUT/adapter` (merged at load time) writes what `sample --model OUT/hf` does."""
    from dots_jax import sample

    common = ["--prompt", "def feet_to_cups(value):\n", "--max-new-tokens", "16", "--show-ids"]  # the task's form
    code, with_adapter, err = run_cli(sample.main, ["--model", str(DEMO_MODEL_DIR), "--lora",
                                                    str(straight / "adapter"), *common])
    assert code == 0, err
    code, merged, err = run_cli(sample.main, ["--model", str(straight / "hf"), *common])
    assert code == 0, err
    assert with_adapter == merged
    # The adapter must change the model, or this compares nothing (six steps need not change a greedy answer).
    ids = jnp.asarray(random_ids(1000, 1, 16, seed=3))
    adapted = from_pretrained(DEMO_MODEL_DIR, lora=straight / "adapter", progress=False)(ids)
    plain = from_pretrained(DEMO_MODEL_DIR, progress=False)(ids)
    assert float(jnp.abs(adapted - plain).max()) > 1e-2 * float(jnp.abs(plain).max())
