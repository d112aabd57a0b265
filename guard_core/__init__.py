"""Qwen3Guard moderation for LLM applications: Gen and token-level Stream guards, run locally.

The adapters in ``integrations`` (LangChain, LlamaIndex, OpenAI client and proxy) are thin
layers over ``Moderator``; policy, conversation folding, batching and streaming state live here.

Importing the package is cheap: torch and transformers are imported only when a local model is
loaded (``GenGuard``, ``StreamGuard`` and the Stream classes are resolved on first access), so a
process that talks to a remote guard, or a CLI's ``--help``, never pays for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .backends import CONFIGURED, GenBackend, gen_backend, load_gen_guard, policy_from_env, stream_backend
from .config import DEFAULT_GEN_MODEL, DEFAULT_REFUSAL, DEFAULT_STREAM_MODEL, METADATA_KEY, Settings
from .conversation import Conversation
from .messages import Message, normalize_messages
from .moderator import Decision, Moderator, PromptResult
from .policy import Action, Mode, Policy
from .remote_gen import RemoteGenGuard
from .resilience import CircuitBreaker, RetryPolicy
from .types import Category, GuardUnavailableError, GuardViolation, RiskLevel, TokenVerdict, Verdict

if TYPE_CHECKING:
    from .debounce import Debounce
    from .gate import StreamGate
    from .gen import GenGuard
    from .relay import StreamRelay
    from .stream import StreamGuard, StreamSession

#: Names whose modules import torch, loaded on first access.
_LAZY = {
    "Debounce": "debounce",
    "GenGuard": "gen",
    "StreamGate": "gate",
    "StreamGuard": "stream",
    "StreamRelay": "relay",
    "StreamSession": "stream",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Action",
    "CONFIGURED",
    "Category",
    "CircuitBreaker",
    "Conversation",
    "DEFAULT_GEN_MODEL",
    "DEFAULT_REFUSAL",
    "DEFAULT_STREAM_MODEL",
    "Debounce",
    "Decision",
    "GenBackend",
    "GenGuard",
    "GuardUnavailableError",
    "GuardViolation",
    "METADATA_KEY",
    "Message",
    "Mode",
    "Moderator",
    "Policy",
    "PromptResult",
    "RemoteGenGuard",
    "RetryPolicy",
    "RiskLevel",
    "Settings",
    "StreamGate",
    "StreamGuard",
    "StreamRelay",
    "StreamSession",
    "TokenVerdict",
    "Verdict",
    "gen_backend",
    "load_gen_guard",
    "normalize_messages",
    "policy_from_env",
    "stream_backend",
]
