"""Protocol-neutral moderation for OpenAI-shaped traffic, shared by the client wrapper and the proxy.

Everything here works on request keyword arguments (the JSON body of a request, as a dict) and
on openai's pydantic response types, never on a client or an HTTP connection, so the in-process
wrapper (``client.py``) and the guard proxy server decide identically:

- which conversation is moderated (``chat_conversation`` / ``responses_conversation``);
- which guard judges what (``Moderator``): a streamed request uses Qwen3Guard-Stream for both the
  prompt (its query heads, free with the prefill the response needs anyway) and the response,
  through one ``StreamGate`` per choice (``ChoiceGates``); a non-streamed request uses
  Qwen3Guard-Gen for both, so whole responses also get Gen's refusal detection;
- what a verdict looks like when attached to a response (``annotation``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, Literal

from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from guard_core import DEFAULT_GEN_MODEL, GenGuard, Policy, Verdict
from guard_core.gate import StreamGate
from guard_core.messages import content_to_text
from guard_core.stream import DEFAULT_CONSECUTIVE, DEFAULT_STREAM_MODEL, StreamGuard

from . import chunks
from .errors import UnsafeContentError

OnUnsafe = Literal["abort", "rewrite"]
Conversation = list[dict[str, str]]

#: The refusal used when ``on_unsafe="rewrite"`` replaces blocked content.
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
#: Extra field carrying verdicts on responses and on the chunks the guard writes itself.
ANNOTATION_KEY = chunks.ANNOTATION_KEY

_SYSTEM_ROLES = ("system", "developer")
_ASSISTANT_PART_TYPES = ("text", "output_text", "refusal")


def _plain(obj: Any) -> Any:
    """Request items may be pydantic objects (e.g. a previous response's output) as well as dicts."""
    return obj.model_dump(exclude_none=True) if hasattr(obj, "model_dump") else obj


def _assistant_text(content: Any) -> str:
    """Text of an assistant turn; refusal parts count as text, anything else is not the model's words."""
    if content is None or isinstance(content, str):
        return content or ""
    pieces = []
    for part in content:
        part = _plain(part)
        if isinstance(part, Mapping) and part.get("type") in _ASSISTANT_PART_TYPES:
            pieces.append(part.get("text") or part.get("refusal") or "")
    return "\n".join(pieces)


def _conversation(turns: Iterable[tuple[str, Any]]) -> Conversation:
    """Fold role/content pairs into what Qwen3Guard reads: one leading system turn, user and
    assistant text, cut after the last user turn (the turn the upstream model is answering).

    Tool results and later system/developer turns are instructions or data, not the user's or the
    model's words, so they are left out; user content that is not text (images, audio, files)
    raises ``ValueError`` as in ``guard_core``, because dropping it would let it through unjudged.
    """
    system: list[str] = []
    turns_out: Conversation = []
    for i, (role, content) in enumerate(turns):
        if role in _SYSTEM_ROLES:
            if not turns_out:
                system.append(content_to_text(content, where=f"message {i}"))
        elif role == "user":
            turns_out.append({"role": "user", "content": content_to_text(content, where=f"message {i}")})
        elif role == "assistant":
            text = _assistant_text(content)
            if text.strip():
                turns_out.append({"role": "assistant", "content": text})
    last_user = max((i for i, t in enumerate(turns_out) if t["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("the request has no user turn to moderate")
    head = [{"role": "system", "content": "\n\n".join(system)}] if any(s.strip() for s in system) else []
    return head + turns_out[: last_user + 1]


def chat_conversation(messages: Iterable[Any]) -> Conversation:
    """The conversation to moderate for a ``chat.completions.create(messages=...)`` request."""
    items = [_plain(m) for m in messages]
    return _conversation((m.get("role", ""), m.get("content")) for m in items if isinstance(m, Mapping))


def responses_conversation(input: Any, instructions: str | None = None) -> Conversation:
    """The conversation to moderate for a ``responses.create(input=..., instructions=...)`` request."""
    turns: list[tuple[str, Any]] = [("system", instructions)] if instructions else []
    if isinstance(input, str):
        turns.append(("user", input))
    else:
        for item in map(_plain, input or ()):
            if isinstance(item, Mapping) and item.get("type", "message") == "message" and "role" in item:
                turns.append((item["role"], item.get("content")))
    return _conversation(turns)


def with_answer(conversation: Conversation, text: str) -> Conversation:
    """The conversation plus the model's answer, for response moderation."""
    return [*conversation, {"role": "assistant", "content": text}]


def annotation(*, prompt: Verdict | None = None, response: Verdict | None = None,
               index: int | None = None) -> dict[str, Any]:
    """The JSON-ready ``qwen3guard`` field: what the guard decided, and about which choice."""
    out: dict[str, Any] = {}
    if prompt is not None:
        out["prompt"] = prompt.to_dict()
    if response is not None:
        out["response"] = response.to_dict()
    if index is not None:
        out["index"] = index
    return out


class Moderator:
    """The guards, the policy and what to do on Unsafe, for one wrapped client or proxy.

    ``prompt_policy`` (default: ``policy``) judges prompts, ``policy`` responses. Guards given as
    model ids or paths are loaded on first use, each only if a request needs it
    (a streaming-only app never loads Gen). ``holdback_tokens`` is ``StreamGate``'s window: the
    default covers the debounce rule, so no token of a flagged run is released; 0 releases text
    at once and aborts as early as the guard allows.
    """

    def __init__(
        self,
        *,
        stream_guard: StreamGuard | str = DEFAULT_STREAM_MODEL,
        gen_guard: GenGuard | str = DEFAULT_GEN_MODEL,
        policy: Policy | None = None,
        prompt_policy: Policy | None = None,
        on_unsafe: OnUnsafe = "abort",
        holdback_tokens: int = DEFAULT_CONSECUTIVE,
        refusal_message: str = DEFAULT_REFUSAL,
    ) -> None:
        if on_unsafe not in ("abort", "rewrite"):
            raise ValueError(f"on_unsafe must be 'abort' or 'rewrite', got {on_unsafe!r}")
        if holdback_tokens < 0:
            raise ValueError(f"holdback_tokens must be >= 0, got {holdback_tokens}")
        self._stream = stream_guard
        self._gen = gen_guard
        self.policy = policy or Policy()
        self.prompt_policy = prompt_policy or self.policy
        self.on_unsafe: OnUnsafe = on_unsafe
        self.holdback_tokens = holdback_tokens
        self.refusal_message = refusal_message
        self._lock = threading.Lock()

    @property
    def stream_guard(self) -> StreamGuard:
        """The Stream guard, loaded now if it was given as a model id or path."""
        with self._lock:
            if isinstance(self._stream, str):
                self._stream = StreamGuard.from_pretrained(self._stream)
            return self._stream

    @property
    def gen_guard(self) -> GenGuard:
        """The Gen guard, loaded now if it was given as a model id or path."""
        with self._lock:
            if isinstance(self._gen, str):
                self._gen = GenGuard.from_pretrained(self._gen)
            return self._gen

    def blocks(self, verdict: Verdict) -> bool:
        """The policy's decision on a response (one place, so wrapper and proxy agree)."""
        return self.policy.blocks(verdict)

    def prompt_blocks(self, verdict: Verdict) -> bool:
        """The prompt policy's decision (e.g. let users ask about a topic the model must not answer)."""
        return self.prompt_policy.blocks(verdict)

    def refusal_text(self, delivered: str = "") -> str:
        """The refusal that replaces blocked text, set apart from any text already delivered."""
        return f"\n\n{self.refusal_message}" if delivered.strip() else self.refusal_message

    def refuse(self, verdict: Verdict, *, delivered: str = "", choice_index: int | None = None) -> UnsafeContentError:
        """The error raised for a block in ``abort`` mode."""
        return UnsafeContentError(verdict, delivered=delivered, choice_index=choice_index)

    # Stream: one gate per choice; the first one also judges the prompt.

    def open_gate(self, conversation: Conversation) -> StreamGate:
        """A gate for one streamed answer to ``conversation`` (prefills the prompt once)."""
        return self.stream_guard.gate(conversation, self.policy, self.holdback_tokens)

    async def aopen_gate(self, conversation: Conversation) -> StreamGate:
        """``open_gate`` without blocking the event loop (the model loads and prefills off-loop)."""
        guard = await asyncio.to_thread(lambda: self.stream_guard)
        return await guard.agate(conversation, self.policy, self.holdback_tokens)

    # Gen: whole prompts and whole responses.

    def prompt_verdict(self, conversation: Conversation) -> Verdict:
        """Gen's verdict on the prompt of a non-streamed request."""
        return self.gen_guard.moderate(conversation)

    async def aprompt_verdict(self, conversation: Conversation) -> Verdict:
        """``prompt_verdict`` for asyncio."""
        guard = await asyncio.to_thread(lambda: self.gen_guard)
        return await guard.amoderate(conversation)

    def check_completion(self, conversation: Conversation, completion: ChatCompletion, prompt: Verdict) -> ChatCompletion:
        """Moderate every choice of a whole chat completion; raise, or rewrite blocked choices."""
        jobs = _completion_jobs(completion)
        verdicts = self.gen_guard.moderate_batch([with_answer(conversation, text) for _, text in jobs]) if jobs else []
        return self._apply_completion(completion, prompt, jobs, verdicts)

    async def acheck_completion(self, conversation: Conversation, completion: ChatCompletion, prompt: Verdict) -> ChatCompletion:
        """``check_completion`` for asyncio."""
        jobs = _completion_jobs(completion)
        guard = await asyncio.to_thread(lambda: self.gen_guard)
        verdicts = await guard.amoderate_batch([with_answer(conversation, text) for _, text in jobs]) if jobs else []
        return self._apply_completion(completion, prompt, jobs, verdicts)

    def check_response(self, conversation: Conversation, response: Response, prompt: Verdict) -> Response:
        """Moderate the text of a whole Responses API response; raise, or rewrite it."""
        text = response.output_text
        verdict = self.gen_guard.moderate(with_answer(conversation, text)) if text.strip() else None
        return self._apply_response(response, prompt, verdict)

    async def acheck_response(self, conversation: Conversation, response: Response, prompt: Verdict) -> Response:
        """``check_response`` for asyncio."""
        text = response.output_text
        guard = await asyncio.to_thread(lambda: self.gen_guard)
        verdict = await guard.amoderate(with_answer(conversation, text)) if text.strip() else None
        return self._apply_response(response, prompt, verdict)

    def _apply_completion(self, completion: ChatCompletion, prompt: Verdict, jobs: list[tuple[int, str]],
                          verdicts: list[Verdict]) -> ChatCompletion:
        by_index = dict(zip((i for i, _ in jobs), verdicts))
        blocked = {i: v for i, v in by_index.items() if self.blocks(v)}
        if blocked and self.on_unsafe == "abort":
            index, verdict = next(iter(blocked.items()))
            raise self.refuse(verdict, choice_index=index)
        choices = [chunks.refused_choice(c, self.refusal_message) if c.index in blocked else c for c in completion.choices]
        notes = [annotation(response=v, index=i) for i, v in by_index.items()]
        return completion.model_copy(update={"choices": choices, ANNOTATION_KEY: {**annotation(prompt=prompt), "choices": notes}})

    def _apply_response(self, response: Response, prompt: Verdict, verdict: Verdict | None) -> Response:
        note = annotation(prompt=prompt, response=verdict)
        if verdict is not None and self.blocks(verdict):
            if self.on_unsafe == "abort":
                raise self.refuse(verdict, choice_index=0)
            return chunks.refused_response(response, self.refusal_message, note)
        return response.model_copy(update={ANNOTATION_KEY: note})


def _completion_jobs(completion: ChatCompletion) -> list[tuple[int, str]]:
    """(choice index, text) for every choice that has text to judge (tool-call-only choices have none)."""
    return [(c.index, c.message.content) for c in completion.choices if c.message.content and c.message.content.strip()]


class ChoiceGates:
    """One ``StreamGate`` per choice (chat) or text part (Responses), opened on first use.

    The gate opened for the prompt check serves the first choice, so a single-choice stream
    prefills the guard exactly once; every further choice gets its own session, because the
    guard's verdicts depend on the text before each token.
    """

    def __init__(self, moderator: Moderator, conversation: Conversation, first: StreamGate) -> None:
        self.moderator = moderator
        self.conversation = conversation
        self._spare: StreamGate | None = first
        self._gates: dict[Hashable, StreamGate] = {}

    @property
    def prompt_verdict(self) -> Verdict:
        """The Stream guard's verdict on the prompt."""
        return (self._spare or next(iter(self._gates.values()))).prompt_verdict

    def get(self, key: Hashable) -> StreamGate:
        """The gate of ``key``, opening it (one prefill) if this is its first text."""
        if key not in self._gates:
            self._gates[key] = self._take_spare() or self.moderator.open_gate(self.conversation)
        return self._gates[key]

    async def aget(self, key: Hashable) -> StreamGate:
        """``get`` for asyncio."""
        if key not in self._gates:
            self._gates[key] = self._take_spare() or await self.moderator.aopen_gate(self.conversation)
        return self._gates[key]

    def opened(self) -> dict[Hashable, StreamGate]:
        """The gates opened so far, by key."""
        return dict(self._gates)

    def close(self) -> None:
        """Free every guard session (idempotent)."""
        for gate in [*self._gates.values(), *([self._spare] if self._spare else [])]:
            gate.close()

    def _take_spare(self) -> StreamGate | None:
        spare, self._spare = self._spare, None
        return spare
