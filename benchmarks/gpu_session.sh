#!/usr/bin/env bash
# Issue 21's GPU session in one device call: the GPU tests, the grouped-matmul benchmark, generation and the
# serving benchmark's decode-step rows, each under its own time budget, so that the whole script ends within about
# 9.5 minutes and a `run` with timeout_s 600 returns every file (and the 15 minutes of device time leave room to
# rerun what failed). A step that fails or runs out of time is reported and the next one runs. What comes back,
# under $OUT:
# session.log (everything printed), gmm_gpu.json, generate_gpu.json (our default MoE backend),
# generate_gpu_mosaic.json (ours on the Mosaic GPU kernels), serve_gpu.json.
#
#     bash benchmarks/gpu_session.sh            # from the repository root, on the GPU machine
#
# Preparing the call, on the CPU machine, in the repository root (/.whl/ is in .gitignore): the device image has
# transformers 5.17; the oracle is pinned at 5.23.0 (pure Python; its other needs, huggingface-hub >= 1.31,
# tokenizers 0.23.x and safetensors >= 0.8, are on the image), so it travels as a wheel:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl transformers==5.23.0
#
# Rehearse before spending device time: `DRY_RUN=1 PYTHON=/path/to/venv/python bash benchmarks/gpu_session.sh`
# runs every step here on the CPU (the GPU tests skip, gmm.py refuses, generate_gpu.py and serve_gpu.py run their
# --dry-run); without DRY_RUN it stops at once where nvidia-smi finds no GPU. Then the device call (the tool `run`,
# not a shell command):
#
#     run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# Settings travel as variables in the command, e.g. command="MOE_BACKEND=mosaic_gpu GENERATE_BUDGET=240 bash
# benchmarks/gpu_session.sh" (the budgets below, MOE_BACKEND for generate_gpu.py and serve_gpu.py: auto, pallas,
# ragged_dot, mosaic_gpu). Afterwards copy the JSON files from the reply's files_at into benchmarks/results/ and
# call give_back unless rerunning at once.

set -uo pipefail
export PYTHONUNBUFFERED=1

# Seconds per step (timeout's budget; each step is killed 10 s after its budget if it ignores the signal). About
# 9.5 minutes in all: with the machine's start, a 15-minute lease leaves room to rerun the steps that failed
# (STEPS="gmm generate_mosaic" bash benchmarks/gpu_session.sh).
VERSIONS_BUDGET=${VERSIONS_BUDGET:-20}
KERNEL_TEST_BUDGET=${KERNEL_TEST_BUDGET:-45}
GMM_BUDGET=${GMM_BUDGET:-150}
GENERATE_BUDGET=${GENERATE_BUDGET:-150}
GENERATE_MOSAIC_BUDGET=${GENERATE_MOSAIC_BUDGET:-75}
SERVE_BUDGET=${SERVE_BUDGET:-40}
MODEL_TEST_BUDGET=${MODEL_TEST_BUDGET:-40}
# Which steps run, in this order (the kernels' acceptance tests and benchmark first: they are issue 21's core).
STEPS=${STEPS:-"versions kernel_tests mosaic_tests gmm generate generate_mosaic serve model_tests"}
MOE_BACKEND=${MOE_BACKEND:-auto}
DRY_RUN=${DRY_RUN:-0}  # 1: a rehearsal on a CPU machine (no nvidia-smi needed; the benchmarks' --dry-run)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}  # the device machine sets OUT; elsewhere a fresh temporary folder
MODEL_DIR=/tmp/dots_gpu_model  # generate_gpu.py saves its random checkpoint here, serve_gpu.py reuses it

VERSIONS_PY='
import importlib.metadata as metadata
import sys

print("python", sys.version.split()[0], sys.executable)
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "flax", "optax", "torch", "triton",
             "transformers", "tokenizers", "huggingface-hub", "safetensors", "numpy"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "(not installed)")
import jax
import torch
import transformers

print("transformers from", transformers.__file__)
print("jax devices", jax.devices(), "| torch cuda", torch.cuda.is_available(), torch.version.cuda)
'

cd "$(dirname "$0")/.." || exit 2
SUMMARY=()
FAILED=0

