"""dcmdp.integrations.verl: the "dcmdp" policy loss against dcmdp's core loss, the driver-side
multiplier, and the shipped verl YAML.

The plain-function tests need no verl. The rest run against the real verl package (0.9.1 here,
installed with --no-deps by scripts/install_integrations.sh) and are skipped without it: verl's
registry and ``get_policy_loss_fn``, its ``ppo_loss`` call site, its IS-weight function, its
``ActorConfig`` and its Hydra defaults. No Ray cluster, no GPU: the trainer class is not run here.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from dcmdp.integrations import LOSS_FORMS, DCMDPOptions
from dcmdp.integrations.verl import (
    GAP_SUM_KEY,
    LOSS_NAME,
    MIN_IS_THRESHOLD,
    MULTIPLIER_STATE_FILE,
    TOKENS_KEY,
    DCMDPController,
    dcmdp_policy_loss,
    engine_logp_from_is_weights,
    load_multiplier_state,
    save_multiplier_state,
)
from dcmdp.losses import LossInputs, LossSettings, get_policy_loss
from dcmdp.multiplier import LagrangeMultiplier

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "configs" / "verl" / "dcmdp_multinode.yaml"
CLIP_LOW, CLIP_HIGH, LAM, TOL = 0.2, 0.28, 0.7, 0.01


def batch(seed: int = 0, B: int = 4, T: int = 6) -> dict[str, torch.Tensor]:
    """A ragged float32 batch with a visible policy drift (old vs logp) and engine gap (engine vs old)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, T - 2, 1, T - 1][:B])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g) * 3.0
    logp = (old + 0.1 * torch.randn(B, T, generator=g)).clamp(max=0.0).requires_grad_(True)
    engine = (old + 0.2 * torch.randn(B, T, generator=g)).clamp(max=0.0)
    adv = torch.randn(B, 1, generator=g).expand(B, T).clone()
    # verl's token IS weight, zero on padding (rollout_corr_helper.compute_rollout_correction_weights)
    weights = torch.exp((old - engine).clamp(-20.0, 20.0)) * mask
    return {"logp": logp, "old": old, "engine": engine, "adv": adv, "mask": mask, "weights": weights}


def plain_config(form: str, info: dict[str, Any] | None = None) -> SimpleNamespace:
    """The attributes of verl's ActorConfig the loss reads, without verl."""
    pl = SimpleNamespace(
        dcmdp_loss_form=form,
        dcmdp_lambda=LAM,
        dcmdp_lambda_init=0.1,
        dcmdp_active_tolerance=TOL,
        dcmdp_tolerance=TOL,
    )
    return SimpleNamespace(
        policy_loss=pl,
        clip_ratio=0.2,
        clip_ratio_low=CLIP_LOW,
        clip_ratio_high=CLIP_HIGH,
        global_batch_info=info or {},
    )


def core(b: dict[str, torch.Tensor], form: str, agg: str = "token-mean", lam: float = LAM) -> Any:
    logp = b["logp"].detach().clone().requires_grad_(True)
    inputs = LossInputs(logp, b["old"], b["engine"], b["adv"], b["mask"])
    settings = LossSettings(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, agg=agg, lam=lam, tolerance=TOL)
    out = get_policy_loss(LOSS_FORMS[form])(inputs, settings)
    out.loss.backward()
    return out, logp.grad


def call(fn: Any, b: dict[str, torch.Tensor], config: Any, agg: str = "token-mean") -> tuple[Any, Any, Any]:
    logp = b["logp"].detach().clone().requires_grad_(True)
    loss, metrics = fn(
        old_log_prob=b["old"],
        log_prob=logp,
        advantages=b["adv"],
        response_mask=b["mask"],
        loss_agg_mode=agg,
        config=config,
        rollout_is_weights=b["weights"],
    )
    loss.backward()
    return loss, metrics, logp.grad


# ----------------------------------------------------------------------------- without verl


