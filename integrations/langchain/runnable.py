"""A guard step for LCEL: ``guard_input | prompt | model | guard_output``.

``invoke`` / ``ainvoke`` (and so ``batch`` / ``abatch``, which LangChain runs through them
concurrently) judge one whole value. ``transform`` / ``atransform`` are overridden because
LangChain's default buffers the entire input stream, which would turn a guard after the model
into a wall: here each chunk is pushed into a ``StreamGate`` and the *original* chunks are
released, unchanged and in order, as soon as the gate has judged the text they carry.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import AsyncIterator, Iterator
from functools import reduce
from typing import Any, Literal, Optional, Self

from langchain_core.callbacks import adispatch_custom_event, dispatch_custom_event
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, BaseMessageChunk
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from pydantic import ConfigDict, Field, InstanceOf, model_validator

from guard_core import Action, GenGuard, GuardViolation, Policy, Verdict
from guard_core.gate import StreamGate
from guard_core.stream import DEFAULT_CONSECUTIVE, DEFAULT_STREAM_MODEL, StreamGuard
from guard_core.gen import DEFAULT_GEN_MODEL

from ._convert import Conversation, Role, chunk_text, to_conversation
from ._core import DEFAULT_REFUSAL, FALLBACK_PROMPT, GUARD_EVENT, METADATA_KEY, event_data, gate_action, stream_context

OnViolation = Literal["raise", "replace", "pass"]


class QwenGuardRunnable(RunnableSerializable[Any, Any]):
    """Moderates what flows through it and passes it on unchanged when the policy allows.

    - ``role="prompt"`` judges the user's input (a template's input dict, a string, messages or
      a prompt value) before it reaches the model; Gen is used when given, else the Stream
      guard's prompt head.
    - ``role="response"`` judges model output (strings, messages, message chunks): whole values
      with Gen when given (else a Stream gate), streams always with the Stream gate.
    - A blocked value is handled by ``on_violation``: ``"raise"`` ``GuardViolation``,
      ``"replace"`` it with ``refusal`` (same type as the input), or ``"pass"`` it with the verdict
      attached. Policy ``FLAG`` verdicts always pass with the verdict attached.

    Verdicts are attached to messages under ``response_metadata["qwen3guard"]`` and dispatched
    as ``qwen3guard_verdict`` custom events so tracing and ``astream_events`` show them.
    """

    role: Role = "response"
    stream_guard: Optional[InstanceOf[StreamGuard]] = None
    gen_guard: Optional[InstanceOf[GenGuard]] = None
    policy: InstanceOf[Policy] = Field(default_factory=Policy)
    on_violation: OnViolation = "raise"
    refusal: str = DEFAULT_REFUSAL
    holdback_tokens: int = Field(default=DEFAULT_CONSECUTIVE, ge=0)
    input_key: Optional[str] = None
    fallback_prompt: str = FALLBACK_PROMPT

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @model_validator(mode="after")
    def _validate(self) -> Self:
        if self.stream_guard is None and self.gen_guard is None:
            raise ValueError("pass a stream_guard, a gen_guard, or both")
        if self.role == "prompt" and self.on_violation == "replace":
            raise ValueError(
                "on_violation='replace' applies to responses; a prompt guard cannot answer for the model "
                "(raise instead and add .with_fallbacks([...], exceptions_to_handle=(GuardViolation,)) to the chain)"
            )
        if self.input_key is not None and self.role != "prompt":
            raise ValueError("input_key selects the prompt in a template's input dict; it needs role='prompt'")
        return self

    @classmethod
    def from_pretrained(
        cls,
        role: Role = "response",
        *,
        stream_model: str | None = None,
        gen_model: str | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> Self:
        """Load the guards from hub ids or local directories.

        With neither given, a prompt guard loads ``Qwen/Qwen3Guard-Gen-0.6B`` and a response guard
        ``Qwen/Qwen3Guard-Stream-0.6B`` (the one that can judge a stream as it arrives).
        """
        if stream_model is None and gen_model is None:
            gen_model, stream_model = (DEFAULT_GEN_MODEL, None) if role == "prompt" else (None, DEFAULT_STREAM_MODEL)
        stream = StreamGuard.from_pretrained(stream_model, device=device) if stream_model else None
        gen = GenGuard.from_pretrained(gen_model, device=device) if gen_model else None
        return cls(role=role, stream_guard=stream, gen_guard=gen, **kwargs)

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Judge one whole value and return it, its replacement, or raise."""
        return self._call_with_config(self._judge, input, config, **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Async ``invoke``; the guard runs off the event loop."""
        return await self._acall_with_config(self._ajudge, input, config, **kwargs)

    def transform(self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        """Pass a stream through, each chunk released once the text it carries has been judged."""
        yield from self._transform_stream_with_config(input, self._transform, config, **kwargs)

    async def atransform(
        self, input: AsyncIterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Async ``transform``."""
        async for chunk in self._atransform_stream_with_config(input, self._atransform, config, **kwargs):
            yield chunk

    def _conversation(self, value: Any) -> Conversation:
        return to_conversation(value, self.role, input_key=self.input_key)

    def _judge(self, value: Any, config: RunnableConfig) -> Any:
        verdict, action = self._moderate(self._conversation(value))
        dispatch_custom_event(GUARD_EVENT, event_data(verdict, action), config=config)
        return self._outcome(value, verdict, action)

    async def _ajudge(self, value: Any, config: RunnableConfig) -> Any:
        verdict, action = await self._amoderate(self._conversation(value))
        await adispatch_custom_event(GUARD_EVENT, event_data(verdict, action), config=config)
        return self._outcome(value, verdict, action)

    def _moderate(self, conversation: Conversation) -> tuple[Verdict, Action]:
        if self.gen_guard is not None:
            verdict = self.gen_guard.moderate(conversation)
            return verdict, self.policy.action_for(verdict)
        assert self.stream_guard is not None
        if self.role == "prompt":
            with self.stream_guard.session(conversation) as session:
                verdict = session.prompt_verdict
            return verdict, self.policy.action_for(verdict)
        with self._gate(conversation[:-1]) as gate:
            gate.push(conversation[-1]["content"])
            gate.finish()
            return gate.verdict, gate_action(gate, self.policy)

    async def _amoderate(self, conversation: Conversation) -> tuple[Verdict, Action]:
        if self.gen_guard is not None:
            verdict = await self.gen_guard.amoderate(conversation)
            return verdict, self.policy.action_for(verdict)
        assert self.stream_guard is not None
        if self.role == "prompt":
            session = await self.stream_guard.asession(conversation)
            await session.aclose()
            return session.prompt_verdict, self.policy.action_for(session.prompt_verdict)
        gate = await self._agate(conversation[:-1])
        try:
            await gate.apush(conversation[-1]["content"])
            await gate.afinish()
            return gate.verdict, gate_action(gate, self.policy)
        finally:
            await gate.aclose()

    def _gate(self, context: Conversation) -> StreamGate:
        assert self.stream_guard is not None
        return self.stream_guard.gate(stream_context(context, self.fallback_prompt), self.policy, self.holdback_tokens)

    async def _agate(self, context: Conversation) -> StreamGate:
        assert self.stream_guard is not None
        return await self.stream_guard.agate(stream_context(context, self.fallback_prompt), self.policy, self.holdback_tokens)

    def _outcome(self, value: Any, verdict: Verdict, action: Action) -> Any:
        if action is Action.ALLOW:
            return value
        if action is Action.BLOCK and self.on_violation == "raise":
            raise GuardViolation(verdict)
        if action is Action.BLOCK and self.on_violation == "replace":
            return self._refusal_like(value, verdict)
        return _with_verdict(value, verdict)

    def _refusal_like(self, value: Any, verdict: Verdict) -> Any:
        if isinstance(value, str):
            return self.refusal
        message_type = AIMessageChunk if isinstance(value, BaseMessageChunk) else AIMessage
        return message_type(content=self.refusal, response_metadata={METADATA_KEY: verdict.to_dict()})

    def _streams_response(self) -> bool:
        return self.role == "response" and self.stream_guard is not None

    def _transform(self, chunks: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        if not self._streams_response():
            yield self._judge(_join(list(chunks)), config)
            return
        held = _Held()
        with self._gate([]) as gate:
            for chunk in chunks:
                text = held.add(chunk)
                if text:
                    gate.push(text)
                if gate.blocked:
                    dispatch_custom_event(GUARD_EVENT, event_data(gate.verdict, Action.BLOCK), config=config)
                    yield from self._on_blocked_stream(held, gate.verdict)
                    if self.on_violation == "pass":
                        yield from chunks
                    return
                yield from held.release(len(gate.delivered))
            gate.finish()
            action = gate_action(gate, self.policy)
            dispatch_custom_event(GUARD_EVENT, event_data(gate.verdict, action), config=config)
            yield from self._stream_end(held, gate.verdict, action)

    async def _atransform(self, chunks: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        if not self._streams_response():
            yield await self._ajudge(_join([c async for c in chunks]), config)
            return
        held = _Held()
        gate = await self._agate([])
        try:
            async for chunk in chunks:
                text = held.add(chunk)
                if text:
                    await gate.apush(text)
                if gate.blocked:
                    await adispatch_custom_event(GUARD_EVENT, event_data(gate.verdict, Action.BLOCK), config=config)
                    for out in self._on_blocked_stream(held, gate.verdict):
                        yield out
                    if self.on_violation == "pass":
                        async for rest in chunks:
                            yield rest
                    return
                for out in held.release(len(gate.delivered)):
                    yield out
            await gate.afinish()
            action = gate_action(gate, self.policy)
            await adispatch_custom_event(GUARD_EVENT, event_data(gate.verdict, action), config=config)
            for out in self._stream_end(held, gate.verdict, action):
                yield out
        finally:
            await gate.aclose()

    def _stream_end(self, held: _Held, verdict: Verdict, action: Action) -> Iterator[Any]:
        """After ``finish``: the held tail, or the violation if the tail blocked; a flag rides on a last chunk."""
        if action is Action.BLOCK:
            yield from self._on_blocked_stream(held, verdict)
            return
        yield from held.release_all()
        if action is Action.FLAG:
            yield from held.verdict_chunk(verdict)

    def _on_blocked_stream(self, held: _Held, verdict: Verdict) -> Iterator[Any]:
        """What replaces the held text once the stream is blocked (the event is already dispatched)."""
        if self.on_violation == "raise":
            raise GuardViolation(verdict)
        if self.on_violation == "replace":
            yield self._refusal_like(held.last, verdict)
            return
        yield from held.release_all()
        yield from held.verdict_chunk(verdict)


class _Held:
    """Chunks waiting for the gate, each with the offset where its text ends in the response."""

    def __init__(self) -> None:
        self._pending: deque[tuple[int, Any]] = deque()
        self._fed = 0
        self.last: Any = ""

    def add(self, chunk: Any) -> str:
        text = chunk_text(chunk)
        self._fed += len(text)
        self._pending.append((self._fed, chunk))
        self.last = chunk
        return text

    def release(self, delivered: int) -> list[Any]:
        """The chunks whose whole text the gate has released, in order."""
        out = []
        while self._pending and self._pending[0][0] <= delivered:
            out.append(self._pending.popleft()[1])
        return out

    def release_all(self) -> list[Any]:
        out = [chunk for _, chunk in self._pending]
        self._pending.clear()
        return out

    def verdict_chunk(self, verdict: Verdict) -> list[Any]:
        """An empty message chunk carrying the verdict, so the joined message holds it (strings cannot)."""
        if isinstance(self.last, BaseMessageChunk):
            return [AIMessageChunk(content="", response_metadata={METADATA_KEY: verdict.to_dict()})]
        return []


def _with_verdict(value: Any, verdict: Verdict) -> Any:
    if isinstance(value, BaseMessage):
        return value.model_copy(update={"response_metadata": {**value.response_metadata, METADATA_KEY: verdict.to_dict()}})
    return value


def _join(chunks: list[Any]) -> Any:
    """A whole value from a streamed input (prompts are judged whole)."""
    if not chunks:
        raise ValueError("the guard received an empty stream; there is nothing to moderate")
    try:
        return reduce(operator.add, chunks)
    except TypeError as exc:
        raise ValueError(f"cannot join streamed input of type {type(chunks[0]).__name__} into one value to moderate") from exc
