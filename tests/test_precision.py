"""Precision remedies: engine.fp32_modules (module groups kept in float32) and the float16 trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dcmdp.config import ConfigError, load_config
from dcmdp.engines.base import EngineSpec, SamplingSettings, make_engine
from dcmdp.engines.precision import check_group_labels, close_under_tying, fp32_modules_problem, in_groups
from dcmdp.models import build_tiny_model, load_model
from dcmdp.probe import parse_setting
from dcmdp.rollout.batch import build_token_batch
from dcmdp.rollout.logprobs import sequence_logprobs, set_compute_dtype

PROMPTS = [[5, 9, 12, 7], [20, 3, 3], [8, 8, 15, 2, 11]]
SAMPLING = SamplingSettings(temperature=1.0, max_tokens=10)


def hf_engine(model_dir: Path, dtype: str, quantization: str | None = None, keep: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    spec = EngineSpec(
        type="transformers", model=str(model_dir), dtype=dtype, quantization=quantization, fp32_modules=keep
    )
    return make_engine(spec)


def test_group_labels_are_checked() -> None:
    assert check_group_labels(["lm_head", "norms", "attention.0", "lm_head"]) == (
        "lm_head",
        "norms",
        "attention.0",
    )
    for bad in ("head", "norms.1", "embeddings.0", "attention.x"):
        with pytest.raises(ValueError, match="unknown"):
            check_group_labels([bad])
    assert in_groups("model.layers.0.self_attn.q_proj", ["attention.0"])
    assert not in_groups("model.layers.1.self_attn.q_proj", ["attention.0"])
    assert in_groups("model.layers.1.self_attn.q_proj", ["attention"])
    assert in_groups("model.layers.1.self_attn.q_norm", ["norms"])  # q_norm is a norm, not attention
    assert not in_groups("model.layers.1.self_attn.q_norm", ["attention"])


def test_engine_support_is_checked_in_the_config() -> None:
    assert fp32_modules_problem("transformers", ("norms", "router")) is None
    assert fp32_modules_problem("vllm", ("lm_head",)) is None
    with pytest.raises(ConfigError, match="vllm keeps only the lm_head"):
        load_config(None, ["engine.type=vllm", "engine.fp32_modules=[lm_head, norms]"])
    with pytest.raises(ConfigError, match="no per-module precision"):
        load_config(None, ["engine.type=llamacpp", "engine.fp32_modules=[lm_head]"])
    with pytest.raises(ConfigError, match=r"engine\.fp32_modules: module group 'lmhead' is unknown"):
        load_config(None, ["engine.type=transformers", "engine.fp32_modules=lmhead"])
    cfg = load_config(None, ["engine.type=transformers", "engine.fp32_modules=lm_head"])
    assert cfg.engine.fp32_modules == ["lm_head"]


def test_fp32_lm_head_gives_float32_logits_of_the_low_precision_hidden_state(tiny_model_dir: Path) -> None:
    engine = hf_engine(tiny_model_dir, "bfloat16", keep=("lm_head",))
    model = engine.model
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        logits = model(input_ids=ids).logits
    assert hidden.dtype == torch.bfloat16 and logits.dtype == torch.float32
    reference = load_model(tiny_model_dir).lm_head  # the float32 head the trainer holds
    with torch.no_grad():
        assert torch.equal(logits, reference(hidden.float()))
    # a bfloat16 head would round the logits themselves
    plain = hf_engine(tiny_model_dir, "bfloat16").model
    with torch.no_grad():
        assert plain(input_ids=ids).logits.dtype == torch.bfloat16


def test_norms_in_float32_feed_the_rest_at_the_engine_dtype(tiny_model_dir: Path) -> None:
    engine = hf_engine(tiny_model_dir, "float16", keep=("norms",))
    model = engine.model
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[1].self_attn.k_norm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float16
    result = engine.generate(PROMPTS, SAMPLING, n=2, seed=0)  # runs: no dtype mismatch anywhere
    assert result.completions
    # the weight sync writes float32 values into the kept modules, engine-dtype values elsewhere
    # (values float16 cannot hold, so a sync that rounded through the engine dtype would show)
    new = load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    engine.load_weights(new.named_parameters())
    assert torch.equal(model.model.norm.weight, new.model.norm.weight)
    assert not torch.equal(new.model.norm.weight.half().float(), new.model.norm.weight)
    assert torch.equal(model.lm_head.weight, new.lm_head.weight.half())


def test_quantized_engine_leaves_the_kept_groups_unquantized(tiny_model_dir: Path) -> None:
    full = hf_engine(tiny_model_dir, "float32", "int3")
    keep_all = hf_engine(tiny_model_dir, "float32", "int3", keep=("attention", "mlp"))
    keep_layer = hf_engine(tiny_model_dir, "float32", "int3", keep=("attention.0",))
    exact = load_model(tiny_model_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    p_full, p_layer = dict(full.model.named_parameters()), dict(keep_layer.model.named_parameters())
    p_exact = dict(exact.named_parameters())
    assert not torch.equal(p_full[q], p_exact[q])
    assert torch.equal(p_layer[q], p_exact[q])
    q1 = q.replace("layers.0", "layers.1")
    assert torch.equal(p_layer[q1], p_full[q1])  # other layers still quantized
    # nothing left to quantize: the engine is the float32 model, token for token
    a = keep_all.generate(PROMPTS, SAMPLING, n=3, seed=4)
    b = hf_engine(tiny_model_dir, "float32").generate(PROMPTS, SAMPLING, n=3, seed=4)
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    # and a weight sync keeps layer 0 exact while it re-quantizes the rest
    keep_layer.load_weights(exact.named_parameters())
    assert torch.equal(dict(keep_layer.model.named_parameters())[q], p_exact[q])
    assert torch.equal(dict(keep_layer.model.named_parameters())[q1], p_full[q1])


def test_a_tied_head_keeps_its_embedding_in_float32_too(tmp_path: Path) -> None:
    from dcmdp.models import TinyModelSpec

    tied = build_tiny_model(tmp_path / "tied", TinyModelSpec(tie_word_embeddings=True))
    engine = hf_engine(tied, "bfloat16", keep=("lm_head",))
    assert close_under_tying(engine.model, ("lm_head",)) == ("lm_head", "embeddings")
    assert engine.model.model.embed_tokens.weight.dtype == torch.float32
    assert engine.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert engine.generate(PROMPTS, SAMPLING, n=2, seed=0).completions


def test_the_remedy_shrinks_the_bfloat16_gap(tiny_model_dir: Path) -> None:
    """Keeping the lm_head and the norms in float32 brings a bfloat16 engine closer to the float32
    trainer on the same tokens (teacher-forced, so only the precision differs)."""
    trainer = load_model(tiny_model_dir)
    sample = hf_engine(tiny_model_dir, "float32").generate(PROMPTS, SAMPLING, n=8, seed=0)
    batch = build_token_batch(PROMPTS, sample.completions, None)
    mask = batch.response_mask_BT

    def gap(model: torch.nn.Module) -> float:
        with torch.no_grad():
            ref, got = sequence_logprobs(trainer, batch, SAMPLING), sequence_logprobs(model, batch, SAMPLING)
        return float((ref[mask] - got[mask].float()).abs().mean())

    plain = gap(hf_engine(tiny_model_dir, "bfloat16").model)
    kept = gap(hf_engine(tiny_model_dir, "bfloat16", keep=("lm_head", "norms")).model)
    every = gap(
        hf_engine(
            tiny_model_dir, "bfloat16", keep=("embeddings", "attention", "mlp", "norms", "lm_head")
        ).model
    )
    assert plain > 1e-4
    assert kept < plain
    assert every < kept  # what is left is the operations between modules (attention, residual adds)


def test_float16_trainer_computes_like_a_float16_model_and_keeps_float32_gradients(
    tiny_model_dir: Path,
) -> None:
    sample = hf_engine(tiny_model_dir, "float16").generate(PROMPTS, SAMPLING, n=4, seed=0)
    batch = build_token_batch(PROMPTS, sample.completions, None)
    mask = batch.response_mask_BT
    half = load_model(tiny_model_dir, dtype=torch.float16)
    master = set_compute_dtype(load_model(tiny_model_dir), torch.float16)
    with torch.no_grad():
        expected = sequence_logprobs(half, batch, SAMPLING)
    got = sequence_logprobs(master, batch, SAMPLING)
    assert torch.equal(got[mask], expected[mask])  # bit for bit the float16 model
    # the float16 engine agrees with it to the engine's own sampling arithmetic
    assert float((got[mask].detach() - batch.engine_logp_BT[mask]).abs().max()) < 1e-3
    got[mask].sum().backward()
    grads = [p.grad for p in master.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)
    assert all(p.dtype == torch.float32 for p in master.parameters())
    assert sum(float(g.abs().sum()) for g in grads) > 0
    set_compute_dtype(master, None)
    with torch.no_grad():
        assert not torch.equal(sequence_logprobs(master, batch, SAMPLING)[mask], expected[mask])


def train_gaps(model_dir: Path, out: Path, trainer_dtype: str) -> list[float]:
    import json

    from dcmdp.trainer import train

    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"model.dtype={trainer_dtype}",
            "engine.type=transformers",
            "engine.dtype=float16",
            "run.steps=2",
            "run.prompts_per_step=4",
            "run.group_size=4",
            "run.eval_every=0",
            "run.eval_problems=8",
            f"run.out_dir={out}",
            "run.tensorboard=false",
        ],
    )
    train(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["discrepancy/prob_gap_mean"] for r in rows if "discrepancy/prob_gap_mean" in r]


def test_float16_trainer_runs_end_to_end_and_closes_the_gap(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A float16 engine measured against a float16 trainer and against a float32 one: the same
    seed samples the same first batch, and the float16 trainer's gap is the smaller."""
    half = train_gaps(tiny_model_dir, tmp_path / "fp16", "float16")
    full = train_gaps(tiny_model_dir, tmp_path / "fp32", "float32")
    assert len(half) == len(full) == 2
    assert half[0] < 0.9 * full[0], (half, full)  # 0.63x on an AMD EPYC; the rest is KV-cache decoding


