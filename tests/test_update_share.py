"""The share bound on the optimizer's step (``loss.constraint_share_of=update``, ShareBoundedAdamW)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dcmdp.config import ConfigError, load_config
from dcmdp.grad_share import ConstraintGradients, ShareBoundedAdamW

BETAS = (0.9, 0.95)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(5, 3, generator=g)),
        torch.nn.Parameter(torch.randn(4, generator=g)),
    ]


def _grads(params: list[torch.nn.Parameter], step: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [scale * torch.randn(p.shape, generator=g) for p in params]


def _norm(ts: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in ts)))


def test_without_a_constraint_it_is_adamw() -> None:
    ours, ref = _params(), _params()
    opt = ShareBoundedAdamW(ours, lr=0.01, betas=BETAS, weight_decay=0.1, kappa=0.5)
    adamw = torch.optim.AdamW(ref, lr=0.01, betas=BETAS, weight_decay=0.1)
    for step in range(6):
        for p, q, g in zip(ours, ref, _grads(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def _reference(g_pgs, g_cs, start, lr, kappa, b, betas=BETAS, eps=1e-8):  # type: ignore[no-untyped-def]
    """The update bound written out for one tensor, in float64."""
    b1, b2 = betas
    theta = start.double().clone()
    m = mc = v = vc = e = ec = torch.zeros_like(theta)
    for t, (g, gc) in enumerate(zip(g_pgs, g_cs), start=1):
        g, gc = g.double(), gc.double()
        m, mc = b1 * m + (1 - b1) * g, b1 * mc + (1 - b1) * gc
        v, vc = b2 * v + (1 - b2) * g * g, b2 * vc + (1 - b2) * gc * gc
        denom = ((v + vc) / (1 - b2**t)).sqrt() + eps
        u, uc = m / (1 - b1**t) / denom, mc / (1 - b1**t) / denom
        e = b * e + (1 - b) * lr * u
        budget = kappa * float(e.norm())
        # the largest s in [0, 1] with |b ec + (1 - b) s lr uc| <= budget, by bisection
        lo, hi = 0.0, 1.0
        if float((b * ec + (1 - b) * lr * uc).norm()) <= budget:
            lo = 1.0
        elif float((b * ec).norm()) <= budget:
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (
                    (mid, hi) if float((b * ec + (1 - b) * mid * lr * uc).norm()) <= budget else (lo, mid)
                )
        ec = b * ec + (1 - b) * lo * lr * uc
        theta = theta - lr * (u + lo * uc)
    return theta, e, ec


@pytest.mark.parametrize("kappa", [0.0, 0.3, 1e9])
def test_each_step_is_the_written_out_rule(kappa: float) -> None:
    p = torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(3)))
    start = p.detach().clone()
    lr, b = 0.01, 0.9
    opt = ShareBoundedAdamW([p], lr=lr, betas=BETAS, weight_decay=0.0, kappa=kappa, drift_beta=b)
    g = torch.Generator().manual_seed(4)
    g_pgs = [torch.randn(6, generator=g) for _ in range(30)]
    g_cs = [0.3 * torch.ones(6) + 0.1 * torch.randn(6, generator=g) for _ in range(30)]
    g_cs[5][0] = -g_pgs[5][0]  # a coordinate where the parts cancel
    for a, c in zip(g_pgs, g_cs):
        p.grad = a.clone()
        opt.set_constraint_grads([p], [c])
        opt.step()
    theta, e, ec = _reference(g_pgs, g_cs, start, lr, kappa, b)
    torch.testing.assert_close(p.detach().double(), theta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["drift_c"].double(), ec, rtol=1e-4, atol=1e-8)
    assert float(ec.norm()) <= kappa * float(e.norm()) * (1 + 1e-6) + 1e-12


def test_a_constraint_pulling_against_the_reward_cannot_inflate_the_step() -> None:
    """Where the constraint's gradient cancels the policy's, the whole gradient is about 0; a second
    moment of the whole gradient would divide each part's momentum by about 0. Each coordinate's
    step stays within lr (1 + kappa), and the policy part wins."""
    p = torch.nn.Parameter(torch.zeros(4))
    lr, kappa, steps = 1e-3, 0.5, 20
    opt = ShareBoundedAdamW([p], lr=lr, weight_decay=0.0, kappa=kappa)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        g_pg = torch.ones(4)
        p.grad = g_pg.clone()
        opt.set_constraint_grads([p], [-g_pg + 1e-3 * torch.randn(4, generator=g)])
        opt.step()
    assert float(p.detach().abs().max()) <= steps * lr * (1 + kappa)
    assert bool((p.detach() < 0).all())  # descends the policy's loss


def test_a_constraint_alone_does_not_move_the_weights() -> None:
    """No policy gradient at all (every group flat): AdamW would follow the constraint at full
    speed; the bounded optimizer does not move (weight decay off)."""
    ours, ref = _params(), _params()
    start = [p.detach().clone() for p in ours]
    opt = ShareBoundedAdamW(ours, lr=0.01, betas=BETAS, weight_decay=0.0, kappa=0.5)
    adamw = torch.optim.AdamW(ref, lr=0.01, betas=BETAS, weight_decay=0.0)
    for step in range(5):
        g_c = _grads(ours, step)
        for p, q, c in zip(ours, ref, g_c):
            p.grad, q.grad = torch.zeros_like(c), c.clone()
        opt.set_constraint_grads(ours, g_c)
        opt.step()
        adamw.step()
        assert opt.last_metrics["dcmdp/constraint_scale"] == 0.0
    for p, s0 in zip(ours, start):
        assert torch.equal(p.detach(), s0)
    assert _norm([q.detach() - s0 for q, s0 in zip(ref, start)]) > 0.01


def test_a_steady_constraint_is_held_to_kappa_of_a_noisy_policy_over_the_window() -> None:
    """The failure of a per-step bound: a policy gradient that is noise moves the weights about
    sqrt(T) steps' worth in T steps, a constant constraint T steps' worth. With the displacement
    averages bounded, the constraint's net displacement over a window stays near kappa times the
    policy's; unbounded it is many times it."""
    lr, kappa, steps = 1e-3, 0.5, 200
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(256, generator=g) for _ in range(steps)]
    moved = {}
    for k in (0.0, kappa, 1e9):
        p = torch.nn.Parameter(torch.zeros(256))
        opt = ShareBoundedAdamW([p], lr=lr, weight_decay=0.0, kappa=k)
        for n in noise:
            p.grad = n.clone()
            opt.set_constraint_grads([p], [0.5 * torch.ones(256)])
            opt.step()
        moved[k] = p.detach().clone()
    policy = float(moved[0.0].norm())  # kappa 0: the policy part alone (it does not depend on s)
    bounded = float((moved[kappa] - moved[0.0]).norm())
    unbounded = float((moved[1e9] - moved[0.0]).norm())
    assert unbounded > 5 * policy
    assert bounded < 2 * kappa * policy


