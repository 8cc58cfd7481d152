"""`dcmdp probe --attribute`: the gap of a setting, applied to one module group at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dcmdp.attribution import attribute, with_setting
from dcmdp.cli import main as cli_main
from dcmdp.engines.base import EngineSpec, SamplingSettings, make_engine
from dcmdp.engines.precision import group_label, group_of
from dcmdp.models import load_model
from dcmdp.rollout.batch import build_token_batch

PROMPTS = [[5, 9, 12, 7], [20, 3, 3], [8, 8, 15, 2, 11]]


def sampled_batch(model_dir: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(EngineSpec(type="transformers", model=str(model_dir), dtype="float32"))
    result = engine.generate(PROMPTS, SamplingSettings(temperature=1.0, max_tokens=12), n=4, seed=0)
    return build_token_batch(PROMPTS, result.completions, None)


def test_groups_of_qwen3_names() -> None:
    assert group_of("model.embed_tokens.weight") == "embeddings"
    assert group_of("lm_head.weight") == "lm_head"
    assert group_of("model.norm.weight") == "norms"
    assert group_of("model.layers.2.input_layernorm.weight") == "norms"
    assert group_of("model.layers.2.self_attn.q_proj.weight") == "attention"
    assert group_of("model.layers.2.mlp.down_proj.weight") == "mlp"
    assert group_of("model.layers.2.mlp.gate_proj.weight") == "mlp"
    assert group_of("model.layers.2.mlp.gate.weight") == "router"
    assert group_of("model.layers.2.mlp.experts.gate_up_proj") == "mlp"
    assert group_label("model.layers.2.mlp.down_proj.weight", per_layer=True) == "mlp.2"
    assert group_label("model.layers.2.self_attn", per_layer=True) == "attention.2"


@pytest.mark.parametrize(
    ("only", "expected"),
    [(r"layers\.1\.mlp\.down_proj", "mlp.1"), (r"layers\.2\.self_attn\.o_proj", "attention.2")],
)
def test_a_deliberately_quantized_module_comes_out_on_top(
    tiny_model_dir: Path, only: str, expected: str
) -> None:
    model = load_model(tiny_model_dir)
    full, rows = attribute(model, sampled_batch(tiny_model_dir), "int3", per_layer=True, only=only)
    assert full.abs_log_ratio > 1e-4
    assert rows[0].group == expected
    assert rows[0].share == pytest.approx(1.0, abs=1e-6)  # that group alone is the whole setting
    assert all(g.abs_log_ratio == 0.0 for g in rows[1:])


def test_moe_experts_and_router(tiny_moe_dir: Path) -> None:
    model = load_model(tiny_moe_dir)
    batch = sampled_batch(tiny_moe_dir)
    _, rows = attribute(model, batch, "int3", per_layer=True, only=r"layers\.1\.mlp\.experts")
    assert rows[0].group == "mlp.1" and rows[0].abs_log_ratio > 0
    # the router is a group of its own (in a compute dtype; the engine's int modes leave it alone)
    _, rows = attribute(model, batch, "float16", per_layer=True, only=r"layers\.0\.mlp\.gate$")
    assert rows[0].group == "router.0" and rows[0].abs_log_ratio > 0
    # in a compute dtype the fused expert stacks (weights held by a module with a child) count too
    _, rows = attribute(model, batch, "bfloat16")
    assert {g.group: g.abs_log_ratio for g in rows}["mlp"] > 0


def test_dtype_mode_casts_only_the_group(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    variant = with_setting(model, "bfloat16", lambda n: group_of(n + ".weight") == "lm_head")
    assert variant.lm_head.weight.dtype == torch.bfloat16
    assert variant.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    _, rows = attribute(model, sampled_batch(tiny_model_dir), "bfloat16")
    assert {g.group for g in rows} == {"embeddings", "attention", "mlp", "norms", "lm_head"}
    assert all(g.abs_log_ratio > 0 for g in rows)


def test_cli_attribute(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plot = tmp_path / "a.png"
    args = ["probe", "--model", str(tiny_model_dir), "--engine", "transformers", "--dtype", "float32"]
    assert (
        cli_main([*args, "--quantization", "int4", "--attribute", "--plot", str(plot), "--prompts", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert "full setting" in out and "Shares add up to" in out and plot.stat().st_size > 1000
    assert cli_main(["probe", "--model", str(tiny_model_dir), "--engine", "vllm", "--attribute"]) == 2
