"""Options that only a wrong result would reveal, each against an oracle outside our code (issue 15):

- `python -m dots_jax.sample`: every sampling option and --dtype reach generate() and the model unchanged (a CLI
  that dropped or swapped one fails); sampled tokens lie in the set transformers' logits allow, the same seed
  repeats, another does not, and temperature moves between greedy and spread; --chat/--system feed the model
  exactly the ids of transformers' apply_chat_template(..., add_generation_prompt=True).
- `python -m dots_jax.train --init --tokenizer --balance-loss-coef`: the first step's cross-entropy is
  transformers' loss on the same batch, and its balance term is the float64 numpy one from transformers' router.
- The balance term of loss_fn and its gradient, against float64 numpy from transformers' router inputs.
- `convert.hf_to_jax --dtype`: the tensors written have that dtype and equal the source cast to it.

Everything runs in-process on one tiny checkpoint (byte-level BPE tokenizer with the dots1 chat template).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conftest import hf_config, hf_model, run_cli, save, torch_one_thread
from flax import nnx
from test_sampling import allowed
from test_tokenizer import save_bpe_tokenizer

import dots_jax
from dots_jax import sample as sample_cli
from dots_jax.inference import generate as gen
from dots_jax.model.attention import Attention
from dots_jax.model.modeling import MoE, RouterBias
from dots_jax.training.data import Batch
from dots_jax.training.step import loss_fn

PROMPT = "hello world"
NEW = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, transformers.Dots1ForCausalLM, transformers.PreTrainedTokenizerFast]:
    """(directory, the transformers model saved there, its tokenizer): the tokenizer carries a chat template."""
    directory = save_bpe_tokenizer(tmp_path_factory.mktemp("ckpt"))
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    assert tokenizer.chat_template
    ref = hf_model(hf_config(vocab_size=len(tokenizer)), seed=3, bias_std=0.05)
    save(ref, directory)
    return directory, ref, tokenizer


class GenerateSpy:
    """Stands in for dots_jax.sample.generate: records what the CLI passes (the model, the prompt ids, every
    keyword) and either runs the real generate or, where only the arguments matter, returns one token per row."""

    def __init__(self, run: bool):
        self.run, self.calls = run, []

    def __call__(self, model, prompts, **kwargs):
        out = gen.generate(model, prompts, **kwargs) if self.run else gen.GenerateOutput([[0] for _ in prompts])
        self.calls.append({"model": model, "prompts": [list(p) for p in prompts], "tokens": out.tokens, **kwargs})
        return out


def sample(monkeypatch, directory: Path, *options: str, run: bool = True) -> dict:
    spy = GenerateSpy(run)
    monkeypatch.setattr(sample_cli, "generate", spy)
    code, out, err = run_cli(sample_cli.main, ["--model", str(directory), "--prompt", PROMPT,
                                               "--max-new-tokens", str(NEW), *options])
    assert code == 0, err
    assert len(spy.calls) == 1
    return spy.calls[0]


# ---------------------------------------------------------------------------------- sample: passing through
def test_sample_passes_each_option_to_generate_and_the_model(checkpoint, monkeypatch):
    """Distinct values for every option, so that a dropped option shows as its default and two swapped options
    show as each other's values; --dtype is read off the weights the model was built with."""
    directory = checkpoint[0]
    call = sample(monkeypatch, directory, "--temperature", "0.7", "--top-k", "5", "--top-p", "0.85",
                  "--min-p", "0.05", "--seed", "11", "--dtype", "bfloat16", run=False)
    got = {k: call[k] for k in ("temperature", "top_k", "top_p", "min_p", "seed", "max_new_tokens")}
    assert got == {"temperature": 0.7, "top_k": 5, "top_p": 0.85, "min_p": 0.05, "seed": 11, "max_new_tokens": NEW}
    params = jax.tree.leaves(nnx.state(call["model"], nnx.Param))
    assert params and {p.dtype for p in params} == {jnp.dtype(jnp.bfloat16)}

    call = sample(monkeypatch, directory, "--dtype", "float32", run=False)
    got = {k: call[k] for k in ("temperature", "top_k", "top_p", "min_p", "seed")}
    assert got == {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 0}
    assert {p.dtype for p in jax.tree.leaves(nnx.state(call["model"], nnx.Param))} == {jnp.dtype(jnp.float32)}


