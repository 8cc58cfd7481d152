"""Transformers engine and weight-only quantization.

The engine's sampling loop is checked against an independent reference: the trainer's
teacher-forced recompute (``dcmdp.logprobs.sequence_logprobs``, one forward, right padding, no
cache). At float32 the two must agree to float round-off; bf16 and quantized engines must not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dcmdp.engines.base import EngineSpec, SamplingSettings, make_engine
from dcmdp.logprobs import build_token_batch, sequence_logprobs
from dcmdp.models import TinyModelSpec, build_char_tokenizer, build_tiny_model, load_model, save_model
from dcmdp.quantize import (
    QUANT_MODES,
    quantizable_weight_names,
    quantize_fp8,
    quantize_int3,
    quantize_int4,
    quantize_int8,
    quantize_linear_weights_,
    quantize_weight,
)

# Prompts of different lengths, so left padding and per-row position ids are exercised.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [30, 31]]
PLAIN = SamplingSettings(max_tokens=12)
TRUNCATED = SamplingSettings(temperature=0.7, top_k=5, top_p=0.9, max_tokens=12)


def _peaky_tiny_model(out: Path, moe: bool = False, head_scale: float = 8.0) -> Path:
    """A random tiny model whose output head is scaled up, so next-token distributions are far
    from uniform (random init gives near-uniform ones, where top-p barely truncates anything)."""
    build_tiny_model(out, moe=moe, seed=1)
    model = load_model(out)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    save_model(model, build_char_tokenizer(), out)
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    # spinning makes a two-thread run 10-40x slower under load.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _peaky_tiny_model(tmp_path_factory.mktemp("hf_engine") / "tiny")


@pytest.fixture(scope="module")
def trainer(hf_model_dir: Path) -> torch.nn.Module:
    return load_model(hf_model_dir).eval()


def _engine(model_dir: Path, dtype: str = "float32", quantization: str | None = None):
    return make_engine(
        EngineSpec(
            type="transformers", model=str(model_dir), dtype=dtype, quantization=quantization, device="cpu"
        )
    )


def _recompute(trainer: torch.nn.Module, prompts, result, sampling):
    """(trainer log-probs, engine log-probs, mask) of the response tokens, all (B, T)."""
    batch = build_token_batch(prompts, result.completions, pad_id=0)
    with torch.no_grad():
        logp = sequence_logprobs(trainer, batch, sampling)
    return logp, batch.engine_logp_BT, batch.response_mask_BT


def _abs_log_ratio(trainer, prompts, result, sampling) -> tuple[float, float]:
    logp, elogp, mask = _recompute(trainer, prompts, result, sampling)
    diff = (logp - elogp)[mask].abs()
    return float(diff.mean()), float(diff.max())


def _prob_gap(trainer, prompts, result, sampling) -> float:
    logp, elogp, mask = _recompute(trainer, prompts, result, sampling)
    return float((logp.exp() - elogp.exp())[mask].abs().mean())


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("sampling", [PLAIN, TRUNCATED], ids=["plain", "T0.7-topk5-topp0.9"])
def test_float32_engine_matches_trainer(hf_model_dir, trainer, sampling):
    engine = _engine(hf_model_dir)
    n = 3
    result = engine.generate(PROMPTS, sampling, n=n, seed=0)
    assert result.dropped == {}
    assert len(result.completions) == len(PROMPTS) * n
    assert [c.prompt_index for c in result.completions] == [i // n for i in range(len(PROMPTS) * n)]
    for c in result.completions:
        assert len(c.token_ids) == len(c.logprobs) == sampling.max_tokens
        assert c.finish_reason == "length"
    mean, worst = _abs_log_ratio(trainer, PROMPTS, result, sampling)
    assert mean < 1e-5, mean
    assert worst < 1e-4, worst
    if sampling.top_k:
        # The returned log-probs are those of the truncated, renormalised distribution: higher
        # than the same tokens' log-probs under temperature alone.
        untruncated = SamplingSettings(temperature=sampling.temperature, max_tokens=sampling.max_tokens)
        logp_full, elogp, mask = _recompute(trainer, PROMPTS, result, untruncated)
        assert float((elogp - logp_full)[mask].mean()) > 0.01
    engine.close()


def test_truncation_renormalises(hf_model_dir):
    """top_k = 1 is greedy: every sampled token has probability 1 under the processed distribution."""
    engine = _engine(hf_model_dir)
    result = engine.generate(PROMPTS[:2], SamplingSettings(top_k=1, max_tokens=6), n=2, seed=0)
    assert all(lp == pytest.approx(0.0, abs=1e-6) for c in result.completions for lp in c.logprobs)
    # greedy -> the n samples of a prompt are identical
    assert result.completions[0].token_ids == result.completions[1].token_ids


def test_stop_tokens_end_rows(hf_model_dir, trainer):
    stop_ids = tuple(range(3, 60))  # about half the character vocabulary: most rows stop early
    sampling = SamplingSettings(max_tokens=10, stop_token_ids=stop_ids)
    engine = _engine(hf_model_dir)
    result = engine.generate(PROMPTS, sampling, n=4, seed=3)
    reasons = {c.finish_reason for c in result.completions}
    assert reasons == {"stop", "length"}, reasons
    for c in result.completions:
        body = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
        assert not any(t in stop_ids for t in body)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in stop_ids  # the stop token is kept
        else:
            assert len(c.token_ids) == sampling.max_tokens
    # rows that stopped early must not disturb the log-probs of rows still running
    mean, _ = _abs_log_ratio(trainer, PROMPTS, result, sampling)
    assert mean < 1e-5


def test_stops_exactly_at_the_stop_ids_not_generation_config_eos(tmp_path):
    """generation_config.json lists a second EOS id (5); the engine stops only at the stop ids."""
    import json

    out = build_tiny_model(tmp_path / "multi-eos")
    config = json.loads((out / "generation_config.json").read_text())
    eos = config["eos_token_id"]
    config["eos_token_id"] = [eos, 5]
    (out / "generation_config.json").write_text(json.dumps(config))
    engine = _engine(out)
    prompts = [[5 + i, 20 + 3 * i, 40] for i in range(8)]

    def sample(stops):
        return engine.generate(prompts, SamplingSettings(max_tokens=48, stop_token_ids=stops), n=8, seed=11)

    only_eos = sample((eos,)).completions
    for c in only_eos:
        assert eos not in c.token_ids[:-1]
        assert c.finish_reason == "length" or c.token_ids[-1] == eos, c.token_ids
    assert sum(c.token_ids.count(5) for c in only_eos) > 0, "id 5 never sampled"
    both = sample((eos, 5)).completions
    assert any(c.finish_reason == "stop" and c.token_ids[-1] == 5 for c in both)
    assert all(c.finish_reason == "length" for c in sample(()).completions)
    engine.close()


def test_seeded_generation_is_reproducible(hf_model_dir):
    engine = _engine(hf_model_dir)
    a = engine.generate(PROMPTS, PLAIN, n=2, seed=7)
    b = engine.generate(PROMPTS, PLAIN, n=2, seed=7)
    c = engine.generate(PROMPTS, PLAIN, n=2, seed=8)
    assert [x.token_ids for x in a.completions] == [x.token_ids for x in b.completions]
    assert [x.logprobs for x in a.completions] == [x.logprobs for x in b.completions]
    assert [x.token_ids for x in a.completions] != [x.token_ids for x in c.completions]


# ----------------------------------------------------------------------------- discrepancy sources


def test_bf16_and_quantized_engines_disagree(hf_model_dir, trainer):
    gaps = {}
    for dtype, quant in [
        ("float32", None),
        ("bfloat16", None),
        ("float32", "int8"),
        ("float32", "int4"),
        ("float32", "fp8"),
    ]:
        engine = _engine(hf_model_dir, dtype, quant)
        result = engine.generate(PROMPTS, PLAIN, n=4, seed=0)
        assert result.dropped == {}
        gaps[(dtype, quant)] = _prob_gap(trainer, PROMPTS, result, PLAIN)
        engine.close()
    exact = gaps[("float32", None)]
    assert exact < 1e-6, gaps
    for key in [("bfloat16", None), ("float32", "int8"), ("float32", "int4"), ("float32", "fp8")]:
        assert gaps[key] > 100 * max(exact, 1e-9), (key, gaps)
    assert gaps[("float32", "int4")] > gaps[("float32", "int8")], gaps


def test_unknown_quantization_is_rejected(hf_model_dir):
    with pytest.raises(ValueError, match="int8, int4, int3, fp8"):
        _engine(hf_model_dir, quantization="nf4")


# ----------------------------------------------------------------------------- weight sync


def _perturbed(model_dir: Path, seed: int = 0) -> torch.nn.Module:
    new = load_model(model_dir).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return new


def test_load_weights_matches_new_trainer(hf_model_dir, trainer):
    new = _perturbed(hf_model_dir)
    engine = _engine(hf_model_dir)
    engine.load_weights(new.named_parameters())
    result = engine.generate(PROMPTS, PLAIN, n=3, seed=0)
    mean_new, _ = _abs_log_ratio(new, PROMPTS, result, PLAIN)
    mean_old, _ = _abs_log_ratio(trainer, PROMPTS, result, PLAIN)
    assert mean_new < 1e-5
    assert mean_old > 1e-3  # the weights really changed


def test_load_weights_keeps_engine_quantized(hf_model_dir):
    new = _perturbed(hf_model_dir, seed=1)
    engine = _engine(hf_model_dir, quantization="int8")
    engine.load_weights(new.named_parameters())
    # The reference: the new weights quantized by the same deterministic rule.
    reference = _perturbed(hf_model_dir, seed=1)
    quantize_linear_weights_(reference, "int8")
    engine_params = dict(engine.model.named_parameters())
    for name, p in reference.named_parameters():
        assert torch.equal(engine_params[name], p), name
    result = engine.generate(PROMPTS, PLAIN, n=2, seed=0)
    assert _abs_log_ratio(reference, PROMPTS, result, PLAIN)[0] < 1e-5
    assert _abs_log_ratio(new, PROMPTS, result, PLAIN)[0] > 1e-4  # still quantized


def test_load_weights_rejects_unknown_names(hf_model_dir):
    engine = _engine(hf_model_dir)
    with pytest.raises(KeyError, match="no_such"):
        engine.load_weights([("no_such.weight", torch.zeros(1))])


# ----------------------------------------------------------------------------- MoE


def test_tiny_moe_runs_and_matches_trainer(tmp_path):
    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32)
    moe_dir = build_tiny_model(tmp_path / "moe", spec=spec, moe=True)
    moe_trainer = load_model(moe_dir).eval()
    for quant, bound in [(None, 1e-5), ("int4", None)]:
        engine = _engine(moe_dir, quantization=quant)
        result = engine.generate(PROMPTS, PLAIN, n=2, seed=0)
        assert len(result.completions) == len(PROMPTS) * 2
        mean, _ = _abs_log_ratio(moe_trainer, PROMPTS, result, PLAIN)
        if bound is not None:
            assert mean < bound
        else:
            assert mean > 1e-4  # the expert stacks are quantized too
        engine.close()


# ----------------------------------------------------------------------------- quantize.py


def test_quantizers_hand_checked():
    # Tie-free values (no w / s lands on .5), row max 2.0.
    w = torch.tensor([[2.0, -0.3, 0.7], [0.0, 0.0, 0.0]])
    # int8: s = 2/127; -0.3/s = -19.05 -> -19; 0.7/s = 44.45 -> 44
    expected8 = torch.tensor([[2.0, -19 * 2 / 127, 44 * 2 / 127], [0.0, 0.0, 0.0]])
    # int4: s = 2/7; -0.3/s = -1.05 -> -1; 0.7/s = 2.45 -> 2
    expected4 = torch.tensor([[2.0, -2 / 7, 4 / 7], [0.0, 0.0, 0.0]])
    # fp8: s = 2/448; -0.3/s = -67.2 -> -64 (e4m3 step 8 in [64, 128)); 0.7/s = 156.8 -> 160 (step 16)
    expected_fp8 = torch.tensor([[2.0, -64 * 2 / 448, 160 * 2 / 448], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(quantize_int8(w), expected8, rtol=0, atol=1e-6)
    torch.testing.assert_close(quantize_int4(w), expected4, rtol=0, atol=1e-6)
    torch.testing.assert_close(quantize_fp8(w), expected_fp8, rtol=0, atol=1e-6)
    # int3: s = 2/3; -0.3/s = -0.45 -> 0; 0.7/s = 1.05 -> 1
    expected3 = torch.tensor([[2.0, 0.0, 2 / 3], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(quantize_int3(w), expected3, rtol=0, atol=1e-6)
    # Per output channel: scaling one row leaves the other untouched.
    w2 = torch.tensor([[2.0, -0.3, 0.7], [20.0, -3.0, 7.0]])
    torch.testing.assert_close(quantize_int4(w2)[0], expected4[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(quantize_int4(w2)[1], 10 * expected4[0], rtol=0, atol=1e-5)


def test_quantizers_keep_dtype_and_levels():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g).to(torch.bfloat16)
    for mode in QUANT_MODES:
        q = quantize_weight(w, mode)
        assert q.dtype == torch.bfloat16 and q.shape == w.shape
    q4 = quantize_int4(torch.randn(8, 256, generator=g))
    levels = (q4 / (q4.abs().amax(dim=-1, keepdim=True) / 7)).round()
    assert all(len(row.unique()) <= 16 for row in levels)
    assert levels.min() >= -8 and levels.max() <= 7
    q3 = quantize_int3(torch.randn(8, 256, generator=g))
    levels3 = (q3 / (q3.abs().amax(dim=-1, keepdim=True) / 3)).round()
    assert all(len(row.unique()) <= 8 for row in levels3)
    assert levels3.min() >= -4 and levels3.max() <= 3


def test_unknown_quant_mode_lists_valid():
    with pytest.raises(ValueError, match="valid: int8, int4, int3, fp8"):
        quantize_weight(torch.ones(2, 2), "int2")


def test_which_weights_are_quantized(tmp_path):
    tied = build_tiny_model(
        tmp_path / "tied",
        spec=TinyModelSpec(hidden_size=32, num_layers=1, head_dim=8, tie_word_embeddings=True),
    )
    for model_dir in (tied,):
        model = load_model(model_dir)
        names = quantizable_weight_names(model)
        assert any(n.endswith("self_attn.q_proj.weight") for n in names)
        assert any(n.endswith("mlp.down_proj.weight") for n in names)
        assert not any("lm_head" in n or "embed_tokens" in n or "norm" in n for n in names)
        before = model.model.embed_tokens.weight.clone()
        quantize_linear_weights_(model, "int4")
        assert torch.equal(model.model.embed_tokens.weight, before)  # tied head/embedding untouched
        assert torch.equal(model.lm_head.weight, before)
    moe = load_model(
        build_tiny_model(
            tmp_path / "moe", spec=TinyModelSpec(hidden_size=32, num_layers=1, head_dim=8), moe=True
        )
    )
    names = quantizable_weight_names(moe)
    assert any(n.endswith("experts.gate_up_proj") for n in names)
    assert not any(n.endswith("gate.weight") for n in names)  # the router stays in full precision
