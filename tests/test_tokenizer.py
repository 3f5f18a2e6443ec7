"""dots_jax.inference.tokenizer against independent oracles: exact round trips, transformers'
PreTrainedTokenizerFast (ids and chat templates), and hand-written strings of the dots1 chat format.

Every tokenizer is built here (no network): a byte-level BPE like the real Qwen2-style dots.llm1 one, and a tiny
SentencePiece model with byte fallback.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
import sentencepiece
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dots_jax.inference.tokenizer import REPLACEMENT_CHAR, StreamDecoder, Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|endofsystem|>", "<|userprompt|>", "<|endofuserprompt|>",
                  "<|response|>", "<|endofresponse|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route each token to a few experts.",
    "你好，世界！今天天气很好。我们一起去公园吧。",
    "日本語のテキストも少し入れておきます。",
    "Emoji: 🎉🚀 party time 🎉 and rockets 🚀",
    "hello hello hello world world world",
] * 20

# Fewer distinct characters, so that a vocabulary of ~300 holds them next to the 256 byte-fallback pieces.
SP_CORPUS = ["The quick brown fox jumps over the lazy dog.", "hello hello world world", "你好，世界！"] * 20

# Characters the corpus never shows, so that byte-level BPE must spell them as several byte tokens.
RARE_TEXT = "Rare: 鬱 🦜 Ω ∑ — ok"
TEXTS = [
    "Hello, world!",
    "你好，世界！今天天气很好。",
    "Emoji 🎉🚀 and a parrot 🦜, plus 鬱 and naïve café.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    RARE_TEXT,
]

# A realistic dots1 chat template, written multi-line so that it only renders right with transformers' jinja
# settings (trim_blocks and lstrip_blocks strip the newlines and indentation around the block tags).
DOTS1_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
    {% set system_message = messages[0]['content'] %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set system_message = 'You are a helpful assistant.' %}
    {% set loop_messages = messages %}
{% endif %}
<|system|>{{ system_message }}<|endofsystem|>{% for message in loop_messages %}
    {% if message['role'] == 'user' %}<|userprompt|>{{ message['content'] }}<|endofuserprompt|>{% endif %}
    {% if message['role'] == 'assistant' %}<|response|>{{ message['content'] }}<|endofresponse|>{% endif %}
    {% if message['role'] not in ('user', 'assistant') %}
        {{ raise_exception('Unexpected role: ' + message['role']) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<|response|>{% endif %}"""

CONVERSATIONS = {
    "system+user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 你好 🎉"}],
    "user only": [{"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of 日本?"},
    ],
}

# The same conversations in the dots1 format, written by hand from the reference doc.
EXPECTED_DOTS1 = {
    "system+user": "<|system|>You are terse.<|endofsystem|><|userprompt|>Hi 你好 🎉<|endofuserprompt|><|response|>",
    "user only": ("<|system|>You are a helpful assistant.<|endofsystem|><|userprompt|>What is 2+2?"
                  "<|endofuserprompt|><|response|>"),
    "multi-turn": ("<|system|>Answer in one word.<|endofsystem|><|userprompt|>Capital of France?<|endofuserprompt|>"
                   "<|response|>Paris.<|endofresponse|><|userprompt|>And of 日本?<|endofuserprompt|><|response|>"),
}


def build_bpe_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE (ByteLevel pre-tokenizer and decoder, like Qwen2's) trained on CORPUS."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def save_bpe_tokenizer(directory: Path, chat_template: str | None = DOTS1_TEMPLATE) -> Path:
    """tokenizer.json + tokenizer_config.json as an HF checkpoint carries them; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_bpe_tokenizer()
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,  # dots.llm1 has no BOS
        "eos_token": "<|endofresponse|>",
        "pad_token": "<|endoftext|>",
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                      "normalized": False, "single_word": False}
            for t in SPECIAL_TOKENS
        },
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    return directory


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def hf_tokenizer(bpe_dir: Path) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast.from_pretrained(bpe_dir)


def train_sentencepiece(directory: Path, user_defined_symbols: list[str] = ()) -> Path:
    """A tiny SentencePiece BPE with byte fallback, saved as directory/tokenizer.model."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(SP_CORPUS), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), model_type="bpe", vocab_size=320,
        byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, user_defined_symbols=user_defined_symbols,
        # No NFKC and no whitespace squeezing, so that decode(encode(text)) can give the text back exactly.
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return directory


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


# ---------------------------------------------------------------------------------------------- BPE
@pytest.mark.parametrize("text", TEXTS)
def test_bpe_round_trip_and_ids_match_transformers(bpe_dir, hf_tokenizer, text):
    tok = Tokenizer.from_dir(bpe_dir)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)


