"""The long-response task (`long_addition`), its BPE tokenizer and the subword model (issue 13)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from dcmdp.models import EOS, PAD, SUBWORD_SPEC, UNK, build_subword_model, count_parameters, load_model
from dcmdp.subword import DEFAULT_VOCAB_SIZE, task_corpus, train_bpe_tokenizer
from dcmdp.tasks import TASKS, LongAdditionTask, Problem, make_task, split_of
from dcmdp.tasks.long_addition import scratchpad

WEIRD = [
    "",
    "   ",
    "\x00\x01",
    "ünïcödé ✓ 𝔘",
    "9" * 5000,
    "answer:" * 5000,
    "answer: " + "9" * 100_000,
    "__import__('os').system('echo hi')",
    "<eos>answer: 5",
    "answer:",
]


@pytest.fixture(scope="module")
def bpe() -> Any:
    """The long_addition BPE tokenizer, trained once for this module (a few seconds)."""
    return train_bpe_tokenizer()


def _problem(a: int, b: int) -> Problem:
    return Problem(prompt=f"{a}+{b}=\n", answer=str(a + b), id=f"long_addition:{a}+{b}")


# ----------------------------------------------------------------------------- the task


def test_registered_with_options() -> None:
    assert "long_addition" in TASKS and list(TASKS)[:3] == ["arithmetic", "countdown", "jsonl"]
    assert isinstance(make_task("long_addition"), LongAdditionTask)
    with pytest.raises(ValueError, match=r"no option\(s\) 'digit'.*valid options: digits"):
        make_task("long_addition", digit=4)
    for bad in [(6, 4), 0, 13, True, "4"]:
        with pytest.raises(ValueError, match="digits"):
            make_task("long_addition", digits=bad)


def test_splits_disjoint_deterministic_and_keyed_on_the_unordered_pair() -> None:
    task = make_task("long_addition", digits=[4, 6])
    train, evals = task.problems("train", 3000), task.problems("eval", 300)
    assert len(train) == 3000 and len(evals) == 300
    assert len({p.id for p in train}) == 3000  # distinct
    assert not {p.id for p in train} & {p.id for p in evals}
    assert task.problems("train", 50) == train[:50]  # same arguments, same list
    assert task.problems("train", 50, seed=1) != train[:50]
    for p in train[:200] + evals[:200]:
        a, b = (int(x) for x in p.prompt.strip().rstrip("=").split("+"))
        assert 1000 <= a < 10**6 and 1000 <= b < 10**6 and p.answer == str(a + b)
        assert split_of(f"long+:{min(a, b)},{max(a, b)}", 0.1) == ("eval" if p in evals else "train")
    with pytest.raises(ValueError, match="split"):
        task.problems("test", 1)


def test_demonstration_is_the_written_column_addition() -> None:
    assert scratchpad(5653, 6581) == (
        "a: 5 6 5 3\n"
        "b: 6 5 8 1\n"
        "units: 3+1+carry 0=4, write 4 carry 0\n"
        "tens: 5+8+carry 0=13, write 3 carry 1\n"
        "hundreds: 6+5+carry 1=12, write 2 carry 1\n"
        "thousands: 5+6+carry 1=12, write 2 carry 1\n"
        "ten-thousands: carry 1, write 1\n"
        "answer: 12234"
    )
    assert scratchpad(7, 0).endswith("units: 7+0+carry 0=7, write 7 carry 0\nanswer: 7")
    task = make_task("long_addition", digits=[1, 12])
    for p in task.problems("train", 300) + task.problems("eval", 100):
        demo = task.demonstration(p)
        assert task.reward(p, demo) == 1.0 and task.reward(p, demo + "<eos>junk") == 1.0
        assert demo.splitlines()[-1] == f"answer: {p.answer}"


def test_reward_grades_the_final_answer_only() -> None:
    task = make_task("long_addition", format_reward=0.1)
    p = _problem(48213, 937)
    assert p.answer == "49150"
    demo = task.demonstration(p)
    assert task.reward(p, demo) == 1.0
    assert task.reward(p, "answer: 49150") == 1.0  # the trace is free
    assert task.reward(p, "nonsense lines\nanswer: 1\nanswer: 49150\n") == 1.0  # the last one counts
    assert task.reward(p, "answer: 49150\nanswer: 1") == 0.1  # ... even when wrong
    cut = demo.rsplit("\n", 1)[0]
    assert task.reward(p, cut) == 0.0  # a partial trace without an answer
    assert task.reward(p, demo[: len(demo) // 2]) == 0.0
    assert task.reward(p, cut + "\nanswer: 49151") == 0.1  # wrong answer, right format
    for wrong in ["answer: 049150", "answer: +49150", "answer: 49150.", "answer: 49,150", "answer 49150"]:
        assert task.reward(p, wrong) in (0.0, 0.1), wrong
        assert task.reward(p, wrong) != 1.0, wrong
    assert make_task("long_addition").reward(p, "answer: 1") == 0.0  # format reward off by default
    for weird in WEIRD:
        assert task.reward(p, weird) in (0.0, 0.1)
    assert task.reward(p, None) == 0.0  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the tokenizer


def test_bpe_tokenizer_specials_size_and_round_trip(bpe: Any) -> None:
    assert bpe.convert_tokens_to_ids([PAD, EOS, UNK]) == [0, 1, 2]
    assert bpe.pad_token_id == 0 and bpe.eos_token_id == 1
    assert 3000 <= len(bpe) <= DEFAULT_VOCAB_SIZE
    numbers = [t for t in bpe.get_vocab() if t.lstrip("Ġ").isdigit()]
    assert len(numbers) > 2000  # the long tail: multi-digit pieces
    task = make_task("long_addition")
    for text in [
        task.problems("eval", 1)[0].prompt + task.demonstration(task.problems("eval", 1)[0]),
        "ünïcödé ✓ 𝔘\t\r\n  x",
        "",
    ]:
        ids = bpe.encode(text, add_special_tokens=False)
        assert bpe.decode(ids) == text
    ids = [*bpe.encode("12+34=\n", add_special_tokens=False), bpe.eos_token_id]
    assert bpe.decode(ids, skip_special_tokens=True) == "12+34=\n"
    assert bpe.decode(ids, skip_special_tokens=False).endswith(EOS)


def test_bpe_tokenizer_is_deterministic(bpe: Any) -> None:
    corpus = task_corpus(problems=500, seed=3)
    assert corpus == task_corpus(problems=500, seed=3)
    a = train_bpe_tokenizer(corpus, vocab_size=600).backend_tokenizer.to_str()
    b = train_bpe_tokenizer(corpus, vocab_size=600).backend_tokenizer.to_str()
    assert a == b
    assert (
        train_bpe_tokenizer(task_corpus(problems=500, seed=4), vocab_size=600).backend_tokenizer.to_str() != a
    )


def test_demonstrations_are_64_to_256_tokens(bpe: Any) -> None:
    task = make_task("long_addition")
    lengths = [
        len(bpe.encode(task.demonstration(p), add_special_tokens=False)) + 1  # + EOS
        for p in task.problems("train", 300) + task.problems("eval", 300)
    ]
    assert min(lengths) >= 64 and max(lengths) <= 256
    assert 90 <= statistics.median(lengths) <= 160


# ----------------------------------------------------------------------------- the model


def test_subword_model_builds(tmp_path: Path, bpe: Any) -> None:
    path = build_subword_model(tmp_path / "bpe")
    model = load_model(path)
    assert model.config.model_type == "qwen3"
    assert model.config.vocab_size == len(bpe) and model.config.vocab_size % 64 == 0
    assert model.config.max_position_embeddings == SUBWORD_SPEC.max_position_embeddings >= 512
    assert model.config.eos_token_id == 1 and model.config.pad_token_id == 0
    assert 0.6e6 < count_parameters(model) < 1e6  # about 0.75M, two thirds embedding + lm_head
    saved = (path / "tokenizer.json").read_text()
    assert saved == bpe.backend_tokenizer.to_str() or '"<eos>"' in saved
    from dcmdp.models import load_tokenizer

    tok = load_tokenizer(path)
    assert tok.get_vocab() == bpe.get_vocab()
    ids = torch.tensor([tok.encode("48213+937=\n", add_special_tokens=False)])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_loads_and_generates_with_the_bpe_tokenizer(tmp_path: Path) -> None:
    """vLLM reads the subword model and its tokenizer.json; its float32 log-probs are the trainer's."""
    pytest.importorskip("vllm")
    from dcmdp.engines import EngineSpec, SamplingSettings, make_engine
    from dcmdp.logprobs import build_token_batch, sequence_logprobs
    from dcmdp.models import load_tokenizer

    path = build_subword_model(tmp_path / "bpe", seed=1)
    tok, model = load_tokenizer(path), load_model(path)
    task = make_task("long_addition")
    prompts = [tok.encode(p.prompt, add_special_tokens=False) for p in task.problems("eval", 3)]
    sampling = SamplingSettings(temperature=1.0, max_tokens=40, stop_token_ids=(tok.eos_token_id,))
    engine = make_engine(EngineSpec(type="vllm", model=str(path), dtype="float32", max_model_len=256))
    try:
        result = engine.generate(prompts, sampling, n=2, seed=0)
    finally:
        engine.close()
    assert len(result.completions) == 6
    for c in result.completions:
        assert c.token_ids and all(0 <= t < model.config.vocab_size for t in c.token_ids)
        assert isinstance(tok.decode(c.token_ids), str)
    batch = build_token_batch(prompts, result.completions, tok.pad_token_id)
    with torch.no_grad():
        logp_BT = sequence_logprobs(model, batch, sampling)
    mask = batch.response_mask_BT
    assert (logp_BT[mask] - batch.engine_logp_BT[mask]).abs().mean().item() < 1e-4
