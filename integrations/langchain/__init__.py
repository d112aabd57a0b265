"""LangChain integration: one callback or one ``|`` step puts Qwen3Guard in front of a chain.

- ``QwenGuardCallbackHandler`` / ``AsyncQwenGuardCallbackHandler``: moderate any chat model or LLM
  (prompt before the call, response token by token while it streams) without changing the chain.
- ``QwenGuardRunnable``: an LCEL step (``guard_input | prompt | model | guard_output``) that
  streams, holding back only text the guard has not judged yet.
"""

from ._core import DEFAULT_REFUSAL, GUARD_EVENT, METADATA_KEY
from ._convert import messages_to_conversation, to_conversation
from .callbacks import AsyncQwenGuardCallbackHandler, QwenGuardCallbackHandler
from .runnable import QwenGuardRunnable

__all__ = [
    "AsyncQwenGuardCallbackHandler",
    "DEFAULT_REFUSAL",
    "GUARD_EVENT",
    "METADATA_KEY",
    "QwenGuardCallbackHandler",
    "QwenGuardRunnable",
    "messages_to_conversation",
    "to_conversation",
]
