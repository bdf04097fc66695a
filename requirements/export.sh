#!/usr/bin/env bash
# Install the optional `export` extra (GGUF for llama.cpp and Ollama: the `export` stage, `python -m pipeline export`)
# into the project's environment, at the versions this project was tested with:
#   bash requirements/export.sh             # PYTHON=/path/to/python to use another environment
#
# 1. llama-cpp-python, gguf and sentencepiece (pyproject.toml's `export` extra, pinned here). PyPI has no Linux wheel
#    of llama-cpp-python, so pip compiles llama.cpp from its source distribution: about 9 minutes on 2 cores (pip
#    keeps the built wheel in its cache, so a second install is quick). CMAKE_BUILD_PARALLEL_LEVEL sets the jobs.
# 2. llama.cpp's own converter (convert_hf_to_gguf.py, conversion/, gguf-py/), which no wheel installs, copied from the
#    same source distribution to <environment>/share/hf-pipeline/llama.cpp, where pipeline.tools.gguf looks for it
#    (LLAMA_CPP_DIR=<a llama.cpp checkout> uses another one). The converter runs with its own gguf-py, which is newer
#    than the PyPI `gguf` of the same version number.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LLAMA_CPP_PYTHON=0.3.36
GGUF=0.19.0
SENTENCEPIECE=0.2.3
DISKCACHE=5.6.3
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

"$PY" -m pip install -q -c requirements/cpu.lock "llama-cpp-python==$LLAMA_CPP_PYTHON" "gguf==$GGUF" \
  "sentencepiece==$SENTENCEPIECE" "diskcache==$DISKCACHE"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$tmp"
src="llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
tar -xzf "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$tmp" "$src/convert_hf_to_gguf.py" "$src/conversion" \
  "$src/gguf-py" "$src/LICENSE"
dest="$("$PY" -c 'import sys; print(sys.prefix)')/share/hf-pipeline/llama.cpp"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
cp -r "$tmp/$src" "$dest"
echo "$LLAMA_CPP_PYTHON" > "$dest/LLAMA_CPP_PYTHON_VERSION"
"$PY" -c 'import llama_cpp, gguf, sentencepiece; print("export extra: llama-cpp-python", llama_cpp.__version__)'
echo "llama.cpp converter: $dest"
