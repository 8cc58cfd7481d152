#!/usr/bin/env bash
# Installs the optional llama.cpp engine dependencies into $VENV (default .venv):
#   - gguf 0.19.0 (GGUF writer/reader and quantizers used by dcmdp.gguf_export)
#   - llama-cpp-python 0.3.36, built from source with a PORTABLE CPU configuration.
# The default build uses -march=native, which on this VM enables AMX tiles that the hypervisor
# advertises but does not allow: every model then dies with "Illegal instruction". The flags
# below pin AVX2/FMA/F16C and turn native and AVX-512 off. The build takes about 5-9 minutes
# on 2 cores and is skipped when llama_cpp already imports.
set -euo pipefail
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "[install_llamacpp] no python at $PY (set VENV=...)" >&2
  exit 1
fi
if "$PY" -c "import gguf" 2>/dev/null; then
  echo "[install_llamacpp] gguf already installed"
else
  echo "[install_llamacpp] gguf 0.19.0"
  "$PY" -m pip install --quiet "gguf==0.19.0"
fi
if "$PY" -c "import llama_cpp" 2>/dev/null; then
  echo "[install_llamacpp] llama-cpp-python already importable: skipping the build"
else
  echo "[install_llamacpp] building llama-cpp-python 0.3.36 (portable CPU build, 5-9 minutes)"
  start=$(date +%s)
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_BMI2=ON -DGGML_AVX512=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF" \
    "$PY" -m pip install --no-cache-dir "llama-cpp-python==0.3.36"
  echo "[install_llamacpp] build took $(( $(date +%s) - start )) s"
fi
"$PY" -c "import importlib.metadata as m, llama_cpp; print('[install_llamacpp] ok: gguf', m.version('gguf'), 'llama_cpp', llama_cpp.__version__)"
