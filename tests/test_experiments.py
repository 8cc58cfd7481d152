"""experiments/: every arm is a valid config, run lengths are read right, and the gradient-bias
measurement tells zero mismatch from a real one."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dcmdp.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run = load("run")


@pytest.mark.parametrize("experiment", sorted(run.EXPERIMENTS))
def test_every_arm_is_a_valid_config(experiment: str) -> None:
    arms = run.EXPERIMENTS[experiment]
    assert len(arms) >= 2
    for arm, overrides in arms.items():
        cfg = load_config(overrides=[*run.COMMON, *overrides, "run.out_dir=/tmp/unused"])
        assert cfg.run.steps == run.steps_of([*run.COMMON, *overrides]), arm


def test_learning_rates_written_relative_to_the_long_regime_follow_it() -> None:
    """The yardstick runs at 1.001 x the long regime's lr and the mb4_lr0.25 arms at a quarter of it;
    the values are written out, so a change of LONG's lr must carry over to them."""
    arms = run.EXPERIMENTS["long_defaults_q4_0"]

    def lr(arm: str) -> float:
        return load_config(overrides=[*run.COMMON, *arms[arm], "run.out_dir=/tmp/unused"]).optim.lr

    base = lr("grpo")
    assert lr("grpo_lr1.001") == pytest.approx(base * 1.001, rel=1e-12)
    assert lr("seq_tis_lr1.001") == lr("opsm_lr1.001") == lr("grpo_lr1.001")
    assert lr("grpo_mb4_lr0.25") == pytest.approx(base / 4, rel=1e-12)
    for arm in [a for a in arms if a.endswith("_mb4_lr0.25")]:
        assert lr(arm) == pytest.approx(base / 4, rel=1e-12), arm


def test_experiments_keep_the_defaults_they_ran_with() -> None:
    """A default that changed after an experiment ran must not change what its documented command
    runs: harm's DCMDP arms ran unguarded with lam_max 10 (and collapsed), harm_guard's guarded with
    10, harm_guard_lammax1 with its own bound of 1; a new experiment gets today's defaults."""
    from dcmdp.algo.multiplier import MultiplierSettings

    def multiplier(experiment: str, arm: str) -> tuple[float, float]:
        cfg = load_config(
            overrides=[*run.COMMON, *run.EXPERIMENTS[experiment][arm], "run.out_dir=/tmp/unused"]
        )
        return cfg.multiplier.reward_guard, cfg.multiplier.lam_max

    assert multiplier("harm", "dcmdp") == (0.0, 10.0)
    assert multiplier("mismatch", "dcmdp_hinge") == (0.0, 10.0)
    assert multiplier("harm_guard", "dcmdp_guard0.05") == (0.05, 10.0)
    assert multiplier("harm_guard_lammax1", "dcmdp_shaping_guard0.05_lammax1") == (0.05, 1.0)
    assert multiplier("long_methods_q4_0", "dcmdp_guard0.05") == (0.05, 10.0)
    # An experiment no pin names (long_methods has not run) gets today's defaults.
    today = MultiplierSettings()
    assert multiplier("long_methods", "dcmdp_guard0.05") == (0.05, today.lam_max) == (0.05, 1.0)
    # the guard became conditional with the update bound (null); those that ran before keep 0.05
    assert today.reward_guard is None
    assert multiplier("long_stress_q4_0", "dcmdp_full_c1e-4_init0.1_update0.5") == (0.05, 1.0)
    assert multiplier("harm_guard_lammax1", "dcmdp_full_guard0.05_lammax1") == (0.05, 1.0)
    assert multiplier("self_correction", "penalty_on_update0.5") == (0.0, 10.0)
    pinned = {name for names in run.RAN_WITH.values() for name in names}
    assert pinned <= set(run.EXPERIMENTS) and "long_methods" not in pinned

    pins = {"loss.constraint_share=0.0", "loss.constraint_share_of=gradient"}

    def bound(experiment: str, arm: str) -> tuple[float, str]:
        cfg = load_config(
            overrides=[*run.COMMON, *run.EXPERIMENTS[experiment][arm], "run.out_dir=/tmp/unused"]
        )
        return cfg.loss.share(), cfg.loss.constraint_share_of

    # The update bound became the default after these ran: off, or the gradient bound where set.
    assert bound("harm", "dcmdp") == (0.0, "gradient")
    assert bound("long_stress_q4_0", "dcmdp_full_c1e-4_init0.1") == (0.0, "gradient")
    assert bound("harm_share", "dcmdp_share0.5") == (0.5, "gradient")
    assert bound("harm_update_share", "dcmdp_update0.5_noguard") == (0.5, "update")
    assert bound("self_correction", "penalty_on_update0.5") == (0.5, "update")
    assert bound("long_methods", "dcmdp_guard0.05") == (0.5, "update")  # not run yet: today's default
    # kappa 0.25 became the default for a correction composed with a constraint after the long
    # regime's grid had run at 0.5: its arms keep 0.5 unless they set their own
    assert bound("long_defaults_q4_0", "dcmdp_tis") == (0.5, "update")
    assert bound("long_defaults_q4_0", "dcmdp") == (0.5, "update")
    assert bound("long_defaults_q4_0", "dcmdp_tis_k0.25") == (0.25, "update")
    assert bound("long_methods", "dcmdp_tis_guard0.05") == (0.25, "update")  # not run yet: today's
    # Every experiment that had run when the bound became the default, written out here: each arm
    # runs without it unless it sets the bound itself.
    ran_before = {
        "mismatch", "int4", "harm", "int8", "fp8", "self_correction", "tolerance", "multiplier",
        "moe", "smollm2", "harm_capped", "harm_capped_more", "harm_share", "harm_search", "harm_guard",
        "remedies", "long_search", "long_methods_q4_0", "long_stress_q4_0", "harm_guard_lammax1",
        "harm_floor", "harm_update_share", "async_staleness",
    }  # fmt: skip
    for name in ran_before:
        for arm, overrides in run.EXPERIMENTS[name].items():
            if not any(o.startswith("loss.constraint_share") for o in overrides if o not in pins):
                assert bound(name, arm) == (0.0, "gradient"), (name, arm)