def test_bpe_rare_characters_are_split_into_byte_tokens(bpe_dir):
    # The premise of the streaming tests: the parrot (4 UTF-8 bytes) is no single token of the merges.
    tok = Tokenizer.from_dir(bpe_dir)
    assert len(tok.encode("🦜")) > 1 and len(tok.encode("鬱")) > 1


def test_bpe_special_tokens(bpe_dir, hf_tokenizer):
    tok = Tokenizer.from_dir(bpe_dir)
    raw = tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    for special in SPECIAL_TOKENS:
        assert tok.encode(special) == [raw.token_to_id(special)]
        assert tok.token_to_id(special) == raw.token_to_id(special)
    text = "<|userprompt|>hi 你好<|endofuserprompt|><|response|>"
    ids = tok.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == raw.token_to_id("<|userprompt|>") and ids[-1] == raw.token_to_id("<|response|>")
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "hi 你好"
    assert tok.eos_token_id == raw.token_to_id("<|endofresponse|>") == hf_tokenizer.eos_token_id
    assert tok.bos_token_id is None
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True) == len(hf_tokenizer)
    assert tok.token_to_id("<|not-a-token|>") is None


def test_config_added_tokens_missing_from_tokenizer_json(tmp_path):
    # tokenizer_config.json may list added tokens that tokenizer.json lacks; transformers adds them at load.
    tok = build_bpe_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    extra = tok.get_vocab_size()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|extra|>",
        "added_tokens_decoder": {str(extra): {"content": "<|extra|>", "special": True}},
    }))
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    text = "hi <|extra|> there"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert extra in ours.encode(text)
    assert ours.eos_token_id == hf.eos_token_id == extra
    assert ours.vocab_size == len(hf) == extra + 1
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == "hi  there"


# ------------------------------------------------------------------------------------- SentencePiece
@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trip(sp_dir, text):
    tok = Tokenizer.from_dir(sp_dir)
    assert tok.is_sentencepiece
    assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_special_tokens(tmp_path):
    # The config's added tokens are split off before SentencePiece sees the text (as transformers' slow
    # tokenizers do): here two user-defined symbols of the model and one token past the model's vocabulary.
    directory = train_sentencepiece(tmp_path, user_defined_symbols=["<|userprompt|>", "<|endofuserprompt|>"])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    user, end_user, extra = sp.piece_to_id("<|userprompt|>"), sp.piece_to_id("<|endofuserprompt|>"), sp.vocab_size()
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endofresponse|>",
        "added_tokens_decoder": {
            str(user): {"content": "<|userprompt|>", "special": True},
            str(end_user): {"content": "<|endofuserprompt|>", "special": True},
            str(extra): {"content": "<|endofresponse|>", "special": True},
        },
    }))
    tok = Tokenizer.from_dir(directory)
    assert tok.encode("<|userprompt|>") == [user]
    assert tok.encode("<|endofresponse|>") == [extra]
    assert tok.eos_token_id == extra and tok.vocab_size == extra + 1
    text = "<|userprompt|>hello 世界<|endofuserprompt|><|endofresponse|>"
    ids = tok.encode(text)
    assert ids == [user] + sp.encode("hello 世界") + [end_user, extra]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "hello 世界"


