"""Dots1Config: reading every config.json variant, checked against transformers' Dots1Config (the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest
import transformers
from conftest import TINY, hf_config
from flax import nnx

import dots_jax
from dots_jax import ConfigError, Dots1Config
from dots_jax.config import CONFIGS_DIR, FULL_ATTENTION, SLIDING_ATTENTION, preset
from dots_jax.model.modeling import RouterBias

REQUIRED = {"model_type": "dots1", "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1}

# The released config.json as transformers 4.5x wrote it: torch_dtype, top-level rope_theta, null n_group /
# topk_group, no head_dim, and the cosmetic fields seen in the wild.
RELEASED_45X = {
    "architectures": ["Dots1ForCausalLM"], "model_type": "dots1", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": 151643, "pad_token_id": None,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 10944, "max_position_embeddings": 32768, "max_window_layers": 62,
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": None, "n_routed_experts": 128,
    "n_shared_experts": 2, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts_per_tok": 6,
    "num_hidden_layers": 62, "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000000.0, "routed_scaling_factor": 2.5, "scoring_func": "noaux_tc",
    "sliding_window": None,
    "tie_word_embeddings": False, "topk_group": None, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 152064, "pretraining_tp": 1,
}
RELEASED_PARAMS = 142_774_381_696  # the published total (model card / paper)


def _ours(cfg: Dots1Config) -> dict:
    """The fields that change the math, from our config."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_shared_experts=cfg.n_shared_experts, first_k_dense_replace=cfg.first_k_dense_replace,
        n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        windows=tuple(cfg.layer_window(i) for i in range(cfg.num_hidden_layers)),
        attention_bias=cfg.attention_bias, tie_word_embeddings=cfg.tie_word_embeddings,
    )


def _reference(hf: transformers.Dots1Config) -> dict:
    """The same fields as transformers' modeling_dots1 reads them (n_group/topk_group None = no grouping)."""
    assert hf.rope_parameters.get("rope_type", "default") == "default"
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        moe_intermediate_size=hf.moe_intermediate_size, num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads, num_key_value_heads=hf.num_key_value_heads,
        head_dim=head_dim, n_routed_experts=hf.n_routed_experts, num_experts_per_tok=hf.num_experts_per_tok,
        n_shared_experts=hf.n_shared_experts, first_k_dense_replace=hf.first_k_dense_replace,
        n_group=hf.n_group or 1, topk_group=hf.topk_group or 1, norm_topk_prob=bool(hf.norm_topk_prob),
        routed_scaling_factor=hf.routed_scaling_factor, rms_norm_eps=hf.rms_norm_eps,
        rope_theta=hf.rope_parameters["rope_theta"],
        windows=tuple(hf.sliding_window if t == SLIDING_ATTENTION else None for t in hf.layer_types),
        attention_bias=hf.attention_bias, tie_word_embeddings=hf.tie_word_embeddings,
    )


# ------------------------------------------------------------------------------------------------ reading
def test_from_hf_dir_file_and_dict_agree(tmp_path):
    hf = hf_config()
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    from_dir = Dots1Config.from_hf(tmp_path)
    assert Dots1Config.from_hf(tmp_path / "config.json") == from_dir
    assert Dots1Config.from_hf(str(tmp_path)) == from_dir
    assert Dots1Config.from_hf(raw) == from_dir
    assert _ours(from_dir) == _reference(hf)


def test_transformers_5x_and_4x_configs_read_the_same(tmp_path):
    # transformers 5.23 reads the 4.5x file and writes its own layout (dtype, rope_parameters): both must give
    # us the released model's math, and the same math as transformers sees.
    hf = transformers.Dots1Config.from_dict(RELEASED_45X)
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_theta" not in written, "not a 5.x-style file"
    assert "dtype" in written and "torch_dtype" not in written, "not a 5.x-style file"
    old, new = Dots1Config.from_hf(RELEASED_45X), Dots1Config.from_hf(tmp_path)
    assert _ours(old) == _ours(new) == _reference(hf)
    assert old.dtype == new.dtype == "bfloat16"
    assert old.eos_token_id == new.eos_token_id == (151643,)
    # The released numbers, from rednote-hilab/dots.llm1's model card, not from our reader.
    assert (old.hidden_size, old.head_dim, old.n_group, old.topk_group, old.rope_theta) == (
        4096, 128, 1, 1, 1e7)
    assert old.layer_types == (FULL_ATTENTION,) * 62 and old.sliding_window is None


