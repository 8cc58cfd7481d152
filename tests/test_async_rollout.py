"""Asynchronous rollouts (run.max_staleness >= 1): the schedule, the off-policy bookkeeping, every
loss in this mode, and the failure handling (a killed worker, a killed trainer, Ctrl-C)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dcmdp.algo.constraints import CONSTRAINTS, MEASURES
from dcmdp.algo.corrections import CORRECTIONS
from dcmdp.algo.loss_core import LossInputs
from dcmdp.algo.losses import composed_loss
from dcmdp.checkpoint import read_metrics
from dcmdp.config import ConfigError, load_config
from dcmdp.rollout.pipeline import PolicyVersions, rollout_cores
from dcmdp.trainer import bounds_update, engine_at_current, gap_key, make_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import REPO, run_cli, small_overrides, train_rows

FP32 = {"engine.dtype": "float32"}  # a matched engine: its own gap is ~1e-7, staleness stands out


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"run\.max_staleness"):
        load_config(overrides=["run.max_staleness=-1"])
    with pytest.raises(ConfigError, match=r"loss\.constraint_gap"):
        load_config(overrides=["loss.constraint_gap=both"])
    sync = load_config(overrides=["loss.constraint_gap=total"])
    assert gap_key(sync) == "discrepancy/prob_gap_mean"  # synchronous: one gap, whatever the setting
    stale = load_config(overrides=["run.max_staleness=1", "loss.constraint_gap=total", "loss.measure=k3"])
    assert gap_key(stale) == "total/kl_engine_trainer_k3"
    assert gap_key(load_config(overrides=["run.max_staleness=1"])) == "discrepancy/prob_gap_mean"


def test_rollout_cores_split() -> None:
    worker, learner = rollout_cores()
    assert worker and learner
    if len(os.sched_getaffinity(0)) >= 2:
        assert not set(worker) & set(learner)


def test_engine_at_current_shifts_by_the_staleness() -> None:
    mu = torch.tensor([[-1.0, -2.0, -3.0]])
    old = torch.tensor([[-0.5, -2.5, float("-inf")]])
    behaviour = torch.tensor([[-1.0, -2.0, -3.0]])
    out = engine_at_current(mu, old, behaviour)
    assert torch.equal(out, torch.tensor([[-0.5, -2.5, -3.0]]))  # mu + (old - behaviour); mu where -inf


def test_policy_versions_keeps_the_last_ones() -> None:
    model = torch.nn.Linear(2, 2)
    store = PolicyVersions(keep=2)
    for v in range(4):
        with torch.no_grad():
            model.weight.fill_(float(v))
        store.save(v, model)
    assert 1 not in store and 2 in store and 3 in store
    assert float(store.model_at(2, model).weight[0, 0]) == 2.0
    assert float(store.model_at(3, model).weight[0, 0]) == 3.0
    with pytest.raises(KeyError, match="not kept"):
        store.model_at(1, model)


@pytest.mark.parametrize("constraint", sorted(c for c in CONSTRAINTS if c != "none"))
@pytest.mark.parametrize("measure", sorted(MEASURES))
def test_constraint_reads_the_carried_engine_logprobs(constraint: str, measure: str) -> None:
    """With ``constraint_engine_logp_BT`` set, the constraint measures the gap to it, while the
    correction keeps reading mu: the same constraint part as passing it as mu without a correction."""
    g = torch.Generator().manual_seed(0)
    B, T = 3, 5
    logp = (-torch.rand(B, T, generator=g) * 2).requires_grad_()
    old = logp.detach() + 0.05 * torch.randn(B, T, generator=g)
    mu = old + 1.5 * torch.randn(B, T, generator=g)
    target = old + 0.01 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    from dcmdp.run_setup import loss_settings

    settings = loss_settings(load_config(), 0.5, 0.004)
    carried = LossInputs(logp, old, mu, adv, mask, constraint_engine_logp_BT=target)
    as_mu = LossInputs(logp, old, target, adv, mask)
    a = composed_loss(carried, settings, "none", constraint, measure)
    b = composed_loss(as_mu, settings, "none", constraint, measure)
    assert a.constraint_part is not None and b.constraint_part is not None
    torch.testing.assert_close(a.constraint_part, b.constraint_part, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-12)
    for correction in CORRECTIONS:  # the corrections keep reading mu, not the carried target
        if correction != "none":
            c = composed_loss(carried, settings, correction, constraint, measure)
            d = composed_loss(as_mu, settings, correction, constraint, measure)
            assert not torch.allclose(c.loss, d.loss, rtol=0, atol=1e-9), correction


def test_async_batches_come_from_the_right_version(tiny_model_dir: Path, tmp_path: Path) -> None:
    """max_staleness 1: step s samples with version s - 2 (s >= 2), and the trainer scores it
    with that version: with a matched fp32 engine the engine gap stays at the float floor while
    the staleness gap is the policy's own move. max_staleness 2: versions 0, 0, 0, 1, 2."""
    out = tmp_path / "s1"
    # The update bound off: the policy must move on every step, also where only the constraint
    # has a gradient (the bound then holds it still).
    extra = {
        **FP32,
        "run.steps": 4,
        "run.eval_every": 2,
        "run.checkpoint_every": 0,
        "run.max_staleness": 1,
        "loss.constraint_share": 0,
    }
    assert run_cli(small_overrides(tiny_model_dir, out, **extra)) == 0
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["staleness/versions"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    for r in rows:
        assert r["discrepancy/prob_gap_mean"] < 1e-5, r["discrepancy/prob_gap_mean"]
    for r in rows[1:]:
        assert r["staleness/prob_gap_mean"] > 20 * r["discrepancy/prob_gap_mean"]
        assert r["total/prob_gap_mean"] > 20 * r["discrepancy/prob_gap_mean"]
    assert rows[0]["staleness/prob_gap_mean"] == 0.0
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]

    out2 = tmp_path / "s2"
    extra2 = {**extra, "run.steps": 5, "run.eval_every": 0, "run.max_staleness": 2}
    assert run_cli(small_overrides(tiny_model_dir, out2, **extra2)) == 0
    assert [r["staleness/versions"] for r in train_rows(out2)] == [0.0, 1.0, 2.0, 2.0, 2.0]


