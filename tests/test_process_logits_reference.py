"""`process_logits` (temperature, top-k, top-p) against an independent brute-force reference.

The Transformers, llama.cpp and fake engines and the trainer all call ``process_logits``, so an
engine-vs-trainer comparison cannot see a bug in it (issue 11, item 6h); only vLLM has its own
sampler. The reference below is written from the documented semantics, in float64 plain Python:

1. divide the logits by the temperature;
2. top-k: keep every token whose value is >= the k-th largest value (ties at the cut-off are all
   kept, as in vLLM's ``apply_top_k_top_p``); k = 0 or k >= V is off;
3. top-p on the distribution renormalised over the tokens top-k kept: walk the tokens by
   decreasing probability and keep each one while the mass *before* it is < top_p (the token
   that crosses top_p is kept); top_p = 1 is off.

With ties straddling the top-p cut-off, which of the tied tokens survive depends on the sort
order; there the check compares the multiset of kept values (and that no token above the lowest
kept value is dropped).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from dcmdp.engines.base import SamplingSettings
from dcmdp.logprobs import process_logits, token_logprobs

NEG_INF = float("-inf")


def reference(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """Processed logits, removed tokens as -inf (float64, no torch)."""
    x = [v / temperature for v in logits]
    keep = [v != NEG_INF for v in x]
    vocab = len(x)
    if 0 < top_k < vocab:
        kth = sorted(x, reverse=True)[top_k - 1]
        keep = [k and v >= kth for k, v in zip(keep, x, strict=True)]
    if top_p < 1.0:
        kept = [i for i in range(vocab) if keep[i]]
        top = max(x[i] for i in kept)
        weights = {i: math.exp(x[i] - top) for i in kept}
        total = sum(weights.values())
        mass = 0.0
        for i in sorted(kept, key=lambda j: -weights[j]):
            if mass >= top_p:
                keep[i] = False
            mass += weights[i] / total
    return [v if k else NEG_INF for v, k in zip(x, keep, strict=True)]


def prefix_masses(values: list[float]) -> list[float]:
    """Cumulative probability masses of the kept tokens by decreasing probability (float64)."""
    finite = sorted((v for v in values if v != NEG_INF), reverse=True)
    top = finite[0]
    weights = [math.exp(v - top) for v in finite]
    total = sum(weights)
    out, mass = [], 0.0
    for w in weights:
        mass += w / total
        out.append(mass)
    return out


def check_row(got: torch.Tensor, logits: list[float], temperature: float, top_k: int, top_p: float) -> None:
    want = reference(logits, temperature, top_k, top_p)
    got_list = got.double().tolist()
    got_kept = sorted(v for v in got_list if v != NEG_INF)
    want_kept = sorted(v for v in want if v != NEG_INF)
    case = f"logits={logits} T={temperature} top_k={top_k} top_p={top_p}"
    assert len(got_kept) == len(want_kept), f"{case}: kept {len(got_kept)} tokens, reference {len(want_kept)}"
    assert got_kept == pytest.approx(want_kept, rel=1e-6, abs=1e-6), case
    # Every kept value is the (tempered) input at that position, and no token above the lowest
    # kept value is dropped (which of several tied tokens at the cut-off survive may differ).
    lowest = want_kept[0]
    for i, (g, w) in enumerate(zip(got_list, want, strict=True)):
        if g != NEG_INF:
            assert g == pytest.approx(logits[i] / temperature, rel=1e-6, abs=1e-6), f"{case}: position {i}"
        if w != NEG_INF and w > lowest + 1e-9:
            assert g != NEG_INF, f"{case}: token {i} (above the cut-off) was removed"
    # the log-probs the trainer takes from these logits are the reference's
    logp = torch.log_softmax(got.double(), dim=-1).tolist()
    top = max(want_kept)
    log_total = top + math.log(sum(math.exp(v - top) for v in want_kept))
    for g, lp in zip(got_list, logp, strict=True):
        if g != NEG_INF:
            assert lp == pytest.approx(g - log_total, abs=1e-6), case


def run_case(logits: list[float], temperature: float, top_k: int, top_p: float) -> None:
    got = process_logits(torch.tensor([logits], dtype=torch.float32), temperature, top_k, top_p)
    assert got.shape == (1, len(logits))
    check_row(got[0], logits, temperature, top_k, top_p)


# --------------------------------------------------------------------------- exact edge cases


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.25, 1),  # the first token alone reaches 0.25
        (0.5, 2),  # masses before: 0, .25, .5, .75 -> the third token starts at exactly top_p
        (0.5000001, 3),
        (0.75, 3),
        (0.7500001, 4),
        (1e-9, 1),  # tiny top_p: only one of the tied maxima
        (1.0, 4),  # off
    ],
)
def test_top_p_at_exact_mass_boundaries_with_ties(top_p: float, kept: int) -> None:
    """Four equal logits: every probability is exactly 1/4 in float32 too."""
    logits = [0.7, 0.7, 0.7, 0.7]
    got = process_logits(torch.tensor([logits]), 1.0, 0, top_p)[0]
    assert int(torch.isfinite(got).sum()) == kept
    run_case(logits, 1.0, 0, top_p)


def test_top_p_keeps_the_token_that_crosses_the_threshold() -> None:
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    for top_p, kept in ((0.4, 1), (0.6, 2), (0.85, 3), (0.9, 3), (0.96, 4), (0.99, 4)):
        got = process_logits(torch.tensor([logits]), 1.0, 0, top_p)[0]
        assert int(torch.isfinite(got).sum()) == kept, top_p
        run_case(logits, 1.0, 0, top_p)


def test_top_p_drops_a_negligible_tail() -> None:
    run_case([0.0, 0.0, -30.0], 1.0, 0, 0.999999)
    assert int(torch.isfinite(process_logits(torch.tensor([[0.0, 0.0, -30.0]]), 1.0, 0, 0.999999)).sum()) == 2


@pytest.mark.parametrize(
    ("logits", "top_k", "kept"),
    [
        ([3.0, 1.0, 1.0, 1.0, 0.0], 2, 4),  # three tokens tie at the k-th value: all kept
        ([3.0, 1.0, 1.0, 1.0, 0.0], 4, 4),
        ([3.0, 1.0, 1.0, 1.0, 0.0], 1, 1),
        ([2.0, 2.0, 2.0], 1, 3),  # all tied
        ([3.0, 1.0, 0.5, 0.0], 3, 3),  # k = V - 1
        ([3.0, 1.0, 0.5, 0.0], 4, 4),  # k = V: off
        ([3.0, 1.0, 0.5, 0.0], 9, 4),  # k > V: off
        ([3.0, NEG_INF, 0.5, NEG_INF], 3, 2),  # fewer finite tokens than k
    ],
)
def test_top_k_keeps_ties_at_the_cut_off(logits: list[float], top_k: int, kept: int) -> None:
    for temperature in (1.0, 0.6, 1.7):
        got = process_logits(torch.tensor([logits]), temperature, top_k, 1.0)[0]
        assert int(torch.isfinite(got).sum()) == kept
        run_case(logits, temperature, top_k, 1.0)


def test_top_p_acts_on_the_top_k_renormalised_distribution() -> None:
    """Full distribution (.4, .35, .25): top_p=0.5 alone keeps 2; after top_k=2 the kept pair is
    renormalised to (.53, .47), so top_p=0.5 keeps 1."""
    logits = [math.log(p) for p in (0.4, 0.35, 0.25)]
    assert int(torch.isfinite(process_logits(torch.tensor([logits]), 1.0, 0, 0.5)).sum()) == 2
    assert int(torch.isfinite(process_logits(torch.tensor([logits]), 1.0, 2, 0.5)).sum()) == 1
    run_case(logits, 1.0, 2, 0.5)
    run_case(logits, 1.0, 0, 0.5)


def test_top_p_uses_the_tempered_distribution() -> None:
    """(.5, .3, .2) at T=1: top_p=0.6 keeps 2. At T=0.5 the first token has p = .25/.38 = .66,
    so it alone reaches 0.6; at T=2 the mass flattens and 0.75 needs all three."""
    logits = [math.log(p) for p in (0.5, 0.3, 0.2)]
    for temperature, top_p, kept in ((1.0, 0.6, 2), (0.5, 0.6, 1), (2.0, 0.75, 3), (1.0, 0.75, 2)):
        got = process_logits(torch.tensor([logits]), temperature, 0, top_p)[0]
        assert int(torch.isfinite(got).sum()) == kept, (temperature, top_p)
        run_case(logits, temperature, 0, top_p)


# --------------------------------------------------------------------------- random cases


def random_cases(count: int, seed: int) -> list[tuple[list[float], float, int, float]]:
    """Random logits drawn from a coarse grid (so ties are common), with random settings; cases
    whose top-p cut-off lies within 1e-5 of a prefix mass (float32 vs float64 territory) are left out."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        vocab = rng.randrange(2, 24)
        logits = [rng.randrange(-8, 9) * 0.5 for _ in range(vocab)]
        temperature = rng.choice([0.3, 0.7, 1.0, 1.3, 2.5])
        top_k = rng.choice([0, 0, 1, 2, 3, 5, vocab - 1, vocab, vocab + 3])
        top_p = rng.choice([1.0, 1.0, 0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999, rng.random()])
        after_k = reference(logits, temperature, top_k, 1.0)
        if top_p < 1.0 and any(abs(m - top_p) < 1e-5 for m in prefix_masses(after_k)):
            continue
        cases.append((logits, temperature, top_k, top_p))
    return cases


