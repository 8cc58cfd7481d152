"""TRL's vLLM colocate path with DCMDPGRPOTrainer, on the real vLLM (the CPU build here, 0.32;
TRL 1.16 warns that it supports vLLM up to 0.31, and runs).

What it checks, each run in its own process (tests/trl_vllm_worker.py):

- D comes from vLLM's sampling log-probs (``sampling_per_token_logps``) and TRL's own importance
  correction is off (DCMDPGRPOConfig's default); TRL's vLLM runs at the dtype vLLM picks for this
  float32 checkpoint (bfloat16 on the CPUs seen so far: a real engine mismatch);
- D at the first step matches ``dcmdp probe`` at that dtype on the same model (other prompts and
  samples: within a factor 4);
- TRL's weight sync works here: while the weights move, D stays at that floor. With the sync
  switched off (``--break-sync``) the same check fails, by a factor of about 100.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "trl", reason="TRL is not installed (scripts/install_integrations.sh installs trl 1.16.0)"
)
pytest.importorskip("vllm")

WORKER = Path(__file__).with_name("trl_vllm_worker.py")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]


PACKED_LINEARS = "'Parameter' object has no attribute 'weight_loader'"


def run_worker(model_dir: Path, out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(WORKER), str(model_dir), str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=out.parent,
    )
    if done.returncode != 0 and PACKED_LINEARS in done.stderr:
        # TRL pushes each parameter with the vLLM model's own load_weights; where vLLM's CPU backend
        # packs the linear weights (seen on AMD Zen 4 with AVX-512, not on Zen 3 with AVX2) it has
        # replaced them by plain Parameters without a loader, so TRL's colocate sync cannot run.
        pytest.skip(
            "CPU capability: vLLM's CPU backend packed the linear weights on this CPU, so TRL's "
            f"colocate weight push fails upstream ({PACKED_LINEARS})"
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def stays_at_floor(steps: list[dict]) -> bool:
    first = steps[0]["d"]
    return all(s["d"] < 20 * first for s in steps[1:])


def test_trl_vllm_colocate_measures_the_engine_gap(tiny_model_dir: Path, tmp_path: Path) -> None:
    good = run_worker(tiny_model_dir, tmp_path / "good.json")
    assert good["rollout_key"] == "sampling_per_token_logps"
    assert good["is_correction"] is False
    # vLLM picks the dtype for this float32 checkpoint (bfloat16 on the CPUs seen so far); the
    # probe below runs at the same one, so the comparison holds whichever it picks
    dtype = good["vllm_dtype"]
    assert dtype in ("bfloat16", "float16", "float32")
    assert len(good["steps"]) == 4 and good["max_weight_change"] > 1e-2
    assert good["steps"][0]["d"] > 0
    assert stays_at_floor(good["steps"]), good["steps"]

    probe = subprocess.run(
        [
            *(sys.executable, "-m", "dcmdp.cli", "probe", "--model", str(tiny_model_dir)),
            *(
                "--setting",
                f"vllm:{dtype}",
                "--prompts",
                "8",
                "--samples",
                "4",
                "--max-tokens",
                "8",
                "--json",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    d_probe = json.loads(probe.stdout)["settings"][0]["metrics"]["discrepancy/prob_gap_mean"]
    assert d_probe / 4 < good["steps"][0]["d"] < 4 * d_probe, (good["steps"][0]["d"], d_probe)

    broken = run_worker(tiny_model_dir, tmp_path / "broken.json", "--break-sync")
    assert broken["steps"][0]["d"] == pytest.approx(good["steps"][0]["d"])  # same start
    assert not stays_at_floor(broken["steps"]), broken["steps"]