def attention_backends(model) -> set[str]:
    return {m.backend for _, m in nnx.iter_graph(model) if isinstance(m, Attention)}


def test_sample_passes_the_kernel_backends_to_the_model(checkpoint, monkeypatch):
    directory = checkpoint[0]
    call = sample(monkeypatch, directory, "--attention-backend", "reference", "--moe-backend", "gather", run=False)
    assert attention_backends(call["model"]) == {"reference"}
    assert {m.moe_backend for _, m in nnx.iter_graph(call["model"]) if isinstance(m, MoE)} == {"gather"}
    assert attention_backends(sample(monkeypatch, directory, run=False)["model"]) == {"auto"}


def test_chat_and_system_feed_the_ids_of_apply_chat_template(checkpoint, monkeypatch):
    directory, _, tokenizer = checkpoint

    def template_ids(messages: list[dict]) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))

    user = {"role": "user", "content": PROMPT}
    plain = sample(monkeypatch, directory, run=False)["prompts"]
    chat = sample(monkeypatch, directory, "--chat", run=False)["prompts"]
    system = sample(monkeypatch, directory, "--chat", "--system", "Answer in one word.", run=False)["prompts"]
    assert plain == [tokenizer.encode(PROMPT)]
    assert chat == [template_ids([user])]
    assert system == [template_ids([{"role": "system", "content": "Answer in one word."}, user])]
    assert len({tuple(plain[0]), tuple(chat[0]), tuple(system[0])}) == 3  # each option changes the ids


# ---------------------------------------------------------------------------------- sample: the tokens drawn
def reference_logits(ref: transformers.Dots1ForCausalLM, prompt: list[int], new: list[int]) -> np.ndarray:
    """transformers' float64 logits for each generated position, teacher-forced on the tokens we drew."""
    with torch_one_thread():
        logits = ref(torch.tensor([prompt + new[:-1]])).logits[0].double().numpy()
    return logits[len(prompt) - 1:]


@pytest.mark.parametrize("options, params", [
    (["--temperature", "1.0", "--top-k", "3"], dict(temperature=1.0, top_k=3)),
    (["--temperature", "0.5", "--top-p", "0.3"], dict(temperature=0.5, top_p=0.3)),
    (["--temperature", "1.5", "--min-p", "0.5"], dict(temperature=1.5, min_p=0.5)),
])
def test_sampled_tokens_lie_in_the_set_transformers_logits_allow(checkpoint, monkeypatch, options, params):
    directory, ref, _ = checkpoint
    call = sample(monkeypatch, directory, *options, "--seed", "1")
    (prompt,), (new,) = call["prompts"], call["tokens"]
    checked = sizes = 0
    for step, (token, logits) in enumerate(zip(new, reference_logits(ref, prompt, new), strict=True)):
        keep, margin = allowed(logits, **params)
        if margin < 2e-4:  # our float32 logits (5 digits) could fall either side
            continue
        checked += 1
        sizes += keep.sum()
        assert keep[token], (params, step, token, np.flatnonzero(keep))
    assert checked >= 0.75 * len(new) and len(new) >= NEW // 2
    assert sizes < 0.1 * len(logits) * checked  # small sets: a token from the wrong set would show


