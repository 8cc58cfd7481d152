"""`dcmdp probe --breakdown`: the gap split by trainer probability, entropy and response position."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dcmdp.breakdown import gap_breakdown, trainer_token_stats
from dcmdp.cli import main
from dcmdp.engines.base import EngineSpec, SamplingSettings, make_engine
from dcmdp.models import load_model
from dcmdp.rollout.batch import build_token_batch
from dcmdp.rollout.logprobs import sequence_logprobs

PROMPTS = [[5, 9, 12, 7], [20, 3, 3], [8, 8, 15, 2, 11]]


def test_bins_by_hand() -> None:
    # one row: a 2-token prompt (masked out), then 5 response tokens
    mask = torch.tensor([[False, False, True, True, True, True, True]])
    p_trainer = torch.tensor([[0.5, 0.5, 0.995, 0.3, 0.3, 0.05, 0.95]])
    p_engine = torch.tensor([[0.5, 0.5, 0.990, 0.2, 0.3, 0.10, 0.95]])
    entropy = torch.tensor([[0.0, 0.0, 0.005, 1.5, 0.7, 3.0, 0.2]])
    bins = gap_breakdown(p_trainer.log(), p_engine.log(), entropy, mask)
    by = {(b.axis, b.label): b for b in bins}
    alr = (p_trainer.log() - p_engine.log()).abs()[mask].double()
    total = float(alr.sum())
    top = by[("trainer prob", "[0.99, 1]")]
    assert top.tokens == 1 and top.prob_gap == pytest.approx(0.005, abs=1e-6)
    mid = by[("trainer prob", "[0.1, 0.5)")]
    assert mid.tokens == 2 and mid.abs_log_ratio == pytest.approx(math.log(1.5) / 2, rel=1e-5)
    assert mid.share == pytest.approx(math.log(1.5) / total, rel=1e-5)
    assert by[("entropy", "[2, inf)")].tokens == 1
    assert by[("entropy", "[1, 2)")].prob_gap == pytest.approx(0.1, abs=1e-6)
    # positions count from the first response token, not from the prompt
    assert by[("position", "[0, 4)")].tokens == 4 and by[("position", "[4, 16)")].tokens == 1
    assert by[("position", "[4, 16)")].abs_log_ratio == pytest.approx(0.0, abs=1e-6)
    for axis in ("trainer prob", "entropy", "position"):
        assert sum(b.tokens for b in bins if b.axis == axis) == 5
        assert sum(b.share for b in bins if b.axis == axis) == pytest.approx(1.0)


def test_tokens_outside_the_trainers_kept_set_are_left_out() -> None:
    mask = torch.ones(1, 3, dtype=torch.bool)
    trainer = torch.tensor([[math.log(0.5), float("-inf"), math.log(0.9)]])
    engine = torch.tensor([[math.log(0.4), math.log(0.01), math.log(0.9)]])
    bins = gap_breakdown(trainer, engine, torch.zeros(1, 3), mask)
    assert sum(b.tokens for b in bins if b.axis == "position") == 2
    # positions still count every response token: a long response with one impossible token early
    mask = torch.ones(1, 6, dtype=torch.bool)
    trainer = torch.full((1, 6), math.log(0.5))
    trainer[0, 1] = float("-inf")
    bins = gap_breakdown(trainer, torch.full((1, 6), math.log(0.4)), torch.zeros(1, 6), mask)
    by = {b.label: b.tokens for b in bins if b.axis == "position"}
    assert by["[0, 4)"] == 3 and by["[4, 16)"] == 2  # positions 0, 2, 3 and 4, 5
    assert all(math.isfinite(b.abs_log_ratio) for b in bins if b.tokens)


@pytest.mark.parametrize("sampling", [SamplingSettings(1.0, max_tokens=8), SamplingSettings(0.7, 0.9, 20, 8)])
def test_trainer_stats_match_the_trainer(tiny_model_dir: Path, sampling: SamplingSettings) -> None:
    engine = make_engine(EngineSpec(type="transformers", model=str(tiny_model_dir), dtype="float32"))
    result = engine.generate(PROMPTS, sampling, n=2, seed=0)
    batch = build_token_batch(PROMPTS, result.completions, None)
    model = load_model(tiny_model_dir).eval()
    logp, entropy = trainer_token_stats(model, batch, sampling, micro_batch=2)
    mask = batch.response_mask_BT
    with torch.no_grad():
        expected = sequence_logprobs(model, batch, sampling)
        logits = model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits[:, :-1]
    torch.testing.assert_close(logp[mask], expected[mask])
    # the entropy of the processed distribution, computed here the long way with Categorical
    from dcmdp.rollout.logprobs import process_logits

    processed = process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    reference = torch.distributions.Categorical(logits=processed).entropy()
    torch.testing.assert_close(entropy[mask], reference[mask], rtol=1e-4, atol=1e-5)
    assert float(entropy[mask].max()) > 0.1


def test_cli_breakdown_json_and_plot(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "bd.png"
    argv = ["probe", "--model", str(tiny_model_dir), "--setting", "transformers:float32:int4"]
    argv += [
        "--prompts",
        "4",
        "--samples",
        "2",
        "--max-tokens",
        "8",
        "--breakdown",
        "--json",
        "--plot",
        str(png),
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    bins = out["settings"][0]["breakdown"]
    assert {b["axis"] for b in bins} == {"trainer prob", "entropy", "position"}
    tokens = out["settings"][0]["metrics"]["discrepancy/num_tokens"]
    assert sum(b["tokens"] for b in bins if b["axis"] == "position") == tokens
    assert png.stat().st_size > 1000
    argv = ["probe", "--model", str(tiny_model_dir), "--setting", "transformers:bfloat16"]
    argv += ["--prompts", "2", "--samples", "2", "--max-tokens", "6", "--breakdown"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "gap of transformers:bfloat16 by the trainer's token probability, entropy and position" in text
    assert "| position | [0, 4) |" in text
