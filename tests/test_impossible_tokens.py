"""Tokens the engine sampled that the trainer's processed distribution gives probability 0.

Under top-k / top-p at another precision (bf16 vLLM, int4 weights) the engine's kept set differs
from the fp32 trainer's near the cut-off. Such sequences leave the loss and D (their
sequence-level importance weight pi/mu is 0), their rate is logged, and neither the discrepancy
check nor the KL-to-reference term may turn them into a crash or a NaN gradient.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dcmdp.checkpoint import read_metrics
from dcmdp.cli import main as cli_main
from dcmdp.engines.base import Completion
from dcmdp.logprobs import build_token_batch
from dcmdp.losses import kl_to_reference_k3
from dcmdp.trainer import drop_trainer_impossible

INF = math.inf
RATE = "discrepancy/trainer_impossible_token_rate"


def overrides(model_dir: Path, out: Path, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "model.path": str(model_dir),
        "task.name": "arithmetic",
        "run.steps": 2,
        "run.prompts_per_step": 8,
        "run.group_size": 4,
        "run.eval_every": 0,
        "run.checkpoint_every": 0,
        "run.tensorboard": False,
        "run.out_dir": str(out),
        "run.threads": 1,
        "sampling.max_tokens": 16,
        "optim.lr": 1e-3,
    }
    values.update(extra)
    return ["train", *(f"{k}={v}" for k, v in values.items())]


def train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


# ----------------------------------------------------------------------------- pure functions


def test_drop_takes_whole_sequences_out_and_counts_them() -> None:
    prompts = [[3, 4], [5]]
    completions = [
        Completion(0, [6, 7, 8], [-1.0, -2.0, -0.5], "length"),
        Completion(1, [9, 10], [-0.1, -0.2], "length"),
    ]
    batch = build_token_batch(prompts, completions, pad_id=0)
    old = torch.full_like(batch.engine_logp_BT, -INF)  # prompt / padding positions: anything
    old[batch.response_mask_BT] = torch.tensor([-1.0, -INF, -0.5, -0.1, -0.2])
    kept, counts = drop_trainer_impossible(batch, old)
    assert counts["discrepancy/trainer_impossible_tokens"] == 1
    assert counts[RATE] == pytest.approx(1 / 5)
    assert counts["discrepancy/trainer_impossible_seq_frac"] == pytest.approx(1 / 2)
    # sequence 0 leaves entirely (not just its -inf token); sequence 1 is untouched
    assert not kept.response_mask_BT[0].any()
    assert torch.equal(kept.response_mask_BT[1], batch.response_mask_BT[1])
    assert torch.isfinite(old[kept.response_mask_BT]).all()
    # D for the dual step: over every sampled token, the impossible one at |0 - mu|
    from dcmdp.trainer import measure_discrepancy

    _, disc = measure_discrepancy(batch, old)
    engine = batch.engine_logp_BT[batch.response_mask_BT]
    trainer = old[batch.response_mask_BT]
    expected = float((trainer.exp() - engine.exp()).abs().mean())
    assert disc["discrepancy/prob_gap_mean"] == pytest.approx(expected, rel=1e-6)
    assert disc["discrepancy/prob_gap_mean"] > disc["discrepancy/prob_gap_mean_kept"]
    # the other measures a constraint can read count it too, at their clamp (|log r| = 20)
    log_r = (trainer - engine).clamp(-20, 20)
    k3 = float((torch.expm1(log_r) - log_r).double().mean())
    assert disc["discrepancy/kl_engine_trainer_k3"] == pytest.approx(k3, rel=1e-6) and k3 > 3
    assert disc["discrepancy/abs_log_ratio_mean"] == pytest.approx(float(log_r.abs().mean()), rel=1e-6)
    for key in ("discrepancy/kl_engine_trainer_k3", "discrepancy/abs_log_ratio_mean"):
        assert disc[key] > disc[key + "_kept"]
    # nothing impossible: the same batch object comes back
    fine = old.clone()
    fine[batch.response_mask_BT] = -1.0
    same, counts = drop_trainer_impossible(batch, fine)
    assert same is batch and counts["discrepancy/trainer_impossible_tokens"] == 0


def test_kl_k3_is_finite_with_minus_inf_at_masked_positions() -> None:
    # prompt / padding positions at -inf on both sides (top-k), as the trainer produces them
    logp = torch.tensor([[-INF, -1.0, -2.0, -INF]], requires_grad=True)
    ref = torch.tensor([[-INF, -1.5, -2.0, -INF]])
    mask = torch.tensor([[False, True, True, False]])
    kl = kl_to_reference_k3(logp, ref, mask)
    kl.backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    log_r = torch.tensor(-0.5)
    expected = float(log_r.exp() - 1 - log_r) / 2
    assert float(kl) == pytest.approx(expected, rel=1e-6)
    # d k3 / d logp = 1 - exp(log_r) > 0 when ref < pi: the penalty pulls pi down towards ref
    assert float(logp.grad[0, 1]) == pytest.approx((1 - math.exp(-0.5)) / 2, rel=1e-5)
    assert float(logp.grad[0, 2]) == 0.0 and float(logp.grad[0, 0]) == 0.0


def test_kl_k3_bounds_a_token_the_reference_cannot_sample() -> None:
    logp = torch.tensor([[-1.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-INF, -0.5]])
    kl = kl_to_reference_k3(logp, ref, torch.tensor([[True, True]]))
    kl.backward()
    assert math.isfinite(float(kl)) and float(kl) == pytest.approx(10.0 / 2)
    assert torch.isfinite(logp.grad).all()


# ----------------------------------------------------------------------------- real engines


def test_int4_transformers_engine_with_top_k_trains(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    # Measured in the review: 512 of 1995 sampled tokens had trainer probability 0 (int4, top_k=5)
    out = tmp_path / "int4"
    argv = overrides(
        tiny_model_dir,
        out,
        **{"engine.type": "transformers", "engine.dtype": "float32", "engine.quantization": "int4"},
        **{"sampling.top_k": 5, "sampling.max_tokens": 8, "loss.type": "tis"},
    )
    assert cli_main(argv) == 0  # died at step 1 before ("logp_BT has ... -inf value(s)")
    rows = train_rows(out)
    assert len(rows) == 2
    assert max(r[RATE] for r in rows) > 0.01, "the int4 engine should sample trainer-impossible tokens"
    for r in rows:
        frac = r["discrepancy/trainer_impossible_seq_frac"]
        assert frac >= r[RATE] > 0  # whole sequences leave, not single tokens
        # D (over every sampled token) is measured either way; an update runs if samples are left
        assert math.isfinite(r["discrepancy/prob_gap_mean"])
        assert ("loss/total" in r) == (frac < 1)
    assert any(r["discrepancy/trainer_impossible_seq_frac"] < 1 for r in rows)
    # most of the batch is lost here (75-91% measured): the trainer says so, once
    printed = capsys.readouterr().out
    assert printed.count("of this step's samples hold a token the trainer gives probability 0") == 1
    # the response length counts every sample, dropped ones too
    assert all(r["response/mean_tokens"] > 1 for r in rows)


def test_kl_to_reference_with_top_k_has_finite_gradients(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kl"
    argv = overrides(
        tiny_model_dir,
        out,
        **{"engine.type": "transformers", "engine.dtype": "float32", "loss.kl_coef": 0.05},
        # the update bound off: it holds the policy still where only the constraint has a gradient
        **{"sampling.top_k": 5, "optim.lr": 1e-2, "loss.constraint_share": 0},
    )
    assert cli_main(argv) == 0  # stopped with "gradient norm became nan" at step 1 before
    rows = train_rows(out)
    assert all(math.isfinite(r["optim/grad_norm"]) and math.isfinite(r["loss/kl_ref"]) for r in rows)
    assert rows[-1]["loss/kl_ref"] > 0  # step 2's policy has moved away from the reference


@pytest.mark.vllm
@pytest.mark.parametrize("filt", [{"sampling.top_k": 5}, {"sampling.top_p": 0.9}])
def test_bf16_vllm_with_sampling_filter_trains_and_logs_the_rate(
    tiny_model_dir: Path, tmp_path: Path, filt: dict[str, object]
) -> None:
    pytest.importorskip("vllm")
    out = tmp_path / "vllm"
    argv = overrides(tiny_model_dir, out, **{"engine.type": "vllm", "engine.dtype": "bfloat16"}, **filt)
    assert cli_main(argv) == 0  # died at step 1 with top_k=5 before
    rows = train_rows(out)
    assert len(rows) == 2
    for r in rows:
        assert 0.0 <= r[RATE] < 0.5
        assert math.isfinite(r["loss/total"]) and math.isfinite(r["discrepancy/prob_gap_mean"])
