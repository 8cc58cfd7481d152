"""Pushing the trainer's weights into an in-process vLLM engine (``VLLMEngine.load_weights``).

Weight sync (``load_weights``)
------------------------------
The trainer's tensors are passed by reference through ``LLM.collective_rpc`` to a function that
runs on the worker and calls ``worker.reload_weights(weights_iterator=...)`` (vLLM's in-place
layer-wise reload: each layer is re-materialised, loaded with the checkpoint loaders and
re-processed, so fused qkv / gate-up projections and CPU weight packing are redone). No file is
written in-process. When the engine core runs in another process
(``VLLM_ENABLE_V1_MULTIPROCESSING=1``) the tensors go through a safetensors file in ``/dev/shm``
(memory-backed; the temp dir when there is none) instead. Two CPU-backend traps are repaired
after the reload, both caught by the perturbed-weights sync tests:

- tied embeddings: ``lm_head`` shares the embedding weight but is not itself reloaded, so its
  packed GEMM copy stays stale (0.3 nats of false mismatch on SmolLM2); it is re-packed with
  ``dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)`` (idempotent: it packs the
  unpacked ``weight`` again). Tying is read from the HF config.
- MoE experts: on a weight *update* vLLM 0.32 skips the CPU experts' re-packing
  (``UnquantizedFusedMoEMethod._setup_kernel`` only calls
  ``fused_experts.process_weights_after_loading`` on the first load), leaving unpacked weights
  in packed storage; it is called here for exactly the MoE layers vLLM re-processed in this
  reload (recorded by wrapping their ``process_weights_after_loading`` meanwhile). It is not
  idempotent: re-packing a layer whose weights did not arrive (already packed) scrambles it
  (an empty or norm-only push moved the float32 engine from 1.6e-7 to 4e-2 mean |log ratio|).

Partial pushes. ``reload_weights`` accepts any subset, layer by layer: a vLLM layer no pushed
weight reaches keeps its kernel tensors untouched; a layer they reach is re-materialised *as a
whole* from ``torch.empty`` (``reload/meta.py: materialize_meta_tensor``), loaded, and
processed even when only part of it arrived ("Delayed processing" in ``reload/layerwise.py``).
So pushing ``q_proj`` alone fills the ``k`` and ``v`` rows of the fused ``qkv_proj`` with
uninitialised memory (0.9-4.9 nats off), and likewise ``gate_proj`` without ``up_proj``, or
``experts.gate_up_proj`` without ``experts.down_proj``. Completing a layer from the engine's
current weights is not possible in general (vLLM's CPU linears keep only a oneDNN-packed copy,
quantized layers only the quantized one), so an incomplete layer is refused instead: before
anything is loaded, ``check_on_worker`` dry-runs the push through vLLM's own layer-wise
machinery (layers put on meta as for a reload, ``model.load_weights`` with counting loaders,
processing replaced by a no-op, kernel tensors put back) and compares the elements each layer
would get with what a full load gives it (the same dry run on the checkpoint's tensor shapes,
once; this also accounts for vocabulary padding). A push that leaves a layer short raises a
ValueError naming the layer and, for fused linears (the model's ``packed_modules_mapping``), the
missing HF parameters; the engine is unchanged. Any push that covers whole layers (a norm, a
decoder layer, one layer's experts, everything) loads exactly those weights. An empty push
does nothing.

Trainer tensors (any float dtype) are cast to the engine dtype before the push. Transformers
>= 5 keeps MoE experts fused in memory (``mlp.experts.gate_up_proj`` of shape (E, 2I, H),
``mlp.experts.down_proj`` of shape (E, H, I)); vLLM's MoE loader accepts those fused names
directly. ``last_sync_seconds`` records the time of the latest sync.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# --- worker side: these functions run inside vLLM's worker (via collective_rpc) -------------------


def _iter_safetensors(path: str, meta: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file; with ``meta``, meta tensors of their shape and dtype
    (scalars and unknown dtypes read for real)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            if meta:
                part = f.get_slice(name)
                shape, dtype = list(part.get_shape()), _SAFETENSORS_DTYPES.get(part.get_dtype())
                if dtype is not None and math.prod(shape) > 1:
                    yield name, torch.empty(shape, dtype=dtype, device="meta")
                    continue
            yield name, f.get_tensor(name)


def _checkpoint_weights(model_dir: str) -> list[tuple[str, torch.Tensor]] | None:
    """The checkpoint's tensors as meta tensors (see ``_iter_safetensors``); None when the model
    has no safetensors files."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    return [item for file in files for item in _iter_safetensors(str(file), meta=True)]


