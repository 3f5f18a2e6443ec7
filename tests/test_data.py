"""The training token stream: file discovery, byte-level tokens, window order, resumability, the eval split.

The oracle is the text itself: every window must be the UTF-8 bytes found at its offset in the concatenated files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import transformers
from test_tokenizer import save_bpe_tokenizer

from dots_jax.inference.tokenizer import Tokenizer
from dots_jax.training.data import (
    BYTE_SEPARATOR,
    DataError,
    TokenStream,
    eval_batches,
    find_files,
    load_tokens,
    split_eval,
)

TEXTS = {"b.txt": "second file, with ünïcode\n", "a.txt": "first file\n", "sub/c.py": "print('third')\n"}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    for name, text in TEXTS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\xff\xfe")
    return tmp_path


def expected_bytes(names: list[str]) -> bytes:
    return b"".join(TEXTS[n].encode() + bytes([BYTE_SEPARATOR]) for n in names)


def test_directory_glob_and_file(corpus: Path):
    assert find_files(corpus) == [corpus / "a.txt", corpus / "b.txt", corpus / "sub" / "c.py"]
    assert find_files(str(corpus / "*.txt")) == [corpus / "a.txt", corpus / "b.txt"]
    assert find_files(corpus / "b.txt") == [corpus / "b.txt"]
    tokens = load_tokens(corpus)
    assert tokens.dtype == np.int32
    assert bytes(tokens.astype(np.uint8)) == expected_bytes(["a.txt", "b.txt", "sub/c.py"])


@pytest.mark.parametrize("spec", ["missing.txt", "*.md"])
def test_nothing_to_read(corpus: Path, spec: str):
    with pytest.raises(DataError, match="no such file|matches no files"):
        find_files(str(corpus / spec))


def test_empty_files(tmp_path: Path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no text"):
        load_tokens(tmp_path)


def test_windows_are_the_text_and_cover_each_epoch_once():
    # Random bytes: every 11-byte window occurs once in the text, so find() locates it.
    text = np.random.default_rng(0).integers(1, 256, 601, dtype=np.uint8).tobytes()
    tokens = np.frombuffer(text, np.uint8).astype(np.int32)
    seq, batch = 10, 4
    stream = TokenStream(tokens, batch, seq, seed=3)
    n = 60  # (601 - 1) // 10 windows: 15 batches per epoch
    assert stream.num_windows == n
    starts = []
    for position in range(0, 2 * n, batch):
        b = stream.batch_at(position)
        inputs, targets = np.asarray(b.inputs), np.asarray(b.targets)
        assert inputs.shape == targets.shape == (batch, seq) and np.asarray(b.loss_mask).all()
        np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
        for row_in, row_t in zip(inputs, targets, strict=True):
            start = text.find(bytes(row_in.astype(np.uint8)) + bytes([row_t[-1]]))
            assert start >= 0 and start % seq == 0  # a window of the text, at a window boundary
            starts.append(start)
    # Each epoch visits every window once, and the two epochs differ in order.
    first, second = starts[:n], starts[n:]
    assert sorted(first) == sorted(second) == list(range(0, n * seq, seq))
    assert first != second


def test_position_alone_determines_the_batch():
    tokens = np.arange(1000, dtype=np.int32) % 251
    a, b = TokenStream(tokens, 3, 16, seed=7), TokenStream(tokens, 3, 16, seed=7)
    for position in (0, 3, 60, 61, 500):  # across epoch boundaries (61 windows)
        np.testing.assert_array_equal(a.batch_at(position).inputs, b.batch_at(position).inputs)
    # Reading other positions in between does not change what a position gives.
    before = np.asarray(a.batch_at(120).inputs)
    a.batch_at(0), a.batch_at(999)
    np.testing.assert_array_equal(a.batch_at(120).inputs, before)
    other_seed = TokenStream(tokens, 3, 16, seed=8)
    assert not np.array_equal(other_seed.batch_at(0).inputs, a.batch_at(0).inputs)


def test_eval_split_is_a_disjoint_tail():
    tokens = np.arange(2000, dtype=np.int32)
    train, held = split_eval(tokens, 0.05, seq_len=16)
    assert len(held) == 100 and np.array_equal(np.concatenate([train, held]), tokens)
    batches = eval_batches(held, batch_size=2, seq_len=16, max_batches=10)
    assert len(batches) == 3  # (100 - 1) // 16 = 6 windows
    seen = np.concatenate([np.asarray(b.inputs).ravel() for b in batches])
    assert seen.min() >= 1900  # only held-out tokens
    assert split_eval(tokens, 0.0, 16)[1].size == 0
    with pytest.raises(DataError, match="too few"):
        split_eval(tokens[:30], 0.05, seq_len=16)


def test_tokenizer_ids_and_eos_separator(corpus: Path, tmp_path: Path):
    directory = save_bpe_tokenizer(tmp_path / "tok")
    oracle = transformers.PreTrainedTokenizerFast.from_pretrained(directory)  # transformers encodes the texts
    expected = []
    for name in ["a.txt", "b.txt", "sub/c.py"]:
        expected += oracle.encode(TEXTS[name], add_special_tokens=False) + [oracle.eos_token_id]
    assert load_tokens(corpus, Tokenizer.from_dir(directory)).tolist() == expected
