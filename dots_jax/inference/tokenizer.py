"""Tokenizers for dots1 checkpoints: a `tokenizer.json` (the real dots.llm1 one is Qwen2-style byte-level BPE, no
BOS) or a SentencePiece `tokenizer.model`, plus the chat template and a streaming decoder.

`Tokenizer.from_dir(path)` reads what an HF model directory carries: the tokenizer file, `tokenizer_config.json`
(special tokens, added tokens, chat template) and `chat_template.jinja`, which transformers writes since 4.5x and
which overrides the config's template, as in transformers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import sentencepiece
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# The named special tokens that transformers hands to a chat template (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# The dots.llm1 instruct format (the chat template of rednote-hilab/dots.llm1.inst), used when the checkpoint
# carries no chat template.
DOTS1_DEFAULT_SYSTEM = "You are a helpful assistant."
DOTS1_SYSTEM = ("<|system|>", "<|endofsystem|>")
DOTS1_USER = ("<|userprompt|>", "<|endofuserprompt|>")
DOTS1_ASSISTANT = ("<|response|>", "<|endofresponse|>")

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is either a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """One interface over a `tokenizers.Tokenizer` and a `sentencepiece.SentencePieceProcessor`."""

    def __init__(self, backend: tokenizers.Tokenizer | sentencepiece.SentencePieceProcessor, *,
                 config: dict[str, Any] | None = None, chat_template: str | None = None, name: str = "tokenizer"):
        self.backend = backend
        self.name = name
        config = config or {}
        # content -> (id, special) for the tokens listed in the config's added_tokens_decoder.
        added = {}
        for token_id, spec in (config.get("added_tokens_decoder") or {}).items():
            added[spec["content"]] = (int(token_id), bool(spec.get("special", False)))
        self._added: dict[str, tuple[int, bool]] = added
        self._added_by_id = {token_id: (content, special) for content, (token_id, special) in added.items()}
        # SentencePiece knows nothing of the config's added tokens: encode() splits text on them itself, the way
        # transformers' slow tokenizers do. Longest first, so that a token containing another one wins.
        contents = sorted(added, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents else None
        if isinstance(backend, tokenizers.Tokenizer):
            self._register_added_tokens_json(backend, added, config)

        # The named special tokens (bos_token, eos_token, ...), and the extra named ones transformers also passes
        # to the chat template when tokenizer_config.json gives `extra_special_tokens` as a dict.
        self.special_tokens: dict[str, str] = {}
        for key in NAMED_SPECIAL_TOKENS:
            content = _token_content(config.get(key))
            if content is not None:
                self.special_tokens[key] = content
        extra = config.get("extra_special_tokens")
        if isinstance(extra, dict):
            for key, value in extra.items():
                content = _token_content(value)
                if content is not None:
                    self.special_tokens[key] = content
        if isinstance(backend, sentencepiece.SentencePieceProcessor):
            # Unless the config names them (null included), the model's own BOS/EOS pieces are the special tokens.
            for key, token_id in (("bos_token", backend.bos_id()), ("eos_token", backend.eos_id())):
                if key not in config and token_id >= 0:
                    self.special_tokens[key] = backend.id_to_piece(token_id)

        template = chat_template if chat_template is not None else config.get("chat_template")
        if isinstance(template, list):  # the older multi-template format: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template: str | None = template

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from an HF model directory: tokenizer.json if present, else tokenizer.model."""
        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: no such directory (expected one holding {TOKENIZER_JSON} or "
                                    f"{SENTENCEPIECE_MODEL})")
        config: dict[str, Any] = {}
        config_path = directory / TOKENIZER_CONFIG
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{config_path}: not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: expected a JSON object")
        template_path = directory / CHAT_TEMPLATE_FILE
        chat_template = template_path.read_text(encoding="utf-8") if template_path.is_file() else None

        if (directory / TOKENIZER_JSON).is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(directory / TOKENIZER_JSON))
            except Exception as e:  # the Rust side raises a bare Exception for a malformed file
                raise ValueError(f"{directory / TOKENIZER_JSON}: not a valid tokenizers file ({e})") from None
        elif (directory / SENTENCEPIECE_MODEL).is_file():
            backend = sentencepiece.SentencePieceProcessor()
            try:
                backend.Load(str(directory / SENTENCEPIECE_MODEL))
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{directory / SENTENCEPIECE_MODEL}: not a valid SentencePiece model ({e})") from None
        else:
            raise FileNotFoundError(f"{directory}: neither {TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL} found")
        return cls(backend, config=config, chat_template=chat_template, name=str(directory))

    def _register_added_tokens_json(self, backend: tokenizers.Tokenizer, added: dict[str, tuple[int, bool]],
                                    config: dict[str, Any]) -> None:
        """Add the config's added tokens that tokenizer.json lacks (transformers does the same at load)."""
        for content, (token_id, special) in sorted(added.items(), key=lambda item: item[1][0]):
            if backend.token_to_id(content) is not None:
                continue
            spec = config["added_tokens_decoder"][str(token_id)]
            token = tokenizers.AddedToken(content, special=special, single_word=spec.get("single_word", False),
                                          lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                                          normalized=spec.get("normalized", not special))
            (backend.add_special_tokens if special else backend.add_tokens)([token])
            if backend.token_to_id(content) != token_id:
                raise ValueError(f"{TOKENIZER_CONFIG} gives {content!r} id {token_id}, but it lands at "
                                 f"{backend.token_to_id(content)} in {TOKENIZER_JSON}")

    @property
    def is_sentencepiece(self) -> bool:
        return isinstance(self.backend, sentencepiece.SentencePieceProcessor)

    # ------------------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding must have at least this many rows)."""
        if self.is_sentencepiece:
            return max([self.backend.vocab_size()] + [token_id + 1 for token_id, _ in self._added.values()])
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token, or None when the vocabulary lacks it."""
        if self.is_sentencepiece:
            if token in self._added:
                return self._added[token][0]
            token_id = self.backend.piece_to_id(token)
            # piece_to_id answers unk_id for an unknown piece: tell that apart from the unk piece itself.
            if token_id == self.backend.unk_id() and token != self.backend.id_to_piece(token_id):
                return None
            return token_id
        return self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        token = self.special_tokens.get("eos_token")
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        token = self.special_tokens.get("bos_token")
        return None if token is None else self.token_to_id(token)

    # ------------------------------------------------------------------------------ encode and decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. Special tokens written in the text (e.g. "<|userprompt|>") become their single ids.

        add_special_tokens applies the tokenizer's own additions: tokenizer.json's post-processor, or BOS for
        SentencePiece. dots.llm1 adds nothing either way (no BOS).
        """
        if not self.is_sentencepiece:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = []
        pieces = self._added_re.split(text) if self._added_re is not None else [text]
        for piece in pieces:
            if piece in self._added:
                ids.append(self._added[piece][0])
            elif piece:
                ids.extend(self.backend.encode(piece))
        if add_special_tokens and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if not self.is_sentencepiece:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        # Runs of SentencePiece ids go through its decoder; the config's added tokens are written as they are.
        parts, run = [], []
        for token_id in ids:
            if token_id in self._added_by_id:
                if run:
                    parts.append(self.backend.decode(run))
                    run = []
                content, special = self._added_by_id[token_id]
                if not (skip_special_tokens and special):
                    parts.append(content)
            elif not (skip_special_tokens and self.backend.is_control(token_id)):
                run.append(token_id)
        if run:
            parts.append(self.backend.decode(run))
        return "".join(parts)

    # ---------------------------------------------------------------------------------- chat template
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **template_vars: Any) -> str:
        """Render a conversation ([{"role": ..., "content": ...}, ...]) into prompt text.

        With a Jinja chat template this matches transformers' apply_chat_template(tokenize=False); without one,
        the dots1 format of the reference doc.
        """
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation: give at least one message")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"messages[{i}] must be a dict with a 'role', got {message!r}")
        # transformers drops None-valued keys (APIs send content=None), which templates handle better as absent.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        if self.chat_template is None:
            return dots1_chat_format(messages, add_generation_prompt)
        template = _compile_chat_template(self.chat_template)
        return template.render(**{**self.special_tokens, **template_vars}, messages=messages,
                               add_generation_prompt=add_generation_prompt, tools=None, documents=None)

    def __repr__(self) -> str:
        kind = "sentencepiece" if self.is_sentencepiece else "tokenizers"
        return f"Tokenizer({self.name!r}, {kind}, vocab_size={self.vocab_size})"


