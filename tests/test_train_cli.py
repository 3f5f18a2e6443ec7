"""`python -m dots_jax.train`, run in-process through main(argv) on the tiny preset with byte-level data:
outputs of a run, --resume continuing it exactly (the resumed run's weights equal an uninterrupted run's, byte for
byte), and one clean `error:` line (exit 2) for each kind of bad input.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli

from dots_jax.config import preset
from dots_jax.train import main
from dots_jax.training import checkpoint

BATCH, SEQ = 2, 16
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_main(argv: list[str]) -> tuple[int, str, str]:
    return run_cli(main, argv)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    words = ["expert", "router", "token", "layer", "bias", "load", "balance", "scan", "grad", "step"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(200)]
    path.write_text("\n".join(lines) + "\n")
    return path


def train_args(corpus: Path, out: Path, steps: int, *extra: str) -> list[str]:
    # Warmup 2 and no decay: the first 6 steps have the same learning rates whether --steps is 6 or 12 (so
    # --resume --extend from 6 to 12 steps is exact).
    return ["--data", str(corpus), "--steps", str(steps), "--batch", str(BATCH), "--seq-len", str(SEQ),
            "--warmup", "2", "--decay", "0", "--eval-every", "3", "--save-every", "3", "--eval-batches", "2",
            "--out", str(out), *extra]


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


@pytest.fixture(scope="module")
def first_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, str]:
    out = tmp_path_factory.mktemp("run") / "out"
    return (out, *run_main(["--config", "tiny", *train_args(corpus, out, 6)]))


def test_run_writes_checkpoints_metrics_curve_and_hf_model(first_run):
    out, code, stdout, stderr = first_run
    assert code == 0, stderr
    assert "step 3: eval loss" in stdout and "train loss" in stdout
    assert checkpoint.all_steps(out / "checkpoints") == [3, 6]
    meta = checkpoint.read_metadata(out / "checkpoints")
    assert meta["step"] == 6 and meta["data"]["position"] == 6 * BATCH
    assert meta["model_config"] == preset("tiny").to_hf()

    png = (out / "loss_curve.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000

    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [0, 3, 6]
    # Warmup 2 from 0, then the peak (3e-4, the default --lr) with no decay.
    assert [r["learning_rate"] for r in train] == pytest.approx([0, 1.5e-4] + [3e-4] * 4, rel=1e-6)
    for r in train:
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
        assert len(r["load_cv"]) == preset("tiny").num_moe_layers
    # A random byte model starts near ln(256) nats per token and learns something in 6 steps.
    assert abs(evals[0]["eval_loss"] - math.log(256)) < 0.3
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]

    assert sorted(p.name for p in (out / "hf").iterdir()) == ["config.json", "model.safetensors"]


def test_resume_continues_exactly(first_run, corpus: Path, tmp_path: Path):
    out, code, _, _ = first_run
    assert code == 0
    code, _, stderr = run_main(train_args(corpus, out, 12, "--resume", "--extend"))
    assert code == 0, stderr
    assert "resumed from step 6" in stderr
    assert checkpoint.all_steps(out / "checkpoints") == [6, 9, 12]  # the newest 3 kept
    assert checkpoint.read_metadata(out / "checkpoints")["data"]["position"] == 12 * BATCH
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in evals] == [0, 3, 6, 9, 12]

    # The same 12 steps without an interruption: the exported weights must be the same bytes.
    straight = tmp_path / "straight"
    code, _, stderr = run_main(["--config", "tiny", *train_args(corpus, straight, 12)])
    assert code == 0, stderr
    assert [r["loss"] for r in read_metrics(straight)[0]] == [r["loss"] for r in train]
    assert (straight / "hf" / "model.safetensors").read_bytes() == (out / "hf" / "model.safetensors").read_bytes()


def test_refuses_to_overwrite_or_to_resume_changed_settings(first_run, corpus: Path):
    out, _, _, _ = first_run
    code, _, err = run_main(["--config", "tiny", *train_args(corpus, out, 30)])
    assert code == 2 and "already holds checkpoints" in err and "--resume" in err
    code, _, err = run_main([*train_args(corpus, out, 30, "--resume"), "--seq-len", "8"])
    assert code == 2 and "--seq-len" in err
    code, _, err = run_main(train_args(corpus, out, 2, "--resume"))
    assert code == 2 and "--steps 2 differs from the run's --steps" in err


@pytest.mark.parametrize("change, message", [
    ({"--data": "missing.txt"}, "missing.txt: no such file"),
    ({"--steps": "0"}, "--steps must be >= 1"),
    ({"--config": "no-such-preset"}, "no preset 'no-such-preset'"),
    ({"--warmup": "5", "--steps": "4"}, "--warmup 5 and --decay 0"),
    ({"--lr": "nan"}, "--lr must be > 0"),
    ({"--init": "/no/such/checkpoint", "--config": None}, "/no/such/checkpoint: no such directory"),
])
def test_bad_input_is_one_error_line(corpus: Path, tmp_path: Path, change: dict, message: str):
    argv = ["--config", "tiny", *train_args(corpus, tmp_path / "out", 6)]
    for flag, value in change.items():
        i = argv.index(flag) if flag in argv else None
        if value is None:
            del argv[i:i + 2]
        elif i is None:
            argv += [flag, value]
        else:
            argv[i + 1] = value
    if "--data" in change:
        argv[argv.index("--data") + 1] = str(tmp_path / change["--data"])
    code, out, err = run_main(argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_resume_without_checkpoint(corpus: Path, tmp_path: Path):
    code, _, err = run_main(train_args(corpus, tmp_path / "empty", 6, "--resume"))
    assert code == 2 and err.startswith("error: --resume: no checkpoint")