def test_probe_settings_take_kept_groups() -> None:
    s = parse_setting("transformers:bfloat16@lm_head+norms")
    assert (s.engine, s.dtype, s.quantization, s.fp32_modules) == (
        "transformers",
        "bfloat16",
        None,
        ("lm_head", "norms"),
    )
    assert s.label == "transformers:bfloat16@lm_head+norms"
    assert parse_setting("vllm:bfloat16@lm_head").fp32_modules == ("lm_head",)
    for bad, match in (
        ("vllm:bfloat16@norms", "vllm keeps only the lm_head"),
        ("transformers:bfloat16@", "must look like"),
        ("transformers:bfloat16@head", "unknown"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_setting(bad)


@pytest.mark.vllm
def test_vllm_runs_the_lm_head_in_float32_and_still_syncs(tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    engine = make_engine(
        EngineSpec(type="vllm", model=str(tiny_model_dir), dtype="bfloat16", fp32_modules=("lm_head",))
    )
    try:

        def head(self):  # type: ignore[no-untyped-def]
            model = self.model_runner.model
            return str(model.logits_processor.head_dtype)

        assert engine._llm.collective_rpc(head) == ["torch.float32"]
        new = load_model(tiny_model_dir)
        with torch.no_grad():
            new.lm_head.weight.mul_(3.0)
        engine.load_weights(new.named_parameters())
        result = engine.generate(PROMPTS, SAMPLING, n=4, seed=1)
        batch = build_token_batch(PROMPTS, result.completions, None)
        mask = batch.response_mask_BT
        with torch.no_grad():
            to_new = sequence_logprobs(new, batch, SAMPLING)[mask]
            to_old = sequence_logprobs(load_model(tiny_model_dir), batch, SAMPLING)[mask]
        engine_lp = batch.engine_logp_BT[mask]
        assert (to_new - engine_lp).abs().mean() < 0.2 * (to_old - engine_lp).abs().mean()
    finally:
        engine.close()


def test_moe_experts_and_router_can_be_kept(tiny_moe_dir: Path) -> None:
    """A fused expert stack owns its weights but has an activation child: it is kept all the same."""
    engine = hf_engine(tiny_moe_dir, "bfloat16", keep=("mlp", "router"))
    experts = engine.model.model.layers[0].mlp.experts
    assert all(p.dtype == torch.float32 for p in experts.parameters())
    assert engine.model.model.layers[0].mlp.gate.weight.dtype == torch.float32
    assert engine.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert any(name.endswith("mlp.experts") for name in engine.fp32_module_names)
    assert engine.generate(PROMPTS, SAMPLING, n=2, seed=0).completions


def test_groups_that_name_nothing_are_refused(tiny_model_dir: Path) -> None:
    for labels in (("attention.00",), ("attention.9",), ("router",)):  # typo, no such layer, dense model
        with pytest.raises(ValueError, match=r"name\(s\) no parameter"):
            hf_engine(tiny_model_dir, "bfloat16", keep=labels)


def test_float16_trainer_on_a_tied_model(tmp_path: Path) -> None:
    from dcmdp.models import TinyModelSpec

    tied = build_tiny_model(tmp_path / "tied", TinyModelSpec(tie_word_embeddings=True))
    sample = hf_engine(tied, "float16").generate(PROMPTS, SAMPLING, n=2, seed=0)
    batch = build_token_batch(PROMPTS, sample.completions, None)
    mask = batch.response_mask_BT
    master = set_compute_dtype(load_model(tied), torch.float16)
    got = sequence_logprobs(master, batch, SAMPLING)
    with torch.no_grad():
        expected = sequence_logprobs(load_model(tied, dtype=torch.float16), batch, SAMPLING)
    assert torch.equal(got[mask], expected[mask])
    got[mask].sum().backward()
    assert master.lm_head.weight.grad is not None and master.lm_head.weight.grad.dtype == torch.float32


def test_float16_compute_survives_the_copies_the_trainer_makes(tiny_model_dir: Path) -> None:
    """The stale-policy copies of asynchronous runs and the KL reference compute in float16 too."""
    from dcmdp.rollout.logprobs import COMPUTE_DTYPE_ATTR
    from dcmdp.rollout.pipeline import PolicyVersions
    from dcmdp.trainer import trainer_model

    model = trainer_model(tiny_model_dir, "float16", "cpu")
    assert getattr(model, COMPUTE_DTYPE_ATTR) == torch.float16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    versions = PolicyVersions(keep=2)
    versions.save(3, model)
    assert getattr(versions.model_at(3, like=model), COMPUTE_DTYPE_ATTR) == torch.float16
    assert getattr(trainer_model(tiny_model_dir, "bfloat16", "cpu"), COMPUTE_DTYPE_ATTR, None) is None