def test_state_round_trips_through_a_checkpoint() -> None:
    a, b = _params(), _params()
    opt_a = ShareBoundedAdamW(a, lr=0.01, betas=BETAS, kappa=0.5)
    for step in range(3):
        for p, g in zip(a, _grads(a, step)):
            p.grad = g
        opt_a.set_constraint_grads(a, _grads(a, 50 + step, scale=0.3))
        opt_a.step()
    for p, q in zip(a, b):
        q.data.copy_(p.data)
    opt_b = ShareBoundedAdamW(b, lr=0.01, betas=BETAS, kappa=0.5)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as saved to disk and read back
    for opt, ps in ((opt_a, a), (opt_b, b)):
        for p, g in zip(ps, _grads(ps, 9)):
            p.grad = g
        opt.set_constraint_grads(ps, _grads(ps, 59, scale=5.0))
        opt.step()
    for p, q in zip(a, b):
        assert torch.equal(p.detach(), q.detach())


def test_the_constraint_buffer_follows_gradient_clipping() -> None:
    model = torch.nn.Linear(3, 2)
    bound = ConstraintGradients(model.parameters(), kappa=0.5)
    bound.add(model(torch.ones(1, 3)).pow(2).sum())
    expected = [g.clone() * 0.25 for g in bound.grads]  # type: ignore[union-attr]
    opt = ShareBoundedAdamW(model.parameters(), lr=0.01, kappa=0.5)
    bound.hand_to(opt, 0.25)
    assert bound.grads == [None, None]
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(opt._constraint[p], e)


