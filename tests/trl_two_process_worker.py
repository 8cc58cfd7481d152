"""One rank of the two-process TRL test (tests/test_integration_trl_multiprocess.py).

Launched with ``python -m torch.distributed.run --nproc_per_node 2`` (gloo on CPU). Runs
``DCMDPGRPOTrainer`` on the tiny model for a few optimizer steps with gradient accumulation and
writes, per rank, everything the test checks independently:

- every micro-batch's tensors behind D (policy log-probs, rollout log-probs, mask) and its step;
- every dual step's D, lambda used and lambda after;
- on resume, lambda right after the checkpoint is loaded;
- the update bound (on by default): the optimizer's class, the logged ``dcmdp/constraint_*``
  metrics, and the final weights (DDP keeps them identical on every rank only if the constraint's
  gradient is averaged over the ranks like ``param.grad``).

    worker.py MODEL_DIR OUT_DIR MAX_STEPS [RESUME_CHECKPOINT]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from dcmdp.integrations.trl import DCMDPGRPOConfig
from trl_worker_common import PROMPTS, StepRecorder, reward_length


class RecordingTrainer(StepRecorder):
    """Also records every micro-batch's tensors behind D, and lambda right after a resume's load."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.micro: list[dict[str, Any]] = []
        self.loaded_lambda: float | None = None
        self.handovers: list[dict[str, Any]] = []

    def _dcmdp_term(self, capture: Any) -> Any:
        if self.model.training:
            self.micro.append(
                {
                    "step": len(self.steps),
                    "logp": capture.logp_BT.detach().cpu(),
                    "rollout": capture.rollout_logp_BT.detach().cpu(),
                    "mask": capture.mask_BT.cpu(),
                }
            )
        return super()._dcmdp_term(capture)

    def _clip_and_hand_over(self, max_norm: float) -> Any:
        """Records, per optimizer step, this rank's own constraint buffer before the all-reduce, the
        clip factor, and what the optimizer was handed (the averaged, clipped buffer)."""
        local = [None if g is None else g.detach().clone() for g in self._constraint_buffer().grads]
        norm = super()._clip_and_hand_over(max_norm)
        opt = self._bounded_optimizer
        assert opt is not None
        handed = [opt._constraint.get(p) for p in self._constraint_buffer().params]
        self.handovers.append(
            {
                "local": [None if g is None else g.cpu() for g in local],
                "handed": [None if g is None else g.detach().clone().cpu() for g in handed],
                "coef": min(1.0, max_norm / (float(norm) + 1e-6)),
            }
        )
        return norm

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.loaded_lambda = self.multiplier.value


def main() -> None:
    model_dir, out_dir, max_steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    args = DCMDPGRPOConfig(
        output_dir=str(out_dir / "trl"),
        per_device_train_batch_size=4,
        num_generations=4,
        gradient_accumulation_steps=2,
        num_iterations=2,
        max_completion_length=6,
        max_steps=max_steps,
        learning_rate=2e-2,
        beta=0.0,
        loss_type="bnpo",
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        seed=0,
        dcmdp_lambda_init=0.5,
        dcmdp_tolerance=0.002,
    )
    trainer = RecordingTrainer(
        model=model_dir,
        reward_funcs=reward_length,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train(resume_from_checkpoint=resume)
    tag = "resume" if resume else "first"
    torch.save(trainer.micro, out_dir / f"{tag}_micro_rank{rank}.pt")
    torch.save(trainer.handovers, out_dir / f"{tag}_handovers_rank{rank}.pt")
    (out_dir / f"{tag}_rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "world": int(os.environ["WORLD_SIZE"]),
                "steps": trainer.steps,
                "final_lambda": trainer.multiplier.value,
                "loaded_lambda": trainer.loaded_lambda,
                "optimizer": type(trainer._bounded_optimizer).__name__,
                "constraint_scale": [
                    h["dcmdp/constraint_scale"]
                    for h in trainer.state.log_history
                    if "dcmdp/constraint_scale" in h
                ],
                "weights": [p.detach().double().sum().item() for p in trainer.model.parameters()],
            }
        )
    )


if __name__ == "__main__":
    main()
