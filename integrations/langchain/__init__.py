"""LangChain integration: one callback or one ``|`` step puts Qwen3Guard in front of a chain.

- ``QwenGuardCallbackHandler`` / ``AsyncQwenGuardCallbackHandler``: moderate any chat model or LLM
  (the input before the call, the answer token by token while it streams) without changing the chain.
- ``QwenGuardRunnable``: an LCEL step (``guard_input | prompt | model | guard_output``) that
  streams, holding back only text the guard has not judged yet; ``QwenGuardRunnable.around(chain)``
  guards a chain with its input in view.
- ``QwenGuardMiddleware``: the same guards in a LangChain v1 agent (``create_agent(middleware=[...])``).
"""

from guard_core import DEFAULT_REFUSAL, METADATA_KEY

from ._convert import messages_to_conversation, to_conversation
from ._core import GUARD_EVENT
from .callbacks import AsyncQwenGuardCallbackHandler, QwenGuardCallbackHandler
from .middleware import QwenGuardMiddleware
from .runnable import QwenGuardRunnable

__all__ = [
    "AsyncQwenGuardCallbackHandler",
    "DEFAULT_REFUSAL",
    "GUARD_EVENT",
    "METADATA_KEY",
    "QwenGuardCallbackHandler",
    "QwenGuardMiddleware",
    "QwenGuardRunnable",
    "messages_to_conversation",
    "to_conversation",
]
