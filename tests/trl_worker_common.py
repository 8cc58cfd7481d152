"""What the TRL worker scripts (trl_two_process_worker.py, trl_vllm_worker.py) share: the prompts,
the reward, and a DCMDPGRPOTrainer that records each dual step. Imported from the scripts' own
folder, which Python puts first on sys.path when it runs them."""

from __future__ import annotations

from typing import Any

from dcmdp.integrations.trl import DCMDPGRPOTrainer

PROMPTS = ["1+1=", "2+3=", "7-4=", "9+9=", "4+4=", "8-1=", "5+2=", "6-6="]


def reward_length(completions: list[str], **_: Any) -> list[float]:
    """Any reward with spread will do: the workers check the multiplier, not learning."""
    return [len(c) / 10.0 for c in completions]


class StepRecorder(DCMDPGRPOTrainer):
    """Records D, the lambda used and the lambda after every dual step (``self.steps``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[dict[str, float]] = []

    def _dual_step(self, lam_used: float) -> None:
        super()._dual_step(lam_used)
        self.steps.append(
            {
                "d": self._metrics["train"]["dcmdp/prob_gap"][-1],
                "lam": lam_used,
                "lam_next": self.multiplier.value,
            }
        )
