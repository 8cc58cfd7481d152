"""DCMDP in one file: the whole method on the library's own functions, no trainer class.

    python examples/minimal_dcmdp.py MODEL_DIR [STEPS]

One step: the engine samples G completions per prompt with their log-probs (mu); the task scores
them; GRPO normalises rewards per group; the trainer recomputes its own log-probs (pi_old);
the policy takes a gradient step on the DCMDP loss with lambda as a plain number; the dual step
moves lambda on the measured discrepancy D; the new weights go to the engine in memory.
`tests/test_trainer.py::test_minimal_example_matches_trainer` checks this file against
`dcmdp.trainer` step for step, with the trainer's update bound off (`loss.constraint_share=0`;
the bound, on by default, keeps the constraint's share of the weights' movement small:
`dcmdp.grad_share.ShareBoundedAdamW`).
"""

from __future__ import annotations

import sys

import torch

from dcmdp.algo.advantages import grpo_advantages
from dcmdp.algo.discrepancy import discrepancy_metrics
from dcmdp.algo.losses import LossInputs, LossSettings, get_policy_loss
from dcmdp.algo.multiplier import LagrangeMultiplier
from dcmdp.engines import EngineSpec, SamplingSettings, make_engine
from dcmdp.models import load_model, load_tokenizer
from dcmdp.rollout import build_token_batch, sequence_logprobs
from dcmdp.tasks import make_task


def main(
    model_dir: str,
    steps: int = 3,
    prompts: int = 4,
    group: int = 4,
    seed: int = 0,
    engine_type: str = "transformers",
    engine_dtype: str = "bfloat16",
    lr: float = 1e-4,
    task_name: str = "arithmetic",
) -> dict:
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_dir)
    policy = load_model(model_dir)  # float32 trainer
    engine = make_engine(EngineSpec(type=engine_type, model=model_dir, dtype=engine_dtype, seed=seed))
    engine.load_weights(policy.named_parameters())
    task = make_task(task_name)
    sampling = SamplingSettings(temperature=1.0, max_tokens=8, stop_token_ids=(tokenizer.eos_token_id,))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    lam = LagrangeMultiplier(init=0.1, eta=1.0, tolerance=0.0037)
    loss_fn = get_policy_loss("dcmdp")
    history = []
    for step in range(1, steps + 1):
        step_seed = seed * 1_000_003 + step
        # 1. rollout on the engine (a black box: tokens + log-probs of what it sampled from)
        problems = task.problems("train", prompts, seed=step_seed)
        prompt_ids = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
        completions = engine.generate(prompt_ids, sampling, n=group, seed=step_seed).completions
        # 2. score, 3. group advantages
        texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        rewards = torch.tensor([task.reward(problems[c.prompt_index], t) for c, t in zip(completions, texts)])
        adv_N = grpo_advantages(rewards, group)
        # 4. the trainer's own log-probs of the same tokens (pi_old), 5. D: pi_old against mu, before the update
        batch = build_token_batch(prompt_ids, completions, tokenizer.pad_token_id)
        with torch.no_grad():
            policy.eval()
            old_logp = sequence_logprobs(policy, batch, sampling)
        D = float(
            discrepancy_metrics(old_logp, batch.engine_logp_BT, batch.response_mask_BT)[
                "discrepancy/prob_gap_mean"
            ]
        )
        # 6. one policy update with lambda as a number
        policy.train()
        logp = sequence_logprobs(policy, batch, sampling)
        adv_BT = adv_N.unsqueeze(1).expand_as(logp)
        settings = LossSettings(lam=lam.value, tolerance=lam.tolerance)
        out = loss_fn(
            LossInputs(logp, old_logp, batch.engine_logp_BT, adv_BT, batch.response_mask_BT), settings
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # 7. dual step, 8. weight sync
        lam_used = lam.value
        lam.update(D)
        engine.load_weights(policy.named_parameters())
        history.append(
            {
                "step": step,
                "reward": float(rewards.mean()),
                "D": D,
                "lambda": lam_used,
                "loss": float(out.loss.detach()),
            }
        )
        print(history[-1])
    engine.close()
    return {"history": history, "lambda": lam.value, "policy": policy}


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