def dots1_chat_format(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The dots.llm1 instruct format, no newlines between segments:
    <|system|>{system}<|endofsystem|><|userprompt|>{user}<|endofuserprompt|><|response|>{assistant}<|endofresponse|>
    """
    system = DOTS1_DEFAULT_SYSTEM
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0].get("content", ""), messages[1:]
    parts = [DOTS1_SYSTEM[0], system, DOTS1_SYSTEM[1]]
    for message in messages:
        role = message["role"]
        if role == "user":
            opening, closing = DOTS1_USER
        elif role == "assistant":
            opening, closing = DOTS1_ASSISTANT
        else:
            raise ValueError(f"the dots1 chat format has no place for a {role!r} message (only a leading system "
                             "message, then user and assistant)")
        parts += [opening, message.get("content", ""), closing]
    if add_generation_prompt:
        parts.append(DOTS1_ASSISTANT[0])
    return "".join(parts)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant-token masks;
    rendering text only, we keep its body as is (without the tag such templates would not parse)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &), which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
    """The environment transformers renders chat templates in: sandboxed (templates from the Hub are untrusted),
    trim_blocks and lstrip_blocks, loop controls, and its raise_exception / tojson / strftime_now helpers."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class StreamDecoder:
    """Turn token ids, fed one at a time, into text pieces that are complete.

    Byte-level BPE (and SentencePiece byte fallback) can split one multi-byte character across tokens; decoding
    such a prefix gives U+FFFD. So each step decodes a small window of recent tokens and emits the new suffix only
    once it no longer ends in U+FFFD. The window starts one emitted chunk back, so that decoders which treat the
    first token specially (SentencePiece drops its leading space) see the same first token in both decodes.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # the window start
        self._read_offset = 0  # tokens before this are already emitted

    def _window_texts(self) -> tuple[str, str]:
        window = self.ids[self._prefix_offset:]
        emitted = self.tokenizer.decode(window[:self._read_offset - self._prefix_offset], self.skip_special_tokens)
        return emitted, self.tokenizer.decode(window, self.skip_special_tokens)

    def put(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        emitted, text = self._window_texts()
        if len(text) > len(emitted) and not text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return text[len(emitted):]
        return ""

    def flush(self) -> str:
        """The text still withheld at the end (it ends in U+FFFD only if the tokens really are invalid UTF-8)."""
        emitted, text = self._window_texts()
        self._prefix_offset = self._read_offset = len(self.ids)
        return text[len(emitted):]
