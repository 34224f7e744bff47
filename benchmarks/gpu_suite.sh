#!/usr/bin/env bash
# One command for every GPU claim, on one CUDA GPU in at most ~8 minutes; results in benchmarks/results/gpu/:
#   0. the wheels in .whl/ (`make gpu-wheels`, benchmarks/gpu/requirements.txt), installed with --no-index
#   1. the machine (CPU, ISA, versions; nvidia-smi) and the GPU runtimes there -> machine.json, nvidia-smi.txt,
#      runtimes.json (TensorRT and ONNX Runtime CUDA are recorded as unavailable where missing, not failed)
#   2. CPU side: synthetic data in the GTA5 (1914x1052) / Cityscapes (2048x1024) layouts, a random ResNet-101
#      checkpoint, its ONNX export at 1024x2048                              -> prepare.json (in the work folder)
#   3. the CUDA tests (pytest -k 'cuda or gpu or trt or tensorrt')           -> cuda_tests.txt
#   4. gta2city training steps (ResNet-101, 730x730, batch 4+4, adapt stage) for run.amp=off / bf16 / fp16, through
#      the real CLI: it/s, hours for 100k iterations (goal <= 3 h), peak CUDA memory -> train_speed.{md,json}
#   5. inference at 1024x2048: torch eager fp32 / fp16 / bf16 and torch.compile fp32 / fp16 with peak memory, and
#      TensorRT fp16 / INT8 and ONNX Runtime CUDA where installed; label agreement with torch fp32
#                                                                            -> gpu_inference.{md,json}
# Without a CUDA GPU it runs 0-2, checks that the test suite collects here, says so and exits 0. Nothing is
# downloaded: the GPU machine has no network. Each step has a time limit; a step that fails or times out is
# recorded in summary.md and the others still run (exit status 1 then).
#
# Environment (defaults are the real claim; tests use small values):
#   PYTHON (default .venv/bin/python, else python3)   GPU_SUITE_OUT (benchmarks/results/gpu)
#   GPU_SUITE_WORK (runs/gpu_suite)                  GPU_SUITE_IMAGES (8 per split)
#   GPU_SUITE_SOURCE_SIZE (1914x1052, WxH)           GPU_SUITE_TARGET_SIZE (2048x1024, WxH)
#   GPU_SUITE_EXPORT_SIZE (1024x2048, HxW)           GPU_SUITE_BACKBONE (resnet101)
#   GPU_SUITE_AMP (off,bf16,fp16)                    GPU_SUITE_ITERS (5,25: the two run lengths whose difference is timed)
#   GPU_SUITE_WHEELS (.whl: the wheels `make gpu-wheels` downloads)
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${GPU_SUITE_OUT:-benchmarks/results/gpu}
WORK=${GPU_SUITE_WORK:-runs/gpu_suite}
IMAGES=${GPU_SUITE_IMAGES:-8}
SOURCE_SIZE=${GPU_SUITE_SOURCE_SIZE:-1914x1052}
TARGET_SIZE=${GPU_SUITE_TARGET_SIZE:-2048x1024}
EXPORT_SIZE=${GPU_SUITE_EXPORT_SIZE:-1024x2048}
BACKBONE=${GPU_SUITE_BACKBONE:-resnet101}
AMP=${GPU_SUITE_AMP:-off,bf16,fp16}
ITERS=${GPU_SUITE_ITERS:-5,25}
START=$(date +%s)
STATUS=0
mkdir -p "$OUT" "$WORK"
SUMMARY="$OUT/summary.md"
{
  echo "# GPU suite"
  echo
  echo "Command: \`benchmarks/gpu_suite.sh\` ($(date -u +%Y-%m-%dT%H:%M:%SZ)); sizes: source $SOURCE_SIZE, target $TARGET_SIZE, export $EXPORT_SIZE, $BACKBONE, $IMAGES images per split."
  echo
} > "$SUMMARY"

