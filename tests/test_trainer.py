"""End-to-end tests of the training loop: CLI smoke runs, every loss, resume after a kill,
gradient accumulation, divergence, bad samples, readable config errors, and the minimal example."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dcmdp.checkpoint import latest_checkpoint, read_metrics
from dcmdp.cli import main as cli_main
from dcmdp.config import Config, ConfigError, load_config
from dcmdp.engines.base import Completion, SamplingSettings
from dcmdp.logprobs import build_token_batch, sequence_logprobs
from dcmdp.losses import POLICY_LOSSES
from dcmdp.tasks import TASKS, Problem, register_task

REPO = Path(__file__).resolve().parents[1]


class DigitTask:
    """A test task a random tiny model can score on: reward 1 when the completion holds a '1'.

    About 8% of random 8-character completions do, so groups carry real advantages."""

    name = "has_one"

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        g = torch.Generator().manual_seed(seed * 2 + (split == "eval"))
        nums = torch.randint(10, 99, (n, 2), generator=g).tolist()
        return [Problem(f"{a}+{b}=", "1", f"{split}-{seed}-{i}") for i, (a, b) in enumerate(nums)]

    def reward(self, problem: Problem, completion_text: str) -> float:
        return 1.0 if "1" in completion_text else 0.0

    def demonstration(self, problem: Problem) -> str:
        return "1"


if "has_one" not in TASKS:
    register_task("has_one")(DigitTask)


def small_overrides(
    model_dir: Path, out_dir: Path, engine: str = "transformers", **extra: object
) -> list[str]:
    values: dict[str, object] = {
        "model.path": str(model_dir),
        "engine.type": engine,
        "engine.dtype": "bfloat16",
        "task.name": "has_one",
        "run.steps": 2,
        "run.prompts_per_step": 4,
        "run.group_size": 4,
        "run.eval_problems": 8,
        "run.eval_every": 2,
        "run.checkpoint_every": 1,
        "run.tensorboard": False,
        "run.out_dir": str(out_dir),
        "run.threads": 1,
        "optim.lr": 1e-3,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_cli(args: list[str]) -> int:
    return cli_main(["train", *args])


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


# ----------------------------------------------------------------------------- smoke runs


def test_cli_two_steps_transformers(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert run_cli(small_overrides(tiny_model_dir, out)) == 0
    printed = capsys.readouterr().out
    assert "greedy accuracy" in printed
    rows = read_metrics(out / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in rows] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]
    train = [r for r in rows if r["kind"] == "train"]
    for key in (
        "reward/mean",
        "discrepancy/prob_gap_mean",
        "discrepancy/kl_engine_trainer_k3",
        "multiplier/lambda",
        "multiplier/tolerance",
        "loss/total",
        "time/rollout",
        "time/recompute",
        "time/update",
        "time/sync",
        "perf/tokens_per_s",
        "clip/frac",
    ):
        assert all(key in r and math.isfinite(r[key]) for r in train), key
    # bf16 engine against a float32 trainer: a real, nonzero mismatch is measured
    assert train[0]["discrepancy/abs_log_ratio_mean"] > 1e-5
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
    assert (out / "config.yaml").exists()


@pytest.mark.vllm
def test_cli_two_steps_vllm(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    out = tmp_path / "run"
    assert run_cli(small_overrides(tiny_model_dir, out, engine="vllm")) == 0
    train = train_rows(out)
    assert [r["step"] for r in train] == [1, 2]
    assert train[0]["discrepancy/abs_log_ratio_mean"] > 1e-5  # vLLM bf16 vs float32 trainer
    assert all(r["rollout/dropped_samples"] == 0 for r in train)


@pytest.mark.parametrize("loss", sorted(POLICY_LOSSES))
def test_every_loss_trains_a_step(loss: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / loss
    args = small_overrides(
        tiny_model_dir,
        out,
        **{
            "loss.type": loss,
            "run.steps": 1,
            "run.eval_every": 0,
            "run.group_size": 8,
            "multiplier.init": 1.0,
        },
    )
    assert run_cli(args) == 0
    (row,) = train_rows(out)
    assert math.isfinite(row["loss/total"])
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(latest_checkpoint(out) / "model.safetensors"))  # type: ignore[operator]
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert moved > 0, f"{loss}: one step left every weight unchanged"


# ----------------------------------------------------------------------------- resume


def _kill_when(cmd: list[str], metrics: Path, step: int, env: dict[str, str]) -> None:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(r.get("kind") == "train" and r["step"] >= step for r in read_metrics(metrics)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def test_resume_after_sigkill_matches_uninterrupted(tiny_model_dir: Path, tmp_path: Path) -> None:
    # the reward guard on as well (by default it is off beside the update bound): both states resume
    extra = {"run.steps": 5, "run.eval_every": 0, "run.checkpoint_every": 2, "multiplier.reward_guard": 0.05}
    full = tmp_path / "full"
    assert run_cli(small_overrides(tiny_model_dir, full, **extra)) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(REPO / "tests" / "slow_train_entry.py"),
        "train",
        *small_overrides(tiny_model_dir, killed, **extra),
    ]
    _kill_when(cmd, killed / "metrics.jsonl", 3, env)  # killed after step 3, checkpoint at 2
    # Simulate a kill in the middle of a checkpoint write and of a log write as well.
    (killed / "checkpoints" / "step_000004.tmp").mkdir(parents=True, exist_ok=True)
    (killed / "checkpoints" / "step_000004.tmp" / "trainer_state.pt").write_bytes(b"half")
    with open(killed / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 4, "reward/me')
    assert (
        run_cli(
            [
                *small_overrides(tiny_model_dir, killed, **extra),
            ]
        )
        == 2
    )  # refuses to overwrite
    assert run_cli(["--resume", *small_overrides(tiny_model_dir, killed, **extra)]) == 0

    a, b = train_rows(full), train_rows(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5], "rows lost or duplicated"
    assert a[-1]["multiplier/lambda_next"] == pytest.approx(b[-1]["multiplier/lambda_next"], abs=1e-9)
    for ra, rb in zip(a, b):
        assert ra["reward/mean"] == rb["reward/mean"]
        assert ra["discrepancy/prob_gap_mean"] == pytest.approx(
            rb["discrepancy/prob_gap_mean"], rel=1e-4, abs=1e-9
        )
    state_a = torch.load(latest_checkpoint(full) / "trainer_state.pt", weights_only=True)  # type: ignore[operator]
    state_b = torch.load(latest_checkpoint(killed) / "trainer_state.pt", weights_only=True)  # type: ignore[operator]
    assert state_a["step"] == state_b["step"] == 5
    ma, mb = state_a["multiplier"], state_b["multiplier"]
    assert ma["kind"] == mb["kind"] == "reward_guard"  # the guard wraps dual ascent
    assert ma["inner"]["value"] == pytest.approx(mb["inner"]["value"], abs=1e-9)
    for key in ("cap", "ceiling", "reward_ema", "best_ema"):
        assert ma[key] == pytest.approx(mb[key], abs=1e-9), key


# ----------------------------------------------------------------------------- accumulation


def test_grad_accum_4x1_equals_1x4(tiny_model_dir: Path) -> None:
    """One minibatch of 8 in one pass vs the same 8 rows in 4 micro-batches of 2."""
    from dcmdp.models import load_model
    from dcmdp.trainer import loss_settings, update_policy

    g = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7], [8, 9]]
    comps = []
    for i in range(8):
        n = 2 + i % 3
        toks = torch.randint(3, 60, (n,), generator=g).tolist()
        comps.append(Completion(i % 2, toks, (-torch.rand(n, generator=g) * 3).tolist(), "length"))
    batch = build_token_batch(prompts, comps, pad_id=0)
    adv = torch.randn(8, generator=g)
    sampling = SamplingSettings(max_tokens=4)
    results = []
    for accum in (1, 4):
        cfg = load_config(
            overrides=[
                "run.prompts_per_step=2",
                "run.group_size=4",
                "loss.constraint_share=0",  # plain SGD below: the gradient itself is compared
                f"optim.grad_accum={accum}",
                "optim.grad_clip=0",
                "optim.lr=1e-2",
            ]
        )
        torch.manual_seed(0)
        model = load_model(tiny_model_dir)
        with torch.no_grad():
            old = sequence_logprobs(model, batch, sampling)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        update_policy(
            cfg,
            model,
            None,
            opt,
            sched,
            batch,
            old,
            None,
            adv,
            sampling,
            loss_settings(cfg, lam=0.5, tolerance=0.0037),
            torch.Generator().manual_seed(1),
        )
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (results[0] - results[1]).abs().max() < 1e-6
    start = torch.cat([p.detach().flatten() for p in load_model(tiny_model_dir).parameters()])
    assert (results[0] - start).abs().max() > 1e-4  # the update did something


# ----------------------------------------------------------------------------- failures


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import dcmdp.trainer as trainer

    real = trainer.update_policy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise trainer.DivergenceError("the loss became nan (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "update_policy", poisoned)
    out = tmp_path / "run"
    assert run_cli(small_overrides(tiny_model_dir, out, **{"run.steps": 3, "run.eval_every": 0})) == 3
    assert "training stopped" in capsys.readouterr().out
    assert latest_checkpoint(out).name == "step_000001"  # type: ignore[union-attr]
    assert [r["step"] for r in train_rows(out)] == [1]


def test_real_nan_in_loss_raises_divergence(tiny_model_dir: Path) -> None:
    from dcmdp.models import load_model
    from dcmdp.trainer import DivergenceError, loss_settings, update_policy

    comps = [Completion(0, [5, 6], [-1.0, -2.0], "length") for _ in range(4)]
    batch = build_token_batch([[7, 8]], comps, pad_id=0)
    cfg = load_config(overrides=["run.prompts_per_step=1", "run.group_size=4", "loss.constraint_share=0"])
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    old = torch.zeros_like(batch.engine_logp_BT)
    with pytest.raises((DivergenceError, ValueError), match=r"nan|NaN|non-finite"):
        update_policy(
            cfg,
            model,
            None,
            opt,
            sched,
            batch,
            old,
            None,
            torch.ones(4),
            SamplingSettings(),
            loss_settings(cfg, 0.1, 0.0037),
            torch.Generator(),
        )


def test_bad_engine_samples_are_counted_and_skipped(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dcmdp.trainer as trainer
    from dcmdp.engines.fake import FakeEngine
    from dcmdp.models import load_model

    model = load_model(tiny_model_dir)

    def make(spec):  # type: ignore[no-untyped-def]
        return FakeEngine(
            model=model, vocab_size=model.config.vocab_size, inject={0: "nan_logprob", 5: "empty"}
        )

    monkeypatch.setattr(trainer, "make_engine", make)
    out = tmp_path / "run"
    assert run_cli(small_overrides(tiny_model_dir, out, **{"run.steps": 1, "run.eval_every": 0})) == 0
    (row,) = train_rows(out)
    assert row["rollout/dropped_samples"] == 2
    assert row["rollout/dropped_groups"] == 2  # completions 0 and 5 sit in groups 0 and 1


def test_reward_errors_are_counted(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}

    def flaky(self, problem, text):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("reward server down")
        return 1.0 if "1" in text else 0.0

    monkeypatch.setattr(DigitTask, "reward", flaky)
    out = tmp_path / "run"
    assert run_cli(small_overrides(tiny_model_dir, out, **{"run.steps": 1, "run.eval_every": 0})) == 0
    (row,) = train_rows(out)
    assert row["rollout/reward_errors"] == 1 and row["rollout/dropped_groups"] == 1


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["loss.type=ppo"], "loss.type: 'ppo' is not allowed; valid values: dcmdp"),
        (["engine.dtype=int3"], "engine.dtype"),
        (["model.device=tpu"], "model.device: 'tpu' is not allowed"),
        (["optim.lrr=1"], "optim.lrr: unknown field; valid fields:"),
        (["trainer.lr=1"], "unknown section 'trainer'"),
        (["optim.lr=fast"], "optim.lr: expected float"),
        (["multiplier.eta=0"], "multiplier.eta: must be > 0"),
        (["multiplier.tolerance=-1"], "multiplier.tolerance: must be > 0"),
        (["run.group_size=1"], "run.group_size"),
        (["optim.grad_accum=3"], "must divide the rollout batch"),
        (["lr=3"], "expected section.field=value"),
    ],
)
def test_config_errors_are_readable(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert needle in str(info.value)


def test_config_file_and_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: {type: grpo, clip_hgh: 0.3}\n")
    assert cli_main(["train", "--config", str(bad)]) == 2
    assert "loss.clip_hgh: unknown field" in capsys.readouterr().err
    evil = tmp_path / "evil.yaml"
    evil.write_text("loss: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(yaml.constructor.ConstructorError, match=r"could not determine a constructor"):
        load_config(evil)


def test_configs_folder_loads() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), Config), path


def test_print_config_roundtrip(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert cli_main(["train", "--print-config", "loss.type=tis", "optim.betas=[0.8, 0.9]"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.loss.type == "tis" and cfg.optim.betas == (0.8, 0.9)


# ----------------------------------------------------------------------------- minimal example


def test_minimal_example_matches_trainer(tiny_model_dir: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import minimal_dcmdp  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    from dcmdp.trainer import train

    result = minimal_dcmdp.main(
        str(tiny_model_dir),
        steps=3,
        prompts=4,
        group=4,
        seed=0,
        engine_type="transformers",
        engine_dtype="bfloat16",
        lr=1e-3,
        task_name="has_one",
    )
    cfg = load_config(
        overrides=small_overrides(
            tiny_model_dir,
            tmp_path / "full",
            # the example is the loop with plain AdamW: the update bound off
            **{"run.steps": 3, "run.eval_every": 0, "run.checkpoint_every": 3, "loss.constraint_share": 0},
        )
    )
    train(cfg, log=lambda s: None)
    rows = train_rows(tmp_path / "full")
    for mine, theirs in zip(result["history"], rows, strict=True):
        assert mine["reward"] == theirs["reward/mean"]
        assert mine["D"] == pytest.approx(theirs["discrepancy/prob_gap_mean"], rel=1e-5, abs=1e-9)
        assert mine["lambda"] == pytest.approx(theirs["multiplier/lambda"], abs=1e-9)
        assert mine["loss"] == pytest.approx(theirs["loss/total"], rel=1e-4, abs=1e-7)
    assert any(h["reward"] > 0 for h in result["history"]), "no reward signal: the comparison would be weak"
    from dcmdp.models import load_model

    full = load_model(latest_checkpoint(tmp_path / "full"))  # type: ignore[arg-type]
    for (name, p), q in zip(result["policy"].named_parameters(), full.parameters(), strict=True):
        assert (p - q).abs().max() < 1e-5, name


def test_report_writes_plots_and_html(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_cli(small_overrides(tiny_model_dir, out)) == 0
    assert cli_main(["report", str(out), str(out), "--out", str(tmp_path / "rep")]) == 0
    for name in ("reward", "accuracy", "discrepancy", "multiplier", "step_time"):
        png = tmp_path / "rep" / f"{name}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "<table>" in page and "run" in page and json.dumps("reward.png")[1:-1] in page


def test_configuration_docs_are_current() -> None:
    """docs/configuration.md is generated from config.py; regenerate it when a field changes."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_config_docs.py"), "--check"])
    assert result.returncode == 0, "run: python scripts/gen_config_docs.py"


