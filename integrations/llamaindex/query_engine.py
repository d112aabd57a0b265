"""A wrapper that moderates what goes into a query engine and what comes out of it.

A postprocessor never sees the answer, and LlamaIndex's instrumentation handlers cannot stop a
stream (the dispatcher swallows their exceptions), so answer moderation wraps the engine.
``query`` and ``aquery`` run one flow (``guard_core.steps``) over the Moderator's checks.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import TYPE_CHECKING, Any, Literal

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.response.schema import RESPONSE_TYPE, AsyncStreamingResponse, PydanticResponse, Response
from llama_index.core.base.response.schema import StreamingResponse
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.prompts.mixin import PromptMixinType
from llama_index.core.schema import NodeWithScore, QueryBundle

from guard_core import METADATA_KEY, Decision, GuardViolation, Moderator, Policy, PromptResult
from guard_core.conversation import Conversation, from_text
from guard_core.steps import Flow, Step, arun, run
from guard_core.structured import json_text

from .postprocessor import build_moderator, query_text

if TYPE_CHECKING:
    from guard_core.gate import StreamGate

OnBlock = Literal["raise", "refuse"]
Record = dict[str, Any]


class GuardedQueryEngine(BaseQueryEngine):
    """Wraps any query engine: the query is moderated before the engine runs, the answer after.

    Guards are anything ``guard_core`` accepts, or pass a shared ``moderator``. A blocked query
    never reaches the engine. Complete answers are judged whole (Gen when configured); streams
    token by token through a Stream gate (with Gen only: collected, judged, then released).
    ``on_block="raise"`` raises ``GuardViolation``; ``"refuse"`` answers the refusal, set apart
    from text already streamed. ``response.metadata["qwen3guard"]`` is ``{"prompt", "response"}``,
    each a ``Decision.to_dict()`` or None (a stream's ``response`` is set when it ends).
    ``check_query=False`` skips the query check (a ``QwenGuardNodePostprocessor`` may do it);
    ``streaming`` says whether a refused query answers as a stream (default: the synthesizer's).
    A refused structured answer (an engine built with ``output_cls=``) stays a ``PydanticResponse``:
    its ``response`` is None, as LlamaIndex types an answer without an object, and
    ``metadata["qwen3guard"]["refusal"]`` holds the refusal text.
    """

    def __init__(self, query_engine: BaseQueryEngine, *, gen_guard: Any = None, stream_guard: Any = None,
                 policy: Policy | None = None, on_block: OnBlock = "raise", refusal: str | None = None,
                 holdback_tokens: int | None = None, review: Any = None, check_query: bool = True,
                 streaming: bool | None = None, moderator: Moderator | None = None,
                 callback_manager: CallbackManager | None = None) -> None:
        if not isinstance(query_engine, BaseQueryEngine):
            raise TypeError(f"query_engine must be a llama_index BaseQueryEngine, got {type(query_engine).__name__}")
        if on_block not in ("raise", "refuse"):
            raise ValueError(f"on_block must be 'raise' or 'refuse', got {on_block!r}")
        self.moderator = build_moderator(moderator, "llamaindex.query_engine", gen_guard=gen_guard,
                                         stream_guard=stream_guard, policy=policy, refusal=refusal,
                                         holdback_tokens=holdback_tokens, review=review)
        self._engine, self._on_block, self._check_query = query_engine, on_block, check_query
        synthesizer = getattr(query_engine, "_response_synthesizer", None)
        self._streaming = bool(getattr(synthesizer, "_streaming", False)) if streaming is None else streaming
        self._structured = getattr(synthesizer, "_output_cls", None) is not None
        super().__init__(callback_manager or getattr(query_engine, "callback_manager", None))

    @property
    def query_engine(self) -> BaseQueryEngine:
        """The wrapped engine."""
        return self._engine

    def _get_prompt_modules(self) -> PromptMixinType:
        return {"query_engine": self._engine}

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        return run(self._flow(query_bundle, asynchronous=False))

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        return await arun(self._flow(query_bundle, asynchronous=True))

    def _flow(self, bundle: QueryBundle, asynchronous: bool) -> Flow[RESPONSE_TYPE]:
        """The query check, the wrapped engine, then the answer check, for ``query`` and ``aquery``."""
        moderator = self.moderator
        conversation = from_text(query_text(bundle) if self._check_query else bundle.query_str)
        record: Record = {"prompt": None, "response": None}
        checked = PromptResult(None)
        if self._check_query:
            checked = yield from moderator.prompt_flow(conversation, keep_gate=self._streaming)
        refusal = self._outcome(record, "prompt", checked.decision)
        if refusal:
            kind = ((AsyncStreamingResponse if asynchronous else StreamingResponse) if self._streaming
                    else PydanticResponse if self._structured else Response)
            return _response(kind, refusal, [], {METADATA_KEY: record})
        gate = checked.gate
        try:
            response = yield Step(lambda: self._engine.query(bundle), lambda: self._engine.aquery(bundle))
        except BaseException:
            if gate is not None:
                gate.close()
            raise
        metadata = {**(response.metadata or {}), METADATA_KEY: record}
        streamed = isinstance(response, (StreamingResponse, AsyncStreamingResponse))
        if streamed and moderator.has_stream:
            gate = gate or (yield from moderator.gate_flow(conversation))
            tokens = (self._released(iter(response.response_gen), gate, conversation, record)
                      if isinstance(response, StreamingResponse) else
                      self._areleased(response.response_gen, gate, conversation, record))
            return type(response)(tokens, response.source_nodes, metadata)
        if gate is not None:
            gate.close()
        text = yield Step(lambda: _text(response), lambda: _atext(response))
        [decision] = yield from moderator.answers_flow(conversation, [text])
        answer = self._outcome(record, "response", decision) or text
        if answer is text and isinstance(response, PydanticResponse):
            return PydanticResponse(response.response, response.source_nodes, metadata)
        kind = type(response) if streamed or isinstance(response, PydanticResponse) else Response
        return _response(kind, answer, response.source_nodes, metadata)

    def _outcome(self, record: Record, role: str, decision: Decision | None, delivered: str = "") -> str:
        """Record a decision; for a block raise, or return the refusal to answer with ("" otherwise)."""
        record[role] = decision.to_dict() if decision is not None else None
        if decision is None or not decision.blocked:
            return ""
        if self._on_block == "raise":
            raise GuardViolation(decision.verdict)
        return self.moderator.refusal_after(delivered)

    def _settle(self, gate: StreamGate, conversation: Conversation, record: Record) -> Flow[str]:
        """End of a stream: the rest of the judged text, or the refusal when the gate blocked."""
        rest = yield Step(gate.finish, gate.afinish)
        decision = yield from self.moderator.stream_decision_flow(gate, conversation)
        return rest + self._outcome(record, "response", decision, gate.delivered)

    def _released(self, deltas: Iterator[str], gate: StreamGate, conversation: Conversation,
                  record: Record) -> Generator[str, None, None]:
        """Yield only text the gate released; a block stops (and closes) the LLM stream."""
        try:
            for delta in deltas:
                if released := gate.push(delta):
                    yield released
                if gate.blocked:
                    break
            if rest := run(self._settle(gate, conversation, record)):
                yield rest
        finally:
            getattr(deltas, "close", lambda: None)()
            gate.close()

    async def _areleased(self, deltas: AsyncIterator[str], gate: StreamGate, conversation: Conversation,
                         record: Record) -> AsyncGenerator[str, None]:
        """``_released`` for an async LLM stream."""
        try:
            async for delta in deltas:
                if released := await gate.apush(delta):
                    yield released
                if gate.blocked:
                    break
            if rest := await arun(self._settle(gate, conversation, record)):
                yield rest
        finally:
            if (aclose := getattr(deltas, "aclose", None)) is not None:
                await aclose()
            gate.close()


def _text(response: RESPONSE_TYPE) -> str:
    """A complete answer's text (a sync stream is read to its end; a structured one is ``json_text``)."""
    if isinstance(response, AsyncStreamingResponse):
        raise ValueError("query() got an AsyncStreamingResponse from the wrapped engine; use aquery()")
    if isinstance(response, StreamingResponse):
        return "".join(response.response_gen)
    if isinstance(response, PydanticResponse):  # what the object says, not its JSON source with escapes
        return json_text(response.response.model_dump(mode="json")) if response.response is not None else ""
    return response.response or ""


async def _atext(response: RESPONSE_TYPE) -> str:
    if isinstance(response, AsyncStreamingResponse):
        return "".join([delta async for delta in response.response_gen])
    return _text(response)


async def _once(text: str) -> AsyncGenerator[str, None]:
    yield text


def _response(kind: type, text: str, nodes: list[NodeWithScore], metadata: dict[str, Any]) -> RESPONSE_TYPE:
    """``text`` as a response of ``kind`` (a stream yields it in one piece; a structured one has no object)."""
    if kind is Response:
        return Response(text, nodes, metadata)
    if kind is PydanticResponse:
        metadata[METADATA_KEY]["refusal"] = text
        return PydanticResponse(None, nodes, metadata)
    return kind(_once(text) if kind is AsyncStreamingResponse else iter([text]), nodes, metadata)