def test_async_constraint_gap_total_reads_total(tiny_model_dir: Path, tmp_path: Path) -> None:
    """loss.constraint_gap=total: the dual step reads the total gap (engine + staleness)."""
    out = tmp_path / "total"
    extra = {
        **FP32,
        "run.steps": 3,
        "run.eval_every": 0,
        "run.checkpoint_every": 0,
        "run.max_staleness": 1,
        "loss.constraint_gap": "total",
        "loss.correction": "tis",
        "multiplier.reward_guard": 0.0,
        "multiplier.tolerance": 1e-9,
        "multiplier.eta": 10.0,
    }
    assert run_cli(small_overrides(tiny_model_dir, out, **extra)) == 0
    rows = train_rows(out)
    for r in rows:  # lambda moves by eta * (D - c), D the total gap
        step = r["multiplier/lambda_next"] - r["multiplier/lambda"]
        expected = 10.0 * (r["total/prob_gap_mean"] - 1e-9)
        assert step == pytest.approx(expected, rel=1e-6, abs=1e-12) or r["multiplier/lambda_next"] in (
            0.0,
            10.0,
        )


# ----------------------------------------------------------------------------- failure handling


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _worker_pid(pid: int) -> int | None:
    for child in _children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            return child
    return None


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(")")[-1].split()[0] != "Z"


