"""Where in the distribution does the gap sit? ``dcmdp probe --breakdown``.

For any engine setting (vLLM included: only the sampled tokens and their engine log-probs are
needed) the per-token gap is split three ways, by properties the trainer can see:

- the trainer's probability of the sampled token (is the gap in the confident tokens or in the
  tail that T = 1 samples?);
- the entropy of the trainer's next-token distribution at that position (after the same
  temperature / top-k / top-p processing the engine sampled with);
- the token's position in the response (does it grow along the sequence?).

Each bin reports its tokens, D = mean |pi - mu| and mean |log pi - log mu| over them, and its
share of the batch's total |log ratio| (the shares of one breakdown add up to 1).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from dcmdp.engines.base import SamplingSettings
from dcmdp.rollout.batch import TokenBatch
from dcmdp.rollout.logprobs import forward_logits, process_logits

PROB_EDGES = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)
ENTROPY_EDGES = (0.0, 0.01, 0.1, 0.5, 1.0, 2.0, float("inf"))
POSITION_EDGES = (0, 4, 16, 64, 256, float("inf"))


@dataclass(frozen=True)
class GapBin:
    axis: str  # "trainer prob" | "entropy" | "position"
    label: str  # e.g. "[0.1, 0.5)"
    tokens: int
    prob_gap: float  # mean |pi - mu| over the bin's tokens (nan when empty)
    abs_log_ratio: float  # mean |log pi - log mu| (nan when empty)
    share: float  # the bin's sum of |log ratio| over the whole batch's


@torch.no_grad()
def trainer_token_stats(
    model: torch.nn.Module, batch: TokenBatch, sampling: SamplingSettings, micro_batch: int = 16
) -> tuple[Tensor, Tensor]:
    """(log pi of each target, entropy of the processed next-token distribution), both B x T."""
    B = batch.input_ids_BL.shape[0]
    device = next(model.parameters()).device
    logps, ents = [], []
    for start in range(0, B, max(micro_batch, 1)):
        rows = slice(start, start + micro_batch)
        logits = forward_logits(
            model, batch.input_ids_BL[rows].to(device), batch.attention_mask_BL[rows].to(device)
        )
        logp = torch.log_softmax(
            process_logits(logits[:, :-1], sampling.temperature, sampling.top_k, sampling.top_p), dim=-1
        )
        p = logp.exp()
        ents.append(-torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1).float().cpu())
        logps.append(
            logp.gather(-1, batch.targets_BT[rows].to(device).unsqueeze(-1)).squeeze(-1).float().cpu()
        )
    return torch.cat(logps), torch.cat(ents)


def _label(lo: float, hi: float, closed: bool) -> str:
    def fmt(x: float) -> str:
        return "inf" if x == float("inf") else f"{x:g}"

    return f"[{fmt(lo)}, {fmt(hi)}{']' if closed and hi != float('inf') else ')'}"


def _bins(axis: str, values: Tensor, edges: tuple[float, ...], gap: Tensor, alr: Tensor) -> list[GapBin]:
    total = float(alr.sum())
    out = []
    for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
        last = i == len(edges) - 2
        sel = (values >= lo) & ((values <= hi) if last else (values < hi))
        n = int(sel.sum())
        out.append(
            GapBin(
                axis=axis,
                label=_label(lo, hi, last),
                tokens=n,
                prob_gap=float(gap[sel].mean()) if n else float("nan"),
                abs_log_ratio=float(alr[sel].mean()) if n else float("nan"),
                share=float(alr[sel].sum()) / total if total > 0 else 0.0,
            )
        )
    return out


def gap_breakdown(
    trainer_logp_BT: Tensor, engine_logp_BT: Tensor, entropy_BT: Tensor, mask_BT: Tensor
) -> list[GapBin]:
    """The gap of the masked tokens binned by trainer probability, entropy and response position.

    Tokens whose trainer log-prob is not finite (outside the trainer's top-k / top-p set) are left
    out, as in the probe's other measures."""
    mask = mask_BT & torch.isfinite(trainer_logp_BT)
    # the index of each token within its response (response tokens are contiguous in a row)
    position_BT = mask_BT.long().cumsum(dim=1) - 1
    t, e = trainer_logp_BT[mask].double(), engine_logp_BT[mask].double()
    gap, alr = (t.exp() - e.exp()).abs(), (t - e).abs()
    return [
        *_bins("trainer prob", t.exp(), PROB_EDGES, gap, alr),
        *_bins("entropy", entropy_BT[mask].double(), ENTROPY_EDGES, gap, alr),
        *_bins("position", position_BT[mask].double(), POSITION_EDGES, gap, alr),
    ]


def format_breakdown(bins: list[GapBin]) -> str:
    lines = [
        "| by | bin | tokens | D (prob gap) | mean abs log ratio | share of the abs log ratio |",
        "|---|---|---|---|---|---|",
    ]
    for b in bins:
        if b.tokens:
            lines.append(
                f"| {b.axis} | {b.label} | {b.tokens} | {b.prob_gap:.3e} | {b.abs_log_ratio:.3e} | {b.share:.0%} |"
            )
    return "\n".join(lines)


def plot_breakdown(results: dict[str, list[GapBin]], path: str) -> None:
    """One panel per axis; one bar series per setting: mean |log ratio| per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = ("trainer prob", "entropy", "position")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    width = 0.8 / max(len(results), 1)
    for k, (setting, bins) in enumerate(results.items()):
        for ax, name in zip(axes, axes_names, strict=True):
            sel = [b for b in bins if b.axis == name]
            xs = [i + k * width for i in range(len(sel))]
            ax.bar(
                xs, [float("nan") if b.tokens == 0 else b.abs_log_ratio for b in sel], width, label=setting
            )
            ax.set_xticks(
                [i + 0.4 - width / 2 for i in range(len(sel))],
                [b.label for b in sel],
                rotation=30,
                fontsize=7,
            )
    for ax, name in zip(axes, axes_names, strict=True):
        ax.set_title(f"by {name}", fontsize=9)
        ax.set_ylabel("mean |log pi - log mu|", fontsize=8)
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["GapBin", "format_breakdown", "gap_breakdown", "plot_breakdown", "trainer_token_stats"]