def test_sentencepiece_bos_eos_without_config(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert tok.bos_token_id == sp.bos_id() and tok.eos_token_id == sp.eos_id()
    assert tok.encode("hello", add_special_tokens=True) == [sp.bos_id()] + sp.encode("hello")
    assert tok.decode([sp.bos_id()] + sp.encode("hello"), skip_special_tokens=True) == "hello"


# ------------------------------------------------------------------------------------------ loading
def test_from_dir_prefers_tokenizer_json(bpe_dir, sp_dir, tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    (both / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    assert not Tokenizer.from_dir(both).is_sentencepiece


def test_from_dir_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model") as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        Tokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_stream_decoder_never_splits_a_character(bpe_dir, sp_dir, kind):
    directory = bpe_dir if kind == "bpe" else sp_dir
    tok = Tokenizer.from_dir(directory)
    # The tokenizer library's own decoder tells which prefixes end inside a character.
    if kind == "bpe":
        raw_decode = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")).decode
    else:
        raw_decode = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).decode
    text = "Emoji 🦜🦜 and 鬱, then 你好 🎉 done."
    ids = tok.encode(text)
    stream = StreamDecoder(tok)
    emitted, partial_steps = "", 0
    for k, token_id in enumerate(ids):
        piece = stream.put(token_id)
        assert REPLACEMENT_CHAR not in piece
        emitted += piece
        assert text.startswith(emitted)
        if raw_decode(ids[:k + 1]).endswith(REPLACEMENT_CHAR):
            partial_steps += 1
            assert piece == "", f"step {k} ends inside a character but emitted {piece!r}"
    assert partial_steps >= 2, "the text should make some tokens end inside a character"
    assert stream.flush() == ""
    assert emitted == text


def test_stream_decoder_skips_special_tokens(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    ids = tok.encode("Paris 🦜<|endofresponse|>")
    stream = StreamDecoder(tok, skip_special_tokens=True)
    assert "".join(stream.put(i) for i in ids) + stream.flush() == "Paris 🦜"


def test_stream_decoder_flush_releases_invalid_bytes(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    first_byte_of_parrot = tok.encode("🦜")[0]
    stream = StreamDecoder(tok)
    assert "".join(stream.put(i) for i in tok.encode("ok")) == "ok"
    assert stream.put(first_byte_of_parrot) == ""
    assert stream.flush() == REPLACEMENT_CHAR


# ----------------------------------------------------------------------------------- chat templates
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(bpe_dir, hf_tokenizer, name):
    tok = Tokenizer.from_dir(bpe_dir)
    messages = CONVERSATIONS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ours == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == EXPECTED_DOTS1[name]
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert no_prompt == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def test_chat_template_raise_exception(bpe_dir, hf_tokenizer):
    tok = Tokenizer.from_dir(bpe_dir)
    messages = [{"role": "tool", "content": "42"}]
    with pytest.raises(jinja2.TemplateError, match="Unexpected role: tool"):
        hf_tokenizer.apply_chat_template(messages, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="Unexpected role: tool"):
        tok.apply_chat_template(messages)


def test_chat_template_special_token_variables_and_tojson(tmp_path):
    # eos_token and pad_token come from tokenizer_config.json; tojson must not HTML-escape; the jinja file
    # chat_template.jinja overrides the config's template, as in transformers.
    directory = save_bpe_tokenizer(tmp_path)
    (directory / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m | tojson }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[{{ pad_token }}|{{ bos_token is defined }}]{% endif %}")
    messages = [{"role": "user", "content": "<b>&'\"你好"}, {"role": "assistant", "content": "ok", "name": None}]
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    ours = Tokenizer.from_dir(directory).apply_chat_template(messages)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # (the None-valued "name" is dropped, as transformers does)
    assert ours == ('{"role": "user", "content": "<b>&\'\\"你好"}<|endofresponse|>'
                    '{"role": "assistant", "content": "ok"}<|endofresponse|>[<|endoftext|>|False]')


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_fallback_chat_format(tmp_path, name):
    tok = Tokenizer.from_dir(save_bpe_tokenizer(tmp_path, chat_template=None))
    assert tok.chat_template is None
    assert tok.apply_chat_template(CONVERSATIONS[name]) == EXPECTED_DOTS1[name]


def test_fallback_chat_format_details(tmp_path):
    tok = Tokenizer.from_dir(save_bpe_tokenizer(tmp_path, chat_template=None))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|system|>You are a helpful assistant.<|endofsystem|><|userprompt|>Hi<|endofuserprompt|>"
        "<|response|>Hello!<|endofresponse|>")
    with pytest.raises(ValueError, match="'tool'"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([])
    # The rendered prompt's markers are single special tokens.
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    assert ids[0] == tok.token_to_id("<|system|>") and ids[-1] == tok.token_to_id("<|response|>")