def test_head_dim_derived_or_explicit():
    assert Dots1Config.from_hf({**TINY, **REQUIRED, "rope_parameters": None}).head_dim == 64 // 4
    hf = hf_config(head_dim=48)
    cfg = Dots1Config.from_hf(hf.to_dict())
    assert cfg.head_dim == 48
    # The oracle: the projection widths of transformers' own attention with that config.
    attn = transformers.models.dots1.modeling_dots1.Dots1Attention(hf, layer_idx=0)
    assert attn.q_proj.weight.shape == (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)
    assert attn.k_norm.weight.shape == (cfg.head_dim,)


@pytest.mark.parametrize("extra", [
    dict(num_hidden_layers=3, sliding_window=16, max_window_layers=1),
    dict(num_hidden_layers=4, sliding_window=8, max_window_layers=2),
    dict(num_hidden_layers=4, sliding_window=8, max_window_layers=5),  # window set but no layer uses it
    dict(num_hidden_layers=3, sliding_window=None, max_window_layers=0),
    dict(num_hidden_layers=3, sliding_window=16,
         layer_types=[SLIDING_ATTENTION, FULL_ATTENTION, SLIDING_ATTENTION]),
    dict(num_hidden_layers=64),  # no sliding_window key: the class default 4096 applies from layer 62 on
    dict(num_hidden_layers=64, max_window_layers=60),
], ids=lambda e: "-".join(f"{k}={v}" if k != "layer_types" else "explicit" for k, v in e.items()))
def test_layer_types_match_transformers(extra):
    raw = {**REQUIRED, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, **extra}
    hf = transformers.Dots1Config.from_dict(raw)
    cfg = Dots1Config.from_hf(raw)
    assert cfg.layer_types == tuple(hf.layer_types)
    assert _ours(cfg)["windows"] == _reference(hf)["windows"]
    if extra == dict(num_hidden_layers=64):  # spelled out, so the oracle itself is checked too
        assert cfg.layer_window(61) is None and cfg.layer_window(62) == cfg.layer_window(63) == 4096


def test_sparse_config_defaults_match_transformers():
    # A config.json that leaves fields out must mean what it means to transformers. In particular the class
    # default of num_key_value_heads is 32 (not num_attention_heads); only an explicit null means "= heads".
    raw = {**REQUIRED, "num_attention_heads": 64}
    assert _ours(Dots1Config.from_hf(raw)) == _reference(transformers.Dots1Config.from_dict(raw))
    raw_null = {**raw, "num_key_value_heads": None}
    assert _ours(Dots1Config.from_hf(raw_null)) == _reference(transformers.Dots1Config.from_dict(raw_null))


