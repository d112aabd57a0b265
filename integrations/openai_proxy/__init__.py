"""Qwen3Guard in front of OpenAI-compatible APIs: an in-process client wrapper (and the guard proxy).

``guard_openai(OpenAI())`` returns a client whose chat completions and responses are moderated,
streamed or not. The protocol-neutral pieces (``moderation``, ``streaming``, ``chunks``) are what
the proxy server shares with the wrapper.
"""

from .client import AsyncGuardedStream, GuardedStream, guard_openai
from .errors import UnsafeContentError
from .moderation import DEFAULT_REFUSAL, Moderator, chat_conversation, responses_conversation
from .streaming import ChatStreamModerator, ResponsesStreamModerator

__all__ = [
    "AsyncGuardedStream",
    "ChatStreamModerator",
    "DEFAULT_REFUSAL",
    "GuardedStream",
    "Moderator",
    "ResponsesStreamModerator",
    "UnsafeContentError",
    "chat_conversation",
    "guard_openai",
    "responses_conversation",
]
