"""Qwen3Guard in front of OpenAI-compatible APIs: an in-process client wrapper and the guard proxy.

``guard_openai(OpenAI())`` returns a client whose chat completions and responses are moderated,
streamed or not; ``qwen3guard-proxy`` (``server.create_app``) does the same for any client over
HTTP. Both decide through the same pieces (``exchange``, ``streaming``) over ``guard_core.Moderator``.
"""

from guard_core import DEFAULT_REFUSAL

from .client import AsyncGuardedStream, GuardedStream, guard_openai
from .errors import GuardFailedError, MalformedReplyError, UnsafeContentError
from .exchange import OpenAIGuard

__all__ = ["AsyncGuardedStream", "DEFAULT_REFUSAL", "GuardFailedError", "GuardedStream", "MalformedReplyError", "OpenAIGuard",
           "UnsafeContentError", "guard_openai"]
