"""Write tests/data/loss_reference.json: every policy loss of the flat registry on fixed random
float64 tensors (loss, gradient with respect to logp, metrics).

Generated once at commit 55d9e15, before the losses became a composition of an importance
correction and a constraint, so that tests/test_loss_composition.py can check that the old names
still compute what they computed then. Rerunning it after that change would only compare the new
code with itself: do not regenerate unless a loss is meant to change.

    python tests/data/make_loss_reference.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dcmdp.algo.losses import POLICY_LOSSES, LossInputs, LossSettings

OUT = Path(__file__).with_name("loss_reference.json")
NAMES = (
    "grpo",
    "tis",
    "icepop",
    "seq_tis",
    "seq_mis",
    "geo_mask",
    "offpolicy_seq_mask",
    "dcmdp",
    "dcmdp_shaping",
    "dcmdp_hinge",
)
SETTINGS = {
    "token-mean": dict(lam=0.7, tolerance=0.02, geo_low=0.9, geo_high=1.1, opsm_delta=-0.15),
    "seq-mean-token-sum": dict(
        agg="seq-mean-token-sum",
        lam=2.5,
        tolerance=0.05,
        seq_cap=1.5,
        tis_cap=1.2,
        icepop_high=1.5,
        geo_low=0.8,
        geo_high=1.3,
        opsm_delta=-0.1,
    ),
}


def reference_inputs() -> dict[str, torch.Tensor]:
    """Fixed float64 inputs: 6 sequences of up to 9 tokens, ragged mask, mixed-sign advantages."""
    g = torch.Generator().manual_seed(1234)
    B, T = 6, 9
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3.0
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    logp = torch.minimum(logp, torch.zeros_like(logp))
    engine = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    engine = torch.minimum(engine, torch.zeros_like(engine))
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    lengths = torch.tensor([9, 7, 3, 9, 1, 5])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return {"logp": logp, "old": old, "engine": engine, "adv": adv, "mask": mask}


def evaluate(name: str, settings: LossSettings, t: dict[str, torch.Tensor]) -> dict[str, object]:
    logp = t["logp"].clone().requires_grad_(True)
    out = POLICY_LOSSES[name](LossInputs(logp, t["old"], t["engine"], t["adv"], t["mask"]), settings)
    (grad,) = torch.autograd.grad(out.loss, logp)
    return {
        "loss": float(out.loss.detach()),
        "grad": grad.flatten().tolist(),
        "metrics": {k: float(v) for k, v in sorted(out.metrics.items())},
        "token_mean_part": None if out.token_mean_part is None else float(out.token_mean_part.detach()),
    }


def main() -> None:
    t = reference_inputs()
    record = {
        f"{name}/{label}": evaluate(name, LossSettings(**kwargs), t)  # type: ignore[arg-type]
        for name in NAMES
        for label, kwargs in SETTINGS.items()
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {len(record)} cases to {OUT}")


if __name__ == "__main__":
    main()
