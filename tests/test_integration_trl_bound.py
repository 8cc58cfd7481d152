"""The update bound in dcmdp.integrations.trl (``dcmdp_constraint_share``), against the real TRL on CPU.

1. The split is exact: with the bound on, ``param.grad`` holds TRL's surrogate gradient alone and
   ``param.grad + buffer`` equals the gradient of the same loss with the bound off, for one and for
   two accumulated micro-batches, whatever factor the loss is scaled by before its backward pass.
2. Two optimizer steps through ``Trainer.train`` equal ShareBoundedAdamW steps fed by hand with the
   recorded policy and constraint gradients, both scaled by one clip factor from the norm of their sum.
3. The defaults per loss form, and the settings the bound refuses.
4. A short run logs the bound's metrics and takes its dual steps; a resumed run restores the
   optimizer's whole state (the constraint's moments and displacement averages included).

The exactness tests run in float32 (``bf16=False``): under bf16 autocast TRL's chunked LM head rounds
the logits' gradient to bf16, so two backward passes differ from one by that rounding.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip(
    "trl", reason="TRL is not installed (scripts/install_integrations.sh installs trl 1.16.0)"
)

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer

from dcmdp import integrations
from dcmdp.grad_share import ShareBoundedAdamW
from dcmdp.integrations.trl import DCMDPGRPOConfig, DCMDPGRPOTrainer
from test_integration_trl import PROMPTS, make_args, make_trainer, micro_batch, reward_length


def flat_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def as_dense(grads: list[torch.Tensor | None], params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g.detach().clone() for g, p in zip(grads, params)]


def accumulate(trainer: Any, batches: list[dict[str, Any]], scale: float, loss_fn: Any) -> list[float]:
    """Backward of ``scale * loss`` for each micro-batch, as Trainer's loop does; returns the losses."""
    values = []
    for inputs in batches:
        loss = loss_fn(trainer.model, inputs)
        (scale * loss).backward()
        values.append(float(loss.detach()))
    return values


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("form", ["penalty", "hinge"])
def test_split_is_exact(
    tiny_model_dir: Path, tmp_path: Path, form: str, micro_batches: int, checkpointing: bool
) -> None:
    def build(share: float) -> Any:
        args = make_args(
            tmp_path,
            dcmdp_loss_form=form,
            dcmdp_constraint_share=share,
            gradient_accumulation_steps=micro_batches,
            bf16=False,
        )
        trainer = make_trainer(tiny_model_dir, args)
        if checkpointing:  # as Trainer.train turns it on (GRPOConfig's default), non-reentrant
            trainer.model.gradient_checkpointing_enable()
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = micro_batches  # set by the training loop
        return trainer

    bounded, plain = build(0.5), build(0.0)
    assert bounded.update_bound == 0.5 and plain.update_bound == 0.0
    batches = [micro_batch(bounded, seed=s) for s in range(micro_batches)]
    window = sum(b["completion_mask"].sum() for b in batches)
    for b in batches:
        b["num_items_in_batch"] = window  # TRL counts the whole accumulation window
    # Trainer divides the loss by the accumulation steps where TRL does not (loss_is_scaled_for_ga):
    # the buffer must carry whatever factor the backward pass applies.
    scale = 1.0 / micro_batches

    params = list(bounded.model.parameters())
    full_losses = accumulate(plain, batches, scale, plain._compute_loss)
    full = as_dense([p.grad for p in plain.model.parameters()], params)
    losses = accumulate(bounded, batches, scale, bounded._compute_loss)
    policy = as_dense([p.grad for p in params], params)
    constraint = as_dense(bounded._constraint.grads, params)
    bounded.model.zero_grad(set_to_none=True)
    accumulate(bounded, batches, scale, lambda m, b: GRPOTrainer._compute_loss(bounded, m, b))
    surrogate = as_dense([p.grad for p in params], params)

    assert losses == pytest.approx(full_losses, rel=1e-6)  # the logged loss still holds the term
    assert flat_norm(constraint) > 1e-3 * flat_norm(full)  # the constraint's gradient is not negligible
    # float32 rounding of two backward passes against one: ~1e-7 of the largest gradient entry
    atol = 1e-5 * max(float(f.abs().max()) for f in full)
    for f, pol, con, sur in zip(full, policy, constraint, surrogate):
        torch.testing.assert_close(pol + con, f, rtol=1e-5, atol=atol)
        torch.testing.assert_close(pol, sur, rtol=1e-6, atol=1e-9)