def test_steps_of_takes_the_last_override() -> None:
    assert run.steps_of(["run.steps=60", "loss.type=grpo", "run.steps=150"]) == 150
    assert run.steps_of(["loss.type=grpo"]) == 60


def test_arms_of_an_experiment_differ_only_where_named() -> None:
    # Shared budget: every mismatch arm has the same run length, batch and model.
    cfgs = [load_config(overrides=[*run.COMMON, *o]) for o in run.EXPERIMENTS["mismatch"].values()]
    assert len({(c.run.steps, c.run.prompts_per_step, c.run.group_size, c.model.path) for c in cfgs}) == 1


@pytest.mark.slow
def test_gradient_bias_is_zero_without_mismatch_and_not_with_int3() -> None:
    gb = load("gradient_bias")
    model_dir = gb.resolve_base_model(load_config(), lambda msg: None)  # warm start: nonzero rewards
    same = gb.measure("transformers:float32", model_dir, batches=2, seed=0)
    int3 = gb.measure("transformers:float32:int3", model_dir, batches=2, seed=0)
    assert same["cos_naive_is"] > 0.99999 and same["rel_diff"] < 1e-3
    assert abs(same["ratio_p01"] - 1) < 1e-4 and abs(same["ratio_p99"] - 1) < 1e-4
    assert int3["rel_diff"] > 10 * same["rel_diff"] and int3["rel_diff"] > 1e-3
    assert int3["ratio_p01"] < 0.99 < 1.01 < int3["ratio_p99"]
    for res in (same, int3):
        assert -1.0 <= res["cos_between_batches"] <= 1.0
        quartiles = res["by_length"]
        assert len(quartiles) == 4 and all(
            a["len_max"] <= b["len_min"] for a, b in itertools.pairwise(quartiles)
        )
    assert all(q["prob_gap_mean"] < 1e-5 for q in same["by_length"])
    assert all(q["seq_abs_log_ratio_mean"] > 0 for q in int3["by_length"])


def _fake_runs(root: Path, key: str, arms: list[str], seeds: list[int]) -> None:
    for arm in arms:
        for seed in seeds:
            d = root / key / arm / f"seed{seed}"
            d.mkdir(parents=True)
            rows = [
                {"kind": "eval", "step": 0, "eval/accuracy_greedy": 0.4, "eval/accuracy_sampled": 0.3},
                {"kind": "train", "step": 1, "reward/mean": 0.5, "discrepancy/prob_gap_mean": 0.001},
                {"kind": "eval", "step": 1, "eval/accuracy_greedy": 0.5, "eval/accuracy_sampled": 0.4},
            ]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