@pytest.mark.parametrize("form", list(LOSS_FORMS))
def test_plain_function_matches_core_loss(form: str) -> None:
    b = batch()
    loss, metrics, grad = call(dcmdp_policy_loss, b, plain_config(form))
    ref, ref_grad = core(b, form)
    assert loss.item() == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert metrics["actor/dcmdp/lambda"] == pytest.approx(LAM)
    assert metrics["actor/dcmdp/prob_gap"] == pytest.approx(ref.metrics["dcmdp/prob_gap"].item(), rel=1e-5)
    assert metrics["actor/dcmdp/prob_gap"] > 0.0


def test_rollout_logp_recovered_from_weights() -> None:
    b = batch()
    got = engine_logp_from_is_weights(b["old"], b["weights"], b["mask"])
    torch.testing.assert_close(got[b["mask"]], b["engine"][b["mask"]], rtol=0, atol=1e-5)
    assert torch.equal(got[~b["mask"]], b["old"][~b["mask"]])  # padding: finite, never -inf


def test_global_batch_normalisation_sums_micro_batches_to_the_full_batch() -> None:
    """verl scales each micro-batch by its share of the global tokens: the sum is the core full-batch loss."""
    b = batch(B=4)
    n_tokens = int(b["mask"].sum())
    total = torch.zeros(())
    grads = []
    for rows in (slice(0, 2), slice(2, 4)):
        part = {k: v[rows] for k, v in b.items()}
        info = {"dp_size": 1, "batch_num_tokens": n_tokens, "global_batch_size": 4}
        loss, _, grad = call(dcmdp_policy_loss, part, plain_config("penalty", info))
        total = total + loss.detach()
        grads.append(grad)
    ref, ref_grad = core(b, "penalty")
    assert total.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    torch.testing.assert_close(torch.cat(grads), ref_grad, rtol=1e-4, atol=1e-7)


