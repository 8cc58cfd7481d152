"""Stop ids and padding, the same everywhere (issue 11, items 4 and 5).

Stop ids: every engine stops exactly at ``SamplingSettings.stop_token_ids``, and the trainer and
``dcmdp probe`` pass all the model's EOS ids (the tokenizer's and those of generation_config.json)
as stop ids. The engines' own checks are in test_hf_engine.py and test_vllm_engine.py
(``TestStopIds``).

Padding: a tokenizer without a pad token pads with 0 (``dcmdp.logprobs.padding_id``); padding is
masked, so the log-probs do not depend on the pad id.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dcmdp.config import Config
from dcmdp.engines.base import Completion, EngineSpec, SamplingSettings, make_engine
from dcmdp.logprobs import build_token_batch, padding_id, sequence_logprobs
from dcmdp.models import EOS, build_tiny_model, char_vocab, eos_token_ids, load_model, load_tokenizer
from dcmdp.trainer import sampling_settings

EOS_ID = char_vocab()[EOS]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; avoids OpenMP spinning on a loaded 2-core machine
    yield
    torch.set_num_threads(before)


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def no_pad_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model whose tokenizer and configs have no pad token, and whose
    generation_config.json lists two EOS ids: [1, 5]."""
    out = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-no-pad")
    _edit_json(out / "tokenizer_config.json", pad_token=None)
    _edit_json(out / "config.json", pad_token_id=None)
    _edit_json(out / "generation_config.json", pad_token_id=None, eos_token_id=[EOS_ID, 5])
    return out


# ----------------------------------------------------------------------------- stop ids


def test_eos_token_ids_reads_tokenizer_and_generation_config(no_pad_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(no_pad_model_dir)
    assert tokenizer.eos_token_id == EOS_ID
    assert eos_token_ids(no_pad_model_dir, tokenizer) == (EOS_ID, 5)
    assert eos_token_ids(no_pad_model_dir) == (EOS_ID, 5)
    # the tokenizer's id comes first and is not repeated; an int works like a one-item list
    only = tmp_path / "m"
    only.mkdir()
    (only / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, EOS_ID, 7]}))
    assert eos_token_ids(only, tokenizer) == (EOS_ID, 7)
    (only / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert eos_token_ids(only, tokenizer) == (EOS_ID, 9)
    # no generation_config.json: config.json's, as Transformers derives the generation config
    (only / "generation_config.json").unlink()
    (only / "config.json").write_text(json.dumps({"eos_token_id": [3, 4]}))
    assert eos_token_ids(only) == (3, 4)
    (only / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": 6}}))
    assert eos_token_ids(only) == (6,)
    (only / "config.json").write_text(json.dumps({}))
    assert eos_token_ids(only) == ()


def test_trainer_stops_on_every_eos_id() -> None:
    cfg = Config()
    assert sampling_settings(cfg, (EOS_ID, 5)).stop_token_ids == (EOS_ID, 5)
    assert sampling_settings(cfg, EOS_ID).stop_token_ids == (EOS_ID,)


# ----------------------------------------------------------------------------- padding


def test_padding_id() -> None:
    assert padding_id(None) == 0
    assert padding_id(7) == 7


def test_build_token_batch_without_pad_token(tiny_model_dir: Path) -> None:
    prompts = [[5, 6, 7], [8, 9]]
    completions = [
        Completion(0, [10, 11], [-1.0, -2.0], "length"),
        Completion(1, [12, 13, 14, 15, 16], [-0.5] * 5, "length"),
    ]
    batch = build_token_batch(prompts, completions, None)  # crashed in torch.full before
    assert batch.input_ids_BL.tolist() == [[5, 6, 7, 10, 11, 0, 0], [8, 9, 12, 13, 14, 15, 16]]
    assert batch.attention_mask_BL.tolist()[0] == [1, 1, 1, 1, 1, 0, 0]
    # padding is masked: the log-probs at response positions do not depend on the pad id
    model = load_model(tiny_model_dir).eval()
    sampling = SamplingSettings()
    with torch.no_grad():
        logps = [
            sequence_logprobs(model, build_token_batch(prompts, completions, pad), sampling)
            for pad in (None, EOS_ID, 90)
        ]
    mask = batch.response_mask_BT
    for other in logps[1:]:
        assert torch.allclose(logps[0][mask], other[mask], atol=1e-6)


def test_transformers_engine_without_pad_token(no_pad_model_dir: Path) -> None:
    engine = make_engine(
        EngineSpec(type="transformers", model=str(no_pad_model_dir), dtype="float32", device="cpu")
    )
    try:
        assert engine.pad_id == 0  # type: ignore[attr-defined]
        prompts = [[5, 6, 7, 8, 9], [10]]  # different lengths: left padding
        sampling = SamplingSettings(max_tokens=6)
        result = engine.generate(prompts, sampling, n=2, seed=0)
    finally:
        engine.close()
    batch = build_token_batch(prompts, result.completions, load_tokenizer(no_pad_model_dir).pad_token_id)
    with torch.no_grad():
        logp = sequence_logprobs(load_model(no_pad_model_dir).eval(), batch, sampling)
    mask = batch.response_mask_BT
    assert (logp[mask] - batch.engine_logp_BT[mask]).abs().max().item() < 1e-4


def test_probe_without_pad_token_stops_on_every_eos_id(no_pad_model_dir: Path, capsys) -> None:
    from dcmdp.cli import main

    argv = ["probe", "--model", str(no_pad_model_dir), "--setting", "transformers:float32"]
    argv += ["--prompts", "3", "--samples", "2", "--max-tokens", "8", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sampling"]["stop_token_ids"] == [EOS_ID, 5]
    assert out["settings"][0]["metrics"]["discrepancy/abs_log_ratio_mean"] < 1e-5