def test_seed_and_temperature_change_the_draws(checkpoint, monkeypatch):
    """Temperature 50 spreads the draws over the vocabulary (few argmax tokens), the same seed repeats them and
    another seed changes them; temperature 1e-3 is greedy decoding of transformers' logits."""
    directory, ref, _ = checkpoint
    hot = sample(monkeypatch, directory, "--temperature", "50", "--seed", "1")
    assert sample(monkeypatch, directory, "--temperature", "50", "--seed", "1")["tokens"] == hot["tokens"]
    assert sample(monkeypatch, directory, "--temperature", "50", "--seed", "2")["tokens"] != hot["tokens"]
    (prompt,), (new,) = hot["prompts"], hot["tokens"]
    argmax = reference_logits(ref, prompt, new).argmax(axis=-1)
    assert np.mean(np.asarray(new) == argmax) < 0.25, new  # uniform over ~400 tokens: ~0; greedy: 1

    cold = sample(monkeypatch, directory, "--temperature", "0.001", "--seed", "1")
    (new,) = cold["tokens"]
    logits = reference_logits(ref, prompt, new)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 0.01  # at T = 1e-3 the runner-up has probability < e^-10
    assert decided.mean() > 0.75
    np.testing.assert_array_equal(np.asarray(new)[decided], logits.argmax(axis=-1)[decided])


# ------------------------------------------------------------------------------------- balance loss, numpy
def router_inputs(ref: transformers.Dots1ForCausalLM, ids: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """transformers' forward on ids [B, S+1]: (float64 logits [B, S+1, V], and per MoE layer the router's input
    hidden states, weight and chosen experts at the first S positions, the inputs of a training batch: causal
    attention makes them independent of the last token)."""
    captured = []
    b, s = ids.shape[0], ids.shape[1] - 1

    def hook(module, inputs, output):
        captured.append({"x": inputs[0].double().numpy()[:, :s], "weight": module.weight.double().numpy(),
                         "indices": output[2].numpy().reshape(b, s + 1, -1)[:, :s], "top_k": module.top_k})

    moe_layers = ref.model.layers[ref.config.first_k_dense_replace:]
    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in moe_layers]
    try:
        with torch_one_thread():
            logits = ref(torch.tensor(ids, dtype=torch.long)).logits.double().numpy()
    finally:
        for h in handles:
            h.remove()
    assert len(captured) == len(moe_layers)
    return logits, captured


def balance_numpy(x: np.ndarray, weight: np.ndarray, indices: np.ndarray, top_k: int) -> tuple[float, np.ndarray]:
    """The sequence-wise balance loss (DeepSeek-V3 / dots.llm1, as dots_jax.model.moe documents it) of one layer and
    its gradient with respect to the router weight [E, H], in float64.

    Per sequence of T tokens: f_i = E / (k T) * (tokens choosing expert i), a constant; P_i = mean over tokens
    of s_i / sum_j s_j with s = sigmoid(x W^T); loss = sum_i f_i P_i, averaged over the B sequences. By the chain
    rule dL/ds_tj = (f_j - sum_i f_i q_ti) / (B T S_t) with q = s / S_t, S_t = sum_j s_tj, and ds/dz = s (1 - s).
    """
    b, t, h = x.shape
    e = weight.shape[0]
    s = 1.0 / (1.0 + np.exp(-(x @ weight.T)))  # [B, T, E]
    total = s.sum(axis=-1, keepdims=True)
    q = s / total
    chosen = np.zeros((b * t, e))
    np.put_along_axis(chosen, indices.reshape(b * t, top_k), 1.0, axis=-1)
    f = e / (top_k * t) * chosen.reshape(b, t, e).sum(axis=1)  # [B, E]
    loss = (f * q.mean(axis=1)).sum(axis=-1).mean()
    d_s = (f[:, None, :] - (f[:, None, :] * q).sum(axis=-1, keepdims=True)) / (b * t * total)
    d_z = d_s * s * (1.0 - s)
    return float(loss), d_z.reshape(-1, e).T @ x.reshape(-1, h)