def test_sequence_mean_surrogate_is_exact_across_micro_batches() -> None:
    b = batch(B=4)
    total = torch.zeros(())
    for rows in (slice(0, 1), slice(1, 4)):
        part = {k: v[rows] for k, v in b.items()}
        config = plain_config("penalty", {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": 4})
        config.policy_loss.dcmdp_lambda = 0.0  # the surrogate alone: exact for seq-mean modes
        loss, _, _ = call(dcmdp_policy_loss, part, config, agg="seq-mean-token-mean")
        total = total + loss.detach()
    ref, _ = core(b, "penalty", agg="seq-mean-token-mean", lam=0.0)
    assert total.item() == pytest.approx(ref.loss.item(), rel=1e-5)


def test_clear_errors() -> None:
    b = batch()
    with pytest.raises(ValueError, match="rollout_is_weights"):
        dcmdp_policy_loss(b["old"], b["logp"], b["adv"], b["mask"], config=plain_config("penalty"))
    with pytest.raises(ValueError, match="not supported"):
        call(dcmdp_policy_loss, b, plain_config("penalty"), agg="token-sum")
    icepop = dict(b, weights=torch.where(b["weights"] > 1.0, 0.0, b["weights"]))  # IcePop zeroes tokens
    with pytest.raises(ValueError, match="zero or NaN"):
        call(dcmdp_policy_loss, icepop, plain_config("penalty"))
    with pytest.raises(ValueError, match="_target_"):
        call(
            dcmdp_policy_loss,
            b,
            SimpleNamespace(**{**vars(plain_config("penalty")), "policy_loss": object()}),
        )


def test_options_refuse_non_finite_numbers_even_where_the_multiplier_ignores_them() -> None:
    # pid_kp / pid_kd go unused by dual ascent, auto_* by a fixed tolerance: a NaN there is still a typo
    # as a config hands them over: floats, YAML's strings, numpy and torch scalars
    bads = (
        float("nan"),
        float("inf"),
        -float("inf"),
        "nan",
        "inf",
        np.float32("nan"),
        torch.tensor(math.inf),
    )
    for name in ("pid_kp", "pid_kd", "auto_quantile", "auto_multiple", "lambda_init", "eta"):
        for bad in bads:
            with pytest.raises(ValueError, match=f"dcmdp_{name} must be finite"):
                DCMDPOptions(tolerance=0.004, **{name: bad})
        with pytest.raises(ValueError, match=f"dcmdp_{name} must be a number"):
            DCMDPOptions(tolerance=0.004, **{name: "0.5x"})
    for bad in bads:
        with pytest.raises(ValueError, match="dcmdp_constraint_share must be a finite number >= 0"):
            DCMDPOptions(tolerance=0.004, constraint_share=bad)
    DCMDPOptions(tolerance=None, ema=None, constraint_share=None)  # None stays legal where it means "auto"
    DCMDPOptions(tolerance=0.004, pid_kp=np.float32(0.3), auto_quantile="0.5")  # finite numbers of any kind


def test_controller_dual_step_matches_the_library_multiplier() -> None:
    controller = DCMDPController(DCMDPOptions(lambda_init=0.1, eta=1.0, tolerance=0.004))
    reference = LagrangeMultiplier(init=0.1, eta=1.0, tolerance=0.004)
    for d in (0.01, 0.02, 0.001):
        logged = controller.observe({GAP_SUM_KEY: d * 250, TOKENS_KEY: 250.0, "actor/pg_loss": 0.3})
        assert logged["dcmdp/lambda"] == pytest.approx(reference.value)
        reference.update(d)
        assert logged["dcmdp/lambda_next"] == pytest.approx(reference.value)
        assert logged["dcmdp/prob_gap"] == pytest.approx(d)
    assert controller.value == pytest.approx(0.1 + (0.01 - 0.004) + (0.02 - 0.004) + (0.001 - 0.004))
    with pytest.raises(KeyError, match="actor/dcmdp/prob_gap_sum"):
        controller.observe({"actor/pg_loss": 0.3, "actor/dcmdp/prob_gap": 0.01})
    with pytest.raises(ValueError, match="no response tokens"):
        controller.observe({GAP_SUM_KEY: 0.0, TOKENS_KEY: 0.0})
    custom = DCMDPController(DCMDPOptions(tolerance=0.004), measure_key="actor/my_gap")
    assert custom.observe({"actor/my_gap": 0.01})["dcmdp/prob_gap"] == 0.01  # a custom key is read as is
    controller.load_state_dict(controller.state_dict())


def test_controller_with_the_tolerance_floor() -> None:
    """dcmdp_tolerance_floor=1: lambda held and the user's c for the warm-up steps, then c = the
    median warm-up gap; a fixed-c checkpoint resumed with the floor on names the way back."""
    controller = DCMDPController(DCMDPOptions(tolerance=1e-4, tolerance_floor=1.0, auto_warmup_steps=3))
    for d in (0.004, 0.002, 0.006):
        logged = controller.observe({GAP_SUM_KEY: d * 100, TOKENS_KEY: 100.0})
        assert logged["dcmdp/lambda_next"] == 0.1 and logged["dcmdp/tolerance"] == 1e-4
    assert controller.multiplier.tolerance == pytest.approx(0.004)
    logged = controller.observe({GAP_SUM_KEY: 0.5, TOKENS_KEY: 100.0})
    assert logged["dcmdp/lambda_next"] == pytest.approx(0.1 + 0.005 - 0.004)
    fixed = DCMDPController(DCMDPOptions(tolerance=1e-4)).state_dict()
    with pytest.raises(ValueError, match="dcmdp_tolerance_floor=0"):
        DCMDPController(DCMDPOptions(tolerance=1e-4, tolerance_floor=1.0)).load_state_dict(fixed)


def test_micro_batches_report_gap_sum_and_tokens() -> None:
    b = batch()
    _, metrics, _ = call(dcmdp_policy_loss, b, plain_config("penalty"))
    n = int(b["mask"].sum())
    assert metrics[TOKENS_KEY] == n
    # the dual step's gap is pi_old's (old_log_prob) against the rollout, not the current policy's
    at_old = float((b["old"].exp() - b["engine"].exp()).abs()[b["mask"]].sum())
    assert metrics[GAP_SUM_KEY] == pytest.approx(at_old, rel=1e-5)
    assert metrics[GAP_SUM_KEY] != pytest.approx(metrics["actor/dcmdp/prob_gap"] * n, rel=1e-3)


def test_the_dual_step_ignores_the_policys_drift_within_the_update() -> None:
    """Several mini-batches or epochs: the current policy has moved from pi_old; D must not count it."""
    b = batch()
    same = dict(b, engine=b["old"], weights=torch.ones_like(b["weights"]) * b["mask"])  # mu == pi_old
    drifted = dict(same, logp=(b["old"] + 0.3).clamp(max=0.0))
    _, metrics, _ = call(dcmdp_policy_loss, drifted, plain_config("penalty"))
    assert metrics[GAP_SUM_KEY] == pytest.approx(0.0, abs=1e-6)
    assert metrics["actor/dcmdp/prob_gap"] > 0.01  # the current policy's gap, logged, is not zero


def test_an_empty_micro_batch_gives_a_zero_loss_connected_to_the_graph() -> None:
    b = batch()
    empty = dict(b, mask=torch.zeros_like(b["mask"]), weights=torch.zeros_like(b["weights"]))
    _, full_metrics, _ = call(dcmdp_policy_loss, b, plain_config("penalty"))
    loss, metrics, grad = call(dcmdp_policy_loss, empty, plain_config("penalty"))
    assert loss.item() == 0.0
    assert grad is not None and torch.count_nonzero(grad) == 0  # backward ran through it
    assert set(metrics) == set(full_metrics)  # verl lines up per-rank metric lists by key
    assert metrics[TOKENS_KEY] == 0.0 and metrics[GAP_SUM_KEY] == 0.0


def test_saturated_is_weights_are_refused() -> None:
    """verl clamps the log ratio at +-20: there the weight no longer carries mu."""
    b = batch()
    engine = b["engine"].clone()
    engine[0, 0] = math.log(0.5)
    old = b["old"].clone()
    old[0, 0] = math.log(0.5) - 25.0  # the trainer finds the engine's token e^-25 as likely
    weights = torch.exp((old - engine).clamp(-20.0, 20.0)) * b["mask"]
    wrong = engine_logp_from_is_weights(old, weights, torch.zeros_like(b["mask"]))  # masked: fine
    assert torch.equal(wrong, old)
    with pytest.raises(ValueError, match=r"1 response token\(s\) have \|log pi_old - log mu\| >= 20"):
        engine_logp_from_is_weights(old, weights, b["mask"])
    with pytest.raises(ValueError, match="verl clamps"):
        call(dcmdp_policy_loss, dict(b, old=old, weights=weights), plain_config("penalty"))
    # just inside the clamp the recovery still holds
    old[0, 0] = math.log(0.5) - 19.5
    weights = torch.exp((old - engine).clamp(-20.0, 20.0)) * b["mask"]
    got = engine_logp_from_is_weights(old, weights, b["mask"])
    assert got[0, 0].item() == pytest.approx(math.log(0.5), abs=1e-4)


def test_no_driver_no_silent_fixed_lambda() -> None:
    b = batch()
    config = plain_config("penalty")
    config.policy_loss.dcmdp_lambda = None  # nothing pushed lambda
    with pytest.raises(ValueError, match="no lambda from the driver"):
        call(dcmdp_policy_loss, b, config)
    config.policy_loss.dcmdp_fixed_lambda = True
    _, metrics, _ = call(dcmdp_policy_loss, b, config)
    assert metrics["actor/dcmdp/lambda"] == pytest.approx(0.1)  # dcmdp_lambda_init, on purpose


def test_multiplier_state_files(tmp_path: Path) -> None:
    folder = tmp_path / "global_step_3"
    with pytest.raises(FileNotFoundError, match="no DCMDP multiplier state"):
        load_multiplier_state(str(folder))
    controller = DCMDPController(DCMDPOptions(tolerance=0.004))
    controller.observe({GAP_SUM_KEY: 5.0, TOKENS_KEY: 100.0})
    save_multiplier_state(str(folder), controller.state_dict())
    assert sorted(p.name for p in folder.iterdir()) == [MULTIPLIER_STATE_FILE]  # no temp file left
    other = DCMDPController(DCMDPOptions(tolerance=0.004))
    other.load_state_dict(load_multiplier_state(str(folder)))
    assert other.value == controller.value != 0.1


def test_module_imports_without_verl() -> None:
    code = (
        "import sys; sys.modules['verl'] = None\n"  # any `import verl...` now raises ImportError
        "import dcmdp.integrations.verl as v\n"
        "assert not v.VERL_AVAILABLE and v.DCMDPPPOTrainer is None\n"
        "assert callable(v.dcmdp_policy_loss)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------- with the real verl


def _verl() -> Any:
    return pytest.importorskip(
        "verl.trainer.ppo.core_algos",
        reason="verl is not installed (scripts/install_integrations.sh installs verl 0.9.1 with --no-deps)",
    )


def _actor_config(**policy_loss: Any) -> Any:
    from verl.workers.config import ActorConfig

    from dcmdp.integrations.verl import DCMDPPolicyLossConfig

    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=CLIP_LOW,
        clip_ratio_high=CLIP_HIGH,
        policy_loss=DCMDPPolicyLossConfig(**policy_loss),
    )


@pytest.mark.parametrize("form", list(LOSS_FORMS))
def test_registered_loss_matches_core_loss(form: str) -> None:
    core_algos = _verl()
    assert LOSS_NAME in core_algos.POLICY_LOSS_REGISTRY
    fn = core_algos.get_policy_loss_fn(LOSS_NAME)
    assert fn is dcmdp_policy_loss
    b = batch(seed=1)
    config = _actor_config(dcmdp_loss_form=form, dcmdp_lambda=LAM, dcmdp_tolerance=TOL)
    loss, metrics, grad = call(fn, b, config)
    ref, ref_grad = core(b, form)
    assert loss.item() == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert metrics["actor/dcmdp/lambda"] == pytest.approx(LAM)


def test_weights_from_verls_own_rollout_correction() -> None:
    _verl()
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    b = batch(seed=2)
    weights, _ = compute_rollout_correction_weights(
        log_ratio=b["old"] - b["engine"],
        response_mask=b["mask"].float(),
        rollout_is="token",
        rollout_is_threshold=1.0e9,
        rollout_is_batch_normalize=False,
    )
    got = engine_logp_from_is_weights(b["old"], weights, b["mask"])
    torch.testing.assert_close(got[b["mask"]], b["engine"][b["mask"]], rtol=0, atol=1e-5)


def verl_ppo_loss(b: dict[str, torch.Tensor], config: Any, logp: torch.Tensor) -> tuple[Any, Any]:
    """verl's engine-path ``ppo_loss`` on batch ``b`` with the policy log-probs ``logp`` [B, T]."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    B, T = b["mask"].shape
    prompt_lens = [2, 3, 1, 2][:B]
    P = max(prompt_lens)
    attention = torch.zeros(B, P + T, dtype=torch.long)
    pieces = []
    for i in range(B):
        n = int(b["mask"][i].sum())
        attention[i, P - prompt_lens[i] : P] = 1
        attention[i, P : P + n] = 1
        pieces.append(torch.cat([torch.zeros(prompt_lens[i] - 1), logp[i, :n], torch.zeros(1)]))
    data = TensorDict(
        {
            "prompts": torch.zeros(B, P, dtype=torch.long),
            "responses": torch.zeros(B, T, dtype=torch.long),
            "attention_mask": attention,
            "response_mask": b["mask"].long(),
            "old_log_probs": b["old"],
            "advantages": b["adv"],
            "rollout_is_weights": b["weights"],
        },
        batch_size=B,
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    return ppo_loss(config, {"log_probs": torch.cat(pieces)}, data)


def test_d_is_the_token_mean_through_verls_metric_aggregation() -> None:
    """Two ranks x two micro-batches of very different sizes, reduced by verl's own Metric code: the
    controller's D is the token mean over all of them, not verl's mean of micro-batch means."""
    _verl()
    from verl.utils.metric import Metric

    config = _actor_config(dcmdp_lambda=LAM, dcmdp_tolerance=TOL)
    per_rank, gaps, counts = [], [], []
    for rank in range(2):
        b = batch(seed=10 + rank, T=40)
        b["mask"][0, 2:] = False  # micro-batch 1: one row of 2 tokens
        b["weights"] = b["weights"] * b["mask"]
        collected: dict[str, Metric] = {}
        for rows in (slice(0, 1), slice(1, 4)):
            part = {k: v[rows] for k, v in b.items()}
            _, metrics = verl_ppo_loss(part, config, part["logp"].detach())
            for key, metric in metrics.items():
                collected.setdefault(key, metric.init_list()).extend(metric)
            delta = (part["old"].exp() - part["engine"].exp()).abs()[part["mask"]]  # pi_old vs mu
            gaps.append(float(delta.sum()))
            counts.append(int(part["mask"].sum()))
        per_rank.append(collected)
    reduced = {k: Metric.aggregate_dp([r[k] for r in per_rank]) for k in per_rank[0]}
    token_mean = sum(gaps) / sum(counts)
    mean_of_means = sum(g / c for g, c in zip(gaps, counts, strict=True)) / len(gaps)
    controller = DCMDPController(DCMDPOptions(tolerance=TOL))
    assert controller.measured_gap(reduced) == pytest.approx(token_mean, rel=1e-4)
    assert abs(mean_of_means - token_mean) > 0.05 * token_mean  # the two really differ here


def test_through_verls_ppo_loss_call_site() -> None:
    """verl's engine-path ``ppo_loss`` (padding removal, field selection, loss lookup) with the dcmdp loss."""
    _verl()
    b = batch(seed=3)
    logp = b["logp"].detach().clone().requires_grad_(True)
    loss, metrics = verl_ppo_loss(b, _actor_config(dcmdp_lambda=LAM, dcmdp_tolerance=TOL), logp)
    loss.backward()
    ref, ref_grad = core(b, "penalty")
    assert loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    torch.testing.assert_close(logp.grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert metrics["actor/dcmdp/prob_gap"].aggregate() == pytest.approx(ref.metrics["dcmdp/prob_gap"].item())


class FakeWorkerGroup:
    """Records what the driver sends with ``set_loss_fn`` (verl's RayWorkerGroup broadcasts it)."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def set_loss_fn(self, loss_fn: Any) -> None:
        self.sent.append(loss_fn)


def test_controller_pushes_lambda_to_the_actor_loss() -> None:
    _verl()
    import pickle

    actor = _actor_config(dcmdp_lambda_init=0.1, dcmdp_tolerance=0.004)
    controller = DCMDPController.from_config(actor.policy_loss)
    wg = FakeWorkerGroup()
    controller.push(wg, actor)
    controller.observe({GAP_SUM_KEY: 5.0, TOKENS_KEY: 100.0})
    controller.push(wg, actor)
    lams = [fn.keywords["config"].policy_loss.dcmdp_lambda for fn in wg.sent]
    assert lams == pytest.approx([0.1, 0.1 + 0.05 - 0.004])
    assert actor.policy_loss.dcmdp_lambda is None  # the driver's copy is never mutated
    sent = pickle.loads(pickle.dumps(wg.sent[-1]))  # Ray pickles it to every worker
    b = batch(seed=4)
    _, metrics, _ = call(dcmdp_policy_loss, b, sent.keywords["config"])
    assert metrics["actor/dcmdp/lambda"] == pytest.approx(lams[-1])


def test_shipped_yaml_composes_and_passes_the_checks() -> None:
    _verl()
    pytest.importorskip("hydra", reason="hydra-core is not installed")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    from dcmdp.integrations.verl import DCMDPPolicyLossConfig, check_verl_config

    with initialize_config_dir(config_dir=str(YAML.parent), version_base=None):
        cfg = compose(config_name=YAML.stem)
    check_verl_config(cfg)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, DCMDPPolicyLossConfig)
    assert actor.policy_loss.loss_mode == LOSS_NAME
    controller = DCMDPController.from_config(actor.policy_loss)
    assert controller.value == pytest.approx(0.1)
    assert controller.multiplier.tolerance == pytest.approx(0.0037)
    assert float(cfg.algorithm.rollout_correction.rollout_is_threshold) >= MIN_IS_THRESHOLD
    assert math.isclose(MIN_IS_THRESHOLD, math.exp(20.0))

    for key, value in [
        ("algorithm.rollout_correction.bypass_mode", True),
        ("algorithm.rollout_correction.rollout_is_threshold", 2.0),
        ("algorithm.rollout_correction.rollout_is", "sequence"),
        ("actor_rollout_ref.rollout.calculate_log_probs", False),
        ("actor_rollout_ref.actor.loss_agg_mode", "token-sum"),
        ("algorithm.rollout_correction.rollout_rs", "token_k1"),
        ("actor_rollout_ref.rollout.top_k", 50),
        ("actor_rollout_ref.rollout.top_p", 0.9),
        ("actor_rollout_ref.rollout.logprobs_mode", "raw_logits"),
        ("data.train_batch_size", 128),  # two mini-batches of 64 with use_dynamic_bsz: true
    ]:
        bad = OmegaConf.create(OmegaConf.to_container(cfg))
        OmegaConf.update(bad, key, value)
        with pytest.raises(ValueError, match=key.rsplit(".", 1)[-1]):
            check_verl_config(bad)


class FakeSyncTrainer:
    """The three methods of verl's PPOTrainerSync that DCMDPPPOTrainer wraps."""

    saved = False

    def _update_actor(self, batch: Any, metrics: dict) -> Any:
        metrics.update({GAP_SUM_KEY: 2.0, TOKENS_KEY: 100.0})
        return batch

    def _save_checkpoint(self) -> None:
        raise RuntimeError("killed inside verl's save")

    def _load_checkpoint(self) -> Any:
        return None


def test_trainer_class_wiring_save_order_and_resume(tmp_path: Path) -> None:
    from dcmdp.integrations.verl import dcmdp_trainer_class

    cls = dcmdp_trainer_class(FakeSyncTrainer)
    trainer = cls.__new__(cls)  # verl's __init__ needs a cluster; set what the methods read
    trainer.dcmdp = DCMDPController(DCMDPOptions(lambda_init=0.1, tolerance=0.004))
    trainer._dcmdp_actor_config = None
    sent: list[Any] = []
    trainer.actor_rollout_wg = SimpleNamespace(set_loss_fn=sent.append)
    trainer.dcmdp.push = lambda wg, cfg: wg.set_loss_fn(trainer.dcmdp.value)
    metrics: dict[str, float] = {}
    trainer._update_actor("batch", metrics)
    assert sent == [0.1]  # pushed before the update
    assert metrics["dcmdp/prob_gap"] == pytest.approx(0.02)
    assert trainer.dcmdp.value == pytest.approx(0.1 + 0.02 - 0.004)
    trainer.global_steps = 5
    trainer.config = SimpleNamespace(
        trainer=SimpleNamespace(default_local_dir=str(tmp_path), resume_mode="auto", resume_from_path=None)
    )
    with pytest.raises(RuntimeError, match="killed inside verl's save"):
        trainer._save_checkpoint()
    assert (tmp_path / "global_step_5" / MULTIPLIER_STATE_FILE).exists()  # written before verl's save
    other = cls.__new__(cls)
    other.dcmdp = DCMDPController(DCMDPOptions(lambda_init=0.1, tolerance=0.004))
    other.global_steps, other.config = 5, trainer.config
    other._load_checkpoint()
    assert other.dcmdp.value == pytest.approx(trainer.dcmdp.value)
    other.global_steps = 6  # a checkpoint folder without the file
    with pytest.raises(FileNotFoundError, match="no DCMDP multiplier state"):
        other._load_checkpoint()
