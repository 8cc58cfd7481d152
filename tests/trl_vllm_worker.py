"""TRL's vLLM colocate path with DCMDPGRPOTrainer, on the real vLLM (CPU build here).

Run by tests/test_integration_trl_vllm.py in its own process (vLLM allows one in-process engine):

    trl_vllm_worker.py MODEL_DIR OUT_JSON [--break-sync]

Trains a few steps with ``use_vllm=True, vllm_mode="colocate"`` and writes, per optimizer step, the
D of the dual step and lambda, plus the dtype TRL's vLLM runs at and how far the weights moved.
``--break-sync`` turns TRL's weight push into a no-op, so vLLM keeps sampling from the initial
weights: the test's check that a healthy run stays at the precision floor must then fail.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from dcmdp.integrations.trl import DCMDPGRPOConfig
from trl_worker_common import PROMPTS, StepRecorder, reward_length


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    args = DCMDPGRPOConfig(
        output_dir=os.path.join(os.path.dirname(out), "trl-vllm"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=4,
        learning_rate=2e-2,
        beta=0.0,
        loss_type="bnpo",
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=0,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.1,
        vllm_max_model_length=64,
        dcmdp_lambda_init=0.5,
        dcmdp_tolerance=0.002,
    )
    trainer = StepRecorder(
        model=model_dir,
        reward_funcs=reward_length,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    if "--break-sync" in sys.argv:
        trainer.vllm_generation.sync_weights = lambda: None
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in trainer.model.named_parameters())
    with open(out, "w") as f:
        json.dump(
            {
                "rollout_key": trainer.dcmdp_rollout_key,
                "vllm_dtype": str(trainer.vllm_generation.llm.llm_engine.model_config.dtype).removeprefix(
                    "torch."
                ),
                "is_correction": trainer.args.vllm_importance_sampling_correction,
                "steps": trainer.steps,
                "max_weight_change": moved,
            },
            f,
        )


if __name__ == "__main__":
    main()