def test_reduced_experiment_leaves_published_results_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    published = ROOT / "docs" / "results" / "harm"
    before = _snapshot(published)
    assert before, "docs/results/harm holds the published figures"
    monkeypatch.setattr(run, "RUNS", tmp_path)
    monkeypatch.setattr(run, "launch", lambda *a, **k: None)
    monkeypatch.setattr(run.subprocess, "call", lambda *a, **k: 0)  # the `dcmdp report` call
    # one arm, one seed, a shorter run: the example of a reduced reproduction
    extra = ["run.steps=10"]
    key = run.runs_key("harm", extra)
    assert key != "harm"  # runs with other settings do not share the grid's run directories
    _fake_runs(tmp_path, key, ["grpo"], [0])
    monkeypatch.setattr(sys, "argv", ["run.py", "harm", "--arms", "grpo", "--seeds", "0", "--set", *extra])
    assert run.main() == 0
    assert _snapshot(published) == before
    assert (tmp_path / key / "results" / "summary.json").exists()
    assert "left as it is" in capsys.readouterr().out


def test_documented_grid_is_recognised() -> None:
    arms = list(run.EXPERIMENTS["harm"])
    assert run.is_documented_grid("harm", arms, [2, 1, 0], ["run.threads=1"])
    assert not run.is_documented_grid("harm", arms[:1], [0, 1, 2], [])
    assert not run.is_documented_grid("harm", arms, [0], [])
    assert not run.is_documented_grid("harm", arms, [0, 1, 2], ["run.steps=10"])
    assert run.runs_key("harm", ["run.threads=1"]) == "harm"
    # keeping checkpoints changes what a run leaves behind, not what it computes
    assert run.runs_key("harm", ["run.threads=1", "run.checkpoint_every=200"]) == "harm"
    assert run.runs_key("harm", ["run.checkpoint_every=200", "run.steps=10"]) != "harm"
    assert run.results_dir("harm", True) == ROOT / "docs" / "results" / "harm"


def test_summary_of_an_unfinished_grid_is_not_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # `harm --summary-only` with no runs used to overwrite docs/results/harm with empty lists
    published = ROOT / "docs" / "results" / "harm"
    before = _snapshot(published)
    monkeypatch.setattr(run, "RUNS", tmp_path)
    monkeypatch.setattr(run.subprocess, "call", lambda *a, **k: 0)
    monkeypatch.setattr(sys, "argv", ["run.py", "harm", "--summary-only"])
    assert run.main() == 0
    assert _snapshot(published) == before
    assert "only 0 of its" in capsys.readouterr().out


def test_the_summary_leaves_out_runs_still_going(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "RUNS", tmp_path)
    arms = {"grpo": run.EXPERIMENTS["harm"]["grpo"]}
    _fake_runs(tmp_path, "harm", ["grpo"], [0, 1])
    done = tmp_path / "harm" / "grpo" / "seed0" / "metrics.jsonl"
    with done.open("a") as fh:  # seed 0 reached its last step (150 in harm); seed 1 stopped at step 1
        fh.write(json.dumps({"kind": "eval", "step": 150, "eval/accuracy_greedy": 0.9}) + "\n")
    table = run.summarise("harm", arms, [0, 1], tmp_path / "out")
    row = next(line for line in table.splitlines() if line.startswith("| grpo |"))
    assert row.split("|")[2].strip() == "1"  # one seed: the finished one
    assert "0.900 ± 0.000" in row  # its last evaluation, not a mix with the partial run


