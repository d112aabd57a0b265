"""A guard step for LCEL (``guard_input | prompt | model | guard_output``), or a guard around a chain.

``transform`` / ``atransform`` are overridden because LangChain's default buffers the whole input
stream (a guard after the model would be a wall): the model's own chunks go through
``guard_core.relay.StreamRelay`` and are released, unchanged and in order, once their text is judged.
A step after the model sees only its output, a lone assistant turn; ``around(chain)`` wraps the
chain instead, as ``with_retry`` / ``with_fallbacks`` do, so the answer is judged as the reply to
the chain's input (Gen sees the question and detects refusals; Stream prefills it).
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Literal, Optional, Self

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, BaseMessageChunk
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from langchain_core.runnables.base import coerce_to_runnable
from pydantic import ConfigDict, InstanceOf, SkipValidation, model_validator

from guard_core import CONFIGURED, DEFAULT_REFUSAL, METADATA_KEY, Action, Decision, GuardViolation, Moderator
from guard_core.config import DEFAULT_CONSECUTIVE
from guard_core.conversation import Conversation
from guard_core.gate import StreamGate
from guard_core.relay import StreamRelay, cut_text
from guard_core.steps import Flow, Step, arun, run
from guard_core.structured import json_source_text

from ._convert import answer_text, as_chunk, chunk_text, is_structured, to_answer, to_conversation, tool_args_text
from ._core import event_step

_MODERATOR_OPTIONS = frozenset({"stream_guard", "gen_guard", "policy", "prompt_check", "holdback_tokens", "refusal", "review"})


class QwenGuardRunnable(RunnableSerializable[Any, Any]):
    """Moderates what flows through it and passes it on unchanged when the policy allows.

    ``role="prompt"`` judges the user's input (a template's input dict, ``input_key`` picking one
    field; a string; messages, tool results judged as untrusted context) before the model runs.
    ``role="response"`` judges model output: whole values with Gen when configured (else Stream),
    streams with the Stream guard as they arrive. ``around(chain)`` does both around a chain. A block
    follows ``on_violation``: ``"raise"`` ``GuardViolation``, ``"replace"`` with ``refusal`` (set
    apart from text already streamed), ``"pass"`` with the decision attached, as for ``FLAG`` and
    ``REVIEW``. Decisions go to messages' ``response_metadata["qwen3guard"]`` (a stream gets a last,
    empty chunk carrying it) and to ``qwen3guard_verdict`` custom events. Guards are any
    ``guard_core.backends`` spec, or share one ``moderator=``.
    """

    role: Literal["prompt", "response"] = "response"
    stream_guard: SkipValidation[Any] = None
    gen_guard: SkipValidation[Any] = None
    policy: SkipValidation[Any] = None
    prompt_check: Optional[Literal["gen", "stream", "off"]] = None
    holdback_tokens: SkipValidation[Any] = DEFAULT_CONSECUTIVE
    refusal: str = DEFAULT_REFUSAL
    review: SkipValidation[Any] = CONFIGURED
    on_violation: Literal["raise", "replace", "pass"] = "raise"
    input_key: Optional[str] = None
    chain: SkipValidation[Any] = None
    moderator: Optional[InstanceOf[Moderator]] = None

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    @model_validator(mode="after")
    def _build(self) -> Self:
        if self.role == "prompt" and (self.on_violation == "replace" or self.chain is not None):
            raise ValueError("a prompt guard cannot answer for the model: raise (and add .with_fallbacks([...], "
                             "exceptions_to_handle=(GuardViolation,))), or guard the whole chain with around(chain)")
        if self.chain is not None:  # what around() does; refused here, not at the first call
            self.chain = coerce_to_runnable(self.chain)
        if self.input_key is not None and self.role != "prompt" and self.chain is None:
            raise ValueError("input_key picks the prompt in a template's input dict: it needs role='prompt' or around()")
        if self.moderator is not None and (given := sorted(self.model_fields_set & _MODERATOR_OPTIONS)):
            raise ValueError(f"pass moderator= or {', '.join(given)}, not both")
        options = {name: getattr(self, name) for name in _MODERATOR_OPTIONS}
        self.moderator = self.moderator or Moderator(**options, source="langchain.runnable")
        if self.role == "prompt" and self.moderator.prompt_check == "off":
            raise ValueError("a prompt guard with prompt_check='off' would judge nothing: drop the step, or set "
                             "prompt_check to 'gen' or 'stream'")
        return self

    @classmethod
    def from_pretrained(cls, role: Literal["prompt", "response"] = "response", *, stream_model: Any = None,
                        gen_model: Any = None, **kwargs: Any) -> Self:
        """Guards by hub id, directory or server URL (Gen); with neither, the configured Gen model
        guards prompts and the configured Stream model responses (``QWEN3GUARD_*``)."""
        if stream_model is None and gen_model is None:
            gen_model, stream_model = (CONFIGURED, None) if role == "prompt" else (None, CONFIGURED)
        return cls(role=role, stream_guard=stream_model, gen_guard=gen_model, **kwargs)

    @classmethod
    def around(cls, chain: Any, **kwargs: Any) -> Self:
        """Guard ``chain`` with its input in view: the input is judged as the prompt, the output as
        the answer to it (streamed through Stream, whole through Gen)."""
        return cls(chain=chain, **kwargs)

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Judge one whole value (around a chain: its input and output) and return it, its replacement, or raise."""
        return self._call_with_config(lambda value, config, run_manager: run(self._whole(value, config, run_manager)),
                                      input, config, **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Async ``invoke``; the guards run off the event loop."""
        return await self._acall_with_config(lambda value, config, run_manager: arun(self._whole(value, config, run_manager)),
                                             input, config, **kwargs)

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        """Stream one input (around a chain: the chain's answer, released as it is judged)."""
        yield from self.transform(iter([input]), config, **kwargs)

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        """Async ``stream``."""
        async for chunk in self.atransform(_once(input), config, **kwargs):
            yield chunk

    def transform(self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        """Pass a stream through, each chunk released once the text it carries has been judged."""
        yield from self._transform_stream_with_config(input, self._transform, config, **kwargs)

    async def atransform(self, input: AsyncIterator[Any], config: RunnableConfig | None = None,
                         **kwargs: Any) -> AsyncIterator[Any]:
        """Async ``transform``."""
        async for chunk in self._atransform_stream_with_config(input, self._atransform, config, **kwargs):
            yield chunk

    def _transform(self, chunks: Iterator[Any], config: RunnableConfig, run_manager: Any) -> Iterator[Any]:
        if self.role == "prompt" or not self.moderator.has_stream:
            yield run(self._whole(_join(list(chunks)), config, run_manager))
            return
        value = _join(list(chunks)) if self.chain is not None else None
        relay, refusal = run(self._open(value, config, run_manager))
        if relay is None:
            yield refusal
            return
        source, last, calls = (chunks if self.chain is None else self.chain.stream(value, config)), None, _Structured()
        with closing(relay):
            for last in source:
                yield from run(self._pass_on(relay, calls, last, config))
                if relay.decisions:
                    break
            else:
                yield from run(self._pass_on(relay, calls, last, config, end=True))
            if relay.blocked and self.on_violation == "pass":
                yield from source

    async def _atransform(self, chunks: AsyncIterator[Any], config: RunnableConfig, run_manager: Any) -> AsyncIterator[Any]:
        if self.role == "prompt" or not self.moderator.has_stream:
            yield await arun(self._whole(_join([c async for c in chunks]), config, run_manager))
            return
        value = _join([c async for c in chunks]) if self.chain is not None else None
        relay, refusal = await arun(self._open(value, config, run_manager))
        if relay is None:
            yield refusal
            return
        source, last, calls = (chunks if self.chain is None else self.chain.astream(value, config)), None, _Structured()
        with closing(relay):
            async for last in source:
                for out in await arun(self._pass_on(relay, calls, last, config)):
                    yield out
                if relay.decisions:
                    break
            else:
                for out in await arun(self._pass_on(relay, calls, last, config, end=True)):
                    yield out
            if relay.blocked and self.on_violation == "pass":
                async for rest in source:
                    yield rest

    def _whole(self, value: Any, config: RunnableConfig, run_manager: Any) -> Flow[Any]:
        """Judge a whole prompt or answer (around a chain: the input, then the chain's output to it)."""
        rid = str(run_manager.run_id)
        if self.role == "prompt":
            result = yield from self.moderator.prompt_flow(to_conversation(value, input_key=self.input_key), rid)
            return (yield from self._outcome(value, result.decision, config))
        if self.chain is None:
            conversation, answer = to_answer(value)
        else:
            conversation, _, refusal = yield from self._enter(value, config, rid, streamed=False)
            if refusal is not None:
                return refusal
            chain, inputs = self.chain, value
            value = yield Step(lambda: chain.invoke(inputs, config), lambda: chain.ainvoke(inputs, config))
            answer = answer_text(value, json_content=True)
        (decision,) = yield from self.moderator.answers_flow(conversation, [answer], rid)
        return (yield from self._outcome(value, decision, config))

    def _enter(self, value: Any, config: RunnableConfig, rid: str,
               streamed: bool) -> Flow[tuple[Conversation, StreamGate | None, Any]]:
        """Around a chain: judge its input as the prompt (a stream keeps a Stream check's gate for the
        answer). A block ends the call (raise, or the refusal as the answer); ``"pass"`` goes on."""
        conversation = to_conversation(value, input_key=self.input_key)
        result = yield from self.moderator.prompt_flow(conversation, rid, streamed)
        answer = yield from self._outcome(self._empty_answer(streamed), result.decision, config)
        stopped = result.decision is not None and result.decision.blocked and self.on_violation != "pass"
        return (conversation, None, answer) if stopped else (conversation, result.gate, None)

    def _empty_answer(self, streamed: bool) -> Any:
        """An empty answer of the chain's output type (text for a chain ending in a string parser,
        else a message), so a refusal in its place keeps the type the next step expects."""
        try:
            text = self.chain.OutputType is str
        except (TypeError, ValueError, AttributeError):  # a runnable whose output type cannot be inferred
            text = False
        return "" if text else AIMessageChunk(content="") if streamed else AIMessage(content="")

    def _open(self, value: Any, config: RunnableConfig, run_manager: Any) -> Flow[tuple[StreamRelay[Any] | None, Any]]:
        """The relay for one streamed answer, or (around a chain whose input is blocked) None and the refusal."""
        rid, conversation, gate = str(run_manager.run_id), Conversation(), None
        if self.chain is not None:
            conversation, gate, refusal = yield from self._enter(value, config, rid, streamed=True)
            if refusal is not None:
                return None, refusal
        return StreamRelay(self.moderator, conversation, self._on_decision, first_gate=gate, request_id=rid), None

    def _pass_on(self, relay: StreamRelay[Any], calls: _Structured, chunk: Any, config: RunnableConfig,
                 end: bool = False) -> Flow[list[Any]]:
        """Feed one chunk (at ``end``: the structured answer's text, whole, and finish the stream) and
        return what may go out, the decision applied."""
        if end:
            item, texts, ended = None, [(0, "\n" + text)] if (text := calls.text()) else [], [0]
        elif is_structured(chunk):  # a parsed value: judged whole at the end
            item, texts, ended, calls.data = chunk, [], [], _add(calls.data, chunk)
        else:
            text = chunk_text(chunk)
            item, texts, ended, calls.content = chunk, [(0, text)], [], calls.content + text
            message = as_chunk(chunk) if isinstance(chunk, BaseMessage) else None
            if getattr(message, "tool_call_chunks", None):
                calls.message = message if calls.message is None else calls.message + message
        out = yield Step(lambda: relay.feed(item, texts, ended), lambda: relay.afeed(item, texts, ended))
        if calls.holding:
            calls.waiting, out = [*calls.waiting, *out], []
        decision = relay.decisions.get(0)
        if decision is None:  # at the end, none means there was no text to judge: what waited goes out
            if end:
                out, calls.waiting = [*calls.waiting, *out], []
            return out
        blocked = decision.blocked and self.on_violation != "pass"
        waiting = [_without_calls(c) for c in calls.waiting if not is_structured(c)] if blocked else calls.waiting
        out, calls.waiting = [*waiting, *out], []
        # The refusal, or an empty chunk carrying the decision, follows what was released.
        empty = AIMessageChunk(content="") if isinstance(chunk, BaseMessage) else ""
        extra = yield from self._outcome(empty, decision, config, relay.released(0))
        return out if extra is empty or extra == "" else [*out, extra]

    def _on_decision(self, key: Any, decision: Decision, relay: StreamRelay[Any]) -> None:
        """Held chunks of a blocked stream were never judged safe: drop them (raise) or cut them to
        the text the gate released (replace)."""
        if decision.blocked and self.on_violation != "pass":
            keep = len(relay.released(key)) if self.on_violation == "replace" else 0
            cut_text(relay.pending, key, keep, chunk_text, _cut)

    def _outcome(self, value: Any, decision: Decision | None, config: RunnableConfig, delivered: str = "") -> Flow[Any]:
        """Publish the decision on ``value``; return it, annotated, or (replace) the refusal in its type,
        set apart from text already ``delivered``; or raise ``GuardViolation``."""
        if decision is None:
            return value
        yield event_step(decision, config)
        if not decision.blocked or self.on_violation == "pass":
            return value if decision.action is Action.ALLOW else _with_decision(value, decision)
        if self.on_violation == "raise":
            raise GuardViolation(decision.verdict)
        text = self.moderator.refusal_after(delivered)
        message = AIMessageChunk if isinstance(value, BaseMessageChunk) else AIMessage
        return text if isinstance(value, str) else message(content=text, response_metadata={METADATA_KEY: decision.to_dict()})


@dataclass
class _Structured:
    """What a streamed answer says beside its streamed text, judged whole at the end by what it says
    (``json_text``): its tool calls (a parser after the guard makes their arguments the answer),
    parsed values (around a chain ending in a parser) and content that is a JSON document (a JSON
    parser after the guard decodes its escapes). The chunks from the first tool call or parsed
    value on wait for that verdict."""

    message: Any = None  # the tool-call chunks so far, added up
    data: Any = None  # the parsed value so far
    content: str = ""  # the streamed text so far
    waiting: list[Any] = field(default_factory=list)

    @property
    def holding(self) -> bool:
        return self.message is not None or self.data is not None

    def text(self) -> str:
        """The text judged at the end: decoded arguments, the parsed value, and JSON content decoded."""
        decoded = json_source_text(self.content)
        texts = (tool_args_text(self.message) if self.message is not None else "",
                 answer_text(self.data) if self.data is not None else "",
                 decoded if decoded != self.content else "")
        return "\n".join(t for t in texts if t)


def _add(total: Any, chunk: Any) -> Any:
    """A parsed value streamed so far, as LangChain adds up a stream (a parser's chunks are each the
    whole value so far: the last one wins)."""
    try:
        return chunk if total is None else total + chunk
    except TypeError:
        return chunk


def _without_calls(chunk: Any) -> Any:
    """A chunk of a blocked answer without tool calls (their arguments were never judged safe) or
    fields beside the content (``reasoning_content``)."""
    if isinstance(chunk, AIMessageChunk):
        return chunk.model_copy(update={"tool_call_chunks": [], "tool_calls": [], "invalid_tool_calls": [],
                                        "additional_kwargs": {}})
    if isinstance(chunk, AIMessage):
        return chunk.model_copy(update={"tool_calls": [], "invalid_tool_calls": [], "additional_kwargs": {}})
    return chunk


def _with_decision(value: Any, decision: Decision) -> Any:
    """``value`` with the decision in its metadata (messages only: other values cannot carry it)."""
    if isinstance(value, BaseMessage):
        return value.model_copy(update={"response_metadata": {**value.response_metadata, METADATA_KEY: decision.to_dict()}})
    return value


def _cut(chunk: Any, keep: int) -> Any:
    """``chunk`` with its text cut to ``keep`` characters (None when nothing is left)."""
    text = chunk_text(chunk)
    if keep == 0 or keep >= len(text):
        return None if keep == 0 else chunk
    return chunk[:keep] if isinstance(chunk, str) else _without_calls(chunk).model_copy(update={"content": text[:keep]})


def _join(chunks: list[Any]) -> Any:
    """One whole value from a streamed input (prompts, and answers without a Stream guard, are judged whole)."""
    if not chunks:
        raise ValueError("the guard received an empty stream; there is nothing to moderate")
    try:
        return reduce(operator.add, chunks)
    except TypeError as exc:
        raise ValueError(f"cannot join streamed input of type {type(chunks[0]).__name__} into one value to moderate") from exc


async def _once(value: Any) -> AsyncIterator[Any]:
    yield value
