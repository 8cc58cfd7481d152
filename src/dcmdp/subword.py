"""A subword (byte-level BPE) tokenizer trained on a task's own text, for long-response models.

The character tokenizer of ``dcmdp.models`` gives every character one token and has about 100
tokens. Real models have tens of thousands, most of them rare: a long tail where low-precision
engines and the trainer disagree most. ``train_bpe_tokenizer`` trains a byte-level BPE (GPT-2's
pre-tokenization: words, digit runs and punctuation, each with an optional leading space) on
prompts and demonstrations of a task, to about ``vocab_size`` tokens, with the character
tokenizer's special tokens (``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2).

Digit runs are pre-tokens, so the merges learn multi-digit numbers: with the default
``long_addition`` corpus the vocabulary fills up with 2-, 3- and 4-digit pieces, most of them
rare. The scratchpad's own digits are separated by spaces and signs, so they stay single tokens.

Deterministic: the corpus is a pure function of (task, options, size, seed) and the BPE trainer
breaks ties by a fixed order, so the same arguments give the same ``tokenizer.json``. Saved with
the model as a ``PreTrainedTokenizerFast`` (``tokenizer.json``), which Transformers, vLLM and the
engines load from the model directory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from dcmdp.models import EOS, PAD, SPECIAL_TOKENS, UNK

DEFAULT_VOCAB_SIZE = 4096
DEFAULT_CORPUS_PROBLEMS = 20_000


def task_corpus(
    task: str = "long_addition",
    task_options: Mapping[str, Any] | None = None,
    problems: int = DEFAULT_CORPUS_PROBLEMS,
    seed: int = 0,
) -> list[str]:
    """``prompt + demonstration`` of ``problems`` train-split problems of ``task`` (eval never seen)."""
    from dcmdp.tasks import make_task

    t = make_task(task, **dict(task_options or {}))
    return [p.prompt + t.demonstration(p) for p in t.problems("train", problems, seed=seed)]


def train_bpe_tokenizer(
    corpus: list[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``corpus`` (default: ``task_corpus()``).

    The vocabulary is at most ``vocab_size`` (fewer when the corpus runs out of pairs seen at
    least ``min_frequency`` times); ids 0-2 are ``<pad>``, ``<eos>``, ``<unk>``, then the 256
    byte symbols, then the merges in the order learned.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = task_corpus() if corpus is None else corpus
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # type: ignore[assignment]
    tok.decoder = decoders.ByteLevel()  # type: ignore[assignment]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def batches() -> Iterator[list[str]]:
        for i in range(0, len(texts), 1000):
            yield texts[i : i + 1000]

    tok.train_from_iterator(batches(), trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=None
    )