def _layer_loads(
    model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
) -> dict[str, tuple[int, int]]:
    """Dry run of vLLM's layer-wise reload: layer -> (checkpoint elements ``weights`` would load
    into it, vLLM's own total for the layer), for every layer they reach.

    The layers are set up exactly as ``reload_weights`` does (checkpoint-format tensors on the
    meta device, counting loaders), ``model.load_weights`` runs, the per-layer processing is
    replaced by a no-op, and every layer gets its kernel tensors back, as vLLM does for a layer
    no weight reached. Nothing of the engine's weights is read or written.
    """
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.model_loader.reload import layerwise

    names = {module: name for name, module in model.named_modules()}
    process = layerwise._layerwise_process

    def count_only(layer: torch.nn.Module, info: Any) -> None:
        info.loaded_weights.clear()  # a complete layer: keep its count, drop the tensors

    layerwise.initialize_layerwise_reload(model)
    layerwise._layerwise_process = count_only
    try:
        model.load_weights(weights)  # type: ignore[operator]
        loads: dict[str, tuple[int, int]] = {}
        for module in model.modules():
            info = layerwise.get_layerwise_info(module)
            if info.can_load() and info.load_numel > 0 and not is_deferred_attention_layer(module):
                loads[names[module]] = (int(info.load_numel), int(info.load_numel_total or 0))
        return loads
    finally:
        layerwise._layerwise_process = process
        if hasattr(model, "_original_do_torchao_reload"):
            model._do_torchao_reload = model._original_do_torchao_reload
        for module in model.modules():
            info = layerwise.get_layerwise_info(module)
            if info.can_load():
                if info.kernel_tensors is not None:
                    layerwise._place_kernel_tensors(module, info)
                info.reset()
        layerwise.LOADING_LAYERS.clear()


def check_on_worker(
    worker: Any,
    weights: list[tuple[str, torch.Tensor]] | str,
    model_dir: str,
    full_loads: dict[str, int] | None,
) -> tuple[dict[str, int], list[tuple[str, int, int]], dict[str, list[str]]]:
    """Runs on the vLLM worker, before a push: (elements a full load gives each layer, computed
    once from the checkpoint; the layers this push would leave incomplete as (layer, elements
    given, elements needed); the model's fused-module mapping). Changes nothing."""
    model = worker.model_runner.get_model()
    if full_loads is None:
        checkpoint = _checkpoint_weights(model_dir)
        full_loads = (
            {name: got for name, (got, _) in _layer_loads(model, checkpoint).items()}
            if checkpoint is not None
            else {}
        )
    pushed = _iter_safetensors(weights, meta=True) if isinstance(weights, str) else iter(weights)
    incomplete = [
        (name, got, full_loads.get(name, total))
        for name, (got, total) in _layer_loads(model, pushed).items()
        if got < full_loads.get(name, total)
    ]
    packed = {k: list(v) for k, v in getattr(model, "packed_modules_mapping", {}).items()}
    return full_loads, incomplete, packed


