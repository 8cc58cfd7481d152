"""Module groups, and keeping some of them in float32 while the rest runs low-precision.

The groups are those ``dcmdp probe --attribute`` ranks (HF Qwen3 / Qwen3-MoE / Llama naming):

    embeddings | attention | mlp (experts) | router | norms | lm_head

and, per layer, ``attention.L``, ``mlp.L`` and ``router.L``. ``engine.fp32_modules`` names some of
them; the Transformers engine then

- at bfloat16 / float16 holds those modules' weights in float32 and runs them in float32 (their
  inputs are cast up by a hook; their outputs go back to the engine dtype, except the lm_head's:
  the logits stay float32, the remedy MiniMax-M1 and others ship for RL);
- with weight-only quantization leaves those modules' weights unquantized.

vLLM has one such knob: ``hf_overrides={"head_dtype": "float32"}`` runs the lm_head projection in
float32 (vLLM 0.32 casts the stored bf16 weight up on CPU), so vLLM accepts ``[lm_head]`` only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

GROUPS = ("embeddings", "attention", "mlp", "router", "norms", "lm_head")
PER_LAYER_GROUPS = ("attention", "mlp", "router")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_LABEL = re.compile(r"^(embeddings|attention|mlp|router|norms|lm_head)(\.(\d+))?$")


def group_of(name: str) -> str:
    """The module group of a parameter or module name."""
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head") or ".lm_head" in name:
        return "lm_head"
    if "norm" in name.rsplit(".", 2)[-2 if name.endswith((".weight", ".bias")) else -1]:
        return "norms"
    if ".self_attn." in name or name.endswith(".self_attn"):
        return "attention"
    if re.search(r"\.mlp\.gate(\.|$)", name):
        return "router"
    if ".mlp." in name or name.endswith(".mlp"):
        return "mlp"
    return "other"


def group_label(name: str, per_layer: bool) -> str:
    group = group_of(name)
    match = _LAYER.search(name + ".")
    if per_layer and match and group in PER_LAYER_GROUPS:
        return f"{group}.{match.group(1)}"
    return group


def check_group_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Validate ``engine.fp32_modules`` entries (``lm_head``, ``norms``, ``attention.0``, ...)."""
    out = []
    for label in labels:
        m = _LABEL.match(str(label))
        if m is None or (m.group(2) and m.group(1) not in PER_LAYER_GROUPS):
            raise ValueError(
                f"module group {label!r} is unknown; valid: {', '.join(GROUPS)}, or "
                f"{'/'.join(PER_LAYER_GROUPS)}.L for layer L"
            )
        out.append(str(label))
    return tuple(dict.fromkeys(out))


def fp32_modules_problem(engine: str, labels: tuple[str, ...]) -> str | None:
    """Why an engine cannot keep ``labels`` in float32 (None: it can)."""
    if not labels or engine == "transformers":
        return None
    if engine == "vllm":
        if set(labels) == {"lm_head"}:
            return None
        return (
            f"vllm keeps only the lm_head in float32 (its hf_overrides head_dtype); it has no "
            f"per-module dtype for {', '.join(x for x in labels if x != 'lm_head')}. Use "
            "engine.fp32_modules=[lm_head], or the transformers engine for the other groups"
        )
    return f"engine.type={engine} has no per-module precision; use the transformers or vllm engine"


def in_groups(name: str, labels: Iterable[str]) -> bool:
    """Whether a parameter or module name belongs to any of the groups (a plain group label
    covers every layer; ``attention.0`` only layer 0)."""
    return any(group_label(name, "." in label) == label for label in labels)


def tied_embeddings(model: nn.Module) -> bool:
    m: Any = model
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    emb = m.get_input_embeddings() if hasattr(m, "get_input_embeddings") else None
    return head is not None and emb is not None and head.weight is emb.weight


def close_under_tying(model: nn.Module, labels: tuple[str, ...]) -> tuple[str, ...]:
    """A tied embedding / lm_head pair is one tensor: keeping either in float32 keeps both."""
    if tied_embeddings(model) and ({"embeddings", "lm_head"} & set(labels)):
        return tuple(dict.fromkeys([*labels, "embeddings", "lm_head"]))
    return labels


def cast(x: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors (also inside tuples) cast to ``dtype``; anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    if isinstance(x, tuple):
        return tuple(cast(v, dtype) for v in x)
    return x


def run_leaf_modules_in(
    model: nn.Module,
    dtype: torch.dtype,
    select: Callable[[str], bool],
    out_dtype: Callable[[str], torch.dtype | None],
) -> list[str]:
    """Hold the selected modules that own parameters (a Linear, a norm, a fused MoE expert stack,
    which has an activation child but holds its weights itself) in ``dtype`` and run them in it:
    a pre-hook casts their inputs to ``dtype`` and a hook casts their outputs to ``out_dtype(name)``
    (None: left as computed). Only each module's own parameters are cast. Returns the module
    names changed."""
    changed = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own or not select(name):
            continue
        for p in own:
            p.data = p.data.to(dtype)
        module.register_forward_pre_hook(lambda _m, args, d=dtype: tuple(cast(a, d) for a in args))
        target = out_dtype(name)
        if target is not None:
            module.register_forward_hook(lambda _m, _i, output, d=target: cast(output, d))
        changed.append(name)
    return changed


def unmatched_groups(model: nn.Module, labels: Iterable[str]) -> list[str]:
    """The labels that name no parameter of ``model`` (a typo such as ``attention.00``, a layer
    the model does not have, ``router`` on a dense model)."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    return [label for label in labels if not any(in_groups(n, [label]) for n in names)]


def keep_float32_(model: nn.Module, labels: tuple[str, ...], engine_dtype: torch.dtype) -> list[str]:
    """In place: the modules of ``labels`` held and run in float32 inside a model loaded at
    ``engine_dtype``; their outputs go back to ``engine_dtype``, except the lm_head's (float32
    logits). Returns the module names kept."""
    labels = close_under_tying(model, labels)
    if not labels or engine_dtype == torch.float32:
        return []

    def out_dtype(name: str) -> torch.dtype | None:
        return None if group_of(name + ".weight") == "lm_head" else engine_dtype

    return run_leaf_modules_in(model, torch.float32, lambda n: in_groups(n, labels), out_dtype)


__all__ = [
    "GROUPS",
    "PER_LAYER_GROUPS",
    "cast",
    "check_group_labels",
    "close_under_tying",
    "fp32_modules_problem",
    "group_label",
    "group_of",
    "in_groups",
    "keep_float32_",
    "run_leaf_modules_in",
    "tied_embeddings",
    "unmatched_groups",
]