def _start(tiny_model_dir: Path, out: Path, **extra: object) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "tests" / "slow_train_entry.py"), "train"]
    cmd += small_overrides(tiny_model_dir, out, **extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    """In the child, before exec: SIGINT at its default and unblocked, as from a terminal (a SIGINT
    the test runner ignores or blocks would be inherited, and Ctrl-C would never arrive)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(r.get("kind") == "train" and r["step"] >= step for r in read_metrics(metrics)):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended or stalled before step {step}: {proc.poll()}")


ASYNC = {"run.steps": 5, "run.eval_every": 0, "run.checkpoint_every": 1, "run.max_staleness": 1}


def _resume_and_check(tiny_model_dir: Path, out: Path) -> None:
    assert run_cli(["--resume", *small_overrides(tiny_model_dir, out, **ASYNC)]) == 0
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4, 5], "rows lost or duplicated"


def test_worker_killed_stops_the_run_and_resume_finishes(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(tiny_model_dir, out, **ASYNC)
    _wait_for_step(proc, out / "metrics.jsonl", 2)
    worker = _worker_pid(proc.pid)
    assert worker is not None, "no rollout worker process found"
    os.kill(worker, signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 4, stdout
    assert "rollout worker died" in stdout and "--resume" in stdout
    _resume_and_check(tiny_model_dir, out)


def test_trainer_killed_leaves_no_orphan_and_resume_finishes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Large batches and max_staleness 3, so sampled batches sit unread in the queue's pipe when
    the trainer dies (a worker that waited to flush them would live on forever)."""
    out = tmp_path / "run"
    big = {"run.prompts_per_step": 16, "run.group_size": 8, "sampling.max_tokens": 64, "run.max_staleness": 3}
    proc = _start(tiny_model_dir, out, **{**ASYNC, **big})
    _wait_for_step(proc, out / "metrics.jsonl", 1)
    time.sleep(3)  # the worker samples ahead meanwhile
    worker = _worker_pid(proc.pid)
    assert worker is not None
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline and _alive(worker):
        time.sleep(0.1)
    assert not _alive(worker), "the rollout worker outlived a killed trainer"
    assert run_cli(["--resume", *small_overrides(tiny_model_dir, out, **{**ASYNC, **big})]) == 0
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4, 5], "rows lost or duplicated"


def test_engine_gap_counts_what_the_sampling_version_cannot_sample(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """With top-k the int3 engine samples tokens the fp32 trainer's top-k excludes. A stale run's
    discrepancy/* counts them exactly as a synchronous run does (step 1 is fresh in both and
    samples the same batch), so the dual step reads the same D. (int3, not bfloat16 alone: on a
    CPU with native bfloat16 arithmetic, AMD Zen 4, bfloat16 kept the same top 3 on every token.)"""
    extra = {
        "run.steps": 2,
        "run.eval_every": 0,
        "run.checkpoint_every": 0,
        "sampling.top_k": 3,
        "engine.quantization": "int3",
    }
    rows = {}
    for n in (0, 1):
        out = tmp_path / f"stale{n}"
        assert run_cli(small_overrides(tiny_model_dir, out, **{**extra, "run.max_staleness": n})) == 0
        rows[n] = train_rows(out)[0]
    assert rows[0]["discrepancy/trainer_impossible_tokens"] > 0, "the setting produced no impossible token"
    for key in ("discrepancy/prob_gap_mean", "discrepancy/trainer_impossible_tokens", "reward/mean"):
        assert rows[1][key] == rows[0][key], key
    assert rows[1]["multiplier/lambda_next"] == pytest.approx(rows[0]["multiplier/lambda_next"], abs=1e-12)


def test_slots_are_one_flat_buffer_per_dtype() -> None:
    """Shared memory costs one file descriptor per buffer: one per dtype, not one per tensor."""
    from dcmdp.rollout.pipeline import slot_layout, slot_views

    named = [("a", torch.randn(2, 3)), ("b", torch.randn(4)), ("c", torch.randn(3).bfloat16())]
    layout, sizes = slot_layout(named)
    assert sizes == {torch.float32: 10, torch.bfloat16: 3}
    buffers = {dtype: torch.zeros(size, dtype=dtype) for dtype, size in sizes.items()}
    views = slot_views(buffers, layout)
    for name, t in named:
        views[name].copy_(t)
    for name, t in named:
        assert torch.equal(slot_views(buffers, layout)[name], t)


def test_ctrl_c_stops_both_processes(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(tiny_model_dir, out, **{**ASYNC, "run.steps": 50})
    _wait_for_step(proc, out / "metrics.jsonl", 1)
    worker = _worker_pid(proc.pid)
    assert worker is not None
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    while time.time() - t0 < 30 and _alive(worker):
        time.sleep(0.05)
    assert not _alive(worker), f"the rollout worker outlived Ctrl-C by {time.time() - t0:.0f}s"
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout
    assert "interrupted" in stdout


def test_every_loss_trains_on_stale_batches(tiny_model_dir: Path) -> None:
    """Every correction with the penalty and every constraint with TIS, on batches one version old
    (an in-process source that replays the schedule, so no worker is needed): finite losses, the
    constraint's target shifted by the staleness."""
    from dcmdp.config import load_config as load
    from dcmdp.engines.base import EngineSpec, make_engine
    from dcmdp.models import load_model, load_tokenizer
    from dcmdp.rollout import SyncRollout
    from dcmdp.run_setup import multiplier_from_config, sampling_settings
    from dcmdp.tasks import make_task
    from dcmdp.trainer import Learner, TrainState, train_step

    class LaggingSource(SyncRollout):
        """Samples step s with the weights of version s - 2, like an AsyncRollout of staleness 1."""

        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            self.pending: list[list[tuple[str, torch.Tensor]]] = []

        def next_batch(self, step: int):  # type: ignore[no-untyped-def]
            ro = super().next_batch(step)
            ro.version = max(0, step - 2)
            return ro

        def publish_weights(self, named_tensors):  # type: ignore[no-untyped-def]
            self.pending.append([(n, t.detach().clone()) for n, t in named_tensors])
            if len(self.pending) > 1:  # the engine serves the previous version
                self.engine.load_weights(self.pending.pop(0))

    combos = [(c, "penalty") for c in CORRECTIONS] + [("tis", c) for c in CONSTRAINTS]
    tokenizer = load_tokenizer(tiny_model_dir)
    for correction, constraint in combos:
        cfg = load(overrides=[*small_overrides(tiny_model_dir, Path("/nonexistent")), "run.max_staleness=1"])
        cfg = dataclasses.replace(
            # every composition, the refused ones included (what is tested is the loss on stale batches)
            cfg,
            loss=dataclasses.replace(
                cfg.loss, correction=correction, constraint=constraint, allow_failed_composition=True
            ),
        )
        torch.manual_seed(0)
        model = load_model(tiny_model_dir)
        sampling = sampling_settings(cfg, (tokenizer.eos_token_id,))
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-3))
        opt = make_optimizer(cfg, model)  # the update bound's optimizer where the default asks for it
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        learner = Learner(cfg, model, None, opt, sched, sampling, torch.Generator().manual_seed(0))
        engine = make_engine(EngineSpec(type="transformers", model=str(tiny_model_dir), dtype="float32"))
        task = make_task("has_one")
        source = LaggingSource(engine, task, tokenizer, sampling, 4, 4, 0)
        versions = PolicyVersions(2)
        run = TrainState(
            learner,
            source,
            tokenizer,
            multiplier_from_config(cfg.multiplier, update_bound=bounds_update(cfg)),
            versions,
        )
        source.publish_weights(model.named_parameters())
        versions.save(0, model)
        for step in (1, 2, 3):
            row = train_step(run, step)
            assert row["staleness/versions"] == (0.0 if step == 1 else 1.0), (correction, constraint)
            assert torch.isfinite(torch.tensor(row["loss/total"])), (correction, constraint)
        assert row["discrepancy/prob_gap_mean"] < 1e-5, (correction, constraint)  # fp32: scored right
        source.close()


