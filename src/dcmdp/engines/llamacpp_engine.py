"""llama.cpp rollout engine: the trainer's weights as a GGUF file, sampled on llama.cpp's low-level API.

- At load and on every ``load_weights(named_tensors)`` the weights are written to a GGUF file of
  type ``EngineSpec.quantization`` ("F32" default, "F16", "BF16", "Q8_0", "Q4_0"; see
  dcmdp.engines.gguf_export) in a temp dir (/dev/shm when present), and llama.cpp reloads the model
  (``last_sync_timings`` holds the export and reload seconds).
- ``generate`` runs up to ``parallel`` (default 16) sequences at once, one llama.cpp sequence
  each (separate KV streams, ``max_model_len`` positions each), on one thread by default, and
  asks llama.cpp for the last position's logits only. Sampling is done here in torch: the logits
  go through ``dcmdp.rollout.logprobs.process_logits`` (temperature, top-k, top-p: the same code the
  trainer recomputes with), a seeded ``torch.multinomial`` draws the token, and its log-prob
  under the processed distribution is returned.
- The KV cache is kept in F32 (llama.cpp's default is F16) and flash attention is off, so that an
  F32 export matches Transformers fp32 to about 1e-6 mean |log ratio| (tiny Qwen3, SmolLM2).
- Completions are grouped by prompt, keep their stop token (finish "stop") or end at
  ``max_tokens`` / ``max_model_len`` (finish "length"), and go through ``validate_completions``.
  ``seed=None`` uses ``spec.seed`` plus the call count.

Needs the optional ``llama-cpp-python`` and ``gguf`` packages: scripts/install_llamacpp.sh.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcmdp.engines.base import (
    Completion,
    EngineSpec,
    GenerateResult,
    SamplingSettings,
    check_generate_args,
    register_engine,
    validate_completions,
)
from dcmdp.engines.gguf_export import check_qtype, load_hf_tensors, vocab_for, write_gguf
from dcmdp.rollout.logprobs import process_logits

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 16  # sequences decoded together in one llama_decode call
MAX_CONTEXT_TOKENS = 16384  # default parallel is capped so that parallel * max_model_len <= this
DEFAULT_THREADS = 1  # llama.cpp threads; DCMDP_LLAMACPP_THREADS or n_threads= to change

_backend_ready = False
_log_callback: Any = None  # kept alive: llama.cpp holds the C pointer


def _llama() -> Any:
    """Import llama_cpp, initialise the backend once and silence llama.cpp's stderr logging."""
    global _backend_ready, _log_callback
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on an optional package
        raise ImportError(
            "the llamacpp engine needs llama-cpp-python (portable build): run scripts/install_llamacpp.sh"
        ) from exc
    if not _backend_ready:
        if not os.environ.get("DCMDP_LLAMACPP_VERBOSE"):
            last = [0]

            def _quiet(level: int, text: bytes, user_data: Any) -> None:
                # ggml levels: 2 info, 3 warn, 4 error, 5 continuation of the previous line.
                # Errors (and their continuations) still reach stderr; the rest is dropped.
                if level != 5:
                    last[0] = level
                if last[0] >= 4:
                    sys.stderr.write(text.decode("utf-8", errors="replace"))

            _log_callback = llama_cpp.llama_log_callback(_quiet)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True
    return llama_cpp