step() {  # step NAME BUDGET COMMAND...: one step under its own timeout; its exit status goes to the summary
    local name=$1 budget=$2 start=$SECONDS rc
    shift 2
    echo "=== $name (budget ${budget} s): $*"
    timeout --kill-after=10 "$budget" "$@"
    rc=$?
    local note=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        note=" (out of time)"
    fi
    echo "=== $name: exit $rc after $((SECONDS - start)) s$note"
    SUMMARY+=("$name: exit $rc, $((SECONDS - start)) s$note")
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
}

main() {
    echo "=== gpu_session.sh at $(date -u +%FT%TZ) on $(hostname); out: $OUT"
    local dry=() mosaic_lengths=(--batches 1,64 --prefill-tokens 2048 --repeats 3)
    if [ "$DRY_RUN" = 1 ]; then
        dry=(--dry-run)
        mosaic_lengths=()  # the dry run's own tiny lengths (the Mosaic kernels are interpreted there)
        echo "DRY_RUN=1: a rehearsal, nothing measured"
    elif ! nvidia-smi; then
        echo "error: nvidia-smi found no GPU: this script is for the device machine (see its header)"
        return 2
    fi
    # The carried wheels first on the path: they replace the image's versions (transformers 5.17).
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || echo "warning: the carried wheels did not install; running on the image's packages"
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # The package from the checkout as it is: no install (the image has no network for its dependencies' resolver).
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    # tests/conftest.py asserts the pinned oracle unless this is set: test_gpu.py only writes tiny checkpoints with
    # transformers, so the image's version serves where the wheel did not travel.
    export DOTS_JAX_ANY_ORACLE=1

    for name in $STEPS; do
        case $name in
            versions) step versions "$VERSIONS_BUDGET" "$PYTHON" -c "$VERSIONS_PY" ;;
            # The kernels against the float64 oracle, Mosaic GPU apart from Triton (a crash of one process must not
            # cost the other's results); later the model's logits on both.
            kernel_tests) step kernel_tests "$KERNEL_TEST_BUDGET" "$PYTHON" -m pytest -q tests/test_gpu.py \
                -k "not model_logits and not mosaic" ;;
            mosaic_tests) step mosaic_tests "$KERNEL_TEST_BUDGET" "$PYTHON" -m pytest -q tests/test_gpu.py \
                -k "mosaic and not model_logits" ;;
            model_tests) step model_tests "$MODEL_TEST_BUDGET" "$PYTHON" -m pytest -q tests/test_gpu.py \
                -k "model_logits" ;;
            # 128 x 64 x 256 tiles: the warp-specialized Mosaic GPU kernel (two compute warpgroups), beside the default.
            gmm) step gmm "$GMM_BUDGET" "$PYTHON" benchmarks/gmm.py --rows 2048 8192 --repeats 5 \
                --impls mosaic_gpu pallas torch --tiling 128,64,256 --out "$OUT/gmm_gpu.json" ;;
            generate) step generate "$GENERATE_BUDGET" "$PYTHON" benchmarks/generate_gpu.py \
                --moe-backend "$MOE_BACKEND" --model-dir "$MODEL_DIR" --out "$OUT/generate_gpu.json" "${dry[@]}" ;;
            # Ours on the Mosaic GPU kernels, against the same reference (measured again, a shorter list).
            generate_mosaic) step generate_mosaic "$GENERATE_MOSAIC_BUDGET" "$PYTHON" benchmarks/generate_gpu.py \
                --moe-backend mosaic_gpu "${mosaic_lengths[@]}" --model-dir "$MODEL_DIR" \
                --out "$OUT/generate_gpu_mosaic.json" "${dry[@]}" ;;
            serve) step serve "$SERVE_BUDGET" "$PYTHON" benchmarks/serve_gpu.py --moe-backend "$MOE_BACKEND" \
                --model-dir "$MODEL_DIR" --out "$OUT/serve_gpu.json" "${dry[@]}" ;;
            *) echo "error: unknown step $name in STEPS (known: versions kernel_tests mosaic_tests gmm generate" \
                   "generate_mosaic serve model_tests)"; return 2 ;;
        esac
    done
    echo "=== summary ($SECONDS s in all)"
    printf '  %s\n' "${SUMMARY[@]}"
    ls -la "$OUT"
    [ "$FAILED" -eq 0 ]  # the script's exit status: 1 if any step failed
}

mkdir -p "$OUT"
main 2>&1 | tee "$OUT/session.log"
exit "${PIPESTATUS[0]}"
