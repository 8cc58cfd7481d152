"""Moved to :mod:`dcmdp.engines.gguf_export`; this module keeps ``dcmdp.gguf_export`` imports working (see README, Layout)."""

from dcmdp.engines.gguf_export import (
    ARCHS,
    BOS_TEXTS,
    EOS_TEXTS,
    FILE_TYPES,
    PAD_TEXTS,
    QTYPES,
    UNK_TEXTS,
    GGUFVocab,
    check_qtype,
    export_gguf,
    load_hf_tensors,
    placeholder_vocab,
    vocab_for,
    vocab_from_tokenizer_json,
    write_gguf,
)

__all__ = [
    "ARCHS",
    "BOS_TEXTS",
    "EOS_TEXTS",
    "FILE_TYPES",
    "PAD_TEXTS",
    "QTYPES",
    "UNK_TEXTS",
    "GGUFVocab",
    "check_qtype",
    "export_gguf",
    "load_hf_tensors",
    "placeholder_vocab",
    "vocab_for",
    "vocab_from_tokenizer_json",
    "write_gguf",
]
