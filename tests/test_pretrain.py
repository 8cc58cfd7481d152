"""Warm start: loss goes down, runs are deterministic and cached, greedy decoding is exact."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dcmdp import cli, models
from dcmdp.pretrain import (
    DEFAULT_PRETRAIN,
    PretrainSettings,
    _collate,
    _encode_demos,
    _parse_option,
    default_out_dir,
    greedy_accuracy,
    greedy_decode,
    pretrain,
    read_record,
    sft_loss,
)
from dcmdp.tasks import Problem, make_task

# Few, small steps: each run costs about a second on two CPU threads.
FAST: dict[str, Any] = dict(
    max_steps=3, batch_size=16, train_problems=64, eval_problems=8, eval_every=3, log_every=1, warmup_steps=0
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    path = models.build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)
    return models.load_model(path), models.load_tokenizer(path)


def _reference_greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """One prompt, no padding, no KV cache: re-run the full sequence for every new token."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + out])).logits
            tok = int(logits[0, -1].argmax())
            if tok == tokenizer.eos_token_id:
                break
            out.append(tok)
    return tokenizer.decode(out, skip_special_tokens=False)


class _EosAtLength(torch.nn.Module):
    """Wraps a model: only printable characters can win (one char per token), and EOS becomes the
    argmax once a row holds ``length`` real tokens."""

    def __init__(self, inner: Any, tokenizer: Any, length: int) -> None:
        super().__init__()
        self.inner, self.length = inner, length
        self.eos, self.n_vocab = tokenizer.eos_token_id, len(tokenizer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any) -> Any:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)
        logits = out.logits.clone()
        logits[..., :3] = float("-inf")  # pad / eos / unk
        logits[..., self.n_vocab :] = float("-inf")  # unused rows of the padded vocabulary
        done_B = attention_mask.sum(-1) >= self.length
        logits[done_B, -1, self.eos] = 1e4
        return SimpleNamespace(logits=logits, past_key_values=out.past_key_values)


