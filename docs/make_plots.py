"""Regenerate the README's plots under docs/: `python docs/make_plots.py`.

- docs/throughput_cpu.png: dots_jax against transformers, from the benchmark results JSON files
  (benchmarks/generate_cpu.py and benchmarks/train_cpu.py write them; rerun those to refresh the figures).
- docs/serve_cpu.png: serving throughput and latency against offered load, from benchmarks/serve_cpu.py's JSON.
- docs/demo_expert_load.png: the embedded demo model's expert load per MoE layer on its held-out text.
(docs/demo_loss_curve.png is the training CLI's own loss_curve.png of the demo model's run.)
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"


def save(fig: plt.Figure, name: str) -> None:
    tmp = DOCS / (name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, DOCS / name)
    plt.close(fig)
    print(f"wrote docs/{name}")


def throughput_plot() -> None:
    generate = json.loads((RESULTS / "generate_cpu.json").read_text())
    train = json.loads((RESULTS / "train_cpu.json").read_text())
    labels, ratios = [], []
    for r in generate["results"]:
        prefills = [(f"prefill {key.split('_')[1]}", key) for key in r if key.startswith("prefill_")
                    and key.endswith("_tok_s")]
        for phase, key in (*prefills, ("decode b1", "decode_b1_tok_s"), ("decode b8", "decode_b8_tok_s")):
            labels.append(f"{r['config']} {r['params_M']:.0f}M\n{phase}")
            ratios.append(r[key]["ours"] / r[key]["ref"])
    for r in train["results"]:
        labels.append(f"{r['config']} {r['params_M']:.1f}M\ntrain {r['batch']}x{r['seq']}")
        ratios.append(r["ratio"])
    fig, ax = plt.subplots(figsize=(9, 3.6))
    colors = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
    ax.bar(range(len(ratios)), ratios, color=colors)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks(range(len(ratios)), labels, fontsize=8)
    ax.set_ylabel("dots_jax tok/s / transformers tok/s")
    cpus = generate["machine"]["cpus"]
    ax.set_title(f"CPU throughput against the reference, f32 ({cpus}-core {generate['machine']['processor']}; "
                 "benchmarks/generate_cpu.py, train_cpu.py)", fontsize=9)
    for i, x in enumerate(ratios):
        ax.text(i, x, f"{x:.2f}x", ha="center", va="bottom", fontsize=8)
    save(fig, "throughput_cpu.png")


def serve_plot() -> None:
    """Throughput against offered load (engine behind the server, static generate(), transformers), and the
    engine's time to first token and inter-token latency, per model."""
    serve = json.loads((RESULTS / "serve_cpu.json").read_text())
    rows = serve["results"]
    fig, axes = plt.subplots(2, len(rows), figsize=(4.6 * len(rows), 6.4), squeeze=False)
    for col, row in enumerate(rows):
        clients = [r["clients"] for r in row["levels"]]
        top, bottom = axes[0][col], axes[1][col]
        for key, label, style in (("engine", "engine (server)", "o-"), ("static", "static generate()", "s--"),
                                  ("transformers", "transformers generate", "^:")):
            top.plot(clients, [r[key]["tok_s"] for r in row["levels"]], style, label=label)
        top.set_title(f"{row['model']} ({row['params_M']:.0f}M): output tokens/s", fontsize=9)
        for key, label, style in (("ttft", "time to first token", "o-"), ("itl", "inter-token latency", "s-")):
            for q, alpha in (("p50", 1.0), ("p99", 0.45)):
                bottom.plot(clients, [r["engine"][key][f"{q}_ms"] for r in row["levels"]], style, alpha=alpha,
                            label=f"{label} {q}", color="tab:blue" if key == "ttft" else "tab:orange")
        bottom.set_yscale("log")
        bottom.set_title("engine latency, ms (client-side, streamed)", fontsize=9)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(clients, [str(c) for c in clients])
            ax.set_xlabel("concurrent clients")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    machine = serve["machine"]
    load = f"{machine['loadavg_1_5_15_start'][0]:.1f}-{machine['loadavg_1_5_15_end'][0]:.1f}"
    fig.suptitle(f"Serving on CPU, f32 ({machine['cpus']}-core {machine['processor']}, load average {load}; "
                 "benchmarks/serve_cpu.py)", fontsize=9)
    fig.tight_layout()
    save(fig, "serve_cpu.png")


def expert_load_plot() -> None:
    import jax.numpy as jnp

    from dots_jax.demo import DEMO_MODEL_DIR, EVAL_FRACTION, SEQ_LEN, stdlib_glob
    from dots_jax.inference.tokenizer import Tokenizer
    from dots_jax.training.data import load_tokens, split_eval
    from dots_jax.weights import from_pretrained

    tokens = load_tokens(stdlib_glob(), Tokenizer.from_dir(DEMO_MODEL_DIR))
    _, held = split_eval(tokens, EVAL_FRACTION, SEQ_LEN)
    windows = held[: (held.size // SEQ_LEN) * SEQ_LEN].reshape(-1, SEQ_LEN)[:32]
    model = from_pretrained(DEMO_MODEL_DIR, dtype=jnp.float32, progress=False)
    _, _, stats = model.forward(jnp.asarray(windows))
    load = np.asarray(stats.expert_load)  # [MoE layers, experts]
    share = load / load.sum(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(8, 2.6))
    image = ax.imshow(share * share.shape[1], cmap="viridis", aspect="auto")
    first = model.cfg.first_k_dense_replace
    ax.set_yticks(range(share.shape[0]), [f"layer {first + i}" for i in range(share.shape[0])])
    ax.set_xlabel("routed expert")
    ax.set_title(f"Demo model: expert load on {windows.size} held-out tokens (1.0 = perfectly even; "
                 f"{platform.machine()} CPU)", fontsize=9)
    fig.colorbar(image, ax=ax, label="load / mean load")
    save(fig, "demo_expert_load.png")


if __name__ == "__main__":
    throughput_plot()
    serve_plot()
    expert_load_plot()