def test_hung_worker_times_out(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(tiny_model_dir, out, **{**ASYNC, "run.rollout_timeout_s": 3})
    _wait_for_step(proc, out / "metrics.jsonl", 1)
    worker = _worker_pid(proc.pid)
    assert worker is not None
    os.kill(worker, signal.SIGSTOP)  # alive but silent: a hang
    try:
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
    assert proc.returncode == 4, stdout
    assert "sent nothing for 3s" in stdout and "run.rollout_timeout_s" in stdout
    assert not _alive(worker), "the trainer left its hung worker behind"


# ----------------------------------------------------------------------------- no wasted forward


def test_reused_forward_gives_the_recompute_numbers(tiny_model_dir: Path, tmp_path: Path) -> None:
    """run.recompute=auto takes pi_old from the update's forward (one optimizer step per batch);
    always runs the separate no-grad recompute. Same numbers either way."""
    from dcmdp.trainer import reuses_forward

    assert reuses_forward(load_config())
    assert not reuses_forward(load_config(overrides=["optim.minibatches=2"]))
    assert not reuses_forward(load_config(overrides=["run.recompute=always"]))
    rows = {}
    for mode in ("auto", "always"):
        out = tmp_path / mode
        extra = {"run.steps": 3, "run.eval_every": 0, "run.checkpoint_every": 0, "run.recompute": mode}
        assert run_cli(small_overrides(tiny_model_dir, out, **extra)) == 0
        rows[mode] = train_rows(out)
    for a, b in zip(rows["auto"], rows["always"], strict=True):
        assert a["reward/mean"] == b["reward/mean"]
        for key in ("discrepancy/prob_gap_mean", "loss/total", "optim/grad_norm", "multiplier/lambda_next"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key