def test_gradient_bias_plots_the_gap_against_length_from_a_summary(tmp_path: Path) -> None:
    quartiles = [
        {"len_min": a, "len_max": b, "prob_gap_mean": g, "seq_abs_log_ratio_mean": r}
        for a, b, g, r in ((10, 20, 1e-3, 0.1), (20, 40, 2e-3, 0.3))
    ]
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"results": [{"setting": "x:float32", "by_length": quartiles}]}))
    png = tmp_path / "by_length.png"
    script = str(ROOT / "experiments" / "gradient_bias.py")
    ok = subprocess.run([sys.executable, script, "--from-summary", str(summary), "--plot", str(png)])
    assert ok.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [sys.executable, script, "--from-summary", str(summary)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "give --plot PNG" in bad.stderr


def test_gradient_bias_leaves_out_batches_without_a_reward_signal() -> None:
    gb = load("gradient_bias")
    nan = float("nan")
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    rows = [
        {"cos_naive_is": nan, "rel_diff": nan, "signal": False},  # every group's rewards equal
        {"cos_naive_is": 0.5, "rel_diff": 2.0, "signal": True},
        {"cos_naive_is": 0.9, "rel_diff": 0.4, "signal": True},
        {"cos_naive_is": 0.7, "rel_diff": 1.0, "signal": True},
    ]
    grads = [torch.zeros(2), e1, e1, e2]
    stats = gb.gradient_stats(rows, grads)
    assert stats["batches_with_signal"] == 3
    assert stats["cos_naive_is"] == 0.7 and stats["rel_diff"] == 1.0  # medians of the three
    # noise: batches 1-2 (cos 1) and 2-3 (cos 0); the zero batch 0 is not a neighbour of anything
    assert stats["cos_between_batches"] == pytest.approx(0.5)
    # a signal batch between two without: no pair, no noise figure
    lone = gb.gradient_stats([{**rows[0]}, rows[1], {**rows[0]}], [torch.zeros(2), e1, torch.zeros(2)])
    assert lone["batches_with_signal"] == 1 and math.isnan(lone["cos_between_batches"])
    none = gb.gradient_stats([rows[0]], [torch.zeros(2)])
    assert none["batches_with_signal"] == 0 and math.isnan(none["cos_naive_is"])


def test_gradient_bias_refuses_an_unknown_or_absent_device_before_any_engine_starts() -> None:
    script = str(ROOT / "experiments" / "gradient_bias.py")
    bad = subprocess.run([sys.executable, script, "--device", "tpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--device" in bad.stderr and "'tpu' is unknown" in bad.stderr
    if not torch.cuda.is_available():
        absent = subprocess.run([sys.executable, script, "--device", "cuda"], capture_output=True, text=True)
        assert absent.returncode == 2 and "no CUDA device is visible" in absent.stderr


def test_mean_interval_is_the_t_interval() -> None:
    # 3 values, mean 2, sample std 1: half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.732
    m, lo, hi = run.mean_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.303 / 3**0.5) and m - lo == pytest.approx(hi - m)
    assert run.mean_interval([0.5]) is None
    many = run.mean_interval([float(i % 2) for i in range(100)])  # beyond the table: t at 30 df
    assert many is not None and many[2] - many[0] == pytest.approx(2.042 * 0.5025 / 10, rel=1e-3)


def test_the_summary_pairs_each_arm_with_grpo_by_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run, "RUNS", tmp_path)
    arms = {a: run.EXPERIMENTS["harm"][a] for a in ("grpo", "tis")}

    def fake(arm: str, seed: int, start: float, evals: list[float]) -> None:
        d = tmp_path / "harm" / arm / f"seed{seed}"
        d.mkdir(parents=True)
        rows = [{"kind": "eval", "step": 0, "eval/accuracy_greedy": start}]
        rows += [{"kind": "train", "step": 1, "reward/mean": 0.5, "discrepancy/prob_gap_mean": 0.001}]
        rows += [
            {"kind": "eval", "step": 150 - 10 * i, "eval/accuracy_greedy": e} for i, e in enumerate(evals)
        ]
        rows.sort(key=lambda r: (r["step"], r["kind"] == "eval"))
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    # grpo gains 0.1 on seed 1 and 0.3 on seed 2; tis gains 0.2 on both, and has seed 0, which
    # grpo lacks, first (so pairing by position would pair tis's seed 0 with grpo's seed 1)
    fake("grpo", 1, 0.4, [0.5, 0.5, 0.5])
    fake("grpo", 2, 0.2, [0.5, 0.5, 0.5])
    fake("tis", 0, 0.0, [0.9, 0.9, 0.9])
    fake("tis", 1, 0.3, [0.5, 0.5, 0.5])
    fake("tis", 2, 0.3, [0.5, 0.5, 0.5])
    table = run.summarise("harm", arms, [0, 1, 2], tmp_path / "out")
    row = next(line for line in table.splitlines() if line.startswith("| tis | 2 |"))
    assert "+0.100 (seed 1), -0.100 (seed 2)" in row and "seed 0" not in row
    # mean 0, std 0.1414: half-width 12.706 * 0.1414 / sqrt(2) = 1.271
    assert "+0.000 [-1.271, +1.271]" in row
    saved = json.loads((tmp_path / "out" / "paired.json").read_text())
    assert saved["reference"] == "grpo"
    assert saved["gain_minus_reference"]["tis"] == pytest.approx({"1": 0.1, "2": -0.1})
    assert set(json.loads((tmp_path / "out" / "summary.json").read_text())) == {"grpo", "tis"}


def _fake_run(
    root: Path, key: str, arm: str, seed: int, start: float, evals: list[float], steps: int
) -> None:
    """A finished run of ``steps`` steps: greedy accuracy ``start`` at step 0, ``evals`` after."""
    d = root / key / arm / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"kind": "eval", "step": 0, "eval/accuracy_greedy": start}]
    rows += [{"kind": "train", "step": 1, "reward/mean": 0.5, "discrepancy/prob_gap_mean": 0.002}]
    rows += [
        {"kind": "eval", "step": steps - len(evals) + 1 + i, "eval/accuracy_greedy": e}
        for i, e in enumerate(evals)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_recorded_runs_from_another_machine_pair_with_runs_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arms = {a: run.EXPERIMENTS["harm"][a] for a in ("grpo", "tis")}
    records = tmp_path / "runs.json"
    # "another machine": grpo's seed 2 ran there and was recorded
    monkeypatch.setattr(run, "RUNS", tmp_path / "there")
    _fake_run(tmp_path / "there", "harm", "grpo", 2, 0.2, [0.5, 0.5, 0.5], 150)
    _fake_run(tmp_path / "there", "harm", "tis", 0, 0.0, [0.1], 80)  # stopped at step 80 of 150
    assert run.record_runs(records, "harm", arms, [0, 1, 2], []) == ([("grpo", 2)], [])
    kept = run.load_records(records)["harm"]["grpo"]["2"]
    assert kept["acc_last3"] == pytest.approx(0.5) and kept["acc_start"] == pytest.approx(0.2)
    assert kept["d_first5"] == pytest.approx(0.002) and kept["lambda_end"] is None
    assert kept["cpu"] and kept["commit"] and kept["set"] == []
    # here: grpo's seed 1 and tis's seeds 1 and 2; grpo's seed 1 is also in the record, with
    # other figures, and the run here wins
    monkeypatch.setattr(run, "RUNS", tmp_path / "here")
    _fake_run(tmp_path / "here", "harm", "grpo", 1, 0.4, [0.5, 0.5, 0.5], 150)
    _fake_run(tmp_path / "here", "harm", "tis", 1, 0.3, [0.5, 0.5, 0.5], 150)
    _fake_run(tmp_path / "here", "harm", "tis", 2, 0.3, [0.5, 0.5, 0.5], 150)
    data = run.load_records(records)
    data["harm"]["grpo"]["1"] = {**kept, "acc_start": 0.0}
    records.write_text(json.dumps(data))
    recorded = run.load_records(records)["harm"]
    table = run.summarise("harm", arms, [0, 1, 2], tmp_path / "out", recorded=recorded)
    assert next(line for line in table.splitlines() if line.startswith("| grpo |")).split("|")[2].strip() == (
        "2 (1 recorded)"
    )
    # tis gains 0.2 on both seeds; grpo 0.1 on seed 1 (here, not the record's 0.5) and 0.3 on seed 2
    assert "+0.100 (seed 1), -0.100 (seed 2)" in table
    assert f"- grpo seed 2: {kept['cpu']}" in table  # where the filled seed ran
    without = run.summarise("harm", arms, [0, 1, 2], tmp_path / "out")
    assert "+0.100 (seed 1) |" in without and "seed 2" not in without.split("per seed")[1]


def test_runs_from_different_warm_starts_are_not_paired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's warm_start.json goes into its record; a table that would mix two warm starts (runs
    here against records, or runs here among themselves) stops and names them."""
    arms = {a: run.EXPERIMENTS["harm"][a] for a in ("grpo", "tis")}
    records = tmp_path / "runs.json"

    def warm(root: Path, arm: str, seed: int, weights: str) -> None:
        record = {"model_path": "long-addition", "weights": weights, "pretrain_accuracy": 0.3}
        (root / "harm" / arm / f"seed{seed}" / "warm_start.json").write_text(json.dumps(record))

    monkeypatch.setattr(run, "RUNS", tmp_path / "there")
    _fake_run(tmp_path / "there", "harm", "grpo", 2, 0.2, [0.5, 0.5, 0.5], 150)
    warm(tmp_path / "there", "grpo", 2, "aaaa")
    run.record_runs(records, "harm", arms, [2], [])
    kept = run.load_records(records)["harm"]["grpo"]["2"]
    assert kept["warm_start"] == "aaaa" and kept["warm_start_accuracy"] == 0.3
    # here, from the same warm start: paired, and the table names it
    monkeypatch.setattr(run, "RUNS", tmp_path / "here")
    for arm, seed in (("grpo", 1), ("tis", 1), ("tis", 2)):
        _fake_run(tmp_path / "here", "harm", arm, seed, 0.3, [0.5, 0.5, 0.5], 150)
        warm(tmp_path / "here", arm, seed, "aaaa")
    recorded = run.load_records(records)["harm"]
    table = run.summarise("harm", arms, [1, 2], tmp_path / "out", recorded=recorded)
    assert "Warm start (model weight fingerprint): aaaa" in table and "grpo seed 2:" in table
    # here from another one: refused, naming both
    warm(tmp_path / "here", "tis", 2, "bbbb")
    with pytest.raises(SystemExit, match=r"2 different warm starts.*aaaa: grpo seed 1 \(here\)"):
        run.summarise("harm", arms, [1, 2], tmp_path / "out", recorded=recorded)
    with pytest.raises(SystemExit, match=r"bbbb: tis seed 2 \(here\)") as local:  # without records too
        run.summarise("harm", arms, [1, 2], tmp_path / "out")
    assert "--pair-with-records" not in str(local.value)  # no records used: no such advice
    # a warm_start.json that cannot be read, and a record whose warm_start is not a string, are named
    seed2 = tmp_path / "here" / "harm" / "tis" / "seed2" / "warm_start.json"
    seed2.write_text("{not json")
    with pytest.raises(SystemExit, match=r"warm_start\.json: not readable JSON"):
        run.summarise("harm", arms, [1, 2], tmp_path / "out")
    seed2.write_text(json.dumps({"weights": "bbbb"}))
    data = run.load_records(records)
    data["harm"]["grpo"]["2"]["warm_start"] = {"weights": "aaaa"}
    records.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="warm_start must be a string"):
        run.load_records(records)
    # a run that kept no warm_start.json (written before runs did) cannot be checked: counted
    (tmp_path / "here" / "harm" / "tis" / "seed2" / "warm_start.json").unlink()
    table = run.summarise("harm", arms, [1, 2], tmp_path / "out", recorded=recorded)
    assert "aaaa; 1 runs did not record theirs" in table
    # nor one whose model had no weight file the fingerprint recognises (weights null)
    (tmp_path / "here" / "harm" / "tis" / "seed2" / "warm_start.json").write_text(
        json.dumps({"weights": None})
    )
    assert "aaaa; 1 runs did not record theirs" in run.summarise("harm", arms, [1, 2], tmp_path / "out")


def test_the_long_experiments_name_the_pinned_warm_start() -> None:
    """Every long-response arm starts from "long-addition-cap2000" (the cap its results were
    measured from), and PREPARE builds that one, whatever the default "long-addition" becomes;
    only long_cap3500_q4_0 names "long-addition", and PREPARE builds pretrain's default for it."""
    from dcmdp.pretrain import (
        LONG_ADDITION_CAP2000_PRETRAIN,
        LONG_ADDITION_PRETRAIN,
        WARM_STARTS,
        default_out_dir,
    )

    assert WARM_STARTS["long-addition-cap2000"][0].max_steps == 2000
    assert WARM_STARTS["long-addition"][0].max_steps == 3500
    prepare = {
        "long-addition-cap2000": [["pretrain", "--task", "long_addition", "--max-steps", "2000"]],
        "long-addition": [["pretrain", "--task", "long_addition"]],
    }
    named = set()
    for name, arms in run.EXPERIMENTS.items():
        for arm, overrides in arms.items():
            if "task.name=long_addition" in overrides:
                paths = [o for o in overrides if o.startswith("model.path=")]
                model = "long-addition" if name == "long_cap3500_q4_0" else "long-addition-cap2000"
                assert paths == [f"model.path={model}"], (name, arm)
                assert run.PREPARE[name] == prepare[model], name
                named.add(model)
    assert named == set(prepare)
    # "long-addition" is a moving name: long_cap3500_q4_0 ran from the cap-2,000 settings with a
    # cap of 3,500; change them and that experiment needs a pinned name as cap2000 got
    assert WARM_STARTS["long-addition"][0] == replace(LONG_ADDITION_CAP2000_PRETRAIN, max_steps=3500)
    # it ran at the defaults of its day: no pinned default of an older experiment leaks in
    pinned = {setting.split("=", 1)[0] for setting in run.RAN_WITH}
    for arm, overrides in run.EXPERIMENTS["long_cap3500_q4_0"].items():
        assert not [o for o in overrides if o.split("=", 1)[0] in pinned], arm
    assert default_out_dir(LONG_ADDITION_CAP2000_PRETRAIN).name == WARM_STARTS["long-addition-cap2000"][1]
    assert default_out_dir(LONG_ADDITION_PRETRAIN).name == WARM_STARTS["long-addition"][1]


