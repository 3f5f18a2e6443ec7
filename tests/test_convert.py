"""The converter (issue 8): HF -> dots_jax -> HF round trip bit for bit, resume after SIGKILL, one clear error per
bad input with nothing left at DST, and restore onto 8 simulated devices into the sharding table's shardings."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conftest import hf_config, hf_model, random_ids, run_cli, save, torch_one_thread
from flax import nnx

import dots_jax
from convert import hf_to_jax, jax_to_hf
from dots_jax.weights import converted
from dots_jax.weights.safetensors_io import SafetensorsFile

REPO = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"
BIAS = "model.layers.{layer}.mlp.gate.e_score_correction_bias"
TOKENIZER_CONFIG = {"model_max_length": 512, "chat_template": "{{ messages }}"}


def _all_tensors(directory: Path) -> dict[str, np.ndarray]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in SafetensorsFile(f).items()}


def _convert(src: Path, dst: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(hf_to_jax.main, ["--src", str(src), "--dst", str(dst), "--no-progress", *extra])


def _cli_env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, transformers.Dots1ForCausalLM]:
    """A tiny bf16 checkpoint in 5 shards whose correction bias is stored f32 (as transformers keeps it), plus a
    tokenizer config that must travel along."""
    model = hf_model(hf_config(), seed=7, bias_std=0.05).to(torch.bfloat16)
    for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.data = layer.mlp.gate.e_score_correction_bias.data.float()
    path = save(model, tmp_path_factory.mktemp("src") / "hf", max_shard_size="100KB")
    (path / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return path, model


@pytest.fixture(scope="module")
def converted_dir(source, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("jax") / "dots1"
    code, out, err = _convert(source[0], dst)
    assert code == 0, err
    return dst


# ---------------------------------------------------------------------------------------- 1. round trip
def test_round_trip_is_bit_identical_and_transformers_loads_it(source, converted_dir, tmp_path):
    src, _ = source
    assert len(list(src.glob("model-*.safetensors"))) >= 3
    code, _, err = run_cli(jax_to_hf.main, ["--src", str(converted_dir), "--dst", str(tmp_path / "hf"),
                                            "--max-shard-size", "120KB", "--no-progress"])
    assert code == 0, err
    exported = tmp_path / "hf"
    assert (exported / INDEX).is_file() and len(list(exported.glob("model-*.safetensors"))) >= 3

    original, back = _all_tensors(src), _all_tensors(exported)
    assert set(back) == set(original)
    for name, value in original.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        assert back[name].tobytes() == value.tobytes(), name
    assert original[BIAS.format(layer=2)].dtype == np.float32
    assert original["model.layers.2.mlp.experts.5.up_proj.weight"].dtype == ml_dtypes.bfloat16
    for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
        assert (exported / name).read_bytes() == (src / name).read_bytes(), name

    ids = torch.from_numpy(random_ids(160, 2, 16, seed=1)).long()
    with torch_one_thread():
        logits = [transformers.Dots1ForCausalLM.from_pretrained(d, dtype="auto").eval()(ids).logits
                  for d in (src, exported)]
    assert logits[0].dtype == torch.bfloat16 and torch.equal(logits[0], logits[1])


def test_converted_checkpoint_layout_and_manifest(source, converted_dir):
    manifest = converted.read_manifest(converted_dir)
    assert manifest["unit_order"] == ["top", "layer_000", "layer_001", "layer_002"]
    params = manifest["units"]["layer_002"]["params"]
    assert params["mlp.gate_proj"]["shape"] == [8, 64, 32]  # experts stacked [E, in, out]
    assert params["mlp.gate_proj"]["dtype"] == "bfloat16" and params["mlp.gate_proj"]["hf_tensors"] == 8
    assert params["mlp.correction_bias"]["dtype"] == params["mlp.correction_bias"]["hf_dtype"] == "float32"
    assert all(re.fullmatch(r"[0-9a-f]{64}", p["sha256"]) for u in manifest["units"].values()
               for p in u["params"].values())
    assert (converted_dir / "tokenizer_config.json").is_file()
    assert not list(converted_dir.parent.glob("*.tmp-*"))


def _flat(model) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_from_pretrained_converted_equals_hf_loader(source, converted_dir, dtype):
    """The same weights as the HF loader gives (same graph, so the same logits: the logits themselves are
    compared on 8 devices below and against transformers in the round trip)."""
    ours = _flat(dots_jax.from_pretrained(converted_dir, dtype=dtype, progress=False))
    hf = _flat(dots_jax.from_pretrained(source[0], dtype=dtype, progress=False))
    assert set(ours) == set(hf)
    for path, value in hf.items():
        assert ours[path].dtype == value.dtype and ours[path].tobytes() == value.tobytes(), path
    assert ours[("moe_layers", "mlp", "correction_bias")].dtype == np.float32


# ------------------------------------------------------------------------------------ 3. SIGKILL + resume
def _item_stamps(root: Path, units: list[str]) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for u in units
            for p in (root / "units" / u).rglob("*")}


# The converter's CLI, stopped (asleep) right after it has recorded its 2nd unit in the manifest, so that a test can
# SIGKILL it at a known point.
PAUSED_CONVERTER = textwrap.dedent("""
    import sys, time
    from convert import hf_to_jax
    from dots_jax.weights import converted

    record, recorded = converted.record_unit, []

    def record_then_pause(*args, **kwargs):
        record(*args, **kwargs)
        recorded.append(args[2])
        if len(recorded) == 2:
            print("paused after 2 units", flush=True)
            time.sleep(3600)

    converted.record_unit = record_then_pause
    sys.exit(hf_to_jax.main(sys.argv[1:]))
