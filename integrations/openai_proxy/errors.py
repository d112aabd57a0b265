"""The exceptions a guarded OpenAI call raises.

They follow openai's own ``ContentFilterFinishReasonError``: plain ``OpenAIError``s (not an
``APIError``, which needs an HTTP request), so code that already catches ``openai.OpenAIError``
keeps working; a blocked call is also a ``GuardViolation`` so guard-aware code can catch every
adapter alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

from openai import OpenAIError

from guard_core import Action, Decision, GuardViolation, Verdict
from guard_core.cli import one_line
from guard_core.types import violation_message


class UnsafeContentError(OpenAIError, GuardViolation):
    """The prompt or the response was blocked by the Qwen3Guard policy.

    ``decision`` / ``verdict`` say why (``verdict.role`` is ``"prompt"`` or ``"response"``);
    ``delivered`` is the text of the blocked choice that already reached the caller (empty for a
    blocked prompt or a non-streamed response); ``choice_index`` is the chat choice (or Responses
    output item, ``output="output"`` in the message) that was blocked, ``None`` for a prompt.
    """

    def __init__(self, decision: Decision | Verdict, *, delivered: str = "", choice_index: int | None = None,
                 output: Literal["choice", "output"] = "choice") -> None:
        self.decision = decision if isinstance(decision, Decision) else Decision(decision, Action.BLOCK)
        self.delivered = delivered
        self.choice_index = choice_index
        verdict = self.decision.verdict
        where = "prompt" if verdict.role == "prompt" else f"response ({output} {choice_index})"
        GuardViolation.__init__(self, verdict, violation_message(verdict, where))


class MalformedReplyError(OpenAIError):
    """The upstream's reply cannot be judged as it stands, so none of it is passed on.

    Raised for a reply without ``choices`` / ``output``, text that is not a string, a stream
    event that is not an object (``[1, 2]``, ``5``), a chat choice without an integer ``index``,
    text for a choice or part after it was done, or a Responses event whose whole text
    contradicts the deltas streamed before it. The proxy answers it with 502 (or, mid-stream, an
    SSE ``error`` event with code ``upstream_error``).
    """


class GuardFailedError(OpenAIError):
    """The guard itself failed (out of memory, a model that cannot be loaded, a bug): the call failed
    closed and nothing unjudged was delivered. The guard's exception is the ``__cause__``; the proxy
    answers the same fault with a 500 ``guard_error``."""


@contextlib.contextmanager
def guard_failures() -> Iterator[None]:
    """Raise a guard's own failure as ``GuardFailedError``, so ``except openai.OpenAIError`` code
    handles it; blocks, the SDK's errors and the caller's bad arguments pass as they are."""
    try:
        yield
    except (OpenAIError, GuardViolation, ValueError, TypeError, NotImplementedError):
        raise
    except Exception as exc:
        raise GuardFailedError(f"the guard failed ({one_line(exc, None)}); nothing unjudged was delivered") from exc