# --------------------------------------------------------------------------------------------- rejection
def _tiny(**changes) -> dict:
    raw = {**TINY, **REQUIRED, **changes}
    return {k: v for k, v in raw.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize("changes, field", [
    (dict(n_routed_experts=8, n_group=3), "n_group"),
    (dict(n_routed_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(hidden_size=64, num_attention_heads=5, num_key_value_heads=5), "num_attention_heads"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(n_routed_experts=_DROP), "n_routed_experts"),
    (dict(n_routed_experts=None), "n_routed_experts"),
    (dict(num_experts_per_tok=_DROP), "num_experts_per_tok"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_parameters"),
    (dict(rope_parameters=_DROP, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(layer_types=[FULL_ATTENTION] * 2), "layer_types"),
    (dict(layer_types=[FULL_ATTENTION, "chunked_attention", FULL_ATTENTION]), "layer_types"),
    (dict(layer_types=[FULL_ATTENTION, SLIDING_ATTENTION, FULL_ATTENTION], sliding_window=None),
     "sliding_window"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (dict(model_type="deepseek_v3"), "model_type"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_inconsistent_config_rejected(changes, field, tmp_path):
    raw = _tiny(**changes)
    with pytest.raises(ConfigError) as info:
        Dots1Config.from_hf(raw)
    assert field in str(info.value)
    # Through a file the message also names the file.
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as info:
        Dots1Config.from_hf(tmp_path)
    assert field in str(info.value) and "config.json" in str(info.value)


def test_unreadable_config_rejected(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        Dots1Config.from_hf(tmp_path)  # no config.json in the directory
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        Dots1Config.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="nope"):
        preset("nope")


# --------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS_DIR.glob("*.json")))
def test_every_preset_parses_like_transformers(name):
    cfg = preset(name)
    raw = json.loads((CONFIGS_DIR / f"{name}.json").read_text())
    assert _ours(cfg) == _reference(transformers.Dots1Config.from_dict(raw))


def test_released_presets_eos():
    assert preset("dots.llm1.base").eos_token_id == (151643,)
    assert preset("dots.llm1.inst").eos_token_id == (151649,)
    assert _ours(preset("dots.llm1.base")) == _ours(preset("dots.llm1.inst"))


def test_released_parameter_count():
    cfg = preset("dots.llm1.base")
    # Plain arithmetic from the released numbers (V=152064, H=4096, 62 layers, 32 heads x 128, dense 10944,
    # 128 experts x 1408, 2 shared = 2816), checked against the published total.
    v, h, hd, heads, layers = 152064, 4096, 128, 32, 62
    attention = 4 * h * heads * hd + 2 * hd + 2 * h  # q, k, v, o (MHA), q_norm, k_norm, 2 layer norms
    dense_mlp = 3 * h * 10944
    moe = 128 * h + 128 + 128 * 3 * h * 1408 + 3 * h * 2816  # router, correction bias, experts, shared
    total = 2 * v * h + layers * attention + dense_mlp + (layers - 1) * moe + h
    assert total == RELEASED_PARAMS
    assert (cfg.vocab_size, cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.num_hidden_layers, cfg.intermediate_size, cfg.n_routed_experts, cfg.moe_intermediate_size,
            cfg.shared_intermediate_size, cfg.first_k_dense_replace) == (
                v, h, hd, heads, heads, layers, 10944, 128, 1408, 2816, 1)

    # The model's shapes (abstract: nothing allocated) add up to the same count. The correction bias is a
    # RouterBias variable, not an nnx.Param (an optimizer must skip it): 61 x 128 of them.
    abstract = nnx.eval_shape(lambda: dots_jax.Dots1ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    params = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    biases = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, RouterBias)))
    assert biases == (layers - 1) * 128
    assert params + biases == RELEASED_PARAMS
    assert sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract))) == RELEASED_PARAMS


# ------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("source", [
    "dots.llm1.base", "dots.llm1.inst", "tiny",
    dict(sliding_window=16, max_window_layers=1, num_key_value_heads=2),
    dict(head_dim=48, attention_bias=True, tie_word_embeddings=True, eos_token_id=[5, 7], bos_token_id=3),
    dict(n_group=4, topk_group=2, first_k_dense_replace=0, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 5e5}),
], ids=lambda s: s if isinstance(s, str) else "-".join(s))
def test_to_hf_round_trip(source, tmp_path):
    cfg = preset(source) if isinstance(source, str) else Dots1Config.from_hf(hf_config(**source).to_dict())
    hf = transformers.Dots1Config(**cfg.to_hf())
    assert Dots1Config.from_hf(hf.to_dict()) == cfg
    assert _reference(hf) == _ours(cfg)
    hf.save_pretrained(tmp_path)  # and through transformers' own file
    assert Dots1Config.from_hf(Path(tmp_path)) == cfg
