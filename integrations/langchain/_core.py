"""Decisions shared by the callback handlers and the Runnable: event payloads and stream actions.

The policy itself lives in ``guard_core.Policy`` and the hold-back in ``guard_core``'s
``StreamGate``; this module only turns their results into what LangChain users see.
"""

from __future__ import annotations

from typing import Any

from guard_core import Action, Policy, Verdict
from guard_core.gate import StreamGate

from ._convert import Conversation

#: Name of the custom event carrying every verdict (``on_custom_event`` / ``astream_events``).
GUARD_EVENT = "qwen3guard_verdict"
#: Key under which a verdict is attached to a message's ``response_metadata``.
METADATA_KEY = "qwen3guard"
#: What ``on_violation="replace"`` answers when no refusal text is configured.
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
#: The user turn assumed when a response arrives without its conversation.
FALLBACK_PROMPT = "(the request is not available)"


def event_data(verdict: Verdict, action: Action, **extra: Any) -> dict[str, Any]:
    """The JSON-ready payload of a verdict event, so tracers can store it as is."""
    return {"role": verdict.role, "action": action.value, "verdict": verdict.to_dict(), **extra}


def gate_action(gate: StreamGate, policy: Policy) -> Action:
    """The gate alone decides blocking (per-token policy plus debounce); a non-safe verdict it let through is flagged."""
    if gate.blocked:
        return Action.BLOCK
    return Action.ALLOW if policy.action_for(gate.verdict) is Action.ALLOW else Action.FLAG


def stream_context(conversation: Conversation, fallback_prompt: str) -> Conversation:
    """The conversation a Stream session prefills before the response: it must end with a user turn."""
    if conversation and conversation[-1]["role"] == "user":
        return conversation
    return [*conversation, {"role": "user", "content": fallback_prompt}]