say() { echo "gpu_suite: $*" >&2; echo "- $*" >> "$SUMMARY"; }

# step NAME LIMIT_SECONDS CMD...: run with a time limit, record the outcome and the seconds it took.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@"
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    say "$name: ok (${took} s)"
  elif [ $rc -eq 124 ]; then
    say "$name: TIMED OUT after ${limit} s"; STATUS=1
  else
    say "$name: FAILED (exit $rc, ${took} s)"; STATUS=1
  fi
  return $rc
}

# 0. Local wheels only: the GPU machine has no network.
WHL=${GPU_SUITE_WHEELS:-.whl}
if compgen -G "$WHL/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --find-links "$WHL" -r benchmarks/gpu/requirements.txt \
    && say "installed the wheels of $WHL (benchmarks/gpu/requirements.txt)" \
    || say "the wheels in $WHL did not all install (make gpu-wheels GPU_PYTHON=<the machine's Python>)"
fi

# 1. The machine, and which GPU runtimes it has.
"$PY" -c "import json, sys; sys.path.insert(0, '.'); from dass_deploy.machine import describe_machine; print(json.dumps(describe_machine(), indent=1))" > "$OUT/machine.json"
if command -v nvidia-smi > /dev/null 2>&1; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true; fi
if "$PY" benchmarks/gpu/bench_inference.py --probe > "$OUT/runtimes.json" 2> "$WORK/probe.log"; then
  "$PY" -c "import json, sys; [print(f'{k}: {v}') for k, v in json.load(open(sys.argv[1])).items()]" "$OUT/runtimes.json" \
    | while read -r line; do say "$line"; done
else
  say "runtime probe FAILED: $(tail -n 1 "$WORK/probe.log")"; STATUS=1
fi

# 2. CPU side.
step "prepare (data, checkpoint, ONNX export)" 150 "$PY" benchmarks/gpu/prepare.py --work "$WORK" \
  --source-size "$SOURCE_SIZE" --target-size "$TARGET_SIZE" --images "$IMAGES" --export-size "$EXPORT_SIZE" \
  --backbone "$BACKBONE" > "$WORK/prepare.log" 2>&1 || { cat "$WORK/prepare.log" >&2; exit 1; }

# The suite's own tests (tests/test_gpu_suite.py) build venvs with a package index: not here.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --ignore tests/test_gpu_suite.py -k "cuda or gpu or trt or tensorrt" tests)

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  step "test collection" 120 "${PYTEST[@]}" --collect-only > "$WORK/collect.txt" 2>&1 || tail -n 20 "$WORK/collect.txt" >&2
  say "no CUDA GPU here (torch.cuda.is_available() is False): ran the CPU-side preparation only; GPU figures not measured"
  echo "gpu_suite: no CUDA GPU; CPU-side preparation done in $(( $(date +%s) - START )) s" >&2
  exit $STATUS
fi

# 3. CUDA tests.
step "CUDA tests" 90 "${PYTEST[@]}" -x > "$OUT/cuda_tests.txt" 2>&1

# 4. Training speed.
step "gta2city training speed" 180 "$PY" benchmarks/gpu/train_speed.py --work "$WORK" --out "$OUT" --amp "$AMP" \
  --iters-short "${ITERS%,*}" --iters-long "${ITERS#*,}" --timeout 80 > "$WORK/train_speed.log" 2>&1

# 5. Inference: torch eager and torch.compile always; TensorRT and ONNX Runtime CUDA where installed.
step "inference (torch eager, torch.compile; TensorRT, ONNX Runtime CUDA if installed)" 300 \
  "$PY" benchmarks/gpu/bench_inference.py --work "$WORK" --out "$OUT" > "$WORK/bench_inference.log" 2>&1

say "total $(( $(date +%s) - START )) s"
for f in train_speed.md gpu_inference.md; do
  if [ -f "$OUT/$f" ]; then { echo; cat "$OUT/$f"; } >> "$SUMMARY"; fi
done
exit $STATUS
