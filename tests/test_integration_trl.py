"""dcmdp.integrations.trl against the real TRL (1.16.0 here), on CPU with the tiny char-level Qwen3.

1. The loss: with TRL's ``loss_type="bnpo"`` (token mean) and the same clip, TRL's GRPO loss plus the
   DCMDP term equals dcmdp's core ``dcmdp`` / ``dcmdp_hinge`` / ``dcmdp_shaping`` loss on the same
   tensors, in value and in the gradient of every model parameter; the term alone equals the core's
   ``dcmdp/penalty``; the dual step reads the core's D.
2. A short training run (``use_vllm=False``, so the rollout reference is TRL's
   ``old_per_token_logps``): weights change, one dual step per optimizer step (not per micro-batch),
   the logged metrics are present, and the checkpoint holds the multiplier.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip(
    "trl", reason="TRL is not installed (scripts/install_integrations.sh installs trl 1.16.0)"
)

from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from dcmdp.integrations import LOSS_FORMS
from dcmdp.integrations.trl import MULTIPLIER_STATE_FILE, DCMDPGRPOConfig, DCMDPGRPOTrainer
from dcmdp.losses import LossInputs, LossSettings, get_policy_loss
from dcmdp.multiplier import LagrangeMultiplier

CLIP_LOW, CLIP_HIGH = 0.2, 0.28
PROMPTS = ["1+1=", "2+3=", "7-4=", "9+9="]


def reward_length(completions: list[str], **_: Any) -> list[float]:
    """Any reward with spread will do: the tests are about the loss, not about learning."""
    return [len(c) / 10.0 for c in completions]


def make_args(tmp_path: Path, **overrides: Any) -> DCMDPGRPOConfig:
    fields: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        num_iterations=2,  # without vLLM this makes TRL keep old_per_token_logps, DCMDP's reference
        learning_rate=5e-3,
        beta=0.0,
        loss_type="bnpo",
        epsilon=CLIP_LOW,
        epsilon_high=CLIP_HIGH,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=0,
        dcmdp_lambda_init=0.5,
        dcmdp_tolerance=0.002,
    )
    fields.update(overrides)
    return DCMDPGRPOConfig(**fields)


def make_trainer(model_dir: Path, args: GRPOConfig, cls: type = DCMDPGRPOTrainer) -> Any:
    return cls(
        model=str(model_dir),
        reward_funcs=reward_length,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


def micro_batch(trainer: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """A hand-built TRL micro-batch: ragged prompts and completions, and a rollout reference that differs."""
    g = torch.Generator().manual_seed(seed)
    B, P, T = 4, 3, 5
    vocab = trainer.model.config.vocab_size
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1], [1, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    prompt_ids = torch.randint(3, vocab - 64, (B, P), generator=g) * prompt_mask
    completion_ids = torch.randint(3, vocab - 64, (B, T), generator=g) * completion_mask
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1),
            T,
        )
    # The gap must be visible at these tiny probabilities (~1/128): shift log-probs by up to +-0.5.
    old = (logp + 0.5 * (2 * torch.rand(B, T, generator=g) - 1)).clamp(max=0.0)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.25, -1.0]),
        "num_items_in_batch": completion_mask.sum(),
        "old_per_token_logps": old,
    }


def loss_and_grads(trainer: Any, fn: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    trainer.model.zero_grad()
    loss = fn()
    loss.backward()
    grads = [p.grad.detach().clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("form", list(LOSS_FORMS))
def test_loss_matches_core_on_the_same_tensors(tiny_model_dir: Path, tmp_path: Path, form: str) -> None:
    # The update bound off: the whole gradient lands in param.grad (its split, p.grad + the
    # constraint's buffer, is checked against this in test_integration_trl_bound.py).
    args = make_args(tmp_path, dcmdp_loss_form=form, dcmdp_constraint_share=0.0)
    trainer = make_trainer(tiny_model_dir, args)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop in a real run
    inputs = micro_batch(trainer)
    lam, c = trainer.multiplier.value, trainer.multiplier.tolerance
    mask = inputs["completion_mask"].bool()
    T = inputs["completion_ids"].shape[1]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    core = get_policy_loss(LOSS_FORMS[form])
    settings = LossSettings(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, agg="token-mean", lam=lam, tolerance=c)
    holder: dict[str, Any] = {}

    def core_loss() -> torch.Tensor:
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, T)
        old = inputs["old_per_token_logps"]  # pi_old, and without vLLM also the rollout reference
        adv = inputs["advantages"][:, None].expand(-1, T)
        holder["out"] = core(LossInputs(logp, old, old, adv, mask), settings)
        return holder["out"].loss

    ref_loss, ref_grads = loss_and_grads(trainer, core_loss)
    ref = holder["out"]
    trl_loss, _ = loss_and_grads(trainer, lambda: GRPOTrainer._compute_loss(trainer, trainer.model, inputs))
    assert trainer.multiplier.steps == 0
    loss, grads = loss_and_grads(trainer, lambda: trainer._compute_loss(trainer.model, inputs))

    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-7)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    if form == "shaping":
        assert inputs["advantages"].dim() == 1  # TRL's buffered batch is left alone
        assert loss.item() != pytest.approx(trl_loss.item(), rel=1e-6)
    else:  # the DCMDP term alone is the core's penalty
        assert (loss - trl_loss).item() == pytest.approx(ref.metrics["dcmdp/penalty"].item(), rel=1e-4)
        assert ref.metrics["dcmdp/penalty"].item() > 0.0
    # One dual step, on the core's D (sync_gradients is True outside gradient accumulation).
    d = ref.metrics["dcmdp/prob_gap"].item()
    assert trainer.multiplier.steps == 1
    assert trainer.multiplier.value == pytest.approx(lam + 1.0 * (d - c))
    assert trainer._metrics["train"]["dcmdp/prob_gap"] == [pytest.approx(d, rel=1e-5)]
    assert trainer._metrics["train"]["discrepancy/prob_gap_mean"] == [pytest.approx(d, rel=1e-5)]


def test_short_training_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two optimizer steps of two micro-batches each: weights move, lambda moves once per step."""
    args = make_args(
        tmp_path,
        max_steps=2,
        gradient_accumulation_steps=2,
        save_strategy="steps",
        save_steps=2,
        learning_rate=2e-2,
    )
    trainer = make_trainer(tiny_model_dir, args)
    assert trainer.dcmdp_rollout_key == "old_per_token_logps"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no weight changed"
    assert trainer.multiplier.steps == 2  # once per optimizer step, not per micro-batch (4 of them)

    logs = [h for h in trainer.state.log_history if "dcmdp/lambda" in h]
    assert len(logs) == 2
    for key in ("dcmdp/lambda", "dcmdp/lambda_next", "dcmdp/prob_gap", "dcmdp/penalty", "dcmdp/tolerance"):
        assert all(key in h and math.isfinite(h[key]) for h in logs), key
    for key in ("discrepancy/prob_gap_mean", "discrepancy/kl_engine_trainer_k3", "discrepancy/prob_pearson"):
        assert all(key in h for h in logs), key
    # Step 1 runs on the weights that generated (D = 0); step 2 after an update (D > 0).
    gaps = [h["dcmdp/prob_gap"] for h in logs]
    assert gaps[0] == pytest.approx(0.0, abs=1e-6) and gaps[1] > 0.0
    replay = LagrangeMultiplier(init=0.5, eta=1.0, tolerance=0.002)
    for h, d in zip(logs, gaps):
        assert h["dcmdp/lambda"] == pytest.approx(replay.value)
        replay.update(d)
    assert trainer.multiplier.value == pytest.approx(replay.value)
    assert trainer.multiplier.value != pytest.approx(0.5)

    checkpoint = tmp_path / "out" / "checkpoint-2"
    state = json.loads((checkpoint / MULTIPLIER_STATE_FILE).read_text())
    assert state == trainer.multiplier.state_dict()
    resumed = make_trainer(tiny_model_dir, args)
    assert resumed.multiplier.value == pytest.approx(0.5)
    resumed.create_optimizer_and_scheduler(num_training_steps=2)
    resumed._load_optimizer_and_scheduler(
        str(checkpoint)
    )  # what Trainer.train(resume_from_checkpoint=...) calls
    assert resumed.multiplier.state_dict() == state


