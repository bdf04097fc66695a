#!/usr/bin/env bash
# The GPU benchmark in one command, on a Linux machine with one CUDA GPU (H100/H200 class), from the repo:
#   bash bench/gpu.sh                      # environment, `pytest -m gpu`, then python bench/gpu.py (~8 min, H100)
#   GPU_BENCH_VLLM=1 bash bench/gpu.sh     # also the vLLM environment (.venv-vllm) and the `engine: vllm` rows
#   bash bench/gpu.sh --only pretrain ppo_hf   # other arguments go to bench/gpu.py (`--help` lists them)
#   bash bench/gpu.sh --dry-run            # no install, no GPU: bench/gpu.py --dry-run into bench/out/gpu-dry-run
# 1. Environment. GPU_BENCH_ENV (default .venv) is used when its torch sees CUDA. Otherwise one is created (.venv,
#    or bench/out/venv-gpu when .venv is the CPU setup's) from a Python whose torch is a CUDA build, with
#    --system-site-packages so the image's torch and CUDA libraries are the ones used; with no such Python,
#    torch==<requirements/cpu.lock's version> comes from the index (PyPI's Linux wheel is a CUDA build;
#    GPU_BENCH_TORCH names another spec). Then requirements/cpu.lock minus torch (a filtered copy), `pip install
#    --no-deps -e '.[test]'` and bitsandbytes (the QLoRA GPU test). A step is skipped when what it installs is there
#    already, so an offline machine with the dependencies needs no index (pip's PIP_INDEX_URL/PIP_FIND_LINKS work).
#    GPU_BENCH_VLLM=1: .venv-vllm with CUDA vLLM (VLLM_CUDA=1 bash requirements/vllm.sh, else pip install vllm).
# 2. `pytest -m gpu` (offline Hub), at most GPU_BENCH_TEST_S seconds (120); GPU_BENCH_SKIP_TESTS=1 skips it.
# 3. python bench/gpu.py --deadline-s <what is left of GPU_BENCH_BUDGET_S (480), which steps 2 and 3 share, counted
#    after step 1>: writes bench/results/gpu.json and gpu.md; parts left at the deadline are recorded as skipped.
# Exit status: non-zero when the environment, the tests or a benchmark part failed (results are written anyway).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

say() { echo "[gpu.sh] $*"; }

DRY=0
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then DRY=1; else ARGS+=("$arg"); fi
done

if [ "$DRY" = 1 ]; then
  PY=${GPU_BENCH_PYTHON:-}
  [ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python; } || PY=python3
  OUT=${GPU_BENCH_OUT:-bench/out/gpu-dry-run}
  say "dry run with $PY into $OUT (no install, no tests, no GPU)"
  exec "$PY" bench/gpu.py --dry-run --out "$OUT" ${ARGS[@]+"${ARGS[@]}"}
fi

cuda_torch() {  # does interpreter $1 have a torch that sees a CUDA device?
  "$1" -c 'import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' \
    >/dev/null 2>&1
}

# ----------------------------------------------------------------------------------------- 1. environment
SETUP_T0=$(date +%s)
TORCH=$(sed -n 's/^torch==//p' requirements/cpu.lock | head -1)
TORCH=${TORCH%%+*}  # a local version such as +cpu names the CPU wheel
ENV=${GPU_BENCH_ENV:-.venv}
if [ -z "${GPU_BENCH_ENV:-}" ] && [ -x "$ENV/bin/python" ] && ! cuda_torch "$ENV/bin/python" \
    && "$ENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
  say "$ENV has a torch without CUDA (the CPU setup): the GPU environment is bench/out/venv-gpu"
  ENV=bench/out/venv-gpu
fi
if [ ! -x "$ENV/bin/python" ]; then
  BASE=""
  for candidate in ${PYTHON:-} python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && cuda_torch "$candidate"; then BASE=$candidate; break; fi
  done
  mkdir -p "$(dirname "$ENV")"
  if [ -n "$BASE" ]; then
    say "creating $ENV from $BASE, whose torch is a CUDA build (--system-site-packages: the image's torch is used)"
    "$BASE" -m venv --system-site-packages "$ENV" || exit 1
  else
    say "creating $ENV (no Python here has a CUDA torch: ${GPU_BENCH_TORCH:-torch==$TORCH} comes from the index)"
    "${PYTHON:-python3}" -m venv "$ENV" || exit 1
  fi
fi
ENV=$(cd "$ENV" && pwd)  # absolute: some checks run from another directory
PY=$ENV/bin/python
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if ! cuda_torch "$PY"; then
  say "installing ${GPU_BENCH_TORCH:-torch==$TORCH} into $ENV"
  "${PIP[@]}" "${GPU_BENCH_TORCH:-torch==$TORCH}" || { say "torch did not install"; exit 1; }
  if ! cuda_torch "$PY"; then
    say "the torch in $ENV sees no CUDA device: $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
    exit 1
  fi
fi
say "torch: $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())')"

LOCK=$(mktemp "${TMPDIR:-/tmp}/gpu-bench-lock.XXXXXX")
trap 'rm -f "$LOCK"' EXIT
grep -v -E '^(torch|torchvision|torchaudio|triton)==' requirements/cpu.lock > "$LOCK"
lock_mismatch() {  # the lock's packages that are missing or at another version in $PY, counted, then a few
  "$PY" - "$LOCK" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

bad = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].split(";")[0].strip()
    if "==" not in line:
        continue
    name, want = (part.strip() for part in line.split("==", 1))
    try:
        have = version(name.split("[")[0])
    except PackageNotFoundError:
        have = None
    if have != want:
        bad.append(f"{name} {have or 'missing'} (lock {want})")