class RecordingTrainer(DCMDPGRPOTrainer):
    """Records, at each optimizer step's clip (the clip of ``max_grad_norm`` or, when that is 0, Trainer's
    measurement of the norm), the weights and both parts of the gradient before clipping."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, list[torch.Tensor]]] = []
        self.loaded_state: dict[str, Any] | None = None

    def _clip_and_hand_over(self, max_norm: float) -> torch.Tensor:
        buffer = self._constraint_buffer()
        self.seen.append(
            {
                "weights": [p.detach().clone() for p in buffer.params],
                "policy": as_dense([p.grad for p in buffer.params], buffer.params),
                "constraint": as_dense(buffer.grads, buffer.params),
            }
        )
        return super()._clip_and_hand_over(max_norm)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            assert self._bounded_optimizer is not None
            self.loaded_state = copy.deepcopy(self._bounded_optimizer.state_dict())


def recording_trainer(model_dir: Path, args: DCMDPGRPOConfig) -> RecordingTrainer:
    trainer: RecordingTrainer = make_trainer(model_dir, args, cls=RecordingTrainer)
    return trainer


@pytest.mark.parametrize("max_norm", [1e-3, 0.0])
def test_optimizer_steps_match_share_bounded_adamw_fed_by_hand(
    tiny_model_dir: Path, tmp_path: Path, max_norm: float
) -> None:
    """Two steps of two micro-batches: step 1 runs on the weights that generated (D = 0, a zero
    constraint gradient), step 2 after an update (the constraint's gradient is not 0). A small
    max_grad_norm makes the clip bind; 0 turns clipping off (Trainer then only measures the norm)."""
    lr, betas, eps, wd = 1e-2, (0.8, 0.99), 1e-6, 0.1
    args = make_args(
        tmp_path,
        max_steps=2,
        gradient_accumulation_steps=2,
        learning_rate=lr,
        adam_beta1=betas[0],
        adam_beta2=betas[1],
        adam_epsilon=eps,
        weight_decay=wd,
        max_grad_norm=max_norm,
        lr_scheduler_type="constant",
        bf16=False,
    )
    trainer = recording_trainer(tiny_model_dir, args)
    trainer.train()
    assert len(trainer.seen) == 2

    # The reference: Trainer's parameter groups, the arguments' hyperparameters, dcmdp's optimizer.
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    ref_params = [torch.nn.Parameter(w.clone()) for w in trainer.seen[0]["weights"]]
    ref = ShareBoundedAdamW(
        [
            {"params": [p for n, p in zip(names, ref_params) if n in decay], "weight_decay": wd},
            {"params": [p for n, p in zip(names, ref_params) if n not in decay], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=betas,
        eps=eps,
        kappa=0.5,
    )
    logs = [h for h in trainer.state.log_history if "dcmdp/constraint_scale" in h]
    assert len(logs) == 2
    for step, seen in enumerate(trainer.seen):
        for p, w in zip(ref_params, seen["weights"]):
            torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-7)  # the trainer's weights so far
        norm = flat_norm([g + c for g, c in zip(seen["policy"], seen["constraint"])])
        coef = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
        assert coef < 0.5 or max_norm == 0, "max_grad_norm must bind for this test to see the clip"
        assert logs[step]["grad_norm"] == pytest.approx(norm, rel=1e-5)
        for p, g in zip(ref_params, seen["policy"]):
            p.grad = g * coef
        ref.set_constraint_grads(ref_params, [c * coef for c in seen["constraint"]])
        ref.step()
        assert logs[step]["dcmdp/constraint_scale"] == pytest.approx(
            ref.last_metrics["dcmdp/constraint_scale"]
        )
        assert logs[step]["dcmdp/constraint_share"] == pytest.approx(
            ref.last_metrics["dcmdp/constraint_share"], rel=1e-5
        )
    assert flat_norm(trainer.seen[0]["constraint"]) == 0.0  # step 1: the gap is 0
    assert flat_norm(trainer.seen[1]["constraint"]) > 0.0
    for p, q in zip(ref_params, trainer.model.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-7)


def test_default_share_per_loss_form_and_invalid_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dcmdp train's defaults, alone and corrected; the constraint alone gets a value of its own
    # here so that the test tells which one is used whatever the defaults are
    assert (integrations.DEFAULT_CONSTRAINT_SHARE, integrations.CORRECTED_CONSTRAINT_SHARE) == (0.5, 0.25)
    monkeypatch.setattr(integrations, "DEFAULT_CONSTRAINT_SHARE", 0.5)
    assert make_args(tmp_path).dcmdp_options().update_bound() == 0.5  # penalty: dcmdp train's default
    assert make_args(tmp_path, dcmdp_loss_form="hinge").dcmdp_options().update_bound() == 0.5
    assert make_args(tmp_path, dcmdp_loss_form="shaping").dcmdp_options().update_bound() == 0.0
    assert make_args(tmp_path, dcmdp_constraint_share=0.25).dcmdp_options().update_bound() == 0.25
    assert make_args(tmp_path, dcmdp_constraint_share=0.0).dcmdp_options().update_bound() == 0.0
    # TRL's own correction on vLLM's samples makes the loss a composed one: dcmdp train's 0.25
    corrected = dict(use_vllm=True, vllm_importance_sampling_correction=True)
    assert make_args(tmp_path, **corrected).dcmdp_options().update_bound() == 0.25
    assert make_args(tmp_path, dcmdp_loss_form="hinge", **corrected).dcmdp_options().update_bound() == 0.25
    assert make_args(tmp_path, dcmdp_constraint_share=0.5, **corrected).dcmdp_options().update_bound() == 0.5
    assert make_args(tmp_path, dcmdp_loss_form="shaping", **corrected).dcmdp_options().update_bound() == 0.0
    # TRL's off-policy sequence mask is a correction with or without vLLM (allowed: see below)
    opsm = dict(off_policy_mask_threshold=0.5, dcmdp_allow_failed_composition=True)
    assert make_args(tmp_path, **opsm).dcmdp_options().update_bound() == 0.25
    # without vLLM TRL applies no IS correction, whatever the flag says
    assert make_args(tmp_path, vllm_importance_sampling_correction=True).dcmdp_options().update_bound() == 0.5
    assert (
        make_args(tmp_path, dcmdp_loss_form="shaping", dcmdp_constraint_share=0)
        .dcmdp_options()
        .update_bound()
        == 0.0
    )
    with pytest.raises(ValueError, match="'shaping'"):
        make_args(tmp_path, dcmdp_loss_form="shaping", dcmdp_constraint_share=0.5)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="dcmdp_constraint_share must be a finite number >= 0"):
            make_args(tmp_path, dcmdp_constraint_share=bad)


def trainer_with(model_dir: Path, args: DCMDPGRPOConfig, **kwargs: Any) -> DCMDPGRPOTrainer:
    return DCMDPGRPOTrainer(
        model=kwargs.pop("model", str(model_dir)),
        reward_funcs=reward_length,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        **kwargs,
    )


def test_the_optimizer_the_bound_builds_and_the_ones_it_refuses(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = make_args(tmp_path, weight_decay=0.1, adam_beta1=0.8, adam_epsilon=1e-6)
    trainer = trainer_with(tiny_model_dir, args)
    opt = trainer.create_optimizer()
    assert isinstance(opt, ShareBoundedAdamW) and opt.kappa == integrations.DEFAULT_CONSTRAINT_SHARE
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    by_id = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = [{by_id[id(p)] for p in g["params"]} for g in opt.param_groups]
    assert groups == [decay, set(by_id.values()) - decay] and decay and groups[1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.8, 0.999) and g["eps"] == 1e-6 for g in opt.param_groups)
    assert all(g["lr"] == args.learning_rate for g in opt.param_groups)
    # off (shaping's default, or 0): Trainer's own optimizer
    shaping = trainer_with(tiny_model_dir, make_args(tmp_path, dcmdp_loss_form="shaping"))
    assert type(shaping.create_optimizer()) is torch.optim.AdamW
    off = trainer_with(tiny_model_dir, make_args(tmp_path, dcmdp_constraint_share=0.0, optim="adafactor"))
    assert not isinstance(off.create_optimizer(), ShareBoundedAdamW)

    way_out = "dcmdp_constraint_share=0"
    with pytest.raises(ValueError, match=f"optim='adafactor'.*{way_out}"):
        trainer_with(tiny_model_dir, make_args(tmp_path, optim="adafactor"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=f"SGD.*{way_out}"):
        trainer_with(tiny_model_dir, make_args(tmp_path), model=model, optimizers=(sgd, None))
    with pytest.raises(ValueError, match=f"optimizer_cls_and_kwargs.*{way_out}"):
        trainer.optimizer = None
        trainer.optimizer_cls_and_kwargs = (torch.optim.SGD, {})  # Trainer's argument (GRPOTrainer has none)
        trainer._check_update_bound_setup()
    own = ShareBoundedAdamW(model.parameters(), lr=1e-3, kappa=0.3)
    with pytest.raises(ValueError, match=r"dcmdp_constraint_share=0\.3"):
        trainer_with(tiny_model_dir, make_args(tmp_path), model=model, optimizers=(own, None))
    accepted = trainer_with(
        tiny_model_dir, make_args(tmp_path, dcmdp_constraint_share=0.3), model=model, optimizers=(own, None)
    )
    assert accepted.create_optimizer() is own and accepted._bounded_optimizer is own


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("fp16", "fp16 mixed precision"),
        ("deepspeed", "DeepSpeed, FSDP"),
        ("fsdp", "DeepSpeed, FSDP"),
        ("transformers_sharded", "weights loaded sharded by transformers"),
        ("reentrant", "reentrant gradient checkpointing"),
    ],
)
def test_setups_the_bound_cannot_run_with_fail_clearly(
    tiny_model_dir: Path, tmp_path: Path, setting: str, message: str
) -> None:
    trainer = trainer_with(tiny_model_dir, make_args(tmp_path))
    trainer._check_update_bound_setup()  # the CPU setup passes
    if setting == "fp16":  # no GradScaler on this CPU: set what a GPU run with fp16=True has
        trainer.dcmdp_args.fp16 = True
    elif setting == "deepspeed":
        trainer.is_deepspeed_enabled = True
    elif setting == "fsdp":
        trainer.is_fsdp_enabled = True
    elif setting == "transformers_sharded":  # from_pretrained(distributed_config=...): DTensor weights
        trainer.is_distributed_loading_by_transformers = True
    else:
        trainer.dcmdp_args.gradient_checkpointing = True
        trainer.dcmdp_args.gradient_checkpointing_kwargs = {"use_reentrant": True}
    with pytest.raises(ValueError, match=f"{message}.*dcmdp_constraint_share=0"):
        trainer._check_update_bound_setup()


def test_short_run_logs_the_bound_and_resume_restores_the_optimizer(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = make_args(
        tmp_path, max_steps=2, gradient_accumulation_steps=2, save_strategy="steps", save_steps=2
    )
    trainer = recording_trainer(tiny_model_dir, args)
    trainer.train()
    assert trainer.multiplier.steps == 2  # the dual step, once per optimizer step
    assert trainer.multiplier.value != pytest.approx(0.5)
    logs = [h for h in trainer.state.log_history if "dcmdp/lambda" in h]
    assert len(logs) == 2
    for h in logs:
        assert 0.0 <= h["dcmdp/constraint_scale"] <= 1.0
        assert math.isfinite(h["dcmdp/constraint_share"])
    opt = trainer._bounded_optimizer
    assert isinstance(opt, ShareBoundedAdamW) and opt.state
    saved = opt.state_dict()
    moved = [st for st in saved["state"].values() if float(st["exp_avg_c"].abs().sum()) > 0]
    assert moved, "the constraint's moments stayed 0: the resume check below would prove nothing"

    resumed = recording_trainer(
        tiny_model_dir, make_args(tmp_path, max_steps=3, gradient_accumulation_steps=2)
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    loaded = resumed.loaded_state
    assert loaded is not None and isinstance(resumed._bounded_optimizer, ShareBoundedAdamW)
    assert loaded["state"].keys() == saved["state"].keys()
    for key, state in saved["state"].items():
        assert loaded["state"][key].keys() == state.keys()
        for name, value in state.items():
            torch.testing.assert_close(loaded["state"][key][name], value, rtol=0, atol=0)
    assert resumed.multiplier.steps == 3

    # the same checkpoint resumed with the bound off: torch's AdamW, holding the policy part's
    # moments only (not ShareBoundedAdamW's extra state, which it would otherwise save for good)
    plain = make_trainer(
        tiny_model_dir,
        make_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, dcmdp_constraint_share=0.0),
    )
    plain.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    inner = getattr(plain.optimizer, "optimizer", plain.optimizer)
    assert type(inner) is torch.optim.AdamW
    assert inner.state and all(st.keys() == {"step", "exp_avg", "exp_avg_sq"} for st in inner.state.values())


def test_a_new_train_call_starts_with_an_empty_constraint_buffer(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """What an interrupted window left in the buffer (an exception between two micro-batches) does
    not reach the next train() call's first optimizer step; Trainer zeroes param.grad likewise."""
    trainer = recording_trainer(tiny_model_dir, make_args(tmp_path, max_steps=1))
    buffer = trainer._constraint_buffer()
    buffer.add_grads([torch.full_like(p, 1e6) for p in buffer.params], torch.ones(()))
    trainer._constraint_this_step = True
    trainer._dcmdp_window += torch.tensor([1e6, 1.0], dtype=torch.float64)
    trainer.train()
    seen = trainer.seen[0]["constraint"]
    assert max(float(g.abs().max()) for g in seen) < 1e3  # the stale 1e6 is gone
    assert trainer.multiplier.steps == 1
    logged = [h["dcmdp/prob_gap"] for h in trainer.state.log_history if "dcmdp/prob_gap" in h]
    assert logged and logged[-1] < 1.0  # nor the stale gap sum in D (it would be about 1e6)


def test_the_compositions_measured_to_fail_are_refused_unless_allowed(tmp_path: Path) -> None:
    """TRL's OPSM and sequence truncation are dcmdp's opsm and seq_tis, whose composition with the
    constraint `dcmdp train` refuses: so does the TRL config, naming the setting, unless allowed."""
    with pytest.raises(ValueError, match=r"off_policy_mask_threshold=0.5 \(dcmdp's opsm: DCMDP \+ OPSM"):
        make_args(tmp_path, off_policy_mask_threshold=0.5)
    truncate = dict(
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode="sequence_truncate",
    )
    with pytest.raises(ValueError, match=r"sequence_truncate.*seq_tis.*dcmdp_allow_failed_composition=True"):
        make_args(tmp_path, **truncate)
    with pytest.raises(ValueError, match=r"opsm.* and .*seq_tis"):  # both named at once
        make_args(tmp_path, off_policy_mask_threshold=0.5, **truncate)
    for form in ("hinge", "shaping"):
        with pytest.raises(ValueError, match="refused"):
            make_args(tmp_path, dcmdp_loss_form=form, off_policy_mask_threshold=0.5)
    allowed = make_args(
        tmp_path, dcmdp_allow_failed_composition=True, off_policy_mask_threshold=0.5, **truncate
    )
    assert [name for _, name in allowed.failed_compositions()] == ["opsm", "seq_tis"]
    # without vLLM the advice leaves out the vLLM correction's modes (they do nothing there)
    with pytest.raises(ValueError) as no_vllm:
        make_args(tmp_path, off_policy_mask_threshold=0.5)
    assert "sequence_mask" not in str(no_vllm.value) and "kappa 0.25" in str(no_vllm.value)
    assert "loss.constraint_share" not in str(no_vllm.value)  # dcmdp train's option name: not here
    # the corrections whose composition held, and truncation without vLLM (TRL applies none), pass
    for mode in ("sequence_mask", "token_truncate", "token_mask"):
        corrected = dict(use_vllm=True, vllm_importance_sampling_correction=True)
        assert (
            make_args(tmp_path, vllm_importance_sampling_mode=mode, **corrected).failed_compositions() == []
        )
    assert make_args(tmp_path, vllm_importance_sampling_mode="sequence_truncate").failed_compositions() == []


def test_a_refused_composition_set_after_the_config_is_refused_by_the_trainer(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = make_args(tmp_path)
    args.off_policy_mask_threshold = 0.5  # after __post_init__ ran
    with pytest.raises(ValueError, match=r"off_policy_mask_threshold=0\.5"):
        trainer_with(tiny_model_dir, args)
    args.dcmdp_allow_failed_composition = True
    assert trainer_with(tiny_model_dir, args).dcmdp_args.failed_compositions() == [
        ("off_policy_mask_threshold=0.5", "opsm")
    ]
