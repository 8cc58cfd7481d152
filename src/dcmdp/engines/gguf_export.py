"""Write a Hugging Face Qwen3 / Llama causal LM to a GGUF file for llama.cpp, in memory.

A short writer on the `gguf` package (``pip install gguf==0.19.0``; see scripts/install_llamacpp.sh):

- architecture metadata for ``qwen3`` (Qwen3ForCausalLM, dense) and ``llama`` (LlamaForCausalLM,
  e.g. SmolLM2);
- HF -> GGUF tensor names through ``gguf.get_tensor_name_map`` (Qwen3's ``q_norm`` / ``k_norm``
  become ``attn_q_norm`` / ``attn_k_norm``);
- the Llama q/k row permutation: HF stores rotary pairs as two halves (NeoX style) while
  llama.cpp's ``llama`` architecture rotates adjacent pairs, so ``convert_hf_to_gguf.py`` permutes
  the rows of ``q_proj`` / ``k_proj``. ``qwen3`` uses NeoX rotation in llama.cpp, so its weights
  are written as they are (both checked against Transformers to ~1e-4 mean |log ratio| in F32);
- tokenizer metadata: a byte-level BPE ``tokenizer.json`` (SmolLM2, Qwen) is written as ``gpt2``
  with its vocab and merges; the dcmdp character tokenizer is written as ``gpt2`` with one token
  per character in the byte-to-unicode alphabet (" " -> "Ġ", "\\n" -> "Ċ"), so that llama.cpp can
  tokenize and detokenize it; the engine feeds token ids directly and only reads ids back;
- ``qtype``: every 2-D weight (embedding and output included) is stored in that type; 1-D
  tensors (norms) stay F32, as llama.cpp's own converter does. Rows whose length is not a
  multiple of the quantization block fall back to F16 (Q-types) -- not the case for the tiny model
  or SmolLM2.

``export_gguf(model_dir_or_model, out_path, qtype)`` is the public entry; ``write_gguf(config,
tensors, out_path, qtype, vocab)`` is what the llama.cpp engine calls with the trainer's
in-memory tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
ARCHS = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}


def check_qtype(qtype: str) -> str:
    if qtype not in QTYPES:
        raise ValueError(f"GGUF type {qtype!r} is unknown; valid: {', '.join(QTYPES)}")
    return qtype


@dataclass
class GGUFVocab:
    """Tokenizer metadata for the GGUF file (``tokens[i]`` is the text of id ``i``)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str = "default"
    eos_id: int | None = None
    bos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the alphabet of byte-level BPE)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _byte_level(text: str) -> str:
    table = _bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def vocab_from_tokenizer_json(path: str | Path, vocab_size: int) -> GGUFVocab:
    """Build GGUF tokenizer metadata from a Hugging Face ``tokenizer.json``, padded to ``vocab_size``."""
    tj = json.loads(Path(path).read_text())
    model = tj.get("model", {})
    added = {int(t["id"]): t for t in tj.get("added_tokens", [])}
    special_ids = {i for i, t in added.items() if t.get("special")}
    tokens: list[str | None] = [None] * vocab_size
    types = [int(_token_type("UNUSED"))] * vocab_size
    merges: list[str] = []
    kind = model.get("type")
    byte_level = _is_byte_level(tj)
    for text, idx in model.get("vocab", {}).items():
        if idx >= vocab_size:
            continue
        if idx in special_ids:
            tokens[idx], types[idx] = text, int(_token_type("CONTROL"))
        else:
            tokens[idx] = text if byte_level else _byte_level(text)
            types[idx] = int(_token_type("NORMAL"))
    for idx, t in added.items():
        if idx < vocab_size:
            tokens[idx] = t["content"]
            types[idx] = int(_token_type("CONTROL" if t.get("special") else "USER_DEFINED"))
    if kind == "BPE" and byte_level:
        for m in model.get("merges", []):
            merges.append(m if isinstance(m, str) else " ".join(m))
        pre = "smollm" if _looks_like_smollm(tj) else "default"
    else:
        pre = "default"
    vocab = GGUFVocab([], types, merges, pre=pre)
    vocab.tokens = _fill_unused(tokens)
    by_text = {t: i for i, t in enumerate(vocab.tokens)}
    for tok, name in (
        (EOS_TEXTS, "eos_id"),
        (PAD_TEXTS, "pad_id"),
        (UNK_TEXTS, "unk_id"),
        (BOS_TEXTS, "bos_id"),
    ):
        for t in tok:
            if t in by_text:
                setattr(vocab, name, by_text[t])
                break
    return vocab


