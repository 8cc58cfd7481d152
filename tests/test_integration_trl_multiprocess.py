"""DCMDPGRPOTrainer on two processes (torch.distributed, gloo on CPU), as a user launches it with
accelerate or torchrun: one multiplier per rank, all identical; D is the token mean over both
ranks' tokens (not the mean of per-rank means); a resumed run restores the same lambda everywhere.
The update bound is on (the default): the ranks' weights stay identical, so the constraint's
gradient is averaged over them as DDP averages ``param.grad``.

The ranks run tests/trl_two_process_worker.py, which records every micro-batch's tensors, so D is
recomputed here from the raw log-probs, independently of the trainer's own bookkeeping.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "trl", reason="TRL is not installed (scripts/install_integrations.sh installs trl 1.16.0)"
)

WORKER = Path(__file__).with_name("trl_two_process_worker.py")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(model_dir: Path, out: Path, max_steps: int, resume: str | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [str(WORKER), str(model_dir), str(out), str(max_steps)] + ([resume] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def eos_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its EOS row scaled up, so completion lengths (and so each rank's token
    count) vary: with equal counts a mean of per-rank means would equal the token mean."""
    from dcmdp.models import EOS, build_tiny_model, char_vocab, load_model

    path = build_tiny_model(tmp_path_factory.mktemp("trl2") / "tiny-eos")
    model = load_model(path)
    with torch.no_grad():
        model.lm_head.weight[char_vocab()[EOS]] *= 20.0
    model.save_pretrained(path)
    return path


def test_two_ranks_share_one_multiplier_and_the_global_token_mean(
    eos_model_dir: Path, tmp_path: Path
) -> None:
    launch(eos_model_dir, tmp_path, max_steps=3)
    ranks = [json.loads((tmp_path / f"first_rank{r}.json").read_text()) for r in (0, 1)]
    micro = [torch.load(tmp_path / f"first_micro_rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert len(ranks[0]["steps"]) == 3  # one dual step per optimizer step, not per micro-batch
    assert ranks[0]["steps"] == ranks[1]["steps"]  # identical D and lambda on every rank
    assert ranks[0]["final_lambda"] == ranks[1]["final_lambda"]
    assert all(len(m) == 6 for m in micro)  # 3 steps x 2 accumulated micro-batches per rank
    assert [r["optimizer"] for r in ranks] == ["ShareBoundedAdamW"] * 2
    assert len(ranks[0]["constraint_scale"]) == 3  # the bound's metric, once per optimizer step
    assert ranks[0]["constraint_scale"] == ranks[1]["constraint_scale"]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # bit for bit: one averaged update on both ranks
    # what the optimizer was handed is the clip factor times the MEAN of the ranks' own buffers
    # (identical weights alone would not catch a sum: both ranks would get the same doubled buffer)
    hand = [torch.load(tmp_path / f"first_handovers_rank{r}.pt") for r in (0, 1)]
    assert len(hand[0]) == len(hand[1]) == 3
    compared = 0
    for h0, h1 in zip(*hand, strict=True):
        assert h0["coef"] == pytest.approx(h1["coef"])
        for l0, l1, got0, got1 in zip(h0["local"], h1["local"], h0["handed"], h1["handed"], strict=True):
            if got0 is None:
                assert l0 is None and l1 is None and got1 is None
                continue
            zero = torch.zeros_like(got0)
            mean = ((zero if l0 is None else l0) + (zero if l1 is None else l1)) / 2
            torch.testing.assert_close(got0, h0["coef"] * mean, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(got1, got0)
            compared += int(mean.abs().sum() > 0)
    assert compared > 0, "no constraint gradient was handed over in any step"

    discriminating, details = 0, []
    for step, logged in enumerate(ranks[0]["steps"]):
        sums, counts = [], []
        for rank in (0, 1):
            parts = [m for m in micro[rank] if m["step"] == step]
            gap = sum(float((p["logp"].exp() - p["rollout"].exp()).abs()[p["mask"]].sum()) for p in parts)
            sums.append(gap)
            counts.append(sum(int(p["mask"].sum()) for p in parts))
        token_mean = sum(sums) / sum(counts)
        assert logged["d"] == pytest.approx(token_mean, rel=1e-5, abs=1e-9)
        per_rank_means = sum(s / c for s, c in zip(sums, counts, strict=True)) / 2
        details.append((step, counts, token_mean, per_rank_means))
        # the match above is to 1e-5: a mean of per-rank means 1e-3 away would have failed it
        if token_mean > 0 and abs(per_rank_means - token_mean) > 1e-3 * token_mean:
            discriminating += 1
    assert discriminating >= 1, f"no step where the ranks token counts made the two means differ: {details}"
    assert any(s["d"] > 0 for s in ranks[0]["steps"])
    assert ranks[0]["final_lambda"] != pytest.approx(0.5)

    # resume from the step-2 checkpoint: every rank restores the lambda it had after step 2
    checkpoint = tmp_path / "trl" / "checkpoint-2"
    assert (checkpoint / "dcmdp_multiplier.json").exists()
    launch(eos_model_dir, tmp_path, max_steps=3, resume=str(checkpoint))
    resumed = [json.loads((tmp_path / f"resume_rank{r}.json").read_text()) for r in (0, 1)]
    after_two = ranks[0]["steps"][1]["lam_next"]
    assert [r["loaded_lambda"] for r in resumed] == [pytest.approx(after_two)] * 2
    assert len(resumed[0]["steps"]) == 1 and resumed[0]["steps"] == resumed[1]["steps"]
    assert resumed[0]["steps"][0]["lam"] == pytest.approx(after_two)
    assert resumed[0]["final_lambda"] == resumed[1]["final_lambda"]
    assert resumed[0]["weights"] == resumed[1]["weights"]
