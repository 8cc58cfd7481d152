#!/usr/bin/env bash
# Installs the optional llama.cpp engine dependencies into $VENV (default .venv):
#   - gguf 0.19.0 (GGUF writer/reader and quantizers used by dcmdp.engines.gguf_export)
#   - llama-cpp-python 0.3.36, built from source with a PORTABLE CPU configuration.
# The default build uses -march=native, which on this VM enables AMX tiles that the hypervisor
# advertises but does not allow: every model then dies with "Illegal instruction". The flags
# below pin AVX2/FMA/F16C and turn native and AVX-512 off.
#
# The source build (about 5-9 minutes on 2 cores) happens once per machine: its wheel is kept in
#   ${DCMDP_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dcmdp/wheels}/<key>/
# where <key> covers the llama-cpp-python version, the CMake arguments, the Python ABI and the
# platform (a wheel built with other flags or for another Python is never reused), and later
# installs (a fresh clone, a new venv) install that wheel in seconds. The wheel is built into a
# temporary directory beside the cache and renamed into place, so an interrupted build leaves no
# entry; a cached wheel that fails to install or import is deleted and rebuilt. pip's own cache
# stays off (--no-cache-dir): it is keyed by the download URL only, not by CMAKE_ARGS, and could
# hand back a -march=native build. To force a rebuild, delete the <key> directory.
# DCMDP_LLAMACPP_CMAKE_ARGS replaces the portable CMake arguments (it is part of the key).
# Skipped entirely when llama_cpp already imports in $VENV.
set -euo pipefail
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
LLAMA_VERSION=0.3.36
PORTABLE_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_BMI2=ON -DGGML_AVX512=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF"
LLAMA_CMAKE_ARGS=${DCMDP_LLAMACPP_CMAKE_ARGS:-$PORTABLE_CMAKE_ARGS}
CACHE_ROOT=${DCMDP_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dcmdp/wheels}
log() { echo "[install_llamacpp] $*"; }

if [ ! -x "$PY" ]; then
  echo "[install_llamacpp] no python at $PY (set VENV=...)" >&2
  exit 1
fi
if "$PY" -c "import gguf" 2>/dev/null; then
  log "gguf already installed"
else
  log "gguf 0.19.0"
  "$PY" -m pip install --quiet "gguf==0.19.0"
fi

# Loads the shared library and asks ggml for its CPU features: a wheel built for another CPU or
# another Python fails here (in a child process, so even a SIGILL only fails the check).
llama_works() {
  "$PY" -c "import llama_cpp; llama_cpp.llama_print_system_info()" >/dev/null 2>&1
}

if llama_works; then
  log "llama-cpp-python already importable: skipping the build"
else
  # The cache key: everything the compiled wheel depends on besides the machine itself.
  ABI=$("$PY" -c "import platform, sys, sysconfig; print(sysconfig.get_config_var('SOABI') or sys.implementation.cache_tag, sysconfig.get_platform(), '-'.join(platform.libc_ver()), sep='|')")
  KEY_TEXT="llama-cpp-python==$LLAMA_VERSION|CMAKE_ARGS=$LLAMA_CMAKE_ARGS|$ABI"
  HASH=$(printf '%s' "$KEY_TEXT" | sha256sum | cut -c1-16)
  TAG=$("$PY" -c "import sys; print(sys.implementation.cache_tag)")
  KEY_DIR="$CACHE_ROOT/llama-cpp-python-$LLAMA_VERSION-$TAG-$HASH"
  mkdir -p "$CACHE_ROOT"
  # Leftovers of builds killed hard (the trap below cleans up everything else).
  find "$CACHE_ROOT" -maxdepth 1 -name '.tmp-*' -mmin +240 -exec rm -rf {} + 2>/dev/null || true

  cached_wheel() { compgen -G "$KEY_DIR/llama_cpp_python-$LLAMA_VERSION-*.whl" | head -n 1 || true; }

  install_wheel() {  # replaces whatever llama-cpp-python is installed by the wheel $1
    "$PY" -m pip uninstall --quiet -y llama-cpp-python >/dev/null 2>&1 || true
    "$PY" -m pip install --quiet --no-cache-dir "$1" && llama_works
  }

  WHEEL=$(cached_wheel)
  if [ -n "$WHEEL" ]; then
    log "installing the cached wheel $WHEEL"
    if install_wheel "$WHEEL"; then
      log "installed from the cache"
    elif "$PY" -m zipfile -t "$WHEEL" >/dev/null 2>&1 \
      && "$PY" -m pip install --quiet --no-cache-dir --no-deps --force-reinstall "$WHEEL" >/dev/null 2>&1 \
      && llama_works; then
      # The wheel works on its own: what failed was a dependency pip could not install (offline?).
      # That is not the wheel's fault, so the cache entry (a 5-25 minute build) is kept.
      log "the cached wheel works, but its dependencies did not install (see pip's message above)"
      exit 1
    else
      log "the cached wheel does not install or import here: deleting it and rebuilding"
      rm -f "$WHEEL"
      WHEEL=""
    fi
  fi

  if [ -z "$WHEEL" ]; then
    log "building llama-cpp-python $LLAMA_VERSION (portable CPU build, 5-9 minutes; once per machine)"
    start=$(date +%s)
    TMP=$(mktemp -d "$CACHE_ROOT/.tmp-build.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} CMAKE_ARGS="$LLAMA_CMAKE_ARGS" \
      "$PY" -m pip wheel --quiet --no-deps --no-cache-dir --wheel-dir "$TMP" "llama-cpp-python==$LLAMA_VERSION"
    BUILT=$(compgen -G "$TMP/llama_cpp_python-$LLAMA_VERSION-*.whl" | head -n 1 || true)
    if [ -z "$BUILT" ]; then
      echo "[install_llamacpp] pip wheel produced no llama_cpp_python wheel in $TMP" >&2
      exit 1
    fi
    log "build took $(($(date +%s) - start)) s"
    mkdir -p "$KEY_DIR"
    printf '%s\n' "$KEY_TEXT" >"$KEY_DIR/key.txt"
    # Same file system as $TMP: the rename is atomic, the entry is the whole wheel or nothing.
    mv -f "$BUILT" "$KEY_DIR/$(basename "$BUILT")"
    WHEEL="$KEY_DIR/$(basename "$BUILT")"
    log "cached $WHEEL"
    if ! install_wheel "$WHEEL"; then
      echo "[install_llamacpp] the freshly built wheel does not import: $WHEEL" >&2
      "$PY" -c "import llama_cpp; llama_cpp.llama_print_system_info()" || true
      rm -f "$WHEEL"
      exit 1
    fi
  fi
fi
"$PY" -c "import importlib.metadata as m, llama_cpp; print('[install_llamacpp] ok: gguf', m.version('gguf'), 'llama_cpp', llama_cpp.__version__)"
