"""A wrapper that moderates what goes into a query engine and what comes out of it.

A postprocessor never sees the generated answer, and LlamaIndex's instrumentation handlers
cannot stop a stream (the dispatcher swallows their exceptions), so answer moderation has to
wrap the engine. Streaming answers go through a ``guard_core.StreamGate``, which only releases
text the Stream guard has already judged; the wrapper never holds text back itself.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator, Generator, Iterator, Literal

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.response.schema import (
    RESPONSE_TYPE,
    AsyncStreamingResponse,
    PydanticResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.prompts.mixin import PromptMixinType
from llama_index.core.schema import QueryBundle

from guard_core import GenGuard, GuardViolation, Policy, Verdict

from .postprocessor import DEFAULT_METADATA_KEY, as_gen_guard, prompt_messages

if TYPE_CHECKING:
    from guard_core.gate import StreamGate
    from guard_core.stream import StreamGuard

DEFAULT_REFUSAL = "I can't help with that."
OnBlock = Literal["raise", "refuse"]


def _as_stream_guard(guard: StreamGuard | str) -> StreamGuard:
    from guard_core.stream import StreamGuard

    if isinstance(guard, StreamGuard):
        return guard
    if isinstance(guard, str) and guard.strip():
        return StreamGuard.from_pretrained(guard)
    raise ValueError(f"stream_guard must be a StreamGuard or a model id / directory, got {type(guard).__name__}")


class _WholeAnswerGate:
    """Gate-shaped adapter over Gen: releases nothing until the complete answer is judged.

    Used for non-streaming answers and, when no Stream guard is configured, for streamed ones
    (the caller then receives the whole answer at once, after moderation, instead of unmoderated
    tokens).
    """

    def __init__(self, guard: GenGuard, policy: Policy, query: str) -> None:
        self._guard, self._policy, self._query = guard, policy, query
        self._parts: list[str] = []
        self.verdict: Verdict | None = None

    @property
    def blocked(self) -> bool:
        return self.verdict is not None and self._policy.blocks(self.verdict)

    def push(self, delta: str) -> str:
        self._parts.append(delta)
        return ""

    async def apush(self, delta: str) -> str:
        return self.push(delta)

    def _messages(self) -> list[dict[str, str]] | None:
        answer = "".join(self._parts)
        if not answer.strip():
            return None
        return [*prompt_messages(self._query), {"role": "assistant", "content": answer}]

    def finish(self) -> str:
        messages = self._messages()
        if messages is not None:
            self.verdict = self._guard.moderate(messages)
        return "" if self.blocked else "".join(self._parts)

    async def afinish(self) -> str:
        messages = self._messages()
        if messages is not None:
            self.verdict = await self._guard.amoderate(messages)
        return "" if self.blocked else "".join(self._parts)

    def close(self) -> None:
        self._parts.clear()

    async def aclose(self) -> None:
        self.close()


class _Guard:
    """The moderation steps both wrappers share: the query check, answer gates and the verdict record."""

    def __init__(
        self,
        gen_guard: GenGuard | str | None,
        stream_guard: StreamGuard | str | None,
        policy: Policy | None,
        on_block: OnBlock,
        refusal: str,
        holdback_tokens: int,
        metadata_key: str,
        check_query: bool,
    ) -> None:
        if gen_guard is None and stream_guard is None:
            raise ValueError("pass gen_guard, stream_guard or both")
        if on_block not in ("raise", "refuse"):
            raise ValueError(f"on_block must be 'raise' or 'refuse', got {on_block!r}")
        if policy is not None and not isinstance(policy, Policy):
            raise ValueError(f"policy must be a guard_core.Policy, got {type(policy).__name__}")
        if not isinstance(refusal, str) or not refusal:
            raise ValueError("refusal must be a non-empty string")
        if not isinstance(holdback_tokens, int) or holdback_tokens < 1:
            raise ValueError(f"holdback_tokens must be an int >= 1 so only judged text is released, got {holdback_tokens!r}")
        self.gen = as_gen_guard(gen_guard) if gen_guard is not None else None
        self.stream = _as_stream_guard(stream_guard) if stream_guard is not None else None
        self.policy = policy or Policy()
        self.on_block = on_block
        self.refusal = refusal
        self.holdback_tokens = holdback_tokens
        self.metadata_key = metadata_key
        self.check_query_enabled = check_query

    def _stream_gate(self, query: str) -> StreamGate:
        assert self.stream is not None
        return self.stream.gate(prompt_messages(query), policy=self.policy, holdback_tokens=self.holdback_tokens)

    def check_query(self, query: str) -> tuple[Verdict | None, StreamGate | None]:
        """Judge the query (Gen when present, else the Stream guard's query heads, whose gate is kept)."""
        if not self.check_query_enabled:
            return None, None
        if self.gen is not None:
            return self.gen.moderate(prompt_messages(query)), None
        gate = self._stream_gate(query)
        return gate.prompt_verdict, gate

    async def acheck_query(self, query: str) -> tuple[Verdict | None, StreamGate | None]:
        """Async ``check_query``."""
        if not self.check_query_enabled:
            return None, None
        if self.gen is not None:
            return await self.gen.amoderate(prompt_messages(query)), None
        gate = await asyncio.to_thread(self._stream_gate, query)
        return gate.prompt_verdict, gate

    def whole_answer_gate(self, query: str, gate: StreamGate | None) -> Any:
        """Gen judges complete answers (it reads the whole reply); the Stream gate only if Gen is absent."""
        return _WholeAnswerGate(self.gen, self.policy, query) if self.gen is not None else gate

    def streaming_gate(self, query: str, gate: StreamGate | None) -> Any:
        """The Stream gate for token streams; without a Stream guard, Gen judges the collected answer."""
        if self.stream is None:
            return _WholeAnswerGate(self.gen, self.policy, query)  # type: ignore[arg-type]
        return gate if gate is not None else self._stream_gate(query)

    async def astreaming_gate(self, query: str, gate: StreamGate | None) -> Any:
        """Async ``streaming_gate`` (the Stream prefill runs in a worker thread)."""
        if self.stream is None or gate is not None:
            return self.streaming_gate(query, gate)
        return await asyncio.to_thread(self._stream_gate, query)

    def blocked_query(self, verdict: Verdict, gate: StreamGate | None) -> str:
        """Raise for a blocked query, or return the refusal to answer with instead."""
        if gate is not None:
            gate.close()
        if self.on_block == "raise":
            raise GuardViolation(verdict)
        return self.refusal

    def blocks_query(self, verdict: Verdict | None) -> bool:
        """True when the query was judged and the policy blocks it."""
        return verdict is not None and self.policy.blocks(verdict)

    def record(self, query: Verdict | None) -> dict[str, Any]:
        """The verdict record attached to responses under ``metadata_key``."""
        return {"query": query.to_dict() if query is not None else None, "answer": None, "blocked": False}

    def moderate_text(self, gate: Any, text: str, record: dict[str, Any]) -> str:
        """Judge a complete answer; returns it, or the refusal (or raises) when the policy blocks it."""
        released = gate.push(text) + gate.finish()
        return self._conclude(gate, record) or released

    async def amoderate_text(self, gate: Any, text: str, record: dict[str, Any]) -> str:
        """Async ``moderate_text``."""
        released = await gate.apush(text) + await gate.afinish()
        return self._conclude(gate, record) or released

    def _conclude(self, gate: Any, record: dict[str, Any]) -> str | None:
        """Record the answer verdict; on a block raise or return the refusal, else None."""
        record["answer"] = gate.verdict.to_dict() if gate.verdict is not None else None
        if not gate.blocked:
            return None
        record["blocked"] = True
        if self.on_block == "raise":
            raise GuardViolation(gate.verdict)
        return self.refusal

    def guard_tokens(self, tokens: Iterator[str], gate: Any, record: dict[str, Any]) -> Generator[str, None, None]:
        """Yield only released text; on a block, stop the upstream generator and raise or refuse."""
        try:
            for delta in tokens:
                released = gate.push(delta)
                if released:
                    yield released
                if gate.blocked:
                    break
            else:
                released = gate.finish()
                if released:
                    yield released
            refusal = self._conclude(gate, record)
            if refusal:
                yield refusal
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
            gate.close()

    async def aguard_tokens(
        self, tokens: AsyncIterator[str], gate: Any, record: dict[str, Any]
    ) -> AsyncGenerator[str, None]:
        """Async ``guard_tokens``."""
        try:
            async for delta in tokens:
                released = await gate.apush(delta)
                if released:
                    yield released
                if gate.blocked:
                    break
            else:
                released = await gate.afinish()
                if released:
                    yield released
            refusal = self._conclude(gate, record)
            if refusal:
                yield refusal
        finally:
            aclose = getattr(tokens, "aclose", None)
            if aclose is not None:
                await aclose()
            await gate.aclose()


async def _agen_of(text: str) -> AsyncGenerator[str, None]:
    yield text


def _gen_of(text: str) -> Generator[str, None, None]:
    yield text


class GuardedQueryEngine(BaseQueryEngine):
    """Wraps any query engine: the query is moderated before the engine runs, the answer after.

    Complete answers are judged by ``gen_guard``; streamed answers (``StreamingResponse`` and
    ``AsyncStreamingResponse``) are passed through a Stream gate token by token, so text is
    released only once judged and a stream the policy blocks stops before the offending text. A
    blocked query never reaches the wrapped engine (no retrieval, no LLM call). On a block the
    wrapper raises ``GuardViolation`` (``on_block="raise"``) or answers ``refusal``; streams yield
    the text already released and then the refusal. Verdicts are recorded in
    ``response.metadata[metadata_key]`` (for streams, once the stream ends).

    ``check_query=False`` skips the query check (e.g. when a ``QwenGuardNodePostprocessor`` in the
    wrapped engine already does it, or to let the LLM itself refuse unsafe requests).
    ``streaming`` says what a refused query returns (a streaming or a plain response); by default
    it follows the wrapped engine's synthesizer where that can be read.
    """

    def __init__(
        self,
        query_engine: BaseQueryEngine,
        *,
        gen_guard: GenGuard | str | None = None,
        stream_guard: StreamGuard | str | None = None,
        policy: Policy | None = None,
        on_block: OnBlock = "raise",
        refusal: str = DEFAULT_REFUSAL,
        holdback_tokens: int = 2,
        metadata_key: str = DEFAULT_METADATA_KEY,
        check_query: bool = True,
        streaming: bool | None = None,
        callback_manager: CallbackManager | None = None,
    ) -> None:
        if not isinstance(query_engine, BaseQueryEngine):
            raise ValueError(f"query_engine must be a llama_index BaseQueryEngine, got {type(query_engine).__name__}")
        self._engine = query_engine
        self._guard = _Guard(gen_guard, stream_guard, policy, on_block, refusal, holdback_tokens, metadata_key, check_query)
        synthesizer = getattr(query_engine, "_response_synthesizer", None)
        self._streaming = bool(getattr(synthesizer, "_streaming", False)) if streaming is None else streaming
        super().__init__(callback_manager or getattr(query_engine, "callback_manager", None))

    @property
    def query_engine(self) -> BaseQueryEngine:
        """The wrapped engine."""
        return self._engine

    def _get_prompt_modules(self) -> PromptMixinType:
        return {"query_engine": self._engine}

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        verdict, gate = self._guard.check_query(query_bundle.query_str)
        record = self._guard.record(verdict)
        if self._guard.blocks_query(verdict):
            return self._refused(self._guard.blocked_query(verdict, gate), record, asynchronous=False)
        response = self._engine.query(query_bundle)
        return self._moderated(response, query_bundle.query_str, gate, record)

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        verdict, gate = await self._guard.acheck_query(query_bundle.query_str)
        record = self._guard.record(verdict)
        if self._guard.blocks_query(verdict):
            return self._refused(self._guard.blocked_query(verdict, gate), record, asynchronous=True)
        response = await self._engine.aquery(query_bundle)
        return await self._amoderated(response, query_bundle.query_str, gate, record)

    def _refused(self, refusal: str, record: dict[str, Any], *, asynchronous: bool) -> RESPONSE_TYPE:
        record["blocked"] = True
        metadata = {self._guard.metadata_key: record}
        if not self._streaming:
            return Response(refusal, metadata=metadata)
        if asynchronous:
            return AsyncStreamingResponse(_agen_of(refusal), metadata=metadata)
        return StreamingResponse(_gen_of(refusal), metadata=metadata)

    def _metadata(self, response: RESPONSE_TYPE, record: dict[str, Any]) -> dict[str, Any]:
        return {**(response.metadata or {}), self._guard.metadata_key: record}

    def _moderated(self, response: RESPONSE_TYPE, query: str, gate: Any, record: dict[str, Any]) -> RESPONSE_TYPE:
        guard = self._guard
        if isinstance(response, StreamingResponse):
            tokens = guard.guard_tokens(iter(response.response_gen), guard.streaming_gate(query, gate), record)
            return StreamingResponse(tokens, response.source_nodes, self._metadata(response, record))
        if isinstance(response, AsyncStreamingResponse):
            raise ValueError("query() got an AsyncStreamingResponse from the wrapped engine; use aquery()")
        text = self._text(response)
        answer = guard.moderate_text(guard.whole_answer_gate(query, gate), text, record) if text.strip() else text
        if gate is not None:
            gate.close()
        return self._rebuilt(response, text, answer, record)

    async def _amoderated(self, response: RESPONSE_TYPE, query: str, gate: Any, record: dict[str, Any]) -> RESPONSE_TYPE:
        guard = self._guard
        if isinstance(response, AsyncStreamingResponse):
            tokens = guard.aguard_tokens(response.async_response_gen(), await guard.astreaming_gate(query, gate), record)
            return AsyncStreamingResponse(tokens, response.source_nodes, self._metadata(response, record))
        if isinstance(response, StreamingResponse):
            stream_gate = await guard.astreaming_gate(query, gate)
            tokens = guard.guard_tokens(iter(response.response_gen), stream_gate, record)
            return StreamingResponse(tokens, response.source_nodes, self._metadata(response, record))
        text = self._text(response)
        answer = await guard.amoderate_text(guard.whole_answer_gate(query, gate), text, record) if text.strip() else text
        if gate is not None:
            await gate.aclose()
        return self._rebuilt(response, text, answer, record)

    @staticmethod
    def _text(response: RESPONSE_TYPE) -> str:
        if isinstance(response, PydanticResponse):
            return str(response)
        return response.response or ""

    def _rebuilt(self, response: RESPONSE_TYPE, text: str, answer: str, record: dict[str, Any]) -> RESPONSE_TYPE:
        metadata = self._metadata(response, record)
        if answer == text and isinstance(response, PydanticResponse):
            return PydanticResponse(response.response, response.source_nodes, metadata)
        return Response(answer, response.source_nodes, metadata)