def _tmp_root() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _strip(name: str) -> str:
    for prefix in ("_orig_mod.", "module."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


class LlamaCppEngine:
    """Rollout engine on llama.cpp (see module docstring). ``make_engine(EngineSpec(type="llamacpp"))``."""

    kv_unified = False  # separate KV streams per sequence: faster for unshared prompts
    torch_threads = 1  # torch intra-op threads while sampling

    def __init__(self, spec: EngineSpec, parallel: int | None = None, n_threads: int | None = None) -> None:
        from transformers import AutoConfig

        from dcmdp.models import resolve_model

        self.spec = spec
        self.qtype = check_qtype(spec.quantization or "F32")
        self.max_model_len = int(spec.max_model_len)
        self.parallel = int(
            parallel
            or os.environ.get("DCMDP_LLAMACPP_PARALLEL")
            or max(1, min(DEFAULT_PARALLEL, MAX_CONTEXT_TOKENS // self.max_model_len))
        )
        self._lib = _llama()
        model_dir = resolve_model(spec.model)
        self.config = AutoConfig.from_pretrained(str(model_dir))
        self.vocab_size = int(self.config.vocab_size)
        eos = getattr(self.config, "eos_token_id", None)
        self.eos_token_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        self._tensors = {k: v.to(torch.float32) for k, v in load_hf_tensors(model_dir).items()}
        self._vocab = vocab_for(model_dir, self.vocab_size)
        # One thread unless asked: ggml's threads spin-wait on each other at every op, which on
        # this 2-core VM shared with other processes made decoding 6x (SmolLM2) to 10x (tiny)
        # slower with 2 threads than with 1 (see docs/llamacpp.md).
        self.n_threads = int(n_threads or os.environ.get("DCMDP_LLAMACPP_THREADS") or DEFAULT_THREADS)
        self._tmpdir = tempfile.mkdtemp(prefix="dcmdp-llamacpp-", dir=_tmp_root())
        self._gguf_path: Path | None = None
        self._version = 0
        self._calls = 0
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._batch_capacity = 0
        self.last_sync_timings: dict[str, float] = {}
        self._sync()

    # ----------------------------------------------------------------- weights
    def _sync(self) -> None:
        """Write the current tensors to a new GGUF file and (re)load llama.cpp from it."""
        lib = self._lib
        t0 = time.perf_counter()
        path = Path(self._tmpdir) / f"model-{self._version}.gguf"
        write_gguf(self.config, self._tensors, path, self.qtype, self._vocab)
        t1 = time.perf_counter()
        self._free_model()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path} (set DCMDP_LLAMACPP_VERBOSE=1 to see why)")
        self._model = model
        n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        if n_vocab != self.vocab_size:
            raise RuntimeError(
                f"llama.cpp reads {n_vocab} tokens, the model has vocab_size {self.vocab_size}"
            )
        cparams = lib.llama_context_default_params()
        cparams.n_seq_max = self.parallel
        cparams.n_ctx = self.max_model_len * self.parallel
        cparams.n_batch = self.max_model_len * self.parallel
        cparams.n_ubatch = min(512, cparams.n_batch)
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.kv_unified = self.kv_unified
        cparams.type_k = lib.GGML_TYPE_F32
        cparams.type_v = lib.GGML_TYPE_F32
        cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.no_perf = True
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self._ctx = ctx
        if self._batch is None:
            self._batch_capacity = int(cparams.n_batch)
            self._batch = lib.llama_batch_init(self._batch_capacity, 0, 1)
        old = self._gguf_path
        self._gguf_path = path
        self._version += 1
        if old is not None and old != path:
            old.unlink(missing_ok=True)
        t2 = time.perf_counter()
        self.last_sync_timings = {"export": t1 - t0, "reload": t2 - t1, "sync": t2 - t0}
        log.debug("llamacpp sync: export %.3fs reload %.3fs", t1 - t0, t2 - t1)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take the trainer's tensors (HF names) in memory, write a new GGUF file, reload llama.cpp.

        Names not present in the model raise ValueError; a tied ``lm_head.weight`` and rotary
        buffers are ignored. Timings of the export and reload go to ``last_sync_timings``.
        """
        unknown: list[str] = []
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        updated = 0
        for raw_name, tensor in named_tensors:
            name = _strip(raw_name)
            if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                continue
            if name not in self._tensors:
                unknown.append(raw_name)
                continue
            if tuple(tensor.shape) != tuple(self._tensors[name].shape):
                raise ValueError(
                    f"tensor {raw_name!r} has shape {tuple(tensor.shape)}, expected {tuple(self._tensors[name].shape)}"
                )
            self._tensors[name] = tensor.detach().to("cpu", torch.float32, copy=True)
            updated += 1
        if unknown:
            raise ValueError(f"load_weights: {len(unknown)} unknown tensor names, e.g. {unknown[:5]}")
        if updated:
            self._sync()

    # --------------------------------------------------------------- sampling
    def _fill_batch(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """entries: (token, pos, seq_id, want_logits)."""
        b = self._batch
        if len(entries) > self._batch_capacity:
            raise ValueError(f"batch of {len(entries)} tokens exceeds the capacity {self._batch_capacity}")
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if want else 0
        b.n_tokens = len(entries)

    def _decode(self, entries: Sequence[tuple[int, int, int, bool]], n_out: int) -> torch.Tensor:
        lib = self._lib
        self._fill_batch(entries)
        rc = lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        ptr = lib.llama_get_logits(self._ctx)
        arr = np.ctypeslib.as_array(ptr, shape=(n_out, self.vocab_size))
        return torch.from_numpy(arr.copy())

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingSettings,
        n: int = 1,
        seed: int | None = None,
    ) -> GenerateResult:
        if self._ctx is None:
            raise RuntimeError("engine is closed")
        check_generate_args(prompts, n)
        t_start = time.perf_counter()
        if seed is None:
            seed = self.spec.seed + self._calls
        self._calls += 1
        gen = torch.Generator().manual_seed(int(seed))
        # The per-step torch ops act on (parallel x vocab) tensors: intra-op threads only add
        # synchronisation (10 ms per op on a loaded 2-core machine instead of 0.01 ms).
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            return self._generate(prompts, sampling, n, gen, t_start)
        finally:
            torch.set_num_threads(torch_threads)

    def _generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingSettings,
        n: int,
        gen: torch.Generator,
        t_start: float,
    ) -> GenerateResult:
        lib = self._lib
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if len(p) >= self.max_model_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; max_model_len is {self.max_model_len}")
            if any(t < 0 or t >= self.vocab_size for t in p):
                raise ValueError(f"prompt {i} holds a token id outside [0, {self.vocab_size})")
        stop = set(sampling.stop_token_ids)
        jobs = [i for i in range(len(prompts)) for _ in range(n)]
        completions: list[Completion] = []
        t_prefill = 0.0
        t_decode = 0.0
        t_sample = 0.0
        mem = lib.llama_get_memory(self._ctx)
        for start in range(0, len(jobs), self.parallel):
            chunk = jobs[start : start + self.parallel]
            lib.llama_memory_clear(mem, True)
            tokens: list[list[int]] = [[] for _ in chunk]
            logps: list[list[float]] = [[] for _ in chunk]
            finish: list[str | None] = [None] * len(chunk)
            limits = [min(sampling.max_tokens, self.max_model_len - len(prompts[pi])) for pi in chunk]
            t0 = time.perf_counter()
            entries: list[tuple[int, int, int, bool]] = []
            for s, pi in enumerate(chunk):
                p = prompts[pi]
                entries.extend((int(tok), pos, s, pos == len(p) - 1) for pos, tok in enumerate(p))
            logits = self._decode(entries, len(chunk))
            t_prefill += time.perf_counter() - t0
            active = list(range(len(chunk)))
            while active:
                t0 = time.perf_counter()
                processed = process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
                logp = torch.log_softmax(processed, dim=-1)
                picked = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1)
                picked_lp = logp.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
                t_sample += time.perf_counter() - t0
                still: list[int] = []
                for row, s in enumerate(active):
                    tok = int(picked[row])
                    tokens[s].append(tok)
                    logps[s].append(float(picked_lp[row]))
                    if tok in stop:
                        finish[s] = "stop"
                    elif len(tokens[s]) >= limits[s]:
                        finish[s] = "length"
                    else:
                        still.append(s)
                active = still
                if not active:
                    break
                t0 = time.perf_counter()
                entries = [
                    (tokens[s][-1], len(prompts[chunk[s]]) + len(tokens[s]) - 1, s, True) for s in active
                ]
                logits = self._decode(entries, len(active))
                t_decode += time.perf_counter() - t0
            for s, pi in enumerate(chunk):
                completions.append(Completion(pi, tokens[s], logps[s], finish[s] or "length"))
        kept, dropped = validate_completions(completions, self.vocab_size)
        elapsed = time.perf_counter() - t_start
        timings = {"generate": elapsed, "prefill": t_prefill, "decode": t_decode, "sample": t_sample}
        return GenerateResult(kept, timings, dropped)

    # ------------------------------------------------------------------ close
    def _free_model(self) -> None:
        lib = self._lib
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None

    def close(self) -> None:
        """Free the llama.cpp context, model and batch, and delete the temp GGUF files."""
        if getattr(self, "_lib", None) is None:
            return
        self._free_model()
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        tmp = getattr(self, "_tmpdir", None)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
            self._tmpdir = ""
        self._gguf_path = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:  # noqa: SIM105 - contextlib may be gone at interpreter exit
            self.close()
        except Exception:
            pass

    @property
    def gguf_path(self) -> Path | None:
        """The GGUF file llama.cpp runs now (inside the engine's temp dir)."""
        return self._gguf_path


@register_engine("llamacpp")
def make_llamacpp_engine(spec: EngineSpec) -> LlamaCppEngine:
    return LlamaCppEngine(spec)