def test_greedy_decode_matches_unbatched_reference(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    # Different lengths exercise the left padding; batch_size=3 exercises chunking.
    prompts = ["1+1=", "37+85=", "9*9=", "123+456=", "countdown 3,5,7->26:", "x"]
    got = greedy_decode(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    want = [_reference_greedy(model, tokenizer, p, 6) for p in prompts]
    assert got == want
    # The random model also picks unused vocabulary rows (they decode to ""); restricted to
    # printable characters every token shows in the text, so the comparison is char by char.
    visible = _EosAtLength(model, tokenizer, length=10**6)
    got = greedy_decode(visible, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    assert got == [_reference_greedy(visible, tokenizer, p, 6) for p in prompts]
    assert [len(g) for g in got] == [6] * len(prompts)


def test_greedy_decode_stops_at_eos_per_row(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    wrapped = _EosAtLength(model, tokenizer, length=7)
    # Prompt lengths 4, 6, 8: EOS comes after 3, 1 and 0 new tokens; the batch runs on for row 0.
    prompts = ["1+1=", "37+85=", "123+456="]
    got = greedy_decode(wrapped, tokenizer, prompts, max_new_tokens=6)
    assert [len(g) for g in got] == [3, 1, 0]
    assert got == [_reference_greedy(wrapped, tokenizer, p, 6) for p in prompts]
    assert "<eos>" not in "".join(got)


def test_greedy_accuracy_hand_crafted(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    model = _EosAtLength(model, tokenizer, length=8)
    prompts = [f"{a}+{b}=" for a, b in [(1, 2), (33, 44), (5, 60), (70, 8)]]
    completions = [_reference_greedy(model, tokenizer, p, 4) for p in prompts]
    assert [len(c) for c in completions] == [4, 2, 3, 3]
    # Answers equal the model's own greedy output for problems 0 and 2 only: accuracy 0.5.
    problems = [
        Problem(prompt=p, answer=c if i % 2 == 0 else c + "#", id=str(i))
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]
    task = make_task("arithmetic")
    assert greedy_accuracy(model, tokenizer, task, problems, max_new_tokens=4) == 0.5
    with pytest.raises(ValueError):
        greedy_accuracy(model, tokenizer, task, [], max_new_tokens=4)


def test_collate_masks_prompt_and_padding(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    task = make_task("arithmetic")
    problems = [Problem("1+2=", "3", "a"), Problem("10+20=", "30", "b")]
    rows = _encode_demos(tokenizer, task, problems)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert rows[0] == (tokenizer("1+2=3", add_special_tokens=False)["input_ids"] + [eos], 4)
    input_ids, mask, labels = _collate(rows, pad)
    assert input_ids.shape == (2, 9)
    assert mask[0].tolist() == [1] * 6 + [0] * 3 and mask[1].sum() == 9
    assert input_ids[0, 6:].tolist() == [pad] * 3
    # Loss only on the completion and EOS: "3<eos>" and "30<eos>".
    assert (labels[0] != -100).nonzero().flatten().tolist() == [4, 5]
    assert labels[0, 5] == eos and labels[1, 8] == eos
    assert (labels[1] != -100).sum() == 3


def test_few_steps_lower_the_loss(tmp_path: Path, tiny: tuple[Any, Any]) -> None:
    model0, tokenizer = tiny
    task = make_task("arithmetic")
    rows = _encode_demos(tokenizer, task, task.problems("train", 64, seed=0))
    batch = _collate(rows, tokenizer.pad_token_id)
    out = pretrain("arithmetic", tmp_path / "p", seed=0, log=None, **{**FAST, "max_steps": 12, "lr": 3e-3})
    with torch.no_grad():
        before = float(sft_loss(model0, *batch))
        after = float(sft_loss(models.load_model(out), *batch))
    # A random model starts near ln(128) ~ 4.85; a dozen steps already learn digits and EOS.
    assert before > 4.0
    assert after < before - 1.0
    record = read_record(out)
    assert record is not None
    assert record["result"]["steps"] == 12
    # The recorded accuracy is the saved model's, recounted here with the unbatched reference
    # decode (a bound such as 0 <= accuracy <= 1 let "every answer correct" pass).
    evals = task.problems("eval", FAST["eval_problems"], seed=0)
    max_new = max(len(r[0]) - r[1] for r in _encode_demos(tokenizer, task, evals)) + 1
    saved = models.load_model(out)
    texts = [_reference_greedy(saved, tokenizer, p.prompt, max_new) for p in evals]
    expected = sum(task.reward(p, t) for p, t in zip(evals, texts, strict=True)) / len(evals)
    assert record["result"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert (out / "dcmdp_model.json").exists() and (out / "tokenizer.json").exists()


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path) -> None:
    a = pretrain("arithmetic", tmp_path / "a", seed=1, log=None, **FAST)
    b = pretrain("arithmetic", tmp_path / "b", seed=1, log=None, **FAST)
    c = pretrain("arithmetic", tmp_path / "c", seed=2, log=None, **FAST)
    sa, sb, sc = (models.load_model(p).state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_cache_returns_without_retraining(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cached"
    pretrain("arithmetic", out, seed=0, log=None, **FAST)
    record = (out / "pretrain.json").read_text()

    def boom(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("retrained although the cache matched")

    monkeypatch.setattr("dcmdp.pretrain.sft_loss", boom)
    messages: list[str] = []
    assert pretrain("arithmetic", out, seed=0, log=messages.append, **{**FAST, "log_every": 2}) == out
    assert messages and "cached" in messages[0]
    assert (out / "pretrain.json").read_text() == record
    # Different settings (another seed) do retrain, and say what they rebuild over and why.
    messages.clear()
    with pytest.raises(AssertionError, match="retrained"):
        pretrain("arithmetic", out, seed=5, log=messages.append, **FAST)
    assert messages and "other settings (seed)" in messages[0] and "rebuilding" in messages[0]
    # An unfinished directory (no pretrain.json) is not taken for a cached result.
    monkeypatch.undo()
    (out / "pretrain.json").unlink()
    pretrain("arithmetic", out, seed=0, log=None, **FAST)
    assert json.loads((out / "pretrain.json").read_text())["settings"]["seed"] == 0


def test_settings_validation_and_hash() -> None:
    with pytest.raises(ValueError, match="target_accuracy"):
        PretrainSettings(target_accuracy=0.0)
    with pytest.raises(ValueError, match="unknown pretrain setting"):
        pretrain("arithmetic", "/nonexistent", lr_typo=1.0)
    assert DEFAULT_PRETRAIN.task == "arithmetic" and DEFAULT_PRETRAIN.task_options == {
        "ops": "+",
        "digits": 2,
    }
    assert PretrainSettings(log_every=1).settings_hash() == PretrainSettings(log_every=7).settings_hash()
    assert PretrainSettings(seed=1).settings_hash() != PretrainSettings(seed=2).settings_hash()
    # `dcmdp pretrain` with default settings writes where `dcmdp train` (ensure_base_model) looks.
    assert default_out_dir(DEFAULT_PRETRAIN, "c") == Path("c/tiny-qwen3-arithmetic")
    assert default_out_dir(PretrainSettings(seed=1), "c").name.startswith("tiny-qwen3-arithmetic-")
    assert _parse_option("digits=[1,3]") == ("digits", [1, 3])
    assert _parse_option("ops=+*") == ("ops", "+*")
    assert _parse_option("ops=*") == ("ops", "*")


def test_cli_pretrain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = [
        "pretrain",
        "--task",
        "countdown",
        "--task-option",
        "count=[2,3]",
        "--task-option",
        "max_number=5",
    ]
    argv += ["--out", str(out), "--max-steps", "2", "--eval-every", "2", "--batch-size", "8"]
    argv += ["--train-problems", "32", "--eval-problems", "4", "--seed", "3", "--lr", "1e-3"]
    assert cli.main(argv) == 0
    record = read_record(out)
    assert record is not None
    assert record["settings"]["task"] == "countdown"
    assert record["settings"]["task_options"] == {"count": [2, 3], "max_number": 5}
    assert record["settings"]["seed"] == 3 and record["result"]["steps"] == 2
    assert "step     2" in capsys.readouterr().out


def test_the_weights_fingerprint_follows_the_weight_files_and_nothing_else(tmp_path: Path) -> None:
    from dcmdp.pretrain import warm_start_record, weights_fingerprint

    a = tmp_path / "a"
    a.mkdir()
    (a / "model.safetensors").write_bytes(b"\x00" * 100)
    (a / "config.json").write_text("{}")
    b = tmp_path / "b"
    b.mkdir()
    (b / "model.safetensors").write_bytes(b"\x00" * 100)
    (b / "config.json").write_text('{"other": 1}')  # not a weight file
    (b / "trainer_state.pt").write_bytes(b"optimizer state")  # a checkpoint's: not a weight file
    (b / "training_args.bin").write_bytes(b"args")
    assert weights_fingerprint(a) == weights_fingerprint(b)
    assert str(weights_fingerprint(a)).startswith("w1-")
    (b / "model.safetensors").write_bytes(b"\x00" * 99 + b"\x01")  # one byte of one weight
    assert weights_fingerprint(a) != weights_fingerprint(b)
    (b / "model.safetensors").write_bytes(b"\x00" * 100)
    (b / "pytorch_model.bin").write_bytes(b"\x00")  # a weight file too
    assert weights_fingerprint(a) != weights_fingerprint(b)
    record = warm_start_record("some/path", a)
    assert record["weights"] == weights_fingerprint(a) and record["pretrain_accuracy"] is None
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tf_model.h5").write_bytes(b"x")  # no weight file it recognises: no fingerprint
    assert weights_fingerprint(empty) is None
    (a / "pretrain.json").write_text(
        json.dumps({"settings_hash": "h", "result": {"accuracy": 0.3, "steps": 7}})
    )
    record = warm_start_record("some/path", a)
    assert (record["pretrain_accuracy"], record["pretrain_steps"], record["pretrain_settings_hash"]) == (
        0.3,
        7,
        "h",
    )


def test_a_large_model_is_fingerprinted_from_a_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcmdp import pretrain

    monkeypatch.setattr(pretrain, "FINGERPRINT_WHOLE_BYTES", 1 << 20)  # so 3 MiB counts as large
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    weights = bytes(range(256)) * (3 << 12)
    (a / "model.safetensors").write_bytes(weights)
    (b / "model.safetensors").write_bytes(weights)
    assert pretrain.weights_fingerprint(a) == pretrain.weights_fingerprint(b)
    (b / "model.safetensors").write_bytes(weights[:-1] + b"\x00")  # the last block is sampled
    assert pretrain.weights_fingerprint(a) != pretrain.weights_fingerprint(b)
    (b / "model.safetensors").write_bytes(weights + b"\x00")  # and the size is hashed
    assert pretrain.weights_fingerprint(a) != pretrain.weights_fingerprint(b)


def test_the_long_addition_warm_starts_keep_their_directories() -> None:
    """ "long-addition" is the raised cap in its own directory; "long-addition-cap2000" keeps the
    settings and directory "long-addition" had before, so a cache built then is still found."""
    from dcmdp.pretrain import (
        LONG_ADDITION_CAP2000_PRETRAIN,
        LONG_ADDITION_PRETRAIN,
        WARM_STARTS,
        default_out_dir,
    )

    assert LONG_ADDITION_PRETRAIN.max_steps == 3500 and LONG_ADDITION_CAP2000_PRETRAIN.max_steps == 2000
    assert LONG_ADDITION_CAP2000_PRETRAIN.settings_hash() == "ea11dc7dadb80e0d"  # the cap-2,000 caches' hash
    assert WARM_STARTS["long-addition-cap2000"][1] == "tiny-qwen3-bpe-long_addition"
    for name, (settings, dir_name) in WARM_STARTS.items():
        assert default_out_dir(settings, "c") == Path("c") / dir_name, name
    assert len({d for _, d in WARM_STARTS.values()}) == len(WARM_STARTS)
    assert set(models.WARM_MODELS) == set(WARM_STARTS)  # the names resolve_model accepts, all built here
