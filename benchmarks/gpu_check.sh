#!/usr/bin/env bash
# One-shot GPU check of hf-kan's Triton kernels (Group-Rational activation, metadata-masked attention): the CUDA
# correctness tests of both, then the benchmarks, everything written to one folder.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default: $OUT if set, else ./gpu_check_results
#
# Installs nothing: needs what a GPU image already has (a CUDA build of PyTorch, Triton, pytest; Transformers and
# PEFT for the tests that compare with the engine and for the KAT training step). hf_kan does not have to be
# installed: the script builds an importable view of the repository in a temporary folder (hf_kan/ plus patches/ as
# hf_kan.patches, as setup.py maps them), and if the full package still does not import (e.g. an older
# Transformers), a kernel-only view (hf_kan.errors and hf_kan.ops) so the kernel tests and benchmarks still run.
#
# Parts (GPU_CHECK_PARTS, default "tests attention vlm rational sweep", run in that order):
#   tests      CUDA correctness: tests/ops/test_attention_*.py and test_rational_*.py (every kernel test runs on
#              "cuda" as well as in the CPU interpreter; no-recompilation tests across lengths/batches)
#   attention  benchmarks/attention.py: kernel vs SDPA flash / efficient vs eager, 1k-16k tokens, fwd and fwd+bwd,
#              MMA, VAR, score taps, decode; memory; fraction of the measured bf16 matrix-product peak
#   vlm        benchmarks/vlm_kernel.py: the whole LLaVA-shaped model on the hf_kan backend's fused Triton path vs
#              its SDPA path vs stock sdpa (patches off / MMA / MMA + VAR + FastV), prefill and decode, memory, and
#              the logit difference between the two paths (needs the full package)
#   rational   benchmarks/rational.py: bf16 with the memory floor and the KAT-T vs ViT-T step, then fp32
#   sweep      benchmarks/attention.py --sweep: alternative launch configurations of the attention kernels at 4k
# Time: GPU_CHECK_BUDGET seconds in all (default 570, to fit a 10-minute command); each part runs under its own
# limit cut to what is left, and a part with under a minute left is skipped (rerun it with GPU_CHECK_PARTS). How
# long each part takes on a GPU has not been measured yet. Copy the tables into benchmarks/RESULTS.md with the card
# named.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$REPO/gpu_check_results}}"
PARTS="${GPU_CHECK_PARTS:-tests attention vlm rational sweep}"
BUDGET="${GPU_CHECK_BUDGET:-570}"
mkdir -p "$OUT_DIR"
cd "$REPO"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET HF_KAN_RATIONAL_BACKEND HF_KAN_ATTENTION_BACKEND
LOG="$OUT_DIR/log.txt"
: > "$LOG"
status=0
say() { echo "$*" | tee -a "$LOG"; }

# --- make hf_kan importable without installing anything ------------------------------------------------------
VIEW="$(mktemp -d)"
trap 'rm -rf "$VIEW"' EXIT
mkdir -p "$VIEW/full/hf_kan"
for entry in "$REPO"/hf_kan/*; do ln -s "$entry" "$VIEW/full/hf_kan/"; done
for mapped in patches eval model_cards; do
  [ -d "$REPO/$mapped" ] && ln -s "$REPO/$mapped" "$VIEW/full/hf_kan/$mapped"
done
# Python checks and pytest run from $VIEW: from the repository root, ./hf_kan (without hf_kan/patches) would shadow
# the view. Benchmarks run as scripts (their own folder first on sys.path), so they may start from the root.
in_view() { (cd "$VIEW" && "$@"); }
FULL=1
if in_view "$PY" -c "import hf_kan" 2>/dev/null; then
  say "hf_kan: installed package"
elif PYTHONPATH="$VIEW/full${PYTHONPATH:+:$PYTHONPATH}" in_view "$PY" -c "import hf_kan" 2>>"$LOG"; then
  export PYTHONPATH="$VIEW/full${PYTHONPATH:+:$PYTHONPATH}"
  say "hf_kan: repository view $VIEW/full"
else
  FULL=0
  mkdir -p "$VIEW/kernels/hf_kan"
  cat > "$VIEW/kernels/hf_kan/__init__.py" <<EOF
"""Kernel-only view of hf_kan for the GPU check: the full package did not import here (see log.txt)."""
__path__ = ["$REPO/hf_kan"]
EOF
  export PYTHONPATH="$VIEW/kernels${PYTHONPATH:+:$PYTHONPATH}"
  say "hf_kan: the full package does not import with this image's packages (error above); kernel-only view," \
      "engine-comparison tests and the KAT training step are skipped"
fi

{
  date -u
  nvidia-smi || true
  "$PY" - <<'EOF'
import platform, torch, triton
try:
    import transformers
    tv = transformers.__version__
except ImportError:
    tv = "not installed"
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "transformers", tv)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF
} 2>&1 | tee -a "$LOG"

run_part() {  # run_part NAME SECONDS CMD... : under min(SECONDS, budget left), output appended to the log
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 60 ]; then
    say "!! $name skipped: ${left}s of the ${BUDGET}s budget left (run it alone with GPU_CHECK_PARTS=...)"
    status=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "== $name (limit ${limit}s) =="
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && say "!! $name hit its ${limit}s limit"
  [ "$rc" -ne 0 ] && status=1
  say "== $name exit $rc =="
}

has_part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if has_part tests; then
  tests=("$REPO"/tests/ops/test_attention_triton.py "$REPO"/tests/ops/test_rational_{triton,dispatch,reference}.py)
  [ "$FULL" = 1 ] && tests+=("$REPO/tests/ops/test_attention_reference.py")
  extra=()
  in_view "$PY" -c "import xdist" 2>/dev/null && extra=(-n 8)
  # GPU_CHECK_PYTEST_ARGS: extra pytest arguments, e.g. "-k cuda" to run only the CUDA variants
  read -r -a user_args <<< "${GPU_CHECK_PYTEST_ARGS:-}"
  run_part tests 240 bash -c 'cd "$0" && exec "$@"' "$VIEW" "$PY" -m pytest "${tests[@]}" --rootdir "$REPO" -q -rs \
    -p no:cacheprovider -p no:benchmark "${extra[@]}" "${user_args[@]}" --junitxml="$OUT_DIR/tests.xml"
fi

if has_part attention; then
  run_part attention 300 "$PY" benchmarks/attention.py --json "$OUT_DIR/attention.json"
fi

if has_part vlm; then
  if [ "$FULL" = 1 ]; then
    run_part vlm 150 "$PY" benchmarks/vlm_kernel.py --json "$OUT_DIR/vlm_kernel.json"
  else
    say "!! vlm skipped: the full package does not import here"
    status=1
  fi
fi

if has_part rational; then
  step=()
  [ "$FULL" = 1 ] && step=(--model-step)
  run_part rational-bf16 240 "$PY" benchmarks/rational.py --device cuda --dtype bfloat16 "${step[@]}" \
    --csv "$OUT_DIR/rational_cuda_bf16.csv"
  run_part rational-fp32 120 "$PY" benchmarks/rational.py --device cuda --dtype float32 --models KAT-T KAT-B \
    --csv "$OUT_DIR/rational_cuda_fp32.csv"
fi

if has_part sweep; then
  run_part attention-sweep 360 "$PY" benchmarks/attention.py --sweep --json "$OUT_DIR/attention_sweep.json"
fi

say "exit status $status; results in $OUT_DIR"
exit $status
