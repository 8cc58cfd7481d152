"""Measured bounds in place of loose ones (issue 11, item 6i).

``tests/test_probe.py`` checks the bfloat16 engine's gap with ``>= 0``, which a probe that compares
the trainer with itself (gap 0) or that drops the sampling settings (gap ~1) passes too. Here the
same run is checked against the value measured on it, with a margin for other CPUs' bfloat16
kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dcmdp.cli import main
from dcmdp.models import TinyModelSpec, build_tiny_model


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def probe_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32)
    return build_tiny_model(tmp_path_factory.mktemp("probe") / "tiny", spec=spec)


def probe(capsys: pytest.CaptureFixture, model_dir: Path, *settings: str) -> list[dict]:
    argv = ["probe", "--model", str(model_dir)]
    for s in settings:
        argv += ["--setting", s]
    argv += ["--prompts", "4", "--samples", "2", "--max-tokens", "8", "--top-k", "20"]
    argv += ["--temperature", "0.8", "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)["settings"]


def test_bfloat16_gap_is_the_measured_one(probe_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    fp32, bf16 = probe(capsys, probe_model_dir, "transformers:float32", "transformers:bfloat16")
    gap = "discrepancy/prob_gap_mean"
    alr = "discrepancy/abs_log_ratio_mean"
    print(f"float32: D {fp32['metrics'][gap]:.3g}, |log r| {fp32['metrics'][alr]:.3g}")
    print(f"bfloat16: D {bf16['metrics'][gap]:.3g}, |log r| {bf16['metrics'][alr]:.3g}")
    # float32 engine = trainer up to round-off (measured D 1e-8, |log r| 1e-7)
    assert fp32["metrics"][gap] < 1e-6 and fp32["metrics"][alr] < 1e-5
    # bfloat16 (measured D 2.4e-4, |log r| 4.8e-3 on a 2-core AMD EPYC): a real gap of bfloat16
    # size, within ~6x, neither 0 (the trainer against itself) nor the size of a lost setting
    assert 4e-5 < bf16["metrics"][gap] < 1.5e-3
    assert 8e-4 < bf16["metrics"][alr] < 3e-2