def test_kl_to_reference_is_logged_and_finite(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # The update bound off: with no reward signal in the first batch only the constraint would
    # move the policy, and the bound holds it still (tests/test_update_share.py).
    extra = {
        "loss.kl_coef": 0.1,
        "run.steps": 2,
        "run.eval_every": 0,
        "optim.lr": 1e-2,
        "loss.constraint_share": 0,
    }
    assert run_cli(small_overrides(tiny_model_dir, out, **extra)) == 0
    rows = train_rows(out)
    assert rows[0]["loss/kl_ref"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert rows[1]["loss/kl_ref"] > 1e-7  # after one update it has moved away


def test_tampered_checkpoint_cannot_run_code(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Checkpoints load with torch.load(weights_only=True): a pickle that runs code is refused."""
    import pickle

    from dcmdp.checkpoint import CheckpointError, load_trainer_state

    out = tmp_path / "run"
    assert run_cli(small_overrides(tiny_model_dir, out, **{"run.steps": 1, "run.eval_every": 0})) == 0
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    (ckpt / "trainer_state.pt").write_bytes(pickle.dumps({"step": 1, "x": Evil()}))
    with pytest.raises(CheckpointError, match="cannot be read") as info:
        load_trainer_state(ckpt)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


def test_unreachable_tolerance_warning() -> None:
    from dcmdp.trainer import unreachable_tolerance

    c = 0.0037
    far = [0.02] * 20
    msg = unreachable_tolerance(far, c, uses_multiplier=True)
    assert msg is not None and "multiplier.tolerance=null" in msg and "0.0037" in msg
    assert unreachable_tolerance(far[:19], c, uses_multiplier=True) is None  # not long enough yet
    assert unreachable_tolerance([*far[:19], 0.007], c, uses_multiplier=True) is None  # one step within 2c
    assert unreachable_tolerance(far, c, uses_multiplier=False) is None  # grpo: lambda unused
    assert unreachable_tolerance(far, None, uses_multiplier=True) is None  # automatic c not set yet
    raised = unreachable_tolerance(far, c, uses_multiplier=True, floor=True)
    assert (
        raised is not None
        and "tolerance_floor=1" not in raised
        and "larger multiplier.tolerance_floor" in raised
    )
    assert (
        unreachable_tolerance([0.0, *far], c, uses_multiplier=True) is not None
    )  # only the last window counts


# ----------------------------------------------------------------------------- labels say what ran


def test_grpo_run_logs_and_prints_no_lambda(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "grpo"
    extra = {"loss.type": "grpo", "engine.quantization": "int4", "run.checkpoint_every": 0}
    assert run_cli(small_overrides(tiny_model_dir, out, **extra)) == 0
    printed = capsys.readouterr().out
    steps = [line for line in printed.splitlines() if line.startswith("step ") and "reward" in line]
    assert len(steps) == 2 and not any("lambda" in line or " c " in line for line in steps)
    assert not any(k.startswith("multiplier/") for r in train_rows(out) for k in r)
    # the deployment engine is named with its quantization
    assert "deployment-engine (transformers bfloat16 int4) greedy accuracy" in printed
    assert "engine: transformers bfloat16 int4 | trainer float32" in printed
    assert '"multiplier"' not in printed and '"tolerance"' not in printed  # summary JSON too


def test_step_line_names_automatic_tolerance_while_it_measures() -> None:
    from dcmdp.config import load_config
    from dcmdp.trainer import engine_label, multiplier_from_config, step_line

    cfg = load_config(overrides=["multiplier.tolerance=null", "multiplier.auto_warmup_steps=3"])
    lam = multiplier_from_config(cfg.multiplier, update_bound=True)
    row = {
        "reward/mean": 0.5,
        "discrepancy/prob_gap_mean": 0.002,
        "loss/total": 0.1,
        "time/step": 1.0,
        "perf/tokens_per_s": 100.0,
        "multiplier/lambda": 0.1,
        "multiplier/tolerance": float("nan"),
    }
    lam.update(0.002)
    line = step_line(cfg, 1, row, lam)
    assert "c auto (measured 1/3 warm-up steps)" in line and "nan" not in line
    for _ in range(2):
        lam.update(0.002)
    assert lam.tolerance is not None
    line = step_line(cfg, 3, {**row, "multiplier/tolerance": lam.tolerance}, lam)
    assert f"c {lam.tolerance:.5f}" in line and "auto" not in line
    assert engine_label(cfg) == "vllm bfloat16"
    q = load_config(
        overrides=["engine.type=transformers", "engine.dtype=float32", "engine.quantization=int3"]
    )
    assert engine_label(q) == "transformers float32 int3"


def test_tolerance_floor_in_a_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """multiplier.tolerance_floor end to end: c is the user's during the warm-up (lambda held at
    init), then the median of the warm-up steps' measured gaps when that is larger."""
    out = tmp_path / "run"
    extra = {
        "loss.type": "dcmdp",
        "run.steps": 4,
        "run.eval_every": 0,
        "run.checkpoint_every": 0,
        "multiplier.tolerance": 1e-6,
        "multiplier.tolerance_floor": 1.0,
        "multiplier.auto_warmup_steps": 2,
        "multiplier.reward_guard": 0.0,
    }
    assert run_cli(small_overrides(tiny_model_dir, out, **extra)) == 0
    rows = train_rows(out)
    d = [r["discrepancy/prob_gap_mean"] for r in rows]
    assert min(d[:2]) > 1e-6  # bf16 engine against the fp32 trainer: a real gap to raise c to
    assert [r["multiplier/tolerance"] for r in rows[:2]] == [1e-6, 1e-6]  # the c the loss used
    assert [r["multiplier/lambda_next"] for r in rows[:2]] == [0.1, 0.1]
    for r in rows[2:]:
        assert r["multiplier/tolerance"] == pytest.approx((d[0] + d[1]) / 2, rel=1e-9)
    assert rows[2]["multiplier/lambda_next"] == pytest.approx(0.1 + d[2] - (d[0] + d[1]) / 2, rel=1e-6)


def test_step_line_says_when_the_floor_raised_c() -> None:
    from dcmdp.config import load_config
    from dcmdp.trainer import multiplier_from_config, step_line

    cfg = load_config(overrides=["multiplier.tolerance=0.0001", "multiplier.tolerance_floor=1.0"])
    lam = multiplier_from_config(cfg.multiplier, update_bound=False)  # guarded, as where the bound is off
    row = {
        "reward/mean": 0.5,
        "discrepancy/prob_gap_mean": 0.004,
        "loss/total": 0.1,
        "time/step": 1.0,
        "perf/tokens_per_s": 100.0,
        "multiplier/lambda": 0.1,
    }
    lam.update(0.004)
    line = step_line(cfg, 1, {**row, "multiplier/tolerance": 1e-4}, lam)
    assert "c 0.00010 (floor measured 1/5 warm-up steps)" in line
    for _ in range(4):
        lam.update(0.004)
    line = step_line(cfg, 5, {**row, "multiplier/tolerance": lam.tolerance}, lam)
    assert "c 0.00400 (raised from 0.00010)" in line
    kept = load_config(overrides=["multiplier.tolerance=0.01", "multiplier.tolerance_floor=1.0"])
    lam = multiplier_from_config(kept.multiplier, update_bound=True)
    for _ in range(5):
        lam.update(0.004)
    line = step_line(kept, 5, {**row, "multiplier/tolerance": lam.tolerance}, lam)
    assert "c 0.01000" in line and "raised" not in line and "floor" not in line