def _repair_cpu_kernels(
    model: torch.nn.Module, tied_embeddings: bool, reprocessed_moe: Sequence[torch.nn.Module]
) -> None:
    """Redo the CPU weight packing that vLLM 0.32's in-place reload leaves stale (see module doc):
    the tied lm_head, and the MoE layers this reload re-processed (and only those: packing an
    already packed layer again scrambles it)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    lm_head = getattr(model, "lm_head", None)
    if (
        tied_embeddings
        and isinstance(lm_head, torch.nn.Module)
        and isinstance(getattr(lm_head, "quant_method", None), UnquantizedEmbeddingMethod)
    ):
        dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)  # idempotent: packs .weight
    for module in reprocessed_moe:
        method: Any = module.quant_method
        method.moe_kernel.fused_experts.process_weights_after_loading(module)


@contextlib.contextmanager
def _recording_moe_reprocessing(model: torch.nn.Module) -> Iterator[list[torch.nn.Module]]:
    """Yields the list of unquantized MoE layers whose weights vLLM re-processes meanwhile
    (``process_weights_after_loading`` runs for a layer only when its weights arrived)."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    seen: list[torch.nn.Module] = []
    methods = [
        m
        for module in model.modules()
        if isinstance(m := getattr(module, "quant_method", None), UnquantizedFusedMoEMethod)
        and m.moe_kernel is not None
    ]

    def recorder(method: Any) -> Any:
        original = method.process_weights_after_loading  # the bound class method

        def record(layer: torch.nn.Module) -> None:
            original(layer)
            if all(layer is not other for other in seen):
                seen.append(layer)

        return record

    for method in methods:
        setattr(method, "process_weights_after_loading", recorder(method))  # noqa: B010 - shadows the method
    try:
        yield seen
    finally:
        for method in methods:
            del method.process_weights_after_loading  # the class method again


def reload_on_worker(
    worker: Any, weights: list[tuple[str, torch.Tensor]] | str, tied_embeddings: bool
) -> None:
    """Runs on the vLLM worker: reload weights in place (tensors, or a safetensors file path)."""
    from vllm.platforms import current_platform

    model = worker.model_runner.get_model()
    iterator = _iter_safetensors(weights) if isinstance(weights, str) else iter(weights)
    with _recording_moe_reprocessing(model) as reprocessed_moe:
        worker.reload_weights(weights_iterator=iterator)
    if current_platform.is_cpu():
        _repair_cpu_kernels(model, tied_embeddings, reprocessed_moe)


# --- the engine side ----------------------------------------------------------------------------


def incomplete_push_message(
    incomplete: Sequence[tuple[str, int, int]], packed: dict[str, list[str]], pushed: Sequence[str]
) -> str:
    """What a refused partial push lacks, layer by layer, naming the missing HF parameters of
    fused layers (vLLM's ``packed_modules_mapping``: qkv_proj <- q_proj, k_proj, v_proj, ...)."""
    parts = []
    for layer, got, full in incomplete:
        parent, _, leaf = layer.rpartition(".")
        members = packed.get(leaf, [])
        arrived = [n for n in pushed if any(n.startswith(f"{parent}.{m}.") for m in members)]
        if not arrived:  # not a fused linear (e.g. MoE experts): the pushed names under its parent
            arrived = [n for n in pushed if n.startswith(f"{parent}.")]
        suffixes = sorted({n.split(".")[-1] for n in arrived}) if members else []
        missing = [
            f"{parent}.{m}.{suffix}"
            for m in members
            for suffix in suffixes
            if f"{parent}.{m}.{suffix}" not in pushed
        ]
        parts.append(
            f"{layer} would get {got} of its {full} elements (from {', '.join(arrived) or '?'}"
            + (f"; missing {', '.join(missing)})" if missing else "; push the rest of this layer's weights)")
        )
    return (
        "vLLM engine: partial weight push refused, nothing was loaded: vLLM reloads a layer as a "
        "whole and fills the parts not pushed with uninitialised memory, so each layer a push "
        "touches needs all its weights. Incomplete: " + "; ".join(parts)
    )


def write_shm_safetensors(weights: list[tuple[str, torch.Tensor]]) -> str:
    """Write tensors to a safetensors file in memory-backed /dev/shm (else the temp dir)."""
    from safetensors.torch import save_file

    shm = Path("/dev/shm")
    directory = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="dcmdp-vllm-sync-", suffix=".safetensors", dir=directory)
    os.close(fd)
    # clone(): safetensors refuses tensors that share storage (e.g. tied weights, expert slices).
    save_file({name: t.cpu().contiguous().clone() for name, t in weights}, path)
    return path
