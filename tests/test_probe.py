"""`dcmdp probe` end to end through the CLI on a tiny model, plus its argument checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dcmdp.cli import main
from dcmdp.models import TinyModelSpec, build_tiny_model, load_tokenizer
from dcmdp.probe import ProbeSetting, make_prompts, parse_setting


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; avoids OpenMP spinning on a loaded 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def probe_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32)
    return build_tiny_model(tmp_path_factory.mktemp("probe") / "tiny", spec=spec)


def test_probe_json_compares_settings(probe_model_dir, capsys):
    argv = ["probe", "--model", str(probe_model_dir), "--setting", "transformers:float32"]
    argv += ["--setting", "transformers:float32:int4", "--prompts", "4", "--samples", "2"]
    argv += ["--max-tokens", "8", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == 4 and out["samples_per_prompt"] == 2
    fp32, int4 = out["settings"]
    assert (fp32["setting"], int4["setting"]) == ("transformers:float32", "transformers:float32:int4")
    assert int4["quantization"] == "int4" and fp32["quantization"] is None
    for s in (fp32, int4):
        assert s["samples"] == 8 and s["dropped"] == {}
        assert s["tokens"] == s["metrics"]["discrepancy/num_tokens"] > 0
        assert s["tokens_per_s"] > 0
    gap = "discrepancy/prob_gap_mean"
    assert fp32["metrics"][gap] < 1e-6
    assert int4["metrics"][gap] > 10 * fp32["metrics"][gap]
    assert (
        int4["metrics"]["discrepancy/abs_log_ratio_mean"] > fp32["metrics"]["discrepancy/abs_log_ratio_mean"]
    )


def test_probe_table_output(probe_model_dir, capsys):
    argv = ["probe", "--model", str(probe_model_dir), "--engine", "transformers", "--dtype", "bfloat16"]
    argv += ["--prompts", "2", "--samples", "1", "--max-tokens", "4", "--top-k", "20", "--temperature", "0.8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "top_k=20" in lines[0]
    assert lines[1].split() == ["measure", "transformers:bfloat16"]
    rows = {line.split()[0]: line.split()[-1] for line in lines[3:]}
    assert rows["samples"] == "2"
    assert float(rows["discrepancy/prob_gap_mean"]) >= 0
    assert "tokens/s" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope:float32", r"engine 'nope' is unknown; valid: .*transformers"),
        ("transformers:float64", r"dtype 'float64' is unknown; valid: float32, bfloat16, float16"),
        ("transformers:float32:int2", r"quantization 'int2' is unknown for engine transformers; valid: int8"),
        ("transformers", r"engine:dtype\[:quantization\]"),
    ],
)
def test_bad_settings_name_allowed_values(text, message):
    with pytest.raises(ValueError, match=message):
        parse_setting(text)


def test_parse_setting():
    assert parse_setting("vllm:bfloat16") == ProbeSetting("vllm", "bfloat16", None)
    assert parse_setting("vllm:bfloat16:fp8").label == "vllm:bfloat16:fp8"
    assert parse_setting("transformers:float32:none").quantization is None


def test_a_setting_builds_the_engine_it_names_with_its_float32_groups():
    from pathlib import Path

    spec = parse_setting("transformers:bfloat16:int8@lm_head+norms").engine_spec(
        Path("m"), 3, "cpu", max_model_len=64
    )
    assert (spec.type, spec.model, spec.dtype, spec.quantization) == ("transformers", "m", "bfloat16", "int8")
    assert (spec.seed, spec.device, spec.max_model_len) == (3, "cpu", 64)
    assert spec.fp32_modules == ("lm_head", "norms")  # gradient_bias.py used to drop these


def test_cli_reports_bad_setting(probe_model_dir, capsys):
    assert main(["probe", "--model", str(probe_model_dir), "--setting", "vllm:fp64"]) == 2
    assert "dtype 'fp64' is unknown; valid: float32, bfloat16, float16" in capsys.readouterr().err


def test_arithmetic_prompts_for_char_tokenizer(probe_model_dir):
    tok = load_tokenizer(probe_model_dir)
    prompts = make_prompts(tok, 5, seed=3)
    texts = [tok.decode(p) for p in prompts]
    assert all(re.fullmatch(r"\d{1,2}\+\d{1,2}=", t) for t in texts), texts
    assert make_prompts(tok, 5, seed=3) == prompts


@pytest.mark.vllm
def test_probe_json_stdout_is_one_json_document_with_real_vllm(probe_model_dir):
    # The documented pipe: `dcmdp probe --json | python -c "import json,sys; json.load(sys.stdin)"`.
    # vLLM logs to stdout and its C++ kernels print to fd 1: all of it must land on stderr.
    pytest.importorskip("vllm")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_LOGGING", "DCMDP_ENGINE"))}
    argv = [sys.executable, "-m", "dcmdp.cli", "probe", "--model", str(probe_model_dir)]
    argv += ["--engine", "vllm", "--dtype", "bfloat16", "--prompts", "2", "--samples", "2"]
    argv += ["--max-tokens", "8", "--json"]
    quiet = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    payload = json.loads(quiet.stdout)
    assert payload["settings"][0]["setting"] == "vllm:bfloat16"
    assert payload["settings"][0]["samples"] == 4
    # quiet by default: no engine warnings, progress bars or tracebacks
    assert "Traceback" not in quiet.stderr
    assert not re.search(r"WARNING|Loading safetensors", quiet.stderr), quiet.stderr[:2000]
    assert len(quiet.stderr.splitlines()) <= 3, quiet.stderr[:2000]
    # --engine-logs shows vLLM's own INFO lines, still on stderr only
    loud = subprocess.run([*argv, "--engine-logs"], capture_output=True, text=True, env=env, timeout=600)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert json.loads(loud.stdout)["settings"][0]["samples"] == 4
    assert "INFO" in loud.stderr
