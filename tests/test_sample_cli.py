"""`python -m dots_jax.sample`, run in-process through main(argv): a tiny HF checkpoint with
its own tokenizer (greedy ids against transformers' generate, the oracle), and one clean `error:` line for each
kind of bad input.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import hf_config, hf_model, run_cli, save
from test_tokenizer import save_bpe_tokenizer

from dots_jax.sample import main

PROMPT = "hello"
MAX_NEW_TOKENS = 5


def run_main(argv: list[str]) -> tuple[int, str, str]:
    return run_cli(main, argv)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random dots1 checkpoint saved by transformers, with the test's byte-level BPE tokenizer."""
    directory = save_bpe_tokenizer(tmp_path_factory.mktemp("ckpt"))
    vocab = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    save(hf_model(hf_config(vocab_size=len(vocab)), bias_std=0.05), directory)
    return directory


@pytest.fixture(scope="module")
def hello_run(checkpoint: Path) -> tuple[int, str, str]:
    """One greedy run on the checkpoint, shared by the tests that read its output (compiling is the slow part)."""
    return run_main(["--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW_TOKENS),
                     "--show-ids"])


def test_checkpoint_run_prints_text_and_speed(hello_run):
    code, out, err = hello_run
    assert code == 0, err
    text = out.split("[1] prompt ids:")[0]
    assert text.strip(), "expected generated text on stdout"
    assert re.search(r"time to first token [\d.]+ s", err)
    assert re.search(r"[\d.]+ tokens/s", err)


def test_greedy_ids_match_transformers_generate(checkpoint, hello_run):
    code, out, err = hello_run
    assert code == 0, err
    prompt_ids = [int(t) for t in re.search(r"\[1\] prompt ids: \[([\d, ]+)\]", out).group(1).split(",")]
    generated = [int(t) for t in re.search(r"\[1\] generated ids: \[([\d, ]+)\]", out).group(1).split(",")]

    hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(checkpoint)
    assert prompt_ids == hf_tokenizer.encode(PROMPT)
    model = transformers.Dots1ForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        sequence = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids)),
                                  do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                  eos_token_id=hf_tokenizer.eos_token_id, pad_token_id=hf_tokenizer.pad_token_id)
    expected = sequence[0, len(prompt_ids):].tolist()
    assert generated == expected
    # stdout is the prompt, then the streamed text: the oracle tokenizer's decoding of those ids.
    assert out.split("\n[1] prompt ids:")[0] == PROMPT + hf_tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("args, names", [
    (["--prompt", ""], ["--prompt", "empty"]),
    (["--prompt", "hi", "--top-p", "0"], ["--top-p"]),
    (["--prompt", "hi", "--top-p", "1.5"], ["--top-p"]),
    (["--prompt", "hi", "--temperature", "-1"], ["--temperature"]),
    (["--prompt", "hi", "--top-k", "-1"], ["--top-k"]),
    (["--prompt", "hi", "--top-k", "two"], ["--top-k"]),
    (["--prompt", "hi", "--mesh", "expert=8"], ["--mesh", "8 devices, but there are 1"]),
    (["--prompt", "hi", "--mesh", "experts=1"], ["--mesh", "unknown axis 'experts'"]),
    (["--prompt", "hello " * 600], ["--prompt", "max_position_embeddings", "512"]),
])
def test_bad_input_is_one_error_line(checkpoint, args, names):
    code, out, err = run_main(["--model", str(checkpoint), *args])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0]
    assert "Traceback" not in out + err


def test_missing_model_is_one_error_line(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    code, out, err = run_main(["--model", str(missing), "--prompt", "hi"])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model") and str(missing) in lines[0], err
    assert "Traceback" not in out + err


def test_repo_id_offline_is_one_error_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE when imported (transformers imported it already): set both.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    code, out, err = run_main(["--model", "dots-jax-tests/no-such-model", "--prompt", "hi"])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model") and "dots-jax-tests/no-such-model" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0] and "Traceback" not in out + err


def test_converted_checkpoint_gives_the_same_tokens(checkpoint, hello_run, tmp_path):
    """--model accepts a directory written by convert.hf_to_jax (as the README says), with the HF run's output."""
    from convert.hf_to_jax import convert

    convert(str(checkpoint), tmp_path / "jax", progress=False, log=lambda _: None)
    code, out, err = run_main(["--model", str(tmp_path / "jax"), "--prompt", PROMPT, "--max-new-tokens",
                               str(MAX_NEW_TOKENS), "--show-ids"])
    assert code == 0, err
    assert out == hello_run[1]