def test_the_summary_counts_runs_of_a_length_set_with_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run, "RUNS", tmp_path)
    arms = {"grpo": run.EXPERIMENTS["harm"]["grpo"]}  # 150 steps by its own settings
    _fake_run(tmp_path, "harm+x", "grpo", 0, 0.4, [0.6], 15)
    short = run.summarise("harm", arms, [0], tmp_path / "out", key="harm+x", extra=["run.steps=15"])
    assert "| grpo | 1 | 0.400" in short
    # without the override the run is short of the arm's 150 steps: still going, left out
    assert "| grpo | 0 |" in run.summarise("harm", arms, [0], tmp_path / "out", key="harm+x")


def test_a_record_from_another_cpu_is_kept_and_a_broken_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arms = {"grpo": run.EXPERIMENTS["harm"]["grpo"]}
    records = tmp_path / "runs.json"
    monkeypatch.setattr(run, "RUNS", tmp_path)
    _fake_run(tmp_path, "harm", "grpo", 0, 0.2, [0.5], 150)
    monkeypatch.setattr(run, "this_cpu", lambda: "CPU A")
    assert run.record_runs(records, "harm", arms, [0], []) == ([("grpo", 0)], [])
    assert run.record_runs(records, "harm", arms, [0], []) == ([("grpo", 0)], [])  # same CPU: replaced
    monkeypatch.setattr(run, "this_cpu", lambda: "CPU B")
    assert run.record_runs(records, "harm", arms, [0], []) == ([], [("grpo", 0, "CPU A")])
    assert run.load_records(records)["harm"]["grpo"]["0"]["cpu"] == "CPU A"
    data = run.load_records(records)
    del data["harm"]["grpo"]["0"]["acc_end"]
    records.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match=r"harm / grpo / seed 0: missing or not a number: \['acc_end'\]"):
        run.load_records(records)
    records.write_text("{")
    with pytest.raises(SystemExit, match="not valid JSON"):
        run.load_records(records)