EOS_TEXTS = ("<eos>", "<|im_end|>", "<|endoftext|>", "</s>")
PAD_TEXTS = ("<pad>", "<|endoftext|>")
UNK_TEXTS = ("<unk>",)
BOS_TEXTS = ("<|im_start|>", "<s>")


def _is_byte_level(tj: Mapping[str, Any]) -> bool:
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(tj.get("pre_tokenizer")) or has(tj.get("decoder"))


def _looks_like_smollm(tj: Mapping[str, Any]) -> bool:
    vocab = tj.get("model", {}).get("vocab", {})
    return vocab.get("<|im_start|>") == 1 and vocab.get("<|endoftext|>") == 0


def _fill_unused(tokens: list[str | None]) -> list[str]:
    """Name the ids the tokenizer leaves unused (the tiny model's vocab is padded to 64)."""
    return [t if t is not None else f"<|dcmdp_unused_{i}|>" for i, t in enumerate(tokens)]


def placeholder_vocab(vocab_size: int) -> GGUFVocab:
    """Tokenizer metadata when no tokenizer is at hand: one named placeholder per id."""
    return GGUFVocab(_fill_unused([None] * vocab_size), [int(_token_type("NORMAL"))] * vocab_size, [])


def _token_type(name: str) -> Any:
    import gguf

    return gguf.TokenType[name]


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _rope_theta(config: Any) -> float:
    params = _cfg(config, "rope_parameters") or _cfg(config, "rope_scaling") or {}
    theta = params.get("rope_theta") if isinstance(params, Mapping) else None
    if theta is None:
        theta = _cfg(config, "rope_theta", 10000.0)
    rope_type = (
        params.get("rope_type", params.get("type", "default")) if isinstance(params, Mapping) else "default"
    )
    if rope_type not in (None, "default"):
        raise NotImplementedError(f"rope scaling {rope_type!r} is not supported by the GGUF writer")
    return float(theta)


def _arch(config: Any) -> str:
    archs = _cfg(config, "architectures") or []
    for a in archs:
        if a in ARCHS:
            return ARCHS[a]
    model_type = _cfg(config, "model_type")
    if model_type in ("qwen3", "llama"):
        return str(model_type)
    raise NotImplementedError(
        f"GGUF export supports {', '.join(ARCHS)} (got architectures={archs}, model_type={model_type!r})"
    )


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for Llama q/k projections (as convert_hf_to_gguf.py's ``permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(name: str, data: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """The array to write and its GGML type: 1-D tensors stay F32, 2-D ones take ``qtype``."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES

    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim < 2 or qtype == "F32":
        return data, gguf.GGMLQuantizationType.F32
    ggml_type = gguf.GGMLQuantizationType[qtype]
    block = GGML_QUANT_SIZES[ggml_type][0]
    if data.shape[-1] % block != 0:
        ggml_type = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, ggml_type), ggml_type


FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32}


