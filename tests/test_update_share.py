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


def test_the_policy_part_is_adamw_on_the_policy_gradient_alone() -> None:
    """kappa 0: whatever the constraint's gradient, the weights follow AdamW fed g - g_c."""
    ours, ref = _params(), _params()
    opt = ShareBoundedAdamW(ours, lr=0.01, betas=BETAS, weight_decay=0.1, kappa=0.0)
    adamw = torch.optim.AdamW(ref, lr=0.01, betas=BETAS, weight_decay=0.1)
    for step in range(6):
        g_pg, g_c = _grads(ours, step), _grads(ours, 100 + step, scale=3.0)
        for p, q, a, b in zip(ours, ref, g_pg, g_c):
            p.grad, q.grad = a + b, a.clone()
        opt.set_constraint_grads(ours, g_c)
        opt.step()
        adamw.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_unbound_it_is_two_adamw_steps_added() -> None:
    """kappa large: the displacement is AdamW's on g - g_c plus AdamW's on g_c (no weight decay,
    so the moments do not depend on the weights and the two runs add)."""
    ours, on_pg, on_c = _params(), _params(), _params()
    start = [p.detach().clone() for p in ours]
    opt = ShareBoundedAdamW(ours, lr=0.01, betas=BETAS, weight_decay=0.0, kappa=1e9)
    a_pg = torch.optim.AdamW(on_pg, lr=0.01, betas=BETAS, weight_decay=0.0)
    a_c = torch.optim.AdamW(on_c, lr=0.01, betas=BETAS, weight_decay=0.0)
    for step in range(6):
        g_pg, g_c = _grads(ours, step), _grads(ours, 100 + step, scale=0.5)
        for p, q, r, a, b in zip(ours, on_pg, on_c, g_pg, g_c):
            p.grad, q.grad, r.grad = a + b, a.clone(), b.clone()
        opt.set_constraint_grads(ours, g_c)
        opt.step()
        a_pg.step()
        a_c.step()
        assert opt.last_metrics["dcmdp/constraint_scale"] == 1.0
    for p, q, r, s0 in zip(ours, on_pg, on_c, start):
        torch.testing.assert_close(
            p.detach() - s0, (q.detach() - s0) + (r.detach() - s0), rtol=1e-5, atol=1e-6
        )


def test_a_constraint_pulling_against_the_reward_cannot_inflate_the_step() -> None:
    """Where the constraint's gradient cancels the policy's, the whole gradient is about 0; a second
    moment of the whole gradient would divide each part's momentum by about 0. Each coordinate's
    step stays within lr (1 + kappa), as two AdamW steps do."""
    p = torch.nn.Parameter(torch.zeros(4))
    lr, kappa, steps = 1e-3, 0.5, 20
    opt = ShareBoundedAdamW([p], lr=lr, weight_decay=0.0, kappa=kappa)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        g_pg = torch.ones(4)
        g_c = -g_pg + 1e-3 * torch.randn(4, generator=g)
        p.grad = g_pg + g_c
        opt.set_constraint_grads([p], [g_c])
        opt.step()
    assert float(p.detach().abs().max()) <= steps * lr * (1 + kappa) * (1 + 1e-6)
    # the policy part wins: each step -lr (u_pg + s u_c) with u_pg = 1, u_c about -1, s = 0.5
    torch.testing.assert_close(p.detach(), torch.full((4,), -steps * lr * (1 - kappa)), rtol=1e-3, atol=0)


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
            p.grad, q.grad = c.clone(), c.clone()
        opt.set_constraint_grads(ours, g_c)
        opt.step()
        adamw.step()
        assert opt.last_metrics["dcmdp/constraint_scale"] == 0.0
        assert opt.last_metrics["dcmdp/constraint_share"] == float("inf")
    for p, s in zip(ours, start):
        assert torch.equal(p.detach(), s)
    assert _norm([q.detach() - s for q, s in zip(ref, start)]) > 0.01


def test_the_constraint_moves_the_weights_at_most_kappa_times_the_policy() -> None:
    """The hand-written step from fresh moments: u = g / (|g| + eps) for each part; the
    constraint's part of the displacement is kappa |u_pg| when it would be larger."""
    params = _params()
    start = [p.detach().clone() for p in params]
    lr, kappa, eps = 0.01, 0.3, 1e-8
    opt = ShareBoundedAdamW(params, lr=lr, betas=BETAS, eps=eps, weight_decay=0.0, kappa=kappa)
    g_pg, g_c = _grads(params, 0, scale=0.1), _grads(params, 1, scale=10.0)
    # some coordinates where the constraint cancels the policy gradient exactly
    g_c[0][0] = -g_pg[0][0]
    for p, a, b in zip(params, g_pg, g_c):
        p.grad = a + b
    opt.set_constraint_grads(params, g_c)
    opt.step()
    u_pg = [a / (a.abs() + eps) for a in g_pg]
    u_c = [b / (b.abs() + eps) for b in g_c]
    s = kappa * _norm(u_pg) / _norm(u_c)
    assert s < 1 and opt.last_metrics["dcmdp/constraint_scale"] == pytest.approx(s, rel=1e-6)
    for p, p0, a, b in zip(params, start, u_pg, u_c):
        torch.testing.assert_close(p.detach(), p0 - lr * (a + s * b), rtol=1e-5, atol=1e-7)
    moved_by_constraint = [p.detach() - p0 + lr * a for p, p0, a in zip(params, start, u_pg)]
    assert _norm(moved_by_constraint) == pytest.approx(kappa * lr * _norm(u_pg), rel=1e-4)


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
    assert load_config().loss.constraint_share_of == "gradient"
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
    adamw.load_state_dict(as_adamw_state(copy.deepcopy(opt.state_dict())))
    for i, p in enumerate(ours):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(adamw.state[ref[i]][key], opt.state[p][key])
        assert "exp_avg_c" not in adamw.state[ref[i]]
    # and an AdamW state into the bounded optimizer: it becomes the policy part
    back = ShareBoundedAdamW(_params(), lr=0.01, betas=BETAS, kappa=0.5)
    back.load_state_dict(copy.deepcopy(adamw.state_dict()))
    for p, g in zip(back.param_groups[0]["params"], _grads(ours, 5)):
        p.grad = g
    back.step()
    for p in back.param_groups[0]["params"]:
        assert torch.equal(back.state[p]["exp_avg_c"], torch.zeros_like(p))
        assert torch.equal(back.state[p]["exp_avg_sq_c"], torch.zeros_like(p))