def test_a_record_names_the_commit_its_run_was_launched_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit comes from the run's launched.json (one per launch: a resume at other code
    joins them, a fresh start begins anew), not from the checkout that records it; a run launched
    before that file existed keeps the commit it was first recorded with while its figures stay
    the same, and a resume of it says its first commit is unknown."""
    arms = {"grpo": run.EXPERIMENTS["harm"]["grpo"]}
    records = tmp_path / "runs.json"
    monkeypatch.setattr(run, "RUNS", tmp_path)
    monkeypatch.setattr(run, "this_cpu", lambda: "CPU A")
    out = run.run_dir("harm", "grpo", 0)

    def at(commit: str) -> None:
        monkeypatch.setattr(run, "this_commit", lambda: commit)

    def recorded(seed: int) -> str:
        return run.load_records(records)["harm"]["grpo"][str(seed)]["commit"]

    # seed 0: a start at zzz that logged nothing, a fresh start at aaa, resumes at bbb and bbb
    at("zzz")
    run.note_launch(out)
    at("aaa")
    run.note_launch(out)
    assert run.launch_commits(out) == ["aaa"]
    _fake_run(tmp_path, "harm", "grpo", 0, 0.2, [0.5], 150)
    at("bbb")
    run.note_launch(out)
    run.note_launch(out)
    assert run.launch_commits(out) == ["aaa", "bbb", "bbb"]
    _fake_run(tmp_path, "harm", "grpo", 1, 0.2, [0.5], 150)  # seed 1: no launched.json
    at("ccc")
    assert run.record_runs(records, "harm", arms, [0, 1], [])[0] == [("grpo", 0), ("grpo", 1)]
    assert (recorded(0), recorded(1)) == ("aaa+bbb", "ccc")
    # recorded again from another checkout: seed 1's figures are the same, so its commit stays,
    # also when the run now has a figure its record lacks (a warm start, NaN reward)
    data = run.load_records(records)
    data["harm"]["grpo"]["1"]["reward_last20"] = math.nan
    records.write_text(json.dumps(data))
    rows = (
        (run.run_dir("harm", "grpo", 1) / "metrics.jsonl")
        .read_text()
        .replace('"reward/mean": 0.5', '"reward/mean": NaN')
    )
    (run.run_dir("harm", "grpo", 1) / "metrics.jsonl").write_text(rows)
    (run.run_dir("harm", "grpo", 1) / "warm_start.json").write_text(json.dumps({"weights": "w1-x"}))
    at("ddd")
    run.record_runs(records, "harm", arms, [0, 1], [])
    assert (recorded(0), recorded(1)) == ("aaa+bbb", "ccc")
    assert run.load_records(records)["harm"]["grpo"]["1"]["warm_start"] == "w1-x"
    # ... but a changed run is recorded anew, with the checkout's commit
    shutil.rmtree(run.run_dir("harm", "grpo", 1))
    _fake_run(tmp_path, "harm", "grpo", 1, 0.3, [0.5], 150)
    run.record_runs(records, "harm", arms, [1], [])
    assert recorded(1) == "ddd"
    # a resume of a run started before launched.json: its first commit is unknown; a run whose
    # every launch commit is unknown (no git) falls back to the checkout's
    seed1 = run.run_dir("harm", "grpo", 1)
    run.note_launch(seed1)
    assert run.launch_commits(seed1) == [run.UNKNOWN_COMMIT, "ddd"]
    assert run.commit_of(seed1, "eee") == "unknown+ddd"
    (seed1 / run.LAUNCH_FILE).write_text(json.dumps({"commits": [run.UNKNOWN_COMMIT]}))
    assert run.commit_of(seed1, "eee") == "eee"
    # with a launched.json, a record is replaced whatever it said before
    at("fff")
    (out / run.LAUNCH_FILE).write_text(json.dumps({"commits": ["fff"]}))
    run.record_runs(records, "harm", arms, [0], [])
    assert recorded(0) == "fff"
    (out / run.LAUNCH_FILE).write_text("{not json")
    assert run.launch_commits(out) is None
    run.note_launch(out)  # an unreadable file on a resume: earlier commits unknown
    assert run.launch_commits(out) == [run.UNKNOWN_COMMIT, "fff"]


def test_stalled_runs_are_those_whose_reward_fell_below_half_the_reference_median() -> None:
    record = {
        "grpo": {"seeds": [0, 1, 2], "reward_last20": [0.05, 0.06, 0.04]},
        "a": {"seeds": [0, 1, 2], "reward_last20": [0.024, 0.026, 0.01]},  # line: 0.5 x 0.05 = 0.025
        "b": {"seeds": [3], "reward_last20": [0.03]},
    }
    line, found = run.stalled(record, "grpo")
    assert line == pytest.approx(0.025)
    assert found == {"a": [0, 2]}  # the seeds, not the positions; arms with none are left out
    record["grpo"]["reward_last20"] = [0.01, 0.06, 0.04]  # the median, not the mean: one stalled GRPO run
    assert run.stalled(record, "grpo") == (pytest.approx(0.02), {"grpo": [0], "a": [2]})


def test_stalled_leaves_nan_out_of_the_line_and_names_nan_runs() -> None:
    nan = float("nan")
    record = {
        "grpo": {"seeds": [0, 1, 2], "reward_last20": [nan, 0.06, 0.04]},
        "a": {"seeds": [0], "reward_last20": [nan]},
    }
    assert run.stalled(record, "grpo") == (pytest.approx(0.025), {"grpo": [0], "a": [0]})
    record["grpo"]["reward_last20"] = [0.06, nan, 0.04]  # the order does not matter
    assert run.stalled(record, "grpo")[0] == pytest.approx(0.025)
    line, found = run.stalled({"grpo": {"seeds": [], "reward_last20": []}}, "grpo")
    assert math.isnan(line) and found == {}


def test_the_recorded_commit_is_dirty_only_when_the_code_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "runs.json").write_text("{}\n")
    git("add", "-A")
    git("commit", "-qm", "c")
    monkeypatch.setattr(run, "ROOT", tmp_path)
    clean = run.this_commit()
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "docs" / "results" / "runs.json").write_text('{"x": {}}\n')  # a record: still clean
    assert run.this_commit() == clean
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    assert run.this_commit() == clean + "-dirty"
