"""Qwen3Guard moderation for LLM applications: Gen and token-level Stream guards, run locally.

The adapters in ``integrations`` (LangChain, LlamaIndex, OpenAI client and proxy) are thin
layers over these classes; policy, batching and streaming state live here.
"""

from .gen import DEFAULT_GEN_MODEL, GenGuard
from .messages import Message, normalize_messages
from .policy import Action, Mode, Policy
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
    "DEFAULT_GEN_MODEL",
    "GenGuard",
    "GuardUnavailableError",
    "GuardViolation",
    "Message",
    "Mode",
    "Policy",
    "RiskLevel",
    "TokenVerdict",
    "Verdict",
    "normalize_messages",
]
