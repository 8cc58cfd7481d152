"""Where does the gap come from? Apply an engine setting to one module group at a time.

``dcmdp probe --attribute`` answers, for a setting whose precision or quantization we control
(the Transformers engine's bfloat16 / float16 compute, or its weight-only int8 / int4 / int3 /
fp8), which part of the model the engine-vs-trainer gap comes from. The rest of the model stays
at the trainer's precision (float32), one group at a time:

    embeddings | attention | mlp (experts) | router | norms | lm_head      (and, per layer,
    attention.L, mlp.L, router.L)

Weight-only quantization touches exactly the weights the Transformers engine quantizes
(``quantizable_weight_names``: linear weights and expert stacks, never the lm_head, the
embeddings or, in Transformers 5's Qwen3-MoE, the router, which is not an ``nn.Linear``). A compute dtype casts each leaf module of the group (its weights, and its inputs
through a hook; outputs return to float32), so operations between leaf modules (attention's
softmax, the residual adds) stay in float32: an approximation of running the engine in that dtype.

Each variant scores the same token sequences (sampled once from the float32 model at T = 1) by
teacher forcing, against the float32 model: D = mean |pi - mu| and mean |log pi - log mu| over
the sampled tokens. A group's share is its gap over the full setting's gap. The shares need not
add up to 1 (the errors of several groups interact); their sum is reported beside them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dcmdp.engines.precision import group_label, in_groups, run_leaf_modules_in
from dcmdp.engines.quantize import quantizable_weight_names, quantize_weight
from dcmdp.rollout.batch import TokenBatch

WEIGHT_MODES = ("int8", "int4", "int3", "fp8")
DTYPE_MODES = ("bfloat16", "float16")


@dataclass(frozen=True)
class GroupGap:
    group: str
    prob_gap: float
    abs_log_ratio: float
    share: float
    """This group's mean |log ratio| over the full setting's."""


def with_setting(model: nn.Module, mode: str, select: Callable[[str], bool]) -> nn.Module:
    """A copy of the float32 ``model`` with ``mode`` applied to the parts ``select`` picks (by name)."""
    out = copy.deepcopy(model).eval()
    if mode in WEIGHT_MODES:
        params = dict(out.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name in quantizable_weight_names(out):
                if select(name):
                    params[name].copy_(quantize_weight(params[name], mode))
        return out
    if mode not in DTYPE_MODES:
        raise ValueError(
            f"attribution mode {mode!r} is unknown; valid: {', '.join(WEIGHT_MODES + DTYPE_MODES)}"
        )
    run_leaf_modules_in(out, getattr(torch, mode), select, lambda _name: torch.float32)
    return out


def token_gap(
    trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor
) -> tuple[float, float]:
    """(mean |pi - mu|, mean |log pi - log mu|) over the masked tokens."""
    t, e = trainer_logp[mask].double(), engine_logp[mask].double()
    return float((t.exp() - e.exp()).abs().mean()), float((t - e).abs().mean())


def attribute(
    model: nn.Module,
    batch: TokenBatch,
    mode: str,
    per_layer: bool = False,
    only: str | None = None,
    logprobs: Callable[[nn.Module, TokenBatch], torch.Tensor] | None = None,
) -> tuple[GroupGap, list[GroupGap]]:
    """The full setting's gap and each group's (sorted, largest first) on ``batch``.

    ``only``: a regular expression; the setting then applies only to parameter / module names it
    matches (to probe a setting that quantizes one module deliberately)."""
    from dcmdp.engines.base import SamplingSettings
    from dcmdp.rollout.logprobs import sequence_logprobs

    sampling = SamplingSettings(temperature=1.0, max_tokens=1)

    def score(m: nn.Module, b: TokenBatch) -> torch.Tensor:
        return logprobs(m, b) if logprobs is not None else sequence_logprobs(m, b, sampling)

    pattern = re.compile(only) if only else None

    def allowed(name: str) -> bool:
        return pattern is None or pattern.search(name) is not None

    mask = batch.response_mask_BT
    with torch.no_grad():
        reference = score(model.eval(), batch)
        full_model = with_setting(model, mode, allowed)
        d, r = token_gap(reference, score(full_model, batch), mask)
        full = GroupGap("full setting", d, r, 1.0)
        labels = sorted({group_label(n, per_layer) for n, _ in model.named_parameters()})
        rows = []
        for label in labels:

            def select(name: str, lab: str = label) -> bool:
                return allowed(name) and in_groups(name, [lab])

            variant = with_setting(model, mode, select)
            d_g, r_g = token_gap(reference, score(variant, batch), mask)
            rows.append(GroupGap(label, d_g, r_g, r_g / r if r > 0 else 0.0))
    rows.sort(key=lambda g: g.abs_log_ratio, reverse=True)
    return full, rows


def format_attribution(full: GroupGap, rows: list[GroupGap]) -> str:
    lines = [
        "| module group | D (prob gap) | mean abs log ratio | share of the full setting |",
        "|---|---|---|---|",
        f"| **{full.group}** | {full.prob_gap:.3e} | {full.abs_log_ratio:.3e} | 100% |",
    ]
    for g in rows:
        lines.append(f"| {g.group} | {g.prob_gap:.3e} | {g.abs_log_ratio:.3e} | {g.share:.0%} |")
    total = sum(g.share for g in rows)
    lines.append(f"\nShares add up to {total:.0%} of the full setting's gap (100% = additive).")
    return "\n".join(lines)


def plot_attribution(full: GroupGap, rows: list[GroupGap], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(rows) + 1.6))
    names = [g.group for g in rows][::-1]
    shares = [100 * g.share for g in rows][::-1]
    ax.barh(names, shares, color="tab:blue")
    ax.set_xlabel("share of the full setting's mean |log ratio| (%)")
    ax.set_title(
        f"{title}\nfull setting: {full.abs_log_ratio:.2e} nats/token, D {full.prob_gap:.2e}", fontsize=9
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