def write_gguf(
    config: Any,
    tensors: Mapping[str, torch.Tensor],
    out_path: str | Path,
    qtype: str = "F32",
    vocab: GGUFVocab | None = None,
) -> Path:
    """Write HF-named ``tensors`` of a Qwen3 / Llama model described by ``config`` to ``out_path``.

    ``config`` is a Transformers config or its ``config.json`` dict. A tied model may omit
    ``lm_head.weight`` (llama.cpp then reuses ``token_embd``).
    """
    import gguf

    check_qtype(qtype)
    arch = _arch(config)
    model_arch = gguf.MODEL_ARCH.QWEN3 if arch == "qwen3" else gguf.MODEL_ARCH.LLAMA
    n_layers = int(_cfg(config, "num_hidden_layers"))
    n_embd = int(_cfg(config, "hidden_size"))
    n_head = int(_cfg(config, "num_attention_heads"))
    n_head_kv = int(_cfg(config, "num_key_value_heads") or n_head)
    head_dim = int(_cfg(config, "head_dim") or n_embd // n_head)
    vocab_size = int(_cfg(config, "vocab_size"))
    tied = bool(_cfg(config, "tie_word_embeddings", False))
    if _cfg(config, "attention_bias", False) or _cfg(config, "mlp_bias", False):
        raise NotImplementedError("attention / MLP biases are not supported by the GGUF writer")

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(str(_cfg(config, "_name_or_path", "") or "dcmdp-export") or "dcmdp-export")
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_context_length(int(_cfg(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(_cfg(config, "intermediate_size")))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(_cfg(config, "rms_norm_eps", 1e-6)))
    writer.add_vocab_size(vocab_size)

    vocab = vocab or placeholder_vocab(vocab_size)
    if len(vocab.tokens) != vocab_size:
        raise ValueError(f"tokenizer has {len(vocab.tokens)} tokens, model vocab_size is {vocab_size}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    # llama.cpp's BPE loader requires a merges array and GGUFWriter skips empty ones: add one
    # merge of two byte symbols (NUL, SOH) that no text here contains.
    writer.add_token_merges(vocab.merges or [f"{_byte_level(chr(0))} {_byte_level(chr(1))}"])
    for key, value in (
        ("eos", vocab.eos_id),
        ("bos", vocab.bos_id),
        ("pad", vocab.pad_id),
        ("unk", vocab.unk_id),
    ):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    writer.add_add_bos_token(False)

    name_map = gguf.get_tensor_name_map(model_arch, n_layers)
    written = 0
    for hf_name, tensor in tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if tied and hf_name == "lm_head.weight":
            continue
        new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r} ({arch})")
        data = tensor.detach().to("cpu", torch.float32).numpy()
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            data = _permute_qk(data, n_head)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            data = _permute_qk(data, n_head_kv)
        encoded, ggml_type = _encode(new_name, data, qtype)
        writer.add_tensor(new_name, encoded, raw_dtype=ggml_type)
        written += 1
    if written == 0:
        raise ValueError("no tensors to write")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def load_hf_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files of a local HF model directory."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def vocab_for(model_dir: str | Path | None, vocab_size: int) -> GGUFVocab:
    """Tokenizer metadata from ``model_dir/tokenizer.json`` when present, else placeholders."""
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").exists():
        return vocab_from_tokenizer_json(Path(model_dir) / "tokenizer.json", vocab_size)
    return placeholder_vocab(vocab_size)


def export_gguf(
    model_dir_or_model: str | Path | torch.nn.Module, out_path: str | Path, qtype: str = "F32"
) -> Path:
    """Write a GGUF file from a local HF model directory or an in-memory HF model.

    ``qtype``: one of ``QTYPES`` ("F32", "F16", "BF16", "Q8_0", "Q4_0"); others raise ValueError.
    For a model object, the tokenizer is read from ``config._name_or_path`` when that is a local
    directory with a ``tokenizer.json``; otherwise placeholder token texts are written.
    """
    check_qtype(qtype)
    if isinstance(model_dir_or_model, torch.nn.Module):
        model: Any = model_dir_or_model
        config = model.config
        tensors = dict(model.state_dict())
        src = str(_cfg(config, "_name_or_path", "") or "")
        model_dir = Path(src) if src and Path(src).is_dir() else None
    else:
        model_dir = Path(model_dir_or_model)
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"no Hugging Face model at {model_dir} (config.json missing)")
        config = json.loads((model_dir / "config.json").read_text())
        tensors = load_hf_tensors(model_dir)
    vocab = vocab_for(model_dir, int(_cfg(config, "vocab_size")))
    return write_gguf(config, tensors, out_path, qtype, vocab)