@pytest.mark.parametrize("seed", range(4))
def test_random_logits_match_the_reference(seed: int) -> None:
    for logits, temperature, top_k, top_p in random_cases(150, seed):
        run_case(logits, temperature, top_k, top_p)


def test_batched_rows_are_processed_independently() -> None:
    """A [B, T, V] tensor (as the trainer passes) gives each row its own cut-offs."""
    rng = random.Random(7)
    vocab = 16
    rows = [[rng.randrange(-6, 7) * 0.5 for _ in range(vocab)] for _ in range(2 * 5)]
    settings = [(0.7, 3, 1.0), (1.3, 0, 0.8), (0.5, 4, 0.9)]
    for temperature, top_k, top_p in settings:
        got = process_logits(torch.tensor(rows).view(2, 5, vocab), temperature, top_k, top_p).view(10, vocab)
        for row, out in zip(rows, got, strict=True):
            after_k = reference(row, temperature, top_k, 1.0)
            if top_p < 1.0 and any(abs(m - top_p) < 1e-5 for m in prefix_masses(after_k)):
                continue
            check_row(out, row, temperature, top_k, top_p)


def test_token_logprobs_match_the_reference() -> None:
    """log pi(target) under the processed distribution, as the trainer recomputes it."""
    rng = random.Random(3)
    vocab = 12
    rows = [[rng.randrange(-6, 7) * 0.5 for _ in range(vocab)] for _ in range(6)]
    sampling = SamplingSettings(temperature=0.8, top_k=5, top_p=0.9)
    targets = []
    for row in rows:  # a target the reference keeps, so its log-prob is finite
        want = reference(row, 0.8, 5, 0.9)
        targets.append(max(range(vocab), key=lambda i: (want[i], -i)))
    got = token_logprobs(torch.tensor([rows]), torch.tensor([targets]), sampling)[0].tolist()
    for row, target, lp in zip(rows, targets, got, strict=True):
        want = reference(row, 0.8, 5, 0.9)
        kept = [v for v in want if v != NEG_INF]
        top = max(kept)
        expected = want[target] - top - math.log(sum(math.exp(v - top) for v in kept))
        assert lp == pytest.approx(expected, abs=1e-5)
