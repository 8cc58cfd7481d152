"""dcmdp's verl loss ``"dcmdp"`` and its driver-side ``DCMDPController`` across training steps,
through as much of verl's own actor update as runs on this CPU machine.

The test drives, per step, on a tiny Qwen3 (``dcmdp.models.build_tiny_model``):

1. ``controller.push(worker, actor_cfg)``: verl's ``set_loss_fn`` receives ``partial(ppo_loss,
   config=...)`` with the current lambda; the test then calls exactly that function, as verl's
   ``TrainingWorker.train_batch`` does.
2. A padded batch built as verl's trainer holds it (``DataProto`` with input_ids, attention_mask,
   position_ids, prompts, responses, response_mask, old_log_probs, advantages), with
   ``rollout_is_weights`` from verl's ``compute_rollout_correction_weights`` (token level, threshold
   1e9, no batch normalisation), turned into verl's training layout by verl's own
   ``DataProto.to_tensordict`` and ``left_right_2_no_padding``, and split into micro-batches by
   verl's ``tensordict_utils.chunk_tensordict``; each micro-batch carries the global batch info
   (``dp_size``, ``batch_num_tokens``, ``global_batch_size``) the engine sets.
3. Per micro-batch: the model's log-probs in verl's no-padding layout (logits divided by the
   temperature, verl's ``logprobs_from_logits`` on the left-shifted labels, as the FSDP engine
   computes them), the pushed loss, backward; then one torch AdamW step for the mini-batch.
4. The metrics collected per micro-batch as ``TrainingWorker.train_mini_batch`` does
   (``Metric.aggregate_dp``), prefixed and reduced as verl's trainer ``_update_actor`` does
   (``rename_dict(..., "actor/")`` and ``reduce_metrics``), then ``controller.observe``.

Checks: lambda moves exactly as a ``LagrangeMultiplier`` replay on the D recomputed here from the
model and the batch; the loss of step 2 uses the lambda after step 1's dual step; the weights
change; the loss and metrics match dcmdp's core loss on the same tensors.

What could not run here, and why (verl 0.9.1, torch CPU, installed by
scripts/install_integrations.sh with --no-deps): verl 0.9.1 has no ``verl/workers/actor``
(``DataParallelPPOActor`` is gone); its actor update is ``TrainingWorker.train_mini_batch`` /
``train_batch`` over an engine from ``verl.workers.engine``, and that cannot be built on this
machine without patching verl:

- ``import verl.workers.engine`` fails: ``verl/workers/engine/fsdp/fsdp_turbo_impl.py`` imports
  ``verl.utils.fsdp_utils``, whose line 30 is ``from peft.utils.save_and_load import
  get_peft_model_state_dict`` -> ``ModuleNotFoundError: No module named 'peft'`` (peft is one of the
  dependencies --no-deps leaves out).
- With peft on the path (tried from a scratch directory), ``TrainingWorker.__init__`` calls
  ``initialize_global_process_group_ray``, whose default backend names NCCL because verl's platform
  detection has no CPU platform and falls back to 'nvidia' ("No supported accelerator detected ...
  Falling back to 'nvidia'"): ``RuntimeError: Distributed package doesn't have NCCL built in``.
- With a single-process gloo group initialised first, the FSDP engine's ``_init_device_mesh``
  calls ``init_device_mesh("cuda", ...)`` (``verl/workers/engine/fsdp/utils.py`` line 48), which
  calls ``torch.cuda.set_device``: ``AttributeError: module 'torch._C' has no attribute
  '_cuda_setDevice'`` on a CPU-only torch.

So the engine's forward (the same temperature convention and log-prob function) and its optimizer
step are reproduced here with the HF model and torch's AdamW; everything else listed above is verl's.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="verl is not installed (scripts/install_integrations.sh installs verl 0.9.1 with --no-deps)",
)

from dcmdp.integrations import LOSS_FORMS
from dcmdp.integrations.verl import (
    GAP_SUM_KEY,
    TOKENS_KEY,
    DCMDPController,
    DCMDPPolicyLossConfig,
)
from dcmdp.losses import LossInputs, LossSettings, get_policy_loss
from dcmdp.multiplier import LagrangeMultiplier

LAMBDA_INIT, ETA, TOL = 0.1, 1.0, 0.0005  # c below the D this set-up gives (about 2e-3)
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
TEMPERATURE = 0.7
LR = 1e-2
B, P, T = 4, 3, 5  # sequences, prompt slots (left-padded), response slots (right-padded)
PROMPT_LENS = [3, 2, 3, 1]
RESPONSE_LENS = [5, 4, 1, 2]  # micro-batches of 9 and 3 tokens: token mean != mean of means
N_MICRO = 2


class WorkerGroup:
    """Stands in for verl's RayWorkerGroup of ``TrainingWorker``s: ``set_loss_fn`` stores the loss
    (``TrainingWorker.set_loss_fn`` is ``self.loss_fn = loss_fn``), which ``train_batch`` then calls."""

    def __init__(self) -> None:
        self.loss_fn: Any = None
        self.pushed: list[Any] = []

    def set_loss_fn(self, loss_fn: Any) -> None:
        self.loss_fn = loss_fn
        self.pushed.append(loss_fn)


def _actor_config() -> Any:
    from verl.workers.config import ActorConfig

    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_mini_batch_size=B,
        ppo_micro_batch_size_per_gpu=B // N_MICRO,
        clip_ratio_low=CLIP_LOW,
        clip_ratio_high=CLIP_HIGH,
        loss_agg_mode="token-mean",
        policy_loss=DCMDPPolicyLossConfig(dcmdp_lambda_init=LAMBDA_INIT, dcmdp_eta=ETA, dcmdp_tolerance=TOL),
    )


def _padded_ids(vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids [B, P+T] (left-padded prompt, right-padded response), attention_mask, response_mask."""
    ids = torch.randint(1, vocab, (B, P + T), generator=g)
    attention = torch.zeros(B, P + T, dtype=torch.long)
    for i in range(B):
        attention[i, P - PROMPT_LENS[i] : P + RESPONSE_LENS[i]] = 1
    ids = ids * attention  # pad id 0
    return ids, attention, attention[:, P:].clone()