def test_config_checks_the_space() -> None:
    # the default since issue 13: the update bound at kappa 0.5 (0.25 with a correction beside it)
    assert (load_config().loss.share(), load_config().loss.constraint_share_of) == (0.5, "update")
    for bad in ("-0.1", "nan", "inf"):
        with pytest.raises(ConfigError, match=r"loss\.constraint_share"):
            load_config(overrides=[f"loss.constraint_share={bad}"])
    with pytest.raises(ConfigError, match=r"loss\.constraint_share_of"):
        load_config(overrides=["loss.constraint_share_of=step"])


def _run(tiny_model_dir: Path, out: Path, *extra: str) -> None:
    from dcmdp import trainer

    cfg = load_config(
        overrides=[
            f"model.path={tiny_model_dir}",
            "engine.type=transformers",
            "engine.dtype=bfloat16",
            "task.name=arithmetic",
            "run.prompts_per_step=2",
            "run.group_size=2",
            "run.eval_every=0",
            "run.checkpoint_every=1",
            "run.tensorboard=false",
            f"run.out_dir={out}",
            "run.threads=1",
            "sampling.max_tokens=4",
            "loss.type=dcmdp_full",
            "multiplier.init=1.0",
            "multiplier.tolerance=1e-6",
            "loss.constraint_share=0.5",
            "loss.constraint_share_of=update",
            "optim.grad_clip=0.01",
            *extra,
        ]
    )
    trainer.train(cfg, resume=(out / "metrics.jsonl").exists(), log=lambda _m: None)


