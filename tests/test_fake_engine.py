"""The test-only fake engine: scripted output, failure injection, and its sampling loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dcmdp.engines.base import Completion, EngineSpec, SamplingSettings, make_engine
from dcmdp.engines.fake import FAILURES, FakeEngine
from dcmdp.logprobs import build_token_batch, sequence_logprobs
from dcmdp.models import TinyModelSpec, build_tiny_model, load_model

SAMPLING = SamplingSettings(max_tokens=4)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; avoids OpenMP spinning on a loaded 2-core machine
    yield
    torch.set_num_threads(before)


def _valid(i: int) -> Completion:
    return Completion(
        prompt_index=i, token_ids=[1, 2, 3], logprobs=[-0.1, -0.2, -0.3], finish_reason="length"
    )


def test_scripted_list_is_returned():
    script = [_valid(0), _valid(1)]
    engine = FakeEngine(vocab_size=8, script=script)
    result = engine.generate([[1], [2]], SAMPLING)
    assert [c.token_ids for c in result.completions] == [[1, 2, 3], [1, 2, 3]]
    assert result.dropped == {}
    result.completions[0].token_ids.append(4)  # callers may mutate; the script must not change
    assert engine.generate([[1], [2]], SAMPLING).completions[0].token_ids == [1, 2, 3]


def test_script_callable_gets_the_call():
    seen = []

    def script(prompts, sampling, n, seed):
        seen.append((len(prompts), sampling.max_tokens, n, seed))
        return [_valid(i // n) for i in range(len(prompts) * n)]

    result = FakeEngine(vocab_size=8, script=script).generate([[1], [2]], SAMPLING, n=3, seed=5)
    assert seen == [(2, 4, 3, 5)]
    assert [c.prompt_index for c in result.completions] == [0, 0, 0, 1, 1, 1]


def test_injected_failures_are_dropped_and_counted():
    inject = {0: "nan_logprob", 1: "empty", 2: "out_of_vocab", 3: "length_mismatch"}
    assert set(inject.values()) == set(FAILURES)
    engine = FakeEngine(vocab_size=8, script=[_valid(i) for i in range(6)], inject=inject)
    result = engine.generate([[1]] * 6, SAMPLING)
    assert [c.prompt_index for c in result.completions] == [4, 5]
    assert result.dropped == {
        "nonfinite_logprob": 1,
        "empty": 1,
        "token_out_of_vocab": 1,
        "length_mismatch": 1,
    }


def test_engine_exception_surfaces():
    engine = FakeEngine(vocab_size=8, script=[_valid(0)], raise_on_generate=RuntimeError("engine died"))
    with pytest.raises(RuntimeError, match="engine died"):
        engine.generate([[1]], SAMPLING)


def test_bad_construction_is_rejected():
    with pytest.raises(ValueError, match="one of script, model or probs_V"):
        FakeEngine(vocab_size=8)
    with pytest.raises(ValueError, match="valid: nan_logprob"):
        FakeEngine(vocab_size=8, script=[], inject={0: "segfault"})


def test_default_spec_samples_uniform():
    engine = make_engine(EngineSpec(type="fake", model=""))
    result = engine.generate([[1], [2]], SamplingSettings(max_tokens=5, temperature=0.5), n=2, seed=0)
    assert len(result.completions) == 4
    for c in result.completions:
        assert len(c.token_ids) == 5 and all(0 <= t < 16 for t in c.token_ids)
        assert c.logprobs == pytest.approx([math.log(1 / 16)] * 5, abs=1e-6)
    engine.load_weights([("w", torch.ones(2))])
    assert torch.equal(engine.loaded[0]["w"], torch.ones(2))  # type: ignore[attr-defined]
    engine.close()
    with pytest.raises(RuntimeError, match="after close"):
        engine.generate([[1]], SAMPLING)


def test_model_backed_fake_matches_trainer(tmp_path: Path):
    """The fake's slow per-row loop agrees with the trainer's teacher-forced recompute."""
    model_dir = build_tiny_model(tmp_path / "m", spec=TinyModelSpec(hidden_size=32, num_layers=1, head_dim=8))
    engine = make_engine(EngineSpec(type="fake", model=str(model_dir), dtype="float32"))
    prompts = [[4, 5], [6]]
    sampling = SamplingSettings(temperature=0.8, top_k=10, top_p=0.9, max_tokens=5, stop_token_ids=(1,))
    result = engine.generate(prompts, sampling, n=2, seed=0)
    batch = build_token_batch(prompts, result.completions, pad_id=0)
    with torch.no_grad():
        logp = sequence_logprobs(load_model(model_dir).eval(), batch, sampling)
    diff = (logp - batch.engine_logp_BT)[batch.response_mask_BT].abs()
    assert float(diff.max()) < 1e-5