def test_invalid_settings_fail_clearly(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loss form"):
        make_args(tmp_path, dcmdp_loss_form="nope")
    with pytest.raises(ValueError, match="hinge"):
        make_args(tmp_path, dcmdp_loss_form="hinge", dcmdp_tolerance=None)
    with pytest.raises(ValueError, match="eta"):
        make_args(tmp_path, dcmdp_eta=-1.0)
    with pytest.raises(ValueError, match="num_iterations"):
        make_trainer(tiny_model_dir, make_args(tmp_path, num_iterations=1))
    plain = GRPOConfig(output_dir=str(tmp_path / "plain"), num_iterations=2, use_cpu=True, report_to=[])
    with pytest.raises(TypeError, match="DCMDPGRPOConfig"):
        make_trainer(tiny_model_dir, plain)


def test_trls_own_is_correction_is_off_unless_asked(tmp_path: Path) -> None:
    assert (
        GRPOConfig(output_dir=str(tmp_path / "p"), use_cpu=True).vllm_importance_sampling_correction is True
    )
    assert make_args(tmp_path).vllm_importance_sampling_correction is False
    assert make_args(tmp_path, vllm_importance_sampling_correction=True).vllm_importance_sampling_correction


@pytest.mark.parametrize(
    ("field", "value"), [("top_k", 50), ("top_p", 0.9), ("min_p", 0.05), ("repetition_penalty", 1.1)]
)
def test_sampling_filters_are_refused_with_engine_logprobs(
    tiny_model_dir: Path, tmp_path: Path, field: str, value: Any
) -> None:
    trainer = make_trainer(tiny_model_dir, make_args(tmp_path))
    setattr(trainer.dcmdp_args, field, value)
    with pytest.raises(ValueError, match=f"needs sampling without {field}"):
        trainer._check_sampling_filters()


def test_dual_step_reads_the_engine_gap_at_pi_old(tiny_model_dir: Path, tmp_path: Path) -> None:
    """vLLM + several optimizer steps per generation: the penalty acts on the current policy, the dual
    step reads |pi_old - mu| (TRL's old_per_token_logps against the sampling log-probs)."""
    trainer = make_trainer(tiny_model_dir, make_args(tmp_path))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.dcmdp_rollout_key = "sampling_per_token_logps"  # as with use_vllm=True
    inputs = micro_batch(trainer)
    g = torch.Generator().manual_seed(5)
    mu = (inputs["old_per_token_logps"] + 0.3 * torch.randn(4, 5, generator=g)).clamp(max=0.0)
    inputs["sampling_per_token_logps"] = mu
    mask = inputs["completion_mask"].bool()
    lam, c = trainer.multiplier.value, trainer.multiplier.tolerance
    trainer._compute_loss(trainer.model, inputs)
    d_old = float((inputs["old_per_token_logps"].exp() - mu.exp()).abs()[mask].mean())
    assert trainer._metrics["train"]["dcmdp/prob_gap"] == [pytest.approx(d_old, rel=1e-5)]
    assert trainer.multiplier.value == pytest.approx(lam + (d_old - c))
    # the logged per-micro-batch discrepancy is still the current policy's
    assert trainer._metrics["train"]["discrepancy/prob_gap_mean"][0] != pytest.approx(d_old, rel=1e-3)


def test_checkpoint_holds_lambda_before_trls_save_and_resume_needs_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = make_trainer(tiny_model_dir, make_args(tmp_path))
    trainer.state.global_step = 7

    def crash(self: Any, model: Any, trial: Any) -> None:
        raise RuntimeError("killed during TRL's save")

    monkeypatch.setattr(GRPOTrainer, "_save_checkpoint", crash)
    with pytest.raises(RuntimeError, match="killed"):
        trainer._save_checkpoint(trainer.model, None)
    saved = tmp_path / "out" / "checkpoint-7" / MULTIPLIER_STATE_FILE
    assert json.loads(saved.read_text()) == trainer.multiplier.state_dict()
    empty = tmp_path / "no-lambda"
    empty.mkdir()
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    monkeypatch.setattr(GRPOTrainer, "_load_optimizer_and_scheduler", lambda self, checkpoint: None)
    with pytest.raises(FileNotFoundError, match="no DCMDP multiplier state"):
        trainer._load_optimizer_and_scheduler(str(empty))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 20},
        {"top_p": 0.9},
        {"min_p": 0.1},
        {"repetition_penalty": 1.3},
        {"presence_penalty": 0.5},
        {"temperature": 0.7},
        {"logit_bias": {5: 3.0}},
    ],
)
def test_generation_kwargs_cannot_sneak_filters_past_the_check(
    tiny_model_dir: Path, tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    """TRL passes generation_kwargs to vLLM's SamplingParams last: they override top_k & co."""
    trainer = make_trainer(tiny_model_dir, make_args(tmp_path))
    trainer.dcmdp_args.generation_kwargs = kwargs
    with pytest.raises(ValueError, match="generation_kwargs"):
        trainer._check_sampling_filters()
    trainer.dcmdp_args.generation_kwargs = {
        "max_tokens": 8,
        "top_k": -1,
        "temperature": trainer.dcmdp_args.temperature,
    }
    trainer._check_sampling_filters()  # neutral values pass (vllm_mode "server" is not reached: no vLLM here)


def test_penalty_is_scaled_by_its_share_of_the_accumulation_window(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Gradient accumulation 2: a micro-batch of n tokens in a window of 2n carries half the penalty,
    so the two micro-batches together give lambda x the window's token mean."""
    trainer = make_trainer(tiny_model_dir, make_args(tmp_path, gradient_accumulation_steps=2))
    assert trainer.dcmdp_args.steps_per_generation == 2
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = micro_batch(trainer)
    n = inputs["completion_mask"].sum()
    inputs["num_items_in_batch"] = 2 * n  # TRL counts the whole generation batch: both micro-batches
    with torch.no_grad():
        trl_loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
        loss = trainer._compute_loss(trainer.model, inputs)
    penalty = trainer._metrics["train"]["dcmdp/penalty"][-1]
    assert penalty > 0
    assert (loss - trl_loss).item() == pytest.approx(penalty / 2, rel=1e-4)