def test_training_uses_the_bounded_optimizer_and_resumes(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcmdp import trainer
    from dcmdp.checkpoint import read_metrics

    coefs: list[float] = []
    real_hand_to = ConstraintGradients.hand_to

    def spy(self: ConstraintGradients, optimizer: ShareBoundedAdamW, clip_coef: float = 1.0) -> None:
        coefs.append(clip_coef)
        real_hand_to(self, optimizer, clip_coef)

    monkeypatch.setattr(ConstraintGradients, "hand_to", spy)

    cfg = load_config(
        overrides=["loss.type=dcmdp", "loss.constraint_share=0.5", "loss.constraint_share_of=update"]
    )
    assert isinstance(trainer.make_optimizer(cfg, torch.nn.Linear(2, 2)), ShareBoundedAdamW)
    for off in (["loss.constraint_share=0.0"], ["loss.type=grpo"], ["loss.constraint_share_of=gradient"]):
        cfg = load_config(
            overrides=[
                "loss.type=dcmdp",
                "loss.constraint_share=0.5",
                "loss.constraint_share_of=update",
                *off,
            ]
        )
        assert type(trainer.make_optimizer(cfg, torch.nn.Linear(2, 2))) is torch.optim.AdamW

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(tiny_model_dir, straight, "run.steps=3")
    _run(tiny_model_dir, resumed, "run.steps=2")
    _run(tiny_model_dir, resumed, "run.steps=3")
    rows = [r for r in read_metrics(straight / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 3 and all("dcmdp/constraint_scale" in r for r in rows)
    # the reward guard, left at null, is off beside the update bound and on without it
    assert not any("multiplier/guard_cap" in r for r in rows)
    _run(tiny_model_dir, tmp_path / "unbounded", "run.steps=1", "loss.constraint_share=0")
    unbounded = [r for r in read_metrics(tmp_path / "unbounded" / "metrics.jsonl") if r["kind"] == "train"]
    assert "multiplier/guard_cap" in unbounded[0]
    assert all(0.0 <= r["dcmdp/constraint_scale"] <= 1.0 for r in rows)
    # optim.grad_clip=0.01 clips every step; the constraint's part was scaled with the gradient
    assert len(coefs) == 6 and all(0.0 < c < 1.0 for c in coefs)
    again = [r for r in read_metrics(resumed / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["loss/total"] for r in again] == pytest.approx([r["loss/total"] for r in rows], rel=1e-6)


def _update_batch(advantages: torch.Tensor):  # type: ignore[no-untyped-def]
    from dcmdp.engines.base import Completion
    from dcmdp.logprobs import build_token_batch

    g = torch.Generator().manual_seed(0)
    comps = []
    for i in range(len(advantages)):
        n = 2 + i % 3
        toks = torch.randint(3, 60, (n,), generator=g).tolist()
        comps.append(Completion(i % 2, toks, (-torch.rand(n, generator=g) * 3).tolist(), "length"))
    return build_token_batch([[5, 6, 7], [8, 9]], comps, pad_id=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_reward_signal_no_step_even_clipped_in_low_precision(
    tiny_model_dir: Path, dtype: torch.dtype
) -> None:
    """Every advantage 0: only the constraint has a gradient, so the bounded step is exactly 0, also
    when the gradient is clipped and held in bfloat16 (a clip factor rounded differently for the
    whole gradient and for the constraint's part would leave a policy part pointing the
    constraint's way). The unbounded AdamW moves."""
    from dcmdp import trainer
    from dcmdp.engines.base import SamplingSettings
    from dcmdp.logprobs import sequence_logprobs
    from dcmdp.models import load_model
    from dcmdp.run_setup import loss_settings

    moved = {}
    for share in ("0.5", "0.0"):
        cfg = load_config(
            overrides=[
                "loss.type=dcmdp_full",
                f"loss.constraint_share={share}",
                "loss.constraint_share_of=update",
                "optim.grad_clip=0.01",
                "optim.epochs=3",
                "optim.weight_decay=0.0",
                "optim.lr=1e-3",
            ]
        )
        torch.manual_seed(0)
        model = load_model(tiny_model_dir).to(dtype)
        start = [p.detach().clone() for p in model.parameters()]
        advantages = torch.zeros(8)
        batch = _update_batch(advantages)
        sampling = SamplingSettings(max_tokens=4)
        with torch.no_grad():
            old = sequence_logprobs(model, batch, sampling)
        opt = trainer.make_optimizer(cfg, model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _i: 1.0)
        learner = trainer.Learner(cfg, model, None, opt, sched, sampling, torch.Generator().manual_seed(1))
        metrics = trainer.update_policy(
            learner,
            trainer.UpdateBatch(batch, old, None, advantages),
            loss_settings(cfg, lam=2.0, tolerance=1e-3),
        )
        moved[share] = _norm([p.detach() - s for p, s in zip(model.parameters(), start)])
        if share == "0.5":
            assert metrics["dcmdp/constraint_scale"] == 0.0
    assert moved["0.5"] == 0.0
    assert moved["0.0"] > 0.1


def test_update_mode_refuses_an_optimizer_that_cannot_bound_the_step(tiny_model_dir: Path) -> None:
    from dcmdp import trainer
    from dcmdp.engines.base import SamplingSettings
    from dcmdp.models import load_model
    from dcmdp.run_setup import loss_settings

    cfg = load_config(
        overrides=["loss.type=dcmdp", "loss.constraint_share=0.5", "loss.constraint_share_of=update"]
    )
    model = load_model(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _i: 1.0)
    sampling = SamplingSettings(max_tokens=4)
    learner = trainer.Learner(cfg, model, None, opt, sched, sampling, torch.Generator().manual_seed(1))
    batch = _update_batch(torch.ones(8))
    data = trainer.UpdateBatch(batch, batch.engine_logp_BT, None, torch.ones(8))
    with pytest.raises(ValueError, match="constraint_share_of=update"):
        trainer.update_policy(learner, data, loss_settings(cfg, lam=1.0, tolerance=1e-3))


def test_a_state_saved_under_one_kappa_is_refused_under_another() -> None:
    a = _params()
    opt = ShareBoundedAdamW(a, lr=0.01, betas=BETAS, kappa=0.5)
    for p, g in zip(a, _grads(a, 0)):
        p.grad = g
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    assert state["kappa"] == 0.5
    ShareBoundedAdamW(_params(), lr=0.01, betas=BETAS, kappa=0.5).load_state_dict(copy.deepcopy(state))
    with pytest.raises(
        ValueError, match=r"saved by a ShareBoundedAdamW with kappa=0\.5, and this one has kappa=0\.25"
    ):
        ShareBoundedAdamW(_params(), lr=0.01, betas=BETAS, kappa=0.25).load_state_dict(copy.deepcopy(state))
    # a state saved before kappa was recorded loads as it is
    legacy = {k: v for k, v in copy.deepcopy(state).items() if k != "kappa"}
    ShareBoundedAdamW(_params(), lr=0.01, betas=BETAS, kappa=0.25).load_state_dict(legacy)


def test_the_defaults_of_the_optimizer_and_the_integrations_are_dcmdp_trains() -> None:
    import inspect

    from dcmdp import config, integrations

    default = inspect.signature(ShareBoundedAdamW).parameters["kappa"].default
    assert default == config.DEFAULT_SHARE == integrations.DEFAULT_CONSTRAINT_SHARE
    assert integrations.CORRECTED_CONSTRAINT_SHARE == config.COMPOSED_SHARE


def test_states_cross_between_adamw_and_the_bounded_optimizer() -> None:
    from dcmdp.grad_share import as_adamw_state

    ours = _params()
    opt = ShareBoundedAdamW(ours, lr=0.01, betas=BETAS, kappa=1e9)
    for step in range(2):
        for p, g in zip(ours, _grads(ours, step)):
            p.grad = g
        opt.set_constraint_grads(ours, _grads(ours, 10 + step, scale=0.5))
        opt.step()
    # into AdamW: the policy part's moments
    ref = _params()
    adamw = torch.optim.AdamW(ref, lr=0.01, betas=BETAS)
    saved = copy.deepcopy(opt.state_dict())
    assert "kappa" in saved and "kappa" not in as_adamw_state(saved)
    adamw.load_state_dict(as_adamw_state(saved))
    for i, p in enumerate(ours):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(adamw.state[ref[i]][key], opt.state[p][key])
        assert set(adamw.state[ref[i]]) == {"step", "exp_avg", "exp_avg_sq"}
    # and an AdamW state into the bounded optimizer: it becomes the policy part
    back = ShareBoundedAdamW(_params(), lr=0.01, betas=BETAS, kappa=0.5)
    back.load_state_dict(copy.deepcopy(adamw.state_dict()))
    for p, g in zip(back.param_groups[0]["params"], _grads(ours, 5)):
        p.grad = g
    back.step()
    for p in back.param_groups[0]["params"]:
        for key in ("exp_avg_c", "exp_avg_sq_c", "drift_c"):
            assert torch.equal(back.state[p][key], torch.zeros_like(p))


def test_a_group_at_lr_0_does_not_move() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = ShareBoundedAdamW([p], lr=0.0, weight_decay=0.1)
    p.grad = torch.ones(3)
    opt.set_constraint_grads([p], [torch.ones(3)])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


def test_lambda_zero_skips_the_constraint_backward_and_steps_like_adamw(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At lambda 0 the constraint's gradient is exactly 0: the default bound takes no second
    backward pass (it costs nothing while the constraint is met) and steps as AdamW does; at
    lambda > 0 it takes one per micro-batch."""
    from dcmdp import trainer
    from dcmdp.engines.base import SamplingSettings
    from dcmdp.logprobs import sequence_logprobs
    from dcmdp.models import load_model
    from dcmdp.run_setup import loss_settings

    calls: list[int] = []
    real_add = ConstraintGradients.add

    def spy(self: ConstraintGradients, constraint_loss: torch.Tensor) -> None:
        calls.append(1)
        real_add(self, constraint_loss)

    monkeypatch.setattr(ConstraintGradients, "add", spy)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.0, 0.0])
    batch = _update_batch(advantages)
    sampling = SamplingSettings(max_tokens=4)
    moved = {}
    for share, lam in (("0.5", 0.0), ("0.0", 0.0), ("0.5", 0.3)):
        calls.clear()
        cfg = load_config(
            overrides=["loss.type=dcmdp_full", f"loss.constraint_share={share}", "optim.grad_accum=2"]
        )
        torch.manual_seed(0)
        model = load_model(tiny_model_dir)
        start = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            old = sequence_logprobs(model, batch, sampling)
        opt = trainer.make_optimizer(cfg, model)
        assert isinstance(opt, ShareBoundedAdamW) == (share == "0.5")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _i: 1.0)
        learner = trainer.Learner(cfg, model, None, opt, sched, sampling, torch.Generator().manual_seed(1))
        trainer.update_policy(
            learner,
            trainer.UpdateBatch(batch, old, None, advantages),
            loss_settings(cfg, lam=lam, tolerance=1e-3),
        )
        moved[(share, lam)] = torch.cat(
            [(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)]
        )
        assert len(calls) == (2 if (share, lam) == ("0.5", 0.3) else 0)
    assert float(moved[("0.5", 0.0)].abs().max()) > 1e-5
    torch.testing.assert_close(moved[("0.5", 0.0)], moved[("0.0", 0.0)], rtol=1e-4, atol=1e-7)
    assert float((moved[("0.5", 0.3)] - moved[("0.5", 0.0)]).abs().max()) > 1e-6


def test_a_registered_loss_keeps_its_constraint_pass_at_lambda_zero(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lambda-0 skip is for constraints that scale with lambda (every built-in one). A loss
    registered without saying so (here a constraint part with a term that does not vanish at
    lambda 0) still gets its backward pass, so its gradient is not dropped."""
    from dcmdp.algo import loss_core
    from dcmdp.algo.losses import composed_loss

    def augmented(inputs: loss_core.LossInputs, settings: loss_core.LossSettings) -> loss_core.LossOutput:
        base = composed_loss(inputs, settings, "none", "penalty")
        assert base.constraint_scales_with_lam  # the built-in penalty says so
        extra = 5.0 * (inputs.logp_BT.exp() - inputs.engine_logp_BT.exp()).abs()[inputs.mask_BT].mean() ** 2
        assert base.constraint_part is not None
        return loss_core.LossOutput(
            loss=base.loss + extra,
            metrics=base.metrics,
            token_mean_part=base.token_mean_part,
            constraint_part=base.constraint_part + extra,
            policy_part=base.policy_part,
        )

    monkeypatch.setitem(loss_core.POLICY_LOSSES, "test_augmented", augmented)
    loss_core.MULTIPLIER_LOSSES.add("test_augmented")  # the set the config reads, cleaned up below
    try:
        _run_augmented(tiny_model_dir, monkeypatch)
    finally:
        loss_core.MULTIPLIER_LOSSES.discard("test_augmented")


def _run_augmented(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dcmdp import trainer
    from dcmdp.engines.base import SamplingSettings
    from dcmdp.logprobs import sequence_logprobs
    from dcmdp.models import load_model
    from dcmdp.run_setup import loss_settings

    calls: list[int] = []
    real_add = ConstraintGradients.add

    def spy(self: ConstraintGradients, constraint_loss: torch.Tensor) -> None:
        calls.append(1)
        real_add(self, constraint_loss)

    monkeypatch.setattr(ConstraintGradients, "add", spy)
    cfg = load_config(overrides=["loss.type=test_augmented"])
    assert trainer.bounds_update(cfg)
    advantages = torch.zeros(8)  # no reward signal: only the extra term has a gradient at lambda 0
    batch = _update_batch(advantages)
    sampling = SamplingSettings(max_tokens=4)
    torch.manual_seed(0)
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        old = sequence_logprobs(model, batch, sampling)
    opt = trainer.make_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _i: 1.0)
    learner = trainer.Learner(cfg, model, None, opt, sched, sampling, torch.Generator().manual_seed(1))
    trainer.update_policy(
        learner,
        trainer.UpdateBatch(batch, old, None, advantages),
        loss_settings(cfg, lam=0.0, tolerance=1e-3),
    )
    assert len(calls) == 1
    assert isinstance(opt, ShareBoundedAdamW)
    assert any(float(v["exp_avg_sq_c"].abs().max()) > 0 for v in opt.state.values())
