"""The capacity planner (dots_jax.plan) on the full released 142B model, compiled ahead of time for a 64-chip
v5p slice (v5p:4x4x4) by the real TPU compiler (libtpu), Pallas MoE kernels included. Nothing runs on a TPU.

Each compile takes tens of seconds on a small machine: every planner run here is done once per module and
shared between the tests that read it.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import require_libtpu

from dots_jax import plan as planner

TOPOLOGY, MESH = "v5p:4x4x4", "expert=16,fsdp=4"


@pytest.fixture(scope="module", autouse=True)
def _libtpu() -> None:
    require_libtpu()


@pytest.fixture(scope="module")
def decode() -> dict:
    return planner.plan(TOPOLOGY, MESH, batch=64, seq=4096, mode="decode")


def test_decode_of_the_full_model_fits_a_v5p_64(decode) -> None:
    r = decode
    assert r["chips"] == 64 and r["slice"] == "v5p-64" and r["fits"]
    m = r["memory_gib"]
    assert 0 < m["total"] < r["hbm_gib"] == 95
    # The weights are split 64 ways (experts over expert=16 x fsdp=4, the rest over fsdp=4): ~285 GB of bf16
    # weights land as 7-8 GiB per chip; the MHA cache (1 MiB per token) 64 x 4096 tokens / 64 chips = 4 GiB.
    assert 6 < m["weights"] < 9
    assert m["kv_cache"] == pytest.approx(64 * 4096 * 62 * 2 * 32 * 128 * 2 / 64 / 2**30, rel=0.01)
    assert m["total"] >= m["weights"] + m["kv_cache"]
    a = r["arithmetic"]
    assert a["total_params"] == pytest.approx(142.8e9, rel=0.01)
    assert a["tokens_per_step"] == 64 and 0.9 < a["experts_hit_fraction"] < 1
    roof = r["roofline"]
    assert roof["bound"] == "memory" and roof["tokens_per_s"] > 0
    assert "compiler_cost_analysis" in r
    text = planner.format_report(r)
    assert "memory per chip (compiler)" in text and "roofline" in text and "does not fit" not in text


def test_prefill_of_the_full_model_compiles() -> None:
    r = planner.plan(TOPOLOGY, MESH, batch=8, seq=512, mode="prefill")
    assert r["fits"] and 0 < r["memory_gib"]["total"] < 95
    assert r["arithmetic"]["tokens_per_step"] == 8 * 512
    assert r["roofline"]["tokens_per_s"] > 0
    # The planner compiles with splash attention: a prompt into a fresh cache runs its forward kernel (segment
    # ids: padding keys), beside the MoE's gmm.
    assert {"splash_mqa_fwd_segmented_no_residuals", "dots_gmm"} <= set(r["mosaic_kernels"]), r["mosaic_kernels"]


def test_a_configuration_that_does_not_fit_says_so(capsys, tmp_path) -> None:
    """64-way expert parallelism leaves the attention weights and the KV cache of 256 x 32768 tokens
    (124 GiB per chip) far beyond 95 GiB: the compiler's RESOURCE_EXHAUSTED becomes a clear message, exit 1."""
    out = tmp_path / "plan.json"
    code = planner.main(["--topology", TOPOLOGY, "--mesh", "expert=64", "--batch", "256", "--seq", "32768",
                         "--mode", "decode", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 1
    assert "does not fit: needs" in text and "GiB per chip (HBM 95 GiB)" in text
    r = json.loads(out.read_text())
    assert r["fits"] is False and r["needs_gib"] > 95


def test_bad_arguments_are_reported_before_compiling(capsys) -> None:
    assert planner.main(["--topology", "v9x:2x2", "--mesh", "expert=4", "--mode", "decode"]) == 2
    assert "unknown TPU generation" in capsys.readouterr().err
    assert planner.main(["--topology", TOPOLOGY, "--mesh", "expert=32,fsdp=2,tensor=3"]) == 2
    assert "--mesh" in capsys.readouterr().err
    assert planner.main(["--topology", TOPOLOGY, "--mesh", "expert=16,fsdp=4", "--mode", "decode", "--remat"]) == 2
    assert "--remat applies to --mode train only" in capsys.readouterr().err
    assert planner.main(["--topology", TOPOLOGY, "--mesh", MESH, "--mode", "serve", "--page-size", "0"]) == 2
    assert "--page-size must be positive" in capsys.readouterr().err


def test_arithmetic_by_hand() -> None:
    from dots_jax.config import preset

    cfg = preset("dots.llm1.inst")
    head, layers = planner.active_params_per_token(cfg)
    embed = planner.param_counts(cfg)["embed"]
    assert (head + layers + embed) / 1e9 == pytest.approx(14.0, abs=0.1)  # dots.llm1: "14B activated"
    assert planner.experts_hit_fraction(cfg, 1) == pytest.approx(6 / 128)
    shape = {"data": 1, "fsdp": 4, "expert": 16, "tensor": 1}
    a = planner.step_arithmetic(cfg, "decode", 64, 4096, shape)
    train = planner.step_arithmetic(cfg, "train", 8, 1024, shape)
    remat = planner.step_arithmetic(cfg, "train", 8, 1024, shape, remat=True)
    assert remat["flops_per_step"] == pytest.approx(train["flops_per_step"] * 4 / 3)  # + one forward, recomputed
    roof = planner.roofline(a, planner.CHIPS["v5p"])
    assert roof["step_time_s"] == pytest.approx(max(a["flops_per_chip"] / 459e12, a["bytes_per_chip"] / 2765e9))
    assert math.isclose(roof["tokens_per_s"], 64 / roof["step_time_s"])


def test_training_step_compiles_with_fsdp_and_expert_parallelism() -> None:
    """A training step of the full model (f32 master weights and AdamW moments, bf16 compute), experts split
    over expert=16 and every weight over fsdp=8, on a 128-chip v5p (v5p:4x4x8). On 64 chips it does not fit:
    with fsdp=4 the attention/shared weights' f32 state is split only 4 ways (45 GiB per chip before the step
    starts). The compile takes ~2.5 CPU-minutes; a 3-layer model at the same widths takes as long (one scanned
    layer body either way), so the test compiles the real one."""
    r = planner.plan("v5p:4x4x8", "expert=16,fsdp=8", batch=128, seq=128, mode="train")
    assert r["fits"], r.get("compiler_message")
    m = r["memory_gib"]
    # f32 params + two f32 moments: routed experts 135e9 x 12 B / 128 chips, the rest 7.7e9 x 12 B / 8.
    assert 20 < m["weights"] < 25 and m["weights"] < m["total"] < 95
    assert r["arithmetic"]["tokens_per_step"] == 128 * 128
    # splash attention's forward and both backward kernels, and the gmm's three.
    kernels = r["mosaic_kernels"]
    for phase in ("fwd", "dq", "dkv"):  # the forward saves its logsumexp for the backward: "_residuals"
        assert any(name.startswith(f"splash_mqa_{phase}_segmented_") for name in kernels), kernels
    assert {"dots_gmm", "dots_gmm_t", "dots_tgmm"} <= set(kernels), kernels


def test_plan_table_help_runs_nothing() -> None:
    """`python benchmarks/plan_table.py --help` prints its usage; it used to ignore it and run every compile."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_table.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--resume" in result.stdout, result.stderr
    assert "fits" not in result.stderr


# ------------------------------------------------------------------------ flops and bytes against hand arithmetic
def hand_counts(hf: dict) -> dict[str, float]:
    """Parameter counts written out from config.json's fields, one projection at a time (not from plan.py)."""
    h, n, kv, d = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    layers, dense = hf["num_hidden_layers"], hf["first_k_dense_replace"]
    moe, experts, width = layers - dense, hf["n_routed_experts"], hf["moe_intermediate_size"]
    q, k, v, o = h * n * d, h * kv * d, h * kv * d, n * d * h
    per_layer = q + k + v + o + d + d + h + h  # q/k/v/o, q_norm and k_norm, the two RMSNorms
    routed = moe * experts * 3 * h * width  # gate, up, down of every routed expert
    rest = (layers * per_layer + h  # the final norm
            + dense * 3 * h * hf["intermediate_size"]
            + moe * (h * experts + 3 * h * width * hf["n_shared_experts"])  # router, shared experts
            + hf["vocab_size"] * h)  # the LM head (untied in dots.llm1); the embedding is a lookup
    return {"routed": routed, "rest": rest, "embed": hf["vocab_size"] * h,
            "k_over_e": hf["num_experts_per_tok"] / experts}


@pytest.mark.parametrize("mode, batch, seq, mesh", [
    ("decode", 64, 4096, {"data": 1, "fsdp": 4, "expert": 16, "tensor": 1}),
    ("prefill", 8, 512, {"data": 2, "fsdp": 1, "expert": 8, "tensor": 4}),
    ("train", 128, 128, {"data": 1, "fsdp": 8, "expert": 16, "tensor": 1}),
])
def test_step_flops_and_bytes_per_chip_match_hand_arithmetic(mode, batch, seq, mesh) -> None:
    """dots.llm1.inst: 2 flops per active weight per token + attention's QK^T and PV over all `seq` slots
    (x3 in training), and per chip the weights read (bf16; f32 master weights, read 3x, in training), the KV
    cache's share and the optimizer's traffic, against the planner's step_arithmetic."""
    from dots_jax.config import preset

    hf = preset("dots.llm1.inst").to_hf()
    c = hand_counts(hf)
    # Released facts first, so that the hand counts themselves are checked: 142B total, 14B activated.
    assert (c["routed"] + c["rest"] + c["embed"]) / 1e9 == pytest.approx(142.8, abs=0.1)
    assert (c["routed"] * c["k_over_e"] + c["rest"] + c["embed"]) / 1e9 == pytest.approx(14.0, abs=0.1)

    chips = math.prod(mesh.values())
    tokens = batch * (1 if mode == "decode" else seq)
    active = c["rest"] + c["routed"] * c["k_over_e"]
    attention = 2 * 2 * hf["num_attention_heads"] * hf["head_dim"] * seq * hf["num_hidden_layers"]  # QK^T, PV
    flops = tokens * (2 * active + attention) * (3 if mode == "train" else 1)
    hit = 1 - (1 - c["k_over_e"]) ** tokens  # chance that an expert is chosen by at least one token
    weight_bytes = 4 if mode == "train" else 2
    weights = weight_bytes * (c["rest"] / mesh["tensor"] + c["routed"] * hit / mesh["expert"])
    if mode == "train":
        total = c["routed"] + c["rest"] + c["embed"]
        expected_bytes = 3 * weights + total / chips * 4 * 4 * 2  # f32 params, grads, m, v; read and written
    else:
        kv_bytes = batch * seq * hf["num_hidden_layers"] * 2 * hf["num_key_value_heads"] * hf["head_dim"] * 2
        expected_bytes = weights + kv_bytes / chips

    a = planner.step_arithmetic(preset("dots.llm1.inst"), mode, batch, seq, mesh)
    assert a["tokens_per_step"] == tokens
    assert a["flops_per_step"] == pytest.approx(flops, rel=1e-9)
    assert a["flops_per_chip"] == pytest.approx(flops / chips, rel=1e-9)
    assert a["bytes_per_chip"] == pytest.approx(expected_bytes, rel=1e-9)
    roof = planner.roofline(a, planner.CHIPS["v5p"])
    # v5p's public figures: 459 TFLOP/s bf16 and 2765 GB/s HBM per chip.
    assert roof["tokens_per_s"] == pytest.approx(tokens / max(flops / chips / 459e12, expected_bytes / 2765e9))


def test_int8_weights_and_kv_bytes_by_hand() -> None:
    """--quantize int8: the decoder's linear weights (q, k, v, o, the dense and shared MLPs, the routed experts) are
    read as one byte each plus an f32 scale per output channel; the LM head, router and norms stay bf16.
    --kv-cache-dtype int8: K and V one byte per element plus an f32 scale per token and head."""
    from dots_jax.config import preset

    cfg = preset("dots.llm1.inst")
    hf = cfg.to_hf()
    h, n, kv, d, layers = hf["hidden_size"], 32, 32, 128, 62
    moe, dense, experts, width = 61, 1, 128, hf["moe_intermediate_size"]
    shared = hf["n_shared_experts"] * width
    attn_w, attn_s = layers * (2 * h * n * d + 2 * h * kv * d), layers * (n * d + 2 * kv * d + h)
    mlp_w = dense * 3 * h * hf["intermediate_size"] + moe * 3 * h * shared
    mlp_s = dense * (2 * hf["intermediate_size"] + h) + moe * (2 * shared + h)
    routed_w, routed_s = moe * experts * 3 * h * width, moe * experts * (2 * width + h)
    bf16 = layers * (2 * d + 2 * h) + h + moe * h * experts + hf["vocab_size"] * h  # norms, router, LM head
    mesh = {"data": 1, "fsdp": 4, "expert": 16, "tensor": 1}
    hit = 1 - (1 - 6 / 128) ** 64
    weights = attn_w + 4 * attn_s + mlp_w + 4 * mlp_s + 2 * bf16 + (routed_w + 4 * routed_s) * hit / 16
    kv_bytes = 64 * 4096 * layers * 2 * kv * (d + 4) / 64

    a = planner.step_arithmetic(cfg, "decode", 64, 4096, mesh, quantize="int8", kv_cache_dtype="int8")
    assert a["weights_read_per_chip"] == pytest.approx(weights, rel=1e-9)
    assert a["kv_bytes_per_chip"] == pytest.approx(kv_bytes, rel=1e-9)
    bf16_step = planner.step_arithmetic(cfg, "decode", 64, 4096, mesh)
    assert 0.5 < a["weights_read_per_chip"] / bf16_step["weights_read_per_chip"] < 0.56
    page = planner.paged_kv_arithmetic(cfg, mesh, 16, 4096, kv_cache_dtype="int8")["page_bytes_per_chip"]
    assert page == layers * 16 * 2 * 2 * (d + 4)  # 2 KV heads per chip (expert=16 splits 32)


def test_int8_decode_of_the_full_model_fits_half_the_v5e_chips() -> None:
    """int8 weights and KV cache: decode 64 x 4096 of the 142B model compiles for a 32-chip v5e with the int8
    Pallas gmm and fits its 16 GiB (bf16 needs 64 chips: the README's table); the int8 weights per chip are about
    half the bf16 ones (the compiler's figures, from the abstract model's shardings)."""
    r = planner.plan("v5e:4x8", "expert=8,fsdp=4", 64, 4096, "decode", quantize="int8", kv_cache_dtype="int8")
    assert r["fits"] and r["memory_gib"]["total"] <= 16, r.get("compiler_message")
    assert "dots_gmm" in r["mosaic_kernels"]
    assert r["arithmetic"]["kv_bytes_per_chip"] == pytest.approx(r["kv_cache_gib"] * 2**30, rel=0.01)


def test_compiled_plan_reports_the_hand_arithmetic(decode) -> None:
    """plan() passes its batch, seq, mode and mesh through to the arithmetic (reusing the module's compile)."""
    from dots_jax.config import preset

    c = hand_counts(preset("dots.llm1.inst").to_hf())
    a = decode["arithmetic"]
    active = c["rest"] + c["routed"] * c["k_over_e"]
    assert a["flops_per_step"] == pytest.approx(64 * (2 * active + 4 * 32 * 128 * 4096 * 62), rel=1e-9)
    weights = 2 * (c["rest"] + c["routed"] * (1 - (1 - c["k_over_e"]) ** 64) / 16)  # tensor=1, expert=16
    assert a["bytes_per_chip"] == pytest.approx(weights + 64 * 4096 * 62 * 2 * 32 * 128 * 2 / 64, rel=1e-9)
    assert decode["roofline"]["tokens_per_s"] == pytest.approx(
        64 / max(a["flops_per_step"] / 64 / 459e12, a["bytes_per_chip"] / 2765e9))


# ------------------------------------------------------------------------------------------ serving: the page pool
def hand_page_bytes(hf: dict, page: int, heads_per_chip: int) -> int:
    """One KV page on one chip: every layer's K and V for `page` tokens of the chip's heads, in bf16."""
    return hf["num_hidden_layers"] * page * 2 * heads_per_chip * hf["head_dim"] * 2


@pytest.mark.parametrize("mesh, axes, heads_per_chip", [
    ({"data": 1, "fsdp": 4, "expert": 16, "tensor": 1}, ["expert"], 2),  # 32 heads: 16 divides, 16 x 4 does not
    ({"data": 1, "fsdp": 2, "expert": 8, "tensor": 4}, ["expert", "tensor"], 1),  # 8 x 4 = 32 ways
    ({"data": 64, "fsdp": 1, "expert": 1, "tensor": 1}, [], 32),  # 64 divides no 32 heads: the pool whole per chip
])
def test_serving_page_pool_arithmetic_by_hand(mesh, axes, heads_per_chip) -> None:
    """The ragged kernel splits the 32 KV heads over the largest mesh axes that divide them, so a page costs every
    chip its heads' share; a 4096-token sequence is 256 pages of 16; the pages that fit are what the budget (HBM
    less the margin) leaves beside the compiled step, and the slice holds pages // 256 sequences, each chip 1/split
    of every one."""
    from dots_jax.config import preset

    cfg = preset("dots.llm1.inst")
    hf = cfg.to_hf()
    kv = planner.paged_kv_arithmetic(cfg, mesh, page_size=16, seq=4096)
    assert kv["head_axes"] == axes and kv["kv_heads_per_chip"] == heads_per_chip
    split = 32 // heads_per_chip
    assert kv["head_split"] == split and kv["pool_replicas"] == 64 // split
    assert kv["page_bytes_per_chip"] == hand_page_bytes(hf, 16, heads_per_chip)
    assert hand_page_bytes(hf, 16, 32) == 62 * 16 * 2 * 32 * 128 * 2  # 15.5 MiB: 0.97 MiB per token (MHA)
    assert kv["pages_per_seq"] == 256 and planner.paged_kv_arithmetic(cfg, mesh, 16, 4097)["pages_per_seq"] == 257

    budget, fixed = 95 * 2**30 * 0.95, 11.25 * 2**30
    cap = planner.serve_capacity(budget, fixed, kv["page_bytes_per_chip"], kv["pages_per_seq"], kv["head_split"])
    pages = int((95 * 0.95 - 11.25) * 2**30 // hand_page_bytes(hf, 16, heads_per_chip))
    assert cap["kv_pages_per_chip"] == pages and cap["seqs_per_slice"] == pages // 256
    assert cap["seqs_per_chip"] == pytest.approx(pages // 256 / split)
    assert planner.serve_capacity(10.0, 20.0, 1.0, 256, 1)["kv_pages_per_chip"] == 0  # nothing left: no pages


def test_serving_decode_traffic_counts_the_repeated_attention() -> None:
    """The serving step reads every row's KV of its heads on every chip (rows whole, heads split 16 ways), not a
    64th of it as the dense decode step's row split does; attention's flops are likewise split 16 ways."""
    from dots_jax.config import preset

    cfg = preset("dots.llm1.inst")
    mesh = {"data": 1, "fsdp": 4, "expert": 16, "tensor": 1}
    decode = planner.step_arithmetic(cfg, "decode", 64, 4096, mesh)
    serve = planner.step_arithmetic(cfg, "serve", 64, 4096, mesh, attention_split=16)
    kv_total = 64 * 4096 * 62 * 2 * 32 * 128 * 2
    assert serve["kv_bytes_per_chip"] == pytest.approx(kv_total / 16)
    assert serve["bytes_per_chip"] - decode["bytes_per_chip"] == pytest.approx(kv_total / 16 - kv_total / 64)
    attention = 64 * 4 * 32 * 128 * 4096 * 62
    assert serve["flops_per_step"] == decode["flops_per_step"]
    assert serve["flops_per_chip"] - decode["flops_per_chip"] == pytest.approx(attention / 16 - attention / 64)


@pytest.fixture(scope="module")
def serve() -> dict:
    """The serving engine's decode step (64 rows, "ragged" paged attention), one compile: `verify` would compile it
    again with the pool it reports (about a minute more)."""
    return planner.plan(TOPOLOGY, MESH, batch=64, seq=4096, mode="serve", verify=False)


def test_serving_step_of_the_full_model_compiles_and_reports_the_pages_per_chip(serve) -> None:
    """The engine's own jitted step for 142B on v5p-64, with the Mosaic ragged-paged-attention and gmm kernels; the
    pages per chip are 95 GiB less 5%, less what the compiled step needs besides its pool (the compiler's figure),
    in pages of 62 layers x 16 tokens x K and V x 2 heads x 128 x 2 bytes."""
    from dots_jax.config import preset

    r = serve
    hf = preset("dots.llm1.inst").to_hf()
    assert r["chips"] == 64 and r["fits"], r.get("compiler_message")
    assert {"ragged_paged_attention_kernel", "dots_gmm"} <= set(r["mosaic_kernels"]), r["mosaic_kernels"]
    m, page = r["memory_gib"], hand_page_bytes(hf, 16, 32 // 16)  # the 32 KV heads split over expert=16
    assert m["kv_cache"] * 2**30 == 64 * 256 * page  # the engine's default pool: a 4096-token sequence per row
    # The pool is updated in place: a step that copied it (scanned as a per-layer input and output) had
    # temporaries as large as the pool and room for half the pages.
    assert m["temporaries"] < m["kv_cache"] / 4, m
    c = hand_counts(hf)
    # Routed experts over expert=16 x fsdp=4; every other matrix (routers too) over fsdp=4, its hidden dimension.
    assert m["weights"] * 2**30 == pytest.approx(2 * (c["routed"] / 64 + (c["rest"] + c["embed"]) / 4), rel=1e-4)

    besides_pool = (m["total"] - m["kv_cache"]) * 2**30
    pages = math.floor((95 * 2**30 * 0.95 - besides_pool) / page)
    assert abs(r["kv_pages_per_chip"] - pages) <= 1  # GiB floats in the report
    assert r["seqs_per_slice"] == r["kv_pages_per_chip"] // 256
    assert r["seqs_per_chip"] == pytest.approx(r["seqs_per_slice"] / 16)
    assert 100 < r["seqs_per_slice"] < 400  # 7.5 GiB of weights: 70-85 GiB of 0.97 MiB pages
    text = planner.format_report(r)
    assert f"KV pages per chip: {r['kv_pages_per_chip']:,}" in text and "not verified" in text
    assert f"| {r['kv_pages_per_chip']:,} | {r['seqs_per_slice']:,} (" in planner.serve_table_row(r)


# -------------------------------------------------------------------------------------- LoRA training (issue 20)
def hand_lora_counts(hf: dict, r: int) -> dict[str, int]:
    """Adapter parameters written out from config.json's fields, one adapted matrix at a time (A [in, r] and
    B [r, out]; the routed experts' A of gate and up is one, as PEFT adapts transformers' fused gate_up_proj)."""
    h, n, kv, d = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    layers, dense = hf["num_hidden_layers"], hf["first_k_dense_replace"]
    moe, experts, width = layers - dense, hf["n_routed_experts"], hf["moe_intermediate_size"]
    shared, wide = hf["n_shared_experts"] * width, hf["intermediate_size"]
    q, k, v, o = h * r + r * n * d, h * r + r * kv * d, h * r + r * kv * d, n * d * r + r * h
    mlp = (h * r + r * wide) + (h * r + r * wide) + (wide * r + r * h)  # gate, up, down
    shared_mlp = (h * r + r * shared) * 2 + (shared * r + r * h)
    routed = experts * (h * r + r * width + r * width + width * r + r * h)  # gate_up A, gate B, up B, down A and B
    return {"attn": layers * (q + k + v + o), "mlp": dense * mlp, "shared": moe * shared_mlp, "experts": moe * routed}


def test_lora_training_arithmetic_by_hand() -> None:
    """--mode train --lora-rank 16 for dots.llm1.inst on v5p-64 (expert=16,fsdp=4): the trainable parameters
    (1.60B, 1.1% of 142.8B; the routed experts' adapters 97% of them), the flops (the frozen base's products run
    forward and once more for the input's gradient, the adapters' three times, attention's three times) and the
    bytes per chip (the bf16 base read twice, the f32 adapters three times, AdamW's traffic for the adapters only),
    against hand counts from config.json; targets choose which counts enter."""
    from dots_jax.config import preset

    cfg = preset("dots.llm1.inst")
    hf = cfg.to_hf()
    lora = hand_lora_counts(hf, 16)
    trainable = sum(lora.values())
    assert trainable == 1_604_572_160 and lora["experts"] / trainable > 0.96
    c = hand_counts(hf)
    total = c["routed"] + c["rest"] + c["embed"]
    assert 0.011 < trainable / total < 0.0113

    mesh, tokens = {"data": 1, "fsdp": 4, "expert": 16, "tensor": 1}, 128 * 128
    k_over_e = c["k_over_e"]
    active = c["rest"] + c["routed"] * k_over_e
    lora_active = lora["attn"] + lora["mlp"] + lora["shared"] + lora["experts"] * k_over_e
    attention = 4 * 32 * 128 * 128 * 62  # QK^T and PV over 128 slots, per token
    flops = tokens * (2 * 2 * active + 3 * 2 * lora_active + 3 * attention)
    hit = 1 - (1 - k_over_e) ** tokens
    base = 2 * (c["rest"] + c["routed"] * hit / 16)  # bf16, whole per chip outside the experts (tensor=1)
    adapters = 4 * (lora["attn"] + lora["mlp"] + lora["shared"] + lora["experts"] * hit / 16)
    expected_bytes = 2 * base + 3 * adapters + trainable / 64 * 4 * 4 * 2  # params, grads, m, v: read and written

    a = planner.step_arithmetic(cfg, "train", 128, 128, mesh, lora_rank=16)
    assert a["trainable_params"] == trainable and a["total_params"] == total
    assert a["flops_per_step"] == pytest.approx(flops, rel=1e-6)  # k/E rounds the adapters' active count
    assert a["bytes_per_chip"] == pytest.approx(expected_bytes, rel=1e-9)
    full = planner.step_arithmetic(cfg, "train", 128, 128, mesh)
    assert full["trainable_params"] == total and 0.6 < a["flops_per_step"] / full["flops_per_step"] < 0.7

    for targets in (("attn",), ("experts",), ("mlp", "shared")):
        counts = planner.lora_param_counts(cfg, 16, targets)
        assert sum(counts.values()) == sum(lora[t] for t in targets), targets
        assert planner.step_arithmetic(cfg, "train", 8, 64, mesh, lora_rank=16, lora_targets=targets)[
            "trainable_params"] == sum(lora[t] for t in targets)


def test_lora_arguments_are_checked(capsys) -> None:
    """--lora-rank only with --mode train; --lora-alpha/--lora-targets only with --lora-rank; a bad target or rank
    is one `error:` line naming it; --quantize int8 in training only under LoRA (a frozen int8 base)."""
    base = ["--topology", TOPOLOGY, "--mesh", MESH]
    assert planner.main([*base, "--mode", "decode", "--lora-rank", "16"]) == 2
    assert "--lora-rank applies to --mode train only" in capsys.readouterr().err
    assert planner.main([*base, "--mode", "train", "--lora-alpha", "32"]) == 2
    assert "need --lora-rank" in capsys.readouterr().err
    assert planner.main([*base, "--mode", "train", "--lora-rank", "16", "--lora-targets", "attn,router"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "targets" in err and len(err.strip().splitlines()) == 1
    assert planner.main([*base, "--mode", "train", "--lora-rank", "0"]) == 2
    assert "rank" in capsys.readouterr().err
    assert planner.main([*base, "--mode", "train", "--quantize", "int8"]) == 2
    assert "--lora-rank" in capsys.readouterr().err
    from dots_jax.model.lora import TARGETS

    assert planner.LORA_TARGETS == TARGETS


def test_lora_training_step_compiles_with_a_frozen_bf16_base() -> None:
    """A LoRA step (rank 4, every target) of tiny.json's model compiled for an 8-chip v5p with mesh data=8, where
    every chip holds every weight: the training state per chip is the bf16 base (2 bytes a parameter: no f32 master
    copy, no moments), the f32 adapters (4 bytes) and their two AdamW moments (8 bytes, and two int32 step counts),
    counted by hand from config.json; the experts' adapters run through the Pallas grouped matmul, forward and
    backward. (The 142B model's LoRA rows are compiled by benchmarks/plan_table.py, not here: minutes each.)"""
    from dots_jax.config import preset

    cfg = preset("tiny")
    hf = cfg.to_hf()
    r = planner.plan("v5p:2x2x2", "data=8", batch=8, seq=64, mode="train", config=cfg, lora_rank=4)
    assert r["fits"], r.get("compiler_message")
    c, adapters = hand_counts(hf), sum(hand_lora_counts(hf, 4).values())
    state = {k: v * 2**30 for k, v in r["train_state_gib"].items()}
    assert state["frozen"] == 2 * (c["routed"] + c["rest"] + c["embed"])
    assert state["trainable"] == 4 * adapters
    assert state["optimizer"] == 2 * 4 * adapters + 2 * 4  # mu, nu; Adam's and the schedule's step counts
    assert r["arithmetic"]["trainable_params"] == adapters
    assert {"dots_gmm", "dots_gmm_t", "dots_tgmm"} <= set(r["mosaic_kernels"]), r["mosaic_kernels"]
    text = planner.format_report(r)
    assert "train (LoRA r=4)" in text and "frozen bf16 base" in text
