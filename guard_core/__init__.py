"""Qwen3Guard moderation for LLM applications: Gen and token-level Stream guards, run locally.

The adapters in ``integrations`` (LangChain, LlamaIndex, OpenAI client and proxy) are thin
layers over these classes; policy, batching and streaming state live here.
"""

from .backends import load_gen_guard, policy_from_env
from .gate import StreamGate
from .gen import DEFAULT_GEN_MODEL, GenGuard
from .messages import Message, normalize_messages
from .policy import Action, Mode, Policy
from .remote_gen import RemoteGenGuard
from .resilience import CircuitBreaker, RetryPolicy
from .stream import DEFAULT_STREAM_MODEL, Debounce, StreamGuard, StreamSession
from .types import (
    Category,
    GuardUnavailableError,
    GuardViolation,
    RiskLevel,
    TokenVerdict,
    Verdict,
)

__all__ = [
    "Action",
    "Category",
    "CircuitBreaker",
    "DEFAULT_GEN_MODEL",
    "DEFAULT_STREAM_MODEL",
    "Debounce",
    "GenGuard",
    "GuardUnavailableError",
    "GuardViolation",
    "Message",
    "Mode",
    "Policy",
    "RemoteGenGuard",
    "RetryPolicy",
    "RiskLevel",
    "StreamGate",
    "StreamGuard",
    "StreamSession",
    "TokenVerdict",
    "Verdict",
    "load_gen_guard",
    "normalize_messages",
    "policy_from_env",
]