""")


def test_sigkill_then_resume_skips_done_units_and_matches(source, converted_dir, tmp_path):
    src, dst = source[0], tmp_path / "out"
    work = tmp_path / ("out" + converted.WORK_SUFFIX)
    args = ["--src", str(src), "--dst", str(dst), "--no-progress"]
    cmd = [sys.executable, "-m", "convert.hf_to_jax", *args]
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_CONVERTER, *args], env=_cli_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # Reading stdout blocks until a line or EOF: a converter that never pauses (or hangs) is killed by this
    # watchdog, which ends the read with EOF instead of hanging the suite.
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    paused = False
    try:
        for line in proc.stdout:  # PAUSED_CONVERTER stops after its 2nd unit and says so
            if "paused after 2 units" in line:
                paused = True
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        watchdog.cancel()
        proc.wait(timeout=60)
    assert paused, "the converter never printed 'paused after 2 units' (killed after 120 s or exited)"
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists() and work.is_dir()
    done = list(json.loads((work / "manifest.json").read_text())["units"])
    assert done == ["top", "layer_000"]
    stamps = _item_stamps(work, done)
    (work / "units" / "layer_001.partial" / "junk").mkdir(parents=True)  # as a kill inside a unit leaves it

    code, _, err = _convert(src, dst)  # without --resume: refuses, names the flag
    assert code != 0 and "--resume" in err and str(work) in err and not dst.exists()

    result = subprocess.run([*cmd, "--resume"], env=_cli_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 of 4 units already written" in result.stdout
    assert not work.exists() and not list((dst / "units").glob("*.partial"))
    assert _item_stamps(dst, done) == stamps, "completed units were rewritten"
    ours, reference = converted.read_manifest(dst), converted.read_manifest(converted_dir)
    assert ours["units"] == reference["units"]
    a = _flat(dots_jax.from_pretrained(dst, progress=False))
    b = _flat(dots_jax.from_pretrained(converted_dir, progress=False))
    assert all(a[path].tobytes() == b[path].tobytes() for path in b)

    code, out, _ = _convert(src, dst, "--resume")  # resuming a finished conversion does nothing
    assert code == 0 and "nothing to do" in out


# ------------------------------------------------------------------------------------------ 4. bad input
def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def _missing_shard(d: Path) -> str:
    victim = _shards(d)[2]
    victim.unlink()
    return victim.name


def _truncated(d: Path) -> str:
    victim = _shards(d)[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return victim.name


def _corrupt_header(d: Path) -> str:
    victim = _shards(d)[1]
    data = bytearray(victim.read_bytes())
    data[8:20] = b"\xff{garbage!!\x00"
    victim.write_bytes(bytes(data))
    return victim.name


def _index_names_absent_tensor(d: Path) -> str:
    index = json.loads((d / INDEX).read_text())
    name = "model.layers.2.self_attn.o_proj.weight"
    index["weight_map"][name] = next(f for f in sorted(set(index["weight_map"].values()))
                                     if f != index["weight_map"][name])
    (d / INDEX).write_text(json.dumps(index))
    return name


def _config_contradicts(d: Path) -> str:
    raw = json.loads((d / "config.json").read_text())
    raw["n_routed_experts"] = 4
    (d / "config.json").write_text(json.dumps(raw))
    return "n_routed_experts"


def _wrong_shape(d: Path) -> str:
    victim = _shards(d)[0]
    header_len = struct.unpack("<Q", victim.read_bytes()[:8])[0]
    header = json.loads(victim.read_bytes()[8:8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = list(reversed(header[name]["shape"]))  # same bytes, transposed claim
    blob = json.dumps(header).encode()
    victim.write_bytes(struct.pack("<Q", len(blob)) + blob + victim.read_bytes()[8 + header_len:])
    return name


@pytest.mark.parametrize("damage", [_missing_shard, _truncated, _corrupt_header, _index_names_absent_tensor,
                                    _config_contradicts, _wrong_shape], ids=lambda f: f.__name__.strip("_"))
def test_bad_input_one_clear_error_nothing_at_dst(source, tmp_path, damage):
    src = Path(shutil.copytree(source[0], tmp_path / "src"))
    named = damage(src)
    dst = tmp_path / "out"
    code, _, err = _convert(src, dst)
    assert code != 0
    assert named in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not dst.exists() and not list(tmp_path.glob("out*"))


def test_non_empty_destination_needs_a_flag(source, converted_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    for flags in ([], ["--resume"]):
        code, _, err = _convert(source[0], dst, *flags)
        assert code != 0 and str(dst) in err and "--overwrite" in err and err.count("\n") == 1, err
        assert [p.name for p in dst.iterdir()] == ["keep.txt"] and not list(tmp_path.glob("out.tmp*"))
    code, _, err = _convert(source[0], dst, "--overwrite")
    assert code == 0, err
    assert not (dst / "keep.txt").exists()
    assert converted.read_manifest(dst)["units"] == converted.read_manifest(converted_dir)["units"]


def test_cli_exit_code_and_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "convert.hf_to_jax", "--src", str(tmp_path / "nope"),
                             "--dst", str(tmp_path / "out")], env=_cli_env(), cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "nope" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_relative_paths(source, converted_dir, tmp_path, monkeypatch):
    """Orbax wants absolute paths: `--dst runs/x` (relative, as in the README) must work all the same."""
    monkeypatch.chdir(tmp_path)
    code, _, err = _convert(source[0], Path("runs/jax"))
    assert code == 0, err
    code, _, err = run_cli(jax_to_hf.main, ["--src", "runs/jax", "--dst", "runs/hf", "--no-progress"])
    assert code == 0, err
    assert converted.read_manifest(tmp_path / "runs/jax")["units"] == converted.read_manifest(converted_dir)["units"]
    original, back = _all_tensors(source[0]), _all_tensors(tmp_path / "runs/hf")
    assert set(back) == set(original) and all(back[k].tobytes() == v.tobytes() for k, v in original.items())
    model = dots_jax.from_pretrained("runs/jax", progress=False)  # a relative converted checkpoint loads too
    assert model.cfg == dots_jax.Dots1Config.from_hf(source[0])


def test_repo_id_offline_is_one_error_line(tmp_path):
    env = {**_cli_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run([sys.executable, "-m", "convert.hf_to_jax", "--src", "dots-jax-tests/no-such-model",
                             "--dst", str(tmp_path / "out")], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: dots-jax-tests/no-such-model: ") and "HF_HUB_OFFLINE" in lines[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- 5. 8 simulated devices
SHARDED = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import dots_jax
    from dots_jax.parallel.sharding import make_mesh, param_shardings

    path = sys.argv[1]
    assert jax.device_count() == 8
    mesh = make_mesh("fsdp=2,expert=2,tensor=2")
    single = dots_jax.from_pretrained(path, progress=False)
    sharded = dots_jax.from_pretrained(path, mesh=mesh, progress=False)
    state = nnx.state(sharded)
    expected = jax.tree.leaves(param_shardings(state, mesh),
                               is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    arrays = jax.tree.leaves(state)
    assert len(arrays) == len(expected) > 0
    split_over = set()
    for value, want in zip(arrays, expected):
        assert value.sharding == want, (value.shape, value.sharding, want)
        split_over.update(a for a in value.sharding.spec if a)
    assert split_over == {"fsdp", "expert", "tensor"}, split_over
    ref = dict(nnx.to_flat_state(nnx.state(single)))
    for path_, var in nnx.to_flat_state(nnx.state(sharded)):
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(ref[path_].get_value()))
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 160, (4, 16)), jnp.int32)
    forward = nnx.jit(lambda model, x: model(x))
    want = np.asarray(forward(single, ids))
    with jax.set_mesh(mesh):
        got = np.asarray(forward(sharded, ids))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    print("OK", np.abs(got - want).max())
""")


def test_restore_onto_8_devices(converted_dir):
    env = {**_cli_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", SHARDED, str(converted_dir)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
