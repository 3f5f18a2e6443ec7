"""A deterministic token stream for training: text files -> one token array -> shuffled [batch, seq+1] windows.

The token array is cut into non-overlapping windows of seq_len + 1 tokens (window i starts at token i * seq_len, so
consecutive windows share one token: the last target of one is the first input of the next). Each epoch visits
every window once, in an order drawn from the seed and the epoch number. A stream position is the number of
windows consumed so far: position alone determines every batch that follows, so a checkpoint that records it
resumes the data exactly, and nothing needs to be iterated to get there.

Without a tokenizer the ids are the raw UTF-8 bytes (0..255), for tests and demos; byte 0 (NUL, which text files
do not contain) separates files.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dots_jax.errors import UserError
from dots_jax.inference.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".py")  # what a --data directory contributes
BYTE_VOCAB = 256
BYTE_SEPARATOR = 0


class DataError(UserError):
    """Training data that cannot be used: the message names the path or the setting at fault."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
    inputs: jax.Array  # [B, S] int32
    targets: jax.Array  # [B, S] int32: the next token of each input position
    loss_mask: jax.Array  # [B, S]: 1 where the target counts (0 for padding, prompts in SFT, ...)


def find_files(spec: str | os.PathLike) -> list[Path]:
    """A file; a directory (its *.txt and *.py files, recursively, sorted by path); or a glob pattern (sorted)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: the directory holds no {' or '.join('*' + s for s in TEXT_SUFFIXES)} files")
        return files
    if glob.has_magic(str(spec)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{spec}: the pattern matches no files")
        return files
    raise DataError(f"{spec}: no such file or directory")


def load_tokens(spec: str | os.PathLike, tokenizer: Tokenizer | None = None) -> np.ndarray:
    """All files of `spec` tokenized and concatenated, each followed by a separator: int32 [N].

    The separator is the tokenizer's EOS token (none if it has none), or byte 0 without a tokenizer.
    """
    separator = BYTE_SEPARATOR if tokenizer is None else tokenizer.eos_token_id
    pieces, text_tokens = [], 0
    for path in find_files(spec):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        if tokenizer is None:
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        else:
            ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
        pieces.append(ids)
        text_tokens += ids.size
        if separator is not None:
            pieces.append(np.asarray([separator], dtype=np.int32))
    if text_tokens == 0:
        raise DataError(f"{spec}: the files hold no text")
    return np.concatenate(pieces)


def fingerprint(tokens: np.ndarray) -> str:
    """A short hash of the token array: a resumed run checks that it trains on the same data."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:16]


def split_eval(tokens: np.ndarray, fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval): the last `fraction` of the tokens (at least one window of seq_len + 1) are held out.

    fraction 0 holds out nothing. A contiguous tail rather than random windows: eval text is never trained on,
    not even the half of a window.
    """
    if fraction <= 0:
        return tokens, tokens[:0]
    held = max(int(round(fraction * tokens.size)), seq_len + 1)
    if tokens.size - held < seq_len + 1:
        raise DataError(f"{tokens.size} tokens are too few to hold out {held} for eval and train on windows of "
                        f"{seq_len + 1}: give more data, a shorter --seq-len or --eval-fraction 0")
    return tokens[:-held], tokens[-held:]


def num_windows(tokens: np.ndarray, seq_len: int) -> int:
    return max((tokens.size - 1) // seq_len, 0)


def _window_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)]  # [B, seq_len + 1]
    return Batch(inputs=jnp.asarray(windows[:, :-1]), targets=jnp.asarray(windows[:, 1:]),
                 loss_mask=jnp.ones((len(starts), seq_len), jnp.float32))


class TokenStream:
    """Shuffled training batches: batch_at(position) holds windows position .. position + batch_size - 1 of the
    endless sequence epoch 0, epoch 1, ..., each epoch a seeded permutation of all windows."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch size and sequence length must be >= 1, got {batch_size} and {seq_len}")
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.num_windows = num_windows(self.tokens, seq_len)
        if self.num_windows < 1:
            raise DataError(f"{self.tokens.size} training tokens do not fill one window of {seq_len + 1}: give "
                            "more data or a shorter --seq-len")
        self._orders: dict[int, np.ndarray] = {}  # epoch -> permutation; recomputable, so a cache only

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)}
        return self._orders[epoch]

    def window_starts(self, position: int) -> np.ndarray:
        """Token offsets of the batch_size windows from stream position `position`."""
        starts = []
        for k in range(position, position + self.batch_size):
            epoch, i = divmod(k, self.num_windows)
            starts.append(int(self.order(epoch)[i]) * self.seq_len)
        return np.asarray(starts, dtype=np.int64)

    def batch_at(self, position: int) -> Batch:
        """The batch at `position`; the next one is at position + batch_size."""
        if position < 0:
            raise ValueError(f"stream position must be >= 0, got {position}")
        return _window_batch(self.tokens, self.window_starts(position), self.seq_len)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> list[Batch]:
    """The held-out windows in order, as up to `max_batches` full batches (fewer windows than batch_size: one
    smaller batch). The same batches at every eval, so eval losses are comparable across steps."""
    count = num_windows(tokens, seq_len)
    if count == 0:
        return []
    size = min(batch_size, count)
    starts = np.arange(min(count // size, max_batches) * size, dtype=np.int64) * seq_len
    return [_window_batch(tokens, chunk, seq_len) for chunk in starts.reshape(-1, size)]