def cross_entropy_numpy(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token cross-entropy of logits [B, S+1, V] on ids [B, S+1] (the last position predicts nothing)."""
    z = logits[:, :-1]
    log_z = z.max(axis=-1) + np.log(np.exp(z - z.max(axis=-1, keepdims=True)).sum(axis=-1))
    picked = np.take_along_axis(z, ids[:, 1:, None], axis=-1)[..., 0]
    return float((log_z - picked).mean())


def test_balance_loss_and_its_gradient_match_numpy(checkpoint):
    """loss_fn with a non-zero balance_loss_coef: the balance term (mean over MoE layers) against float64 numpy
    from transformers' router inputs, the total loss = CE + coef * balance, and the balance gradient of the last
    MoE layer's router (no later layer depends on it) against the hand-derived gradient."""
    directory, ref, _ = checkpoint
    ids = np.random.default_rng(5).integers(0, ref.config.vocab_size, size=(2, 13)).astype(np.int32)
    logits, layers = router_inputs(ref, ids)
    per_layer = [balance_numpy(**layer) for layer in layers]
    balance = np.mean([loss for loss, _ in per_layer])
    last_grad = per_layer[-1][1].T / len(layers)  # ours stores the router as [H, E]; the loss is a layer mean
    ce = cross_entropy_numpy(logits, ids)

    # "gather": the expert backend with the smallest program to compile; the loss does not depend on the backend.
    ours = dots_jax.from_pretrained(directory, dtype=jnp.float32, moe_backend="gather", progress=False)
    graphdef, params, router_bias = nnx.split(ours, nnx.Param, RouterBias)
    batch = Batch(inputs=jnp.asarray(ids[:, :-1]), targets=jnp.asarray(ids[:, 1:]),
                  loss_mask=jnp.ones((2, 12), jnp.float32))

    # One compile serves both coefficients (traced): the balance gradient is the difference of the total loss's
    # gradients at coef and at 0 over coef, the cross-entropy's part cancelling exactly.
    @jax.jit
    def run(params, coef):
        return jax.value_and_grad(lambda p: loss_fn(p, router_bias, graphdef, batch, coef), has_aux=True)(params)

    coef = 0.5
    (loss, aux), grads = run(params, jnp.float32(coef))
    _, grads0 = run(params, jnp.float32(0.0))
    np.testing.assert_allclose(float(aux["balance_loss"]), balance, rtol=1e-5)
    np.testing.assert_allclose(float(aux["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(loss), ce + coef * balance, rtol=1e-5)

    def router(tree):
        return np.asarray(tree["moe_layers"]["mlp"]["router"][...][-1], np.float64)

    scale = np.abs(last_grad).max()
    assert scale > 1e-4  # the gradient is not trivially zero
    np.testing.assert_allclose((router(grads) - router(grads0)) / coef, last_grad, atol=1e-4 * scale)


# -------------------------------------------------------------------------------------------- train --init
def test_train_init_first_loss_is_transformers_loss(checkpoint, tmp_path):
    """--init loads the checkpoint (a random init would give another loss), --tokenizer encodes the data with
    its tokenizer (bytes would give other tokens), and the first step's metrics are transformers' cross-entropy
    and the float64 balance term of the same batch, with loss = ce + --balance-loss-coef x balance. The data is
    exactly two windows and --batch 2, so the first batch holds both whatever the shuffle's order."""
    from dots_jax.train import main

    directory, ref, tokenizer = checkpoint
    text = "the router sends each token to the experts it scores highest, and the bias keeps the load even"
    (tmp_path / "data.txt").write_text(text)
    stream = tokenizer.encode(text) + [tokenizer.eos_token_id]  # the data loader ends each file with EOS
    seq = (len(stream) - 1) // 2
    ids = np.asarray([stream[:seq + 1], stream[seq:2 * seq + 1]])
    code, _, err = run_cli(main, ["--init", str(directory), "--tokenizer", str(directory), "--data",
                                  str(tmp_path / "data.txt"), "--steps", "1", "--batch", "2", "--seq-len", str(seq),
                                  "--eval-fraction", "0", "--balance-loss-coef", "0.25", "--moe-backend", "gather",
                                  "--out", str(tmp_path / "out")])
    assert code == 0, err
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1

    logits, layers = router_inputs(ref, ids)
    balance = np.mean([balance_numpy(**layer)[0] for layer in layers])
    # The loss covers seq targets per window: the window's last input position predicts nothing here.
    ce = cross_entropy_numpy(logits, ids)
    np.testing.assert_allclose(first["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(first["balance_loss"], balance, rtol=1e-5)
    np.testing.assert_allclose(first["loss"], ce + 0.25 * balance, rtol=1e-5)


def test_train_init_takes_a_converted_checkpoint(checkpoint, tmp_path):
    """--init and --tokenizer take a converted checkpoint (convert.hf_to_jax) as well as the HF directory: the first
    step's cross-entropy is transformers' on the same batch (the run above, from the converted copy), and the
    exported model carries the tokenizer."""
    from convert import hf_to_jax
    from dots_jax.train import main

    directory, ref, tokenizer = checkpoint
    code, _, err = run_cli(hf_to_jax.main, ["--src", str(directory), "--dst", str(tmp_path / "jax"), "--no-progress"])
    assert code == 0, err
    text = "the router sends each token to the experts it scores highest, and the bias keeps the load even"
    (tmp_path / "data.txt").write_text(text)
    stream = tokenizer.encode(text) + [tokenizer.eos_token_id]
    seq = (len(stream) - 1) // 2
    ids = np.asarray([stream[:seq + 1], stream[seq:2 * seq + 1]])
    code, _, err = run_cli(main, ["--init", str(tmp_path / "jax"), "--tokenizer", str(tmp_path / "jax"), "--data",
                                  str(tmp_path / "data.txt"), "--steps", "1", "--batch", "2", "--seq-len", str(seq),
                                  "--eval-fraction", "0", "--balance-loss-coef", "0.25", "--moe-backend", "gather",
                                  "--out", str(tmp_path / "out")])
    assert code == 0, err
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    logits, _ = router_inputs(ref, ids)
    np.testing.assert_allclose(first["ce"], cross_entropy_numpy(logits, ids), rtol=1e-5)
    assert (tmp_path / "out" / "hf" / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------- convert --dtype
def test_convert_dtype_writes_the_source_cast_to_it(checkpoint, tmp_path):
    """From the float32 checkpoint: every item written has --dtype (the router's correction bias excepted: f32
    always), and each unit holds exactly the values of its source tensors cast to it (compared as sorted
    multisets, which needs no knowledge of our layout)."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file

    from convert import hf_to_jax

    directory, dtype = checkpoint[0], "bfloat16"  # float16 takes the same path (one numpy cast) and 4 s more
    code, _, err = run_cli(hf_to_jax.main, ["--src", str(directory), "--dst", str(tmp_path / "out"),
                                           "--no-progress", "--dtype", dtype])
    assert code == 0, err
    want = np.dtype(getattr(ml_dtypes, dtype, None) or dtype)
    source: dict[str, list[np.ndarray]] = {}
    for file in directory.glob("*.safetensors"):
        for name, value in load_file(file).items():
            assert value.dtype == np.float32
            layer = name.split(".")[2] if name.startswith("model.layers.") else None
            unit = "top" if layer is None else f"layer_{int(layer):03d}"
            bias = name.endswith("e_score_correction_bias")
            source.setdefault(unit + ("/bias" if bias else ""), []).append(value if bias else value.astype(want))

    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    written: dict[str, list[np.ndarray]] = {}
    for item in sorted((tmp_path / "out" / "units").glob("*/*")):
        value = np.asarray(checkpointer.restore(item)["value"])
        bias = item.name == "mlp.correction_bias"
        assert value.dtype == (np.float32 if bias else want), item
        written.setdefault(item.parent.name + ("/bias" if bias else ""), []).append(value)
    assert sorted(written) == sorted(source)
    for unit, values in source.items():
        expected = np.sort(np.concatenate([v.ravel() for v in values]).astype(np.float64))
        got = np.sort(np.concatenate([v.ravel() for v in written[unit]]).astype(np.float64))
        np.testing.assert_array_equal(got, expected, err_msg=unit)
