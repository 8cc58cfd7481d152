"""Shared fixtures: tiny models built once per test session (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# vLLM reads these at import time: in-process engine, a small CPU KV cache, and permission to pass
# a function through collective_rpc (the in-memory weight push). Exported values win.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On a small machine shared with other jobs, two OpenMP threads spin against each other and
# tiny-model steps slow down 10-40x (vLLM and Transformers alike); one thread is steady.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-initialised tiny Qwen3 (untied embeddings) saved in HF format."""
    from dcmdp.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-initialised tiny Qwen3-MoE (4 experts, top-2) saved in HF format."""
    from dcmdp.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-moe", moe=True)
