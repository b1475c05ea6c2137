#!/usr/bin/env bash
# The GPU checks in one go (each part has its own time limit, 11 min 15 s in all; never yet
# run on a GPU, so how long they take there is not measured):
#
#   bash bench/gpu_check.sh           # on a CUDA machine, from any folder; PYTHON=... to pick the interpreter
#   bash bench/gpu_check.sh --smoke   # on a machine without a GPU: the ahead-of-time compilation runs
#                                     # for sm_80 and sm_90; every other command is checked (pytest
#                                     # --collect-only, bench --help, engine.run --dry-run), nothing is timed
#
# 0. python -m bench.triton_aot for this GPU's architecture (sm_80, sm_89, sm_90), every kernel and
#    config once per dtype: compiled on the CPU, shared memory, registers and spills against the
#    device's limits. A launch that does not fit stops the script here, in seconds, before any GPU work;
#    the table (with the datasheet roofline) is the prediction the parts below measure;
# 1. the CUDA-only tests: the compiled Triton kernels against the reference, the device gates, and the
#    train loop's no-host-read test (on CUDA the engine trains on the GPU there);
# 2. python -m bench.kernels on the GPU (Triton vs the torch path vs peft-style vs real HF peft, and the
#    roofline prediction from this GPU's measured peaks) at rank 8, then qkv and proj at rank 128 (the
#    Selective LoRA paper's), written to bench/results/gpu/kernels-<device>{,-r128};
# 3. python -m bench.loaders, files section: DALI `mixed` (GPU decode) beside DALI CPU and torch;
# 4. a 200-step ViT-B/16 LoRA run in bf16, train.compile off and on. The GPU machine has no internet:
#    `model.pretrained=false` builds timm's vit_base_patch16_224 with random weights (no download;
#    speed does not depend on the weights), on the embedded digits target upscaled to 224 px by
#    Preprocess.from_model, the torch loader (DALI's CUDA build need not be installed for this part).
#
# Everything goes under bench/results/gpu/: one log per part, the benches' CSV and JSON, the runs'
# folders (results.json, metrics.csv) and summary.txt (each part's status and the two runs' img/s).
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=bench/results/gpu
RUNS=$OUT/runs
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
failed=0

if [ $SMOKE = 0 ] && ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device visible to $PY (use --smoke to check the commands without one)" >&2
    exit 2
fi
DEVICE=$($PY -c 'from bench.device import device_name; print(device_name())' 2>/dev/null || echo unknown)
# this GPU's architecture as bench.triton_aot names it (sm_80, sm_89, sm_90), or empty if it has no table
ARCH=$($PY -c 'import torch; a = "sm_%d%d" % torch.cuda.get_device_capability()
print(a if a in ("sm_80", "sm_89", "sm_90") else "")' 2>/dev/null || echo "")

# part NAME SECONDS CMD...: run CMD under a time limit, its output in $OUT/NAME.log, a line in the summary
part() {
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
    local began=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local code=$?
    echo "   $name: exit $code after $((SECONDS - began))s (log $OUT/$name.log)" | tee -a "$SUMMARY"
    [ $code = 0 ] || failed=1
}

CUDA_TESTS=(tests/kernels/test_lora_linear_cuda.py tests/kernels/test_lora_linear_device_gates.py
            "tests/test_train.py::test_a_train_step_reads_nothing_back_from_the_device")
VIT_RUN=(-m engine.run --model vit_base_patch16_224 model.pretrained=false --strategy lora --precision bf16
         --steps 200 --eval-every 200 --batch-size 64 --loader torch data.workers=8
         data.knn_train_limit=1000 data.knn_test_limit=500 eval.knn_curve_limit=0 --out "$RUNS" --overwrite)

if [ $SMOKE = 1 ]; then
    part triton-aot 300 $PY -m bench.triton_aot --representative --arch sm_80 sm_90 --out "$OUT/triton-aot-smoke"
    part tests 120 $PY -m pytest -q --collect-only "${CUDA_TESTS[@]}"
    part kernels 60 $PY -m bench.kernels --help
    part loaders 60 $PY -m bench.loaders --help
    part vit-eager 120 $PY "${VIT_RUN[@]}" --name vit-b16-lora-bf16-eager --dry-run
    part vit-compiled 120 $PY "${VIT_RUN[@]}" --name vit-b16-lora-bf16-compiled --compile --dry-run
else
    if [ -n "$ARCH" ]; then
        part triton-aot 120 $PY -m bench.triton_aot --representative --arch "$ARCH" --out "$OUT/triton-aot-$ARCH"
        if [ $failed != 0 ]; then
            echo "error: a Triton launch does not fit this GPU (see $OUT/triton-aot.log); no GPU part was run" >&2
            cat "$SUMMARY"
            exit 1
        fi
    else
        echo "== triton-aot: no ahead-of-time table for this GPU (sm_80, sm_89, sm_90 only)" | tee -a "$SUMMARY"
    fi
    part tests 90 $PY -m pytest -q "${CUDA_TESTS[@]}"
    part kernels 120 $PY -m bench.kernels --out "$OUT/kernels-$DEVICE"
    part kernels-r128 90 $PY -m bench.kernels --rank 128 --shapes qkv proj --out "$OUT/kernels-$DEVICE-r128"
    part loaders 60 $PY -m bench.loaders --quick --sections files --out "$OUT/loaders-$DEVICE"
    part vit-eager 75 $PY "${VIT_RUN[@]}" --name vit-b16-lora-bf16-eager
    part vit-compiled 120 $PY "${VIT_RUN[@]}" --name vit-b16-lora-bf16-compiled --compile
    $PY - "$RUNS" >> "$SUMMARY" <<'EOF'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
speed = {}
for mode in ("eager", "compiled"):
    path = runs / f"vit-b16-lora-bf16-{mode}" / "results.json"
    if path.exists():
        speed[mode] = json.loads(path.read_text())["train_img_per_s"]
        print(f"ViT-B/16 LoRA bf16, train.compile {mode}: {speed[mode]:.1f} train img/s")
if len(speed) == 2:
    print(f"compiled / eager: {speed['compiled'] / speed['eager']:.3f}x")
EOF
fi
echo "summary: $SUMMARY"
cat "$SUMMARY"
exit $failed