print(len(bad), "; ".join(bad[:4]))
EOF
}
MISMATCH=$(lock_mismatch)
if [ "${MISMATCH%% *}" != 0 ]; then
  say "installing requirements/cpu.lock without torch (${MISMATCH})"
  if ! "${PIP[@]}" -r "$LOCK"; then
    say "the lock did not install (another Python version, or no index?): installing the project's ranges instead"
    "${PIP[@]}" -e '.[test]' || say "the project's ranges did not install either"
  fi
fi
if ! (cd / && "$PY" -c "import pipeline, sys; sys.exit(0 if pipeline.__file__.startswith('$PWD/') else 1)") \
    >/dev/null 2>&1; then
  say "installing this repo: pip install --no-deps -e '.[test]'"
  "${PIP[@]}" --no-deps -e '.[test]' || "${PIP[@]}" --no-deps --no-build-isolation -e '.[test]' \
    || say "the editable install failed (bench/gpu.py and pytest still import it from the repo root)"
fi
if ! "$PY" -c 'import bitsandbytes' >/dev/null 2>&1; then
  say "installing ${GPU_BENCH_BNB:-bitsandbytes} (the QLoRA GPU test)"
  "${PIP[@]}" "${GPU_BENCH_BNB:-bitsandbytes}" || say "no bitsandbytes: the QLoRA GPU test will be skipped"
fi
if ! "$PY" -c 'import torch, transformers, trl, peft, accelerate, datasets, yaml, pydantic, pytest'; then
  say "the environment $ENV lacks a dependency (above); see the pip output"
  exit 1
fi

VLLM_PY=${GPU_BENCH_VLLM_PYTHON:-.venv-vllm/bin/python}
cuda_vllm() {
  "$1" -c 'import importlib.util, sys, torch; sys.exit(0 if importlib.util.find_spec("vllm") and torch.cuda.is_available() else 1)' \
    >/dev/null 2>&1
}
if [ "${GPU_BENCH_VLLM:-0}" = 1 ] && ! cuda_vllm "$VLLM_PY"; then
  VLLM_ENV=$(dirname "$(dirname "$VLLM_PY")")
  if [ -z "${GPU_BENCH_VLLM_PYTHON:-}" ] && [ -x "$VLLM_PY" ]; then
    say "$VLLM_ENV has no CUDA vLLM (the CPU build?): the GPU one is bench/out/venv-vllm-gpu"
    VLLM_ENV=bench/out/venv-vllm-gpu
    VLLM_PY=$VLLM_ENV/bin/python
  fi
  say "creating the vLLM environment $VLLM_ENV"
  if [ -f requirements/vllm.sh ]; then
    VLLM_CUDA=1 VLLM_ENV="$VLLM_ENV" bash requirements/vllm.sh || say "the vLLM environment did not install"
  else
    { [ -x "$VLLM_PY" ] || "${PYTHON:-python3}" -m venv "$VLLM_ENV"; } \
      && "$VLLM_PY" -m pip install -q --disable-pip-version-check "vllm${GPU_BENCH_VLLM_VERSION:+==$GPU_BENCH_VLLM_VERSION}" \
      || say "the vLLM environment did not install"
  fi
fi
say "environment ready in $(( $(date +%s) - SETUP_T0 )) s: $PY"

# ----------------------------------------------------------------------------------------- 2. pytest -m gpu
BUDGET=${GPU_BENCH_BUDGET_S:-480}
T0=$(date +%s)
TEST_RC=0
SUMMARY=""
if [ "${GPU_BENCH_SKIP_TESTS:-0}" != 1 ]; then
  TEST_S=${GPU_BENCH_TEST_S:-120}
  TESTLOG=$(mktemp "${TMPDIR:-/tmp}/gpu-bench-pytest.XXXXXX")
  trap 'rm -f "$LOCK" "$TESTLOG"' EXIT
  say "pytest -m gpu (at most $TEST_S s)"
  HF_HUB_OFFLINE=1 HF_HUB_DISABLE_XET=1 TOKENIZERS_PARALLELISM=false \
    timeout -k 10 "$TEST_S" "$PY" -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$TESTLOG"
  TEST_RC=${PIPESTATUS[0]}
  SUMMARY=$(grep -E '[0-9]+ (passed|failed|skipped|error|deselected)|no tests ran' "$TESTLOG" | tail -1 \
            | sed -E 's/=+//g; s/^ +//; s/ +$//')
  [ "$TEST_RC" = 124 ] && SUMMARY="timed out after $TEST_S s"
  [ "$TEST_RC" = 5 ] && TEST_RC=0  # no test selected is not a failure
  say "pytest -m gpu: ${SUMMARY:-no summary} (exit $TEST_RC) in $(( $(date +%s) - T0 )) s"
fi

# ----------------------------------------------------------------------------------------- 3. bench/gpu.py
LEFT=$(( BUDGET - ($(date +%s) - T0) - 5 ))
[ "$LEFT" -gt 0 ] || LEFT=1
say "bench/gpu.py with a deadline of $LEFT s"
timeout -k 30 $(( LEFT + 90 )) "$PY" bench/gpu.py --deadline-s "$LEFT" --vllm-python "$VLLM_PY" \
  ${SUMMARY:+--pytest "$SUMMARY"} ${ARGS[@]+"${ARGS[@]}"}
BENCH_RC=$?
say "done in $(( $(date +%s) - SETUP_T0 )) s (tests and bench $(( $(date +%s) - T0 )) s of $BUDGET): tests exit $TEST_RC, bench exit $BENCH_RC"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