def _sequence_logp(model: Any, seq: torch.Tensor) -> torch.Tensor:
    """verl's engine convention on one unpadded sequence: logits / temperature, log-prob of the next
    token (labels rolled left by one), output aligned with the input (last entry: wrapped label)."""
    from verl.utils.torch_functional import logprobs_from_logits

    logits = model(input_ids=seq[None], position_ids=torch.arange(len(seq))[None]).logits[0]
    return logprobs_from_logits(logits / TEMPERATURE, torch.roll(seq, -1))


def _padded_response_logp(model: Any, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """log pi(response token) [B, T] in verl's padded layout (0 at padding), no grad."""
    out = torch.zeros(B, T)
    with torch.no_grad():
        for i in range(B):
            seq = ids[i][attention[i].bool()]
            lp = _sequence_logp(model, seq)
            p, n = PROMPT_LENS[i], RESPONSE_LENS[i]
            out[i, :n] = lp[p - 1 : p - 1 + n]
    return out


def _step_batch(model: Any, vocab: int, seed: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """A verl ``DataProto`` for one step, and the tensors the test checks against."""
    from verl.protocol import DataProto
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    g = torch.Generator().manual_seed(seed)
    ids, attention, response_mask = _padded_ids(vocab, g)
    mask = response_mask.bool()
    old = _padded_response_logp(model, ids, attention)  # the trainer's recompute of pi_old
    # the rollout engine's log-probs: pi_old off by a visible amount (engine / trainer mismatch)
    rollout = (old + 0.4 * torch.randn(B, T, generator=g)).clamp(max=-1e-3) * mask
    advantages = torch.randn(B, 1, generator=g).expand(B, T) * mask
    weights, _ = compute_rollout_correction_weights(
        log_ratio=old - rollout,
        response_mask=response_mask.float(),
        rollout_is="token",
        rollout_is_threshold=1.0e9,
        rollout_is_batch_normalize=False,
    )
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0) * attention
    batch = DataProto.from_dict(
        tensors={
            "input_ids": ids,
            "attention_mask": attention,
            "position_ids": position_ids,
            "prompts": ids[:, :P],
            "responses": ids[:, P:],
            "response_mask": response_mask,
            "old_log_probs": old,
            "advantages": advantages,
            "rollout_is_weights": weights,
        },
        meta_info={"temperature": TEMPERATURE},
    )
    ref = {"old": old, "rollout": rollout, "adv": advantages, "mask": mask}
    return batch, ref


def _update_actor(model: Any, optimizer: Any, loss_fn: Any, batch: Any) -> dict[str, Any]:
    """One actor update (one mini-batch, N_MICRO micro-batches, one optimizer step) with verl's data
    layout, loss call and metric handling; returns the reduced step metrics as verl's trainer has them."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import Metric, reduce_metrics
    from verl.utils.py_functional import append_to_dict, rename_dict
    from verl.workers.utils.padding import left_right_2_no_padding

    td = left_right_2_no_padding(batch.to_tensordict())
    batch_num_tokens = int(td["response_mask"].sum())
    optimizer.zero_grad()
    micro_metrics: dict[str, Any] = {}  # this rank's Metric per key, one value per micro-batch
    for micro in tu.chunk_tensordict(td, N_MICRO):
        tu.assign_non_tensor(micro, dp_size=1, batch_num_tokens=batch_num_tokens, global_batch_size=B)
        seqs = micro["input_ids"].unbind()
        log_probs = torch.nested.nested_tensor_from_jagged(
            torch.cat([_sequence_logp(model, s) for s in seqs]), offsets=micro["input_ids"].offsets()
        )
        # as the FSDP engine calls it (transformer_impl.py forward_step)
        loss, metrics = loss_fn(model_output={"log_probs": log_probs}, data=micro, dp_group=None)
        loss.backward()
        for key, metric in metrics.items():
            micro_metrics.setdefault(key, metric.init_list()).extend(metric)
    optimizer.step()
    # TrainingWorker.train_mini_batch: Metric.aggregate_dp over the (one) dp rank, one entry per
    # mini-batch; the trainer's _update_actor: rename_dict(..., "actor/") and reduce_metrics
    per_step: dict[str, list[Any]] = {}
    append_to_dict(per_step, {k: Metric.aggregate_dp([m]) for k, m in micro_metrics.items()})
    return reduce_metrics(rename_dict(per_step, "actor/"))


def _core_loss(ref: dict[str, torch.Tensor], logp: torch.Tensor, lam: float) -> Any:
    inputs = LossInputs(logp, ref["old"], ref["rollout"], ref["adv"], ref["mask"])
    settings = LossSettings(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, agg="token-mean", lam=lam, tolerance=TOL)
    return get_policy_loss(LOSS_FORMS["penalty"])(inputs, settings)


def test_controller_and_loss_across_verl_actor_updates(tiny_model_dir: Any) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.train()
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    actor_cfg = _actor_config()
    controller = DCMDPController.from_config(actor_cfg.policy_loss)
    replay = LagrangeMultiplier(init=LAMBDA_INIT, eta=ETA, tolerance=TOL)
    worker = WorkerGroup()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    lambdas_used, ds = [], []
    for step in range(3):
        controller.push(worker, actor_cfg)
        assert actor_cfg.policy_loss.dcmdp_lambda is None  # the driver's copy stays clean
        batch, ref = _step_batch(model, vocab, seed=100 + step)
        # D recomputed independently: the current policy (before this update) against the rollout
        current = _padded_response_logp(model, batch.batch["input_ids"], batch.batch["attention_mask"])
        mask = ref["mask"]
        d = float((current.exp() - ref["rollout"].exp()).abs()[mask].mean())
        expected = _core_loss(ref, current, replay.value)

        metrics = _update_actor(model, optimizer, worker.loss_fn, batch)
        logged = controller.observe(metrics)

        # (b) the loss ran with the lambda the controller holds now (after the previous dual step)
        assert metrics["actor/dcmdp/lambda"] == pytest.approx(replay.value, rel=1e-6, abs=1e-9)
        lambdas_used.append(metrics["actor/dcmdp/lambda"])
        # the actor saw every response token, and its D is the token mean recomputed here
        assert metrics[TOKENS_KEY] * N_MICRO == pytest.approx(float(mask.sum()))  # mean over micro-batches
        assert logged["dcmdp/prob_gap"] == pytest.approx(d, rel=1e-4)
        assert metrics["actor/pg_loss"] == pytest.approx(expected.loss.item(), rel=1e-4, abs=1e-6)
        # (a) lambda moves exactly as the core dual step on that D
        replay.update(d)
        ds.append(d)
        assert controller.value == pytest.approx(replay.value, rel=1e-5, abs=1e-8)
        assert logged["dcmdp/lambda_next"] == pytest.approx(replay.value, rel=1e-5, abs=1e-8)

    # D is well above c here, so lambda grew each step, and each step's loss saw a new lambda
    assert all(x > TOL for x in ds)
    assert lambdas_used[0] == pytest.approx(LAMBDA_INIT)
    assert lambdas_used[1] > lambdas_used[0] and lambdas_used[2] > lambdas_used[1]
    assert [fn.keywords["config"].policy_loss.dcmdp_lambda for fn in worker.pushed] == pytest.approx(
        lambdas_used
    )
    # (c) the updates changed the model
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, changed
    assert GAP_SUM_KEY in metrics
