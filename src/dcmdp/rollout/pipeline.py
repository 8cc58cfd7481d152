"""Overlap rollout and training: a rollout worker process with bounded staleness.

:class:`AsyncRollout` is the second :class:`~dcmdp.rollout.source.RolloutSource`. It owns the
engine in its own process, which samples the batch of step k+1 (and up to ``max_staleness``
ahead) while the trainer updates on batch k. The loop keeps its shape: it asks for the next batch
and hands over new weights.

The schedule is fixed, so runs repeat exactly: the batch of step s is sampled with policy version
``max(start, s - 1 - N)`` (N = ``run.max_staleness``; version v = the weights after v updates;
``start`` = the step a run starts or resumes at). The trainer publishes version k after update
k and at once asks for the batch of step k + 1 + N; the worker takes its commands in order, so it
loads version k before it samples that batch. ``Rollout.version`` says which version sampled a
batch.

Weights reach the worker through N + 1 shared-memory slots (version v lives in slot v mod (N+1)).
Publishing is one copy into a slot; before it overwrites a slot the trainer checks that the
worker has loaded the version the slot held (a shared counter), which the schedule guarantees
once the batch that version sampled has arrived, so the learner never waits longer than the copy.

The trainer keeps the parameters of the versions still in flight (:class:`PolicyVersions`) so it
can score a stale batch with the policy that sampled it: the engine gap (engine against its own
sampling version) and the staleness gap (sampling version against the current policy) are then
measured apart (docs/concepts.md, "Asynchronous rollouts").

Failure handling: a worker that dies or sends nothing for ``timeout_s`` stops the run with
:class:`RolloutWorkerError` (the last checkpoint stays on disk for ``--resume``); the worker ignores
Ctrl-C (the trainer shuts it down) and exits on its own when the trainer process disappears.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import queue
import signal
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.multiprocessing as mp

from dcmdp.engines.base import EngineSpec, GenerateResult, SamplingSettings
from dcmdp.rollout.step import Rollout
from dcmdp.tasks import Task

#: How often (s) a waiting side checks that the other process is still alive.
POLL_S = 0.5
#: The worker's start (imports, engine build: vLLM takes tens of seconds) may take this long even
#: when ``timeout_s`` is shorter.
START_TIMEOUT_S = 300.0


Layout = list[tuple[str, torch.dtype, int, tuple[int, ...]]]
"""Where each tensor lives in a slot: (name, dtype, offset in that dtype's flat buffer, shape)."""


def slot_layout(named: list[tuple[str, torch.Tensor]]) -> tuple[Layout, dict[torch.dtype, int]]:
    """Pack tensors into one flat buffer per dtype: each tensor's offset, and each buffer's size."""
    layout: Layout = []
    sizes: dict[torch.dtype, int] = {}
    for name, t in named:
        offset = sizes.get(t.dtype, 0)
        layout.append((name, t.dtype, offset, tuple(t.shape)))
        sizes[t.dtype] = offset + t.numel()
    return layout, sizes


def slot_views(buffers: dict[torch.dtype, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Each tensor of a slot as a view into its flat buffer."""
    return {
        name: buffers[dtype].narrow(0, offset, math.prod(shape)).view(shape)
        for name, dtype, offset, shape in layout
    }


class RolloutWorkerError(RuntimeError):
    """The rollout worker crashed, hung past its timeout, or reported an error."""


@dataclass(frozen=True)
class WorkerSpec:
    """What the worker process builds its engine, task and tokenizer from (all picklable)."""

    engine: EngineSpec
    task: Task
    """The task itself (pickled), so a task registered at run time works in the worker too."""
    tokenizer_path: str
    sampling: SamplingSettings
    prompts_per_step: int
    group_size: int
    seed: int
    threads: int = 1
    """torch threads in the worker (the learner keeps its own ``run.threads``)."""
    cores: tuple[int, ...] = ()
    """CPU cores to pin the worker to (empty = no pinning)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables set in the worker before the engine is built."""


def rollout_cores(n_cpus: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split the cores this process may use: (worker's, learner's). The worker gets the last
    half (at least one); with a single core both share it."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = list(range(n_cpus or os.cpu_count() or 1))
    if n_cpus is not None:
        allowed = allowed[:n_cpus]
    if len(allowed) < 2:
        return tuple(allowed), tuple(allowed)
    k = max(1, len(allowed) // 2)
    return tuple(allowed[-k:]), tuple(allowed[:-k])


# ----------------------------------------------------------------------------- worker process


def _worker_main(
    spec: WorkerSpec,
    buffers: list[dict[torch.dtype, torch.Tensor]],
    layout: Layout,
    commands: Any,
    results: Any,
    loaded: Any,
    parent_pid: int,
) -> None:
    """The worker: build the engine, then follow commands until ``stop`` (or the parent is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    engine = None
    slots = [slot_views(b, layout) for b in buffers]
    try:
        os.environ.update(spec.env)
        if spec.cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, spec.cores)
        torch.set_num_threads(max(1, spec.threads))
        from dcmdp.engines.base import make_engine
        from dcmdp.evaluate import evaluate_accuracy
        from dcmdp.models import load_tokenizer
        from dcmdp.rollout.source import SyncRollout

        task = spec.task
        tokenizer = load_tokenizer(spec.tokenizer_path)
        engine = make_engine(spec.engine)
        source = SyncRollout(
            engine, task, tokenizer, spec.sampling, spec.prompts_per_step, spec.group_size, spec.seed
        )
        version = -1
        results.put(("ready", os.getpid()))
        while True:
            try:
                cmd = commands.get(timeout=POLL_S)
            except queue.Empty:
                if os.getppid() != parent_pid:  # the trainer died (kill -9): do not linger
                    # A batch nobody will read may still sit in the queue's pipe: exit without
                    # waiting to flush it.
                    results.cancel_join_thread()
                    return
                continue
            kind = cmd[0]
            if kind == "stop":
                results.cancel_join_thread()  # the trainer no longer reads what is in flight
                return
            if kind == "weights":
                _, version, slot = cmd
                # A copy, so the trainer may overwrite the slot while this version samples.
                engine.load_weights((n, t.clone()) for n, t in slots[slot].items())
                loaded.value = version
            elif kind == "sample":
                step = cmd[1]
                ro = source.next_batch(step)
                ro.version = version
                # Plain numbers, not a tensor: a tensor crosses a queue as a shared-memory handle
                # that the receiver can open only while this process lives.
                rewards = ro.rewards_N.tolist()
                ro.rewards_N = torch.empty(0)
                results.put(("batch", step, ro, rewards))
            elif kind == "probe":
                _, prompts, sampling, seed = cmd
                results.put(("probe", version, engine.generate(prompts, sampling, n=1, seed=seed)))
            elif kind == "eval":
                _, problems, greedy, sampled, seed = cmd
                t0 = time.perf_counter()
                row = evaluate_accuracy(engine, task, tokenizer, problems, greedy, sampled, seed=seed)
                row["time/eval"] = time.perf_counter() - t0
                results.put(("eval", version, row))
            else:
                raise ValueError(f"unknown command {kind!r}")
    except BaseException:
        results.put(("error", traceback.format_exc()))
    finally:
        if engine is not None:
            engine.close()


# ----------------------------------------------------------------------------- trainer side


class AsyncRollout:
    """Rollouts from a worker process, at most ``max_staleness`` policy versions old.

    Usage (what :func:`dcmdp.trainer.train` does)::

        source = AsyncRollout(spec, model.named_parameters(), max_staleness=1)
        source.publish_weights(model.named_parameters())   # version `start`; sampling begins
        for step in ...:
            ro = source.next_batch(step)                   # ro.version: who sampled it
            ...update...
            source.publish_weights(model.named_parameters())
        source.close()
    """

    def __init__(
        self,
        spec: WorkerSpec,
        named_params: Iterable[tuple[str, torch.Tensor]],
        max_staleness: int,
        start_version: int = 0,
        timeout_s: float = 600.0,
        last_step: int | None = None,
    ) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = max_staleness
        self.timeout_s = timeout_s
        self.version = start_version - 1  # the first publish is version start_version
        self._start = start_version
        self.last_step = last_step
        """No batch is sampled for a step beyond this one (the run's last)."""
        self._received: dict[int, Rollout] = {}
        ctx = mp.get_context("spawn")
        # One flat shared buffer per dtype per slot (one file descriptor each, not one per tensor).
        layout, sizes = slot_layout([(n, t.detach()) for n, t in named_params])
        self.buffers = [
            {dtype: torch.empty(size, dtype=dtype).share_memory_() for dtype, size in sizes.items()}
            for _ in range(max_staleness + 1)
        ]
        self.slots = [slot_views(b, layout) for b in self.buffers]
        self._commands = ctx.Queue()
        self._results = ctx.Queue()
        self._loaded = ctx.Value("q", -1)
        self.process = ctx.Process(
            target=_worker_main,
            args=(spec, self.buffers, layout, self._commands, self._results, self._loaded, os.getpid()),
            daemon=True,
            name="dcmdp-rollout-worker",
        )
        self.process.start()
        self._closed = False
        msg = self._receive("the worker to start", max(timeout_s, START_TIMEOUT_S))
        if msg[0] != "ready":
            raise RolloutWorkerError(f"rollout worker: expected 'ready', got {msg[0]!r}")

    # -- the RolloutSource interface

    def publish_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the weights into the next slot, tell the worker, and ask for the batch they sample."""
        self.version += 1
        v = self.version
        slot_index = v % len(self.slots)
        previous = v - len(self.slots)  # the version this slot held; the worker must be past it
        deadline = time.monotonic() + self.timeout_s
        while previous >= self._start and self._loaded.value < previous:
            self._check_alive("publish")
            if time.monotonic() > deadline:
                raise RolloutWorkerError(
                    f"rollout worker has not loaded version {previous} after {self.timeout_s:.0f}s"
                )
            time.sleep(0.001)
        slot = self.slots[slot_index]
        with torch.no_grad():
            for name, tensor in named_tensors:
                slot[name].copy_(tensor.detach())
        self._commands.put(("weights", v, slot_index))
        first = v == self._start
        for step in range(v + 1 if first else v + 1 + self.max_staleness, v + 2 + self.max_staleness):
            if self.last_step is None or step <= self.last_step:
                self._commands.put(("sample", step))

    def next_batch(self, step: int) -> Rollout:
        """The batch of ``step``; blocks until the worker has sampled it."""
        while step not in self._received:
            msg = self._receive(f"the batch of step {step}")
            if msg[0] != "batch":
                raise RolloutWorkerError(f"rollout worker: expected a batch, got {msg[0]!r}")
            self._received[msg[1]] = _with_rewards(msg[2], msg[3])
        ro = self._received.pop(step)
        oldest = max(self._start, step - 1 - self.max_staleness)
        if ro.version != oldest:
            raise RolloutWorkerError(
                f"step {step}: the batch was sampled by version {ro.version}, the schedule says {oldest}"
            )
        return ro

    # -- beyond the interface: evaluation on the worker's engine, and shutdown

    def evaluate(
        self, problems: list[Any], greedy: SamplingSettings, sampled: SamplingSettings | None, seed: int
    ) -> dict[str, float]:
        """Accuracy on the deployment engine with the newest published version (waits for it)."""
        self._commands.put(("eval", problems, greedy, sampled, seed))
        return dict(self._reply("eval", "an evaluation"))

    def probe(self, prompts: list[list[int]], sampling: SamplingSettings, seed: int) -> GenerateResult:
        """One sample of each prompt with the newest published version (the weight-sync check)."""
        self._commands.put(("probe", prompts, sampling, seed))
        result: GenerateResult = self._reply("probe", "the weight-sync probe")
        return result

    def _reply(self, kind: str, waiting_for: str) -> Any:
        """The worker's answer to the command just sent, made with the newest published version;
        batches sampled ahead that arrive first are kept for ``next_batch``."""
        while True:
            msg = self._receive(waiting_for)
            if msg[0] == "batch":
                self._received[msg[1]] = _with_rewards(msg[2], msg[3])
                continue
            if msg[0] != kind or msg[1] != self.version:
                raise RolloutWorkerError(
                    f"rollout worker: expected {kind} of version {self.version}, got {msg[:2]!r}"
                )
            return msg[2]

    def close(self, timeout_s: float = 3.0) -> None:
        """Stop the worker (asks and waits ``timeout_s``, then terminates, then kills); safe to
        call twice. A worker in the middle of a generation is terminated rather than waited for."""
        if self._closed:
            return
        self._closed = True
        if self.process.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self._commands.put(("stop",))
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        for q in (self._commands, self._results):
            q.cancel_join_thread()
            q.close()

    # -- helpers

    def _check_alive(self, waiting_for: str) -> None:
        if not self.process.is_alive():
            raise RolloutWorkerError(
                f"the rollout worker died (exit code {self.process.exitcode}) while the trainer waited "
                f"for {waiting_for}; the last checkpoint is kept: continue with --resume"
            )

    def _receive(self, waiting_for: str, timeout_s: float | None = None) -> tuple[Any, ...]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                msg = self._results.get(timeout=POLL_S)
            except (ConnectionError, EOFError, OSError) as exc:  # the worker died mid-message
                time.sleep(POLL_S)
                self._check_alive(waiting_for)
                raise RolloutWorkerError(f"the rollout worker's message was cut off ({exc})") from None
            except queue.Empty:
                self._check_alive(waiting_for)
                if time.monotonic() > deadline:
                    raise RolloutWorkerError(
                        f"the rollout worker sent nothing for {timeout_s:.0f}s while the trainer "
                        f"waited for {waiting_for} (run.rollout_timeout_s); the last checkpoint is "
                        "kept: continue with --resume"
                    ) from None
                continue
            if msg[0] == "error":
                raise RolloutWorkerError(f"the rollout worker failed:\n{msg[1]}")
            return tuple(msg)


def _with_rewards(ro: Rollout, rewards: list[float]) -> Rollout:
    ro.rewards_N = torch.tensor(rewards)
    return ro


class PolicyVersions:
    """The trainer's copies of the policy versions a stale batch may have been sampled with.

    ``save(v, model)`` after version v is published keeps the last ``keep`` versions;
    ``model_at(v)`` is a second module holding version v's parameters (built once, reloaded as
    needed), with which the trainer scores a batch as the policy that sampled it did.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._states: dict[int, dict[str, torch.Tensor]] = {}
        self._shadow: torch.nn.Module | None = None
        self._shadow_version: int | None = None

    def save(self, version: int, model: torch.nn.Module) -> None:
        self._states[version] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for old in [v for v in self._states if v <= version - self.keep]:
            del self._states[old]

    def __contains__(self, version: int) -> bool:
        return version in self._states

    def model_at(self, version: int, like: torch.nn.Module) -> torch.nn.Module:
        if version not in self._states:
            raise KeyError(f"policy version {version} is not kept (kept: {sorted(self._states)})")
        if self._shadow is None:
            self._shadow = copy.deepcopy(like).eval()
            for p in self._shadow.parameters():
                p.requires_grad_(False)
        if self._shadow_version != version:
            self._shadow.load_state_dict(self._states[version])
            self._shadow_version = version
        return self._shadow
