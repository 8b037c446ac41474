#!/usr/bin/env bash
# One-shot GPU check of the Group-Rational Triton kernels: CUDA correctness tests, the kernel benchmark (with the
# memory-traffic floor) and a KAT-T vs ViT-T training step. Writes everything to one folder.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default: $OUT if set, else ./gpu_check_results
#
# Needs a CUDA build of PyTorch, Triton and this project importable (pip install -e . ; the script falls back to
# PYTHONPATH=<repo>). Takes about 3-6 minutes on one H100; no network. Copy the tables into benchmarks/RESULTS.md
# with the card named (see the "GPU checks" section there).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$REPO/gpu_check_results}}"
mkdir -p "$OUT_DIR"
cd "$REPO"
PY="${PYTHON:-python}"
if ! "$PY" -c "import hf_kan" 2>/dev/null; then
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET HF_KAN_RATIONAL_BACKEND
status=0

{
  date -u
  nvidia-smi || true
  "$PY" - <<'EOF'
import platform, torch, triton, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# 1. Correctness on CUDA: every test of the kernel files runs on "cuda" as well as in the CPU interpreter,
#    plus the no-recompilation and (with two GPUs) second-device tests; the slow sm_90 build test too.
echo "== tests ==" | tee "$OUT_DIR/tests.txt"
"$PY" -m pytest tests/test_rational_triton.py tests/test_rational_dispatch.py tests/test_rational_reference.py \
  -q -rs -p no:cacheprovider -n 4 2>&1 | tee -a "$OUT_DIR/tests.txt" || status=1
# without xdist installed, rerun serially
grep -q "unrecognized arguments: -n" "$OUT_DIR/tests.txt" && {
  "$PY" -m pytest tests/test_rational_triton.py tests/test_rational_dispatch.py tests/test_rational_reference.py \
    -q -rs -p no:cacheprovider 2>&1 | tee -a "$OUT_DIR/tests.txt" || status=1
}

# 2. Kernel benchmark, bf16 (the training dtype) with the memory floor, plus the KAT-T vs ViT-T training step.
echo "== benchmark bf16 ==" | tee "$OUT_DIR/bench_bf16.txt"
"$PY" benchmarks/rational.py --device cuda --dtype bfloat16 --model-step --csv "$OUT_DIR/rational_cuda_bf16.csv" \
  2>&1 | tee -a "$OUT_DIR/bench_bf16.txt" || status=1

# 3. fp32 kernels (KAT-T, KAT-B) for the floor fraction at 4-byte elements.
echo "== benchmark fp32 ==" | tee "$OUT_DIR/bench_fp32.txt"
"$PY" benchmarks/rational.py --device cuda --dtype float32 --models KAT-T KAT-B \
  --csv "$OUT_DIR/rational_cuda_fp32.csv" 2>&1 | tee -a "$OUT_DIR/bench_fp32.txt" || status=1

echo "exit status $status; results in $OUT_DIR"
exit $status
