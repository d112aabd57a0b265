"""The streamed half of ``QwenGuardMiddleware``: the guarded chat model and the ``tools``-channel scrubber.

Plain ``stream()`` never runs stream transformers, so ``GuardedChatModel`` stands in for the agent's
model: it reads the real one with no callbacks attached (its raw tokens reach no one) through a
``StreamRelay`` and yields the model's own chunks once judged, and every stream mode, state and
checkpoint is built from what it yields. The v3 ``tools`` channel gets each raw tool result from the
tool's own callbacks, before ``wrap_tool_call`` sees it, so ``ToolResultScrubber`` judges it there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, Self

from langchain_core.language_models.chat_models import BaseChatModel, agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableBinding
from langgraph.stream import StreamTransformer
from pydantic import ConfigDict, Field, model_validator

from guard_core import METADATA_KEY, Action, Decision, GuardViolation, Moderator, RiskLevel, Verdict
from guard_core.conversation import Conversation
from guard_core.messages import content_to_text
from guard_core.moderator import strictest
from guard_core.relay import Key, StreamRelay, cut_text
from guard_core.steps import Flow, Step, arun, run

from ._convert import args_text, as_chunk, chunk_text, json_source_text, messages_to_conversation
from ._core import event_step

def withheld(decision: Decision, tool_call_id: str = "", name: str | None = None, id: str | None = None) -> ToolMessage:
    """What the model, the state and the ``tools`` channel get in place of blocked input: the verdict
    only (or why there is none: the input could not be judged)."""
    verdict = decision.verdict
    cats = ", ".join(verdict.categories) or "no category"
    reason = f"it could not be judged ({verdict.error})" if verdict.error else f"{verdict.risk.value} ({cats})"
    return ToolMessage(content=f"Withheld by Qwen3Guard: {reason}.", status="error",
                       tool_call_id=tool_call_id, name=name, id=id, response_metadata={METADATA_KEY: decision.to_dict()})


def tool_text(result: Any) -> str:
    """The text a tool returned (a message's content, else ``str``); image and file parts, NUL bytes
    and lone surrogates raise ``ValueError`` (they cannot be judged)."""
    return content_to_text(result.content if isinstance(result, BaseMessage) else str(result or ""), where="tool result")


def result_decision_flow(moderator: Moderator, result: Any) -> Flow[Decision | None]:
    """The decision on what a tool returned, judged as untrusted context (None: it has no text).

    A result the guard cannot read (``tool_text`` raises: a NUL byte or lone surrogate in a scraped
    page, an image) is blocked, failing closed: it is third-party text the app cannot fix first,
    so it must neither stop the run with an error nor reach the model unjudged.
    """
    try:
        text = tool_text(result)
    except ValueError as exc:
        return Decision(Verdict(RiskLevel.UNSAFE, error=str(exc), error_kind="rejected"), Action.BLOCK)
    if not text.strip():
        return None
    return (yield from moderator.context_flow([text]))[0]


class ModelTurn:
    """One model call: its chunks, its decisions, and the text the caller has been sent.

    The relay (Stream guard) releases chunks as their text is judged; Gen judges the whole message
    before the gate's last chunks go out (Gen alone holds all of it). A block stops the model and
    ends the message with the refusal, or raises (``raise_on_block``); with ``hold_controversial`` a
    blocked Controversial answer is read to its end and kept for a human instead. A structured
    response is the answer too, judged by what it says once parsed (``json_text``), not by its JSON
    source: the arguments of each ``structured`` tool call (``ToolStrategy``; key ``("args", index)``)
    and, with ``json_content`` (``ProviderStrategy``), the message's JSON. Its JSON is judged whole
    when the model is done, so from its first chunk on the message waits for that verdict, and it is
    dropped whole on a block.
    """

    def __init__(self, moderator: Moderator, conversation: Conversation, *, raise_on_block: bool,
                 hold_controversial: bool, structured: frozenset[str] = frozenset(), json_content: bool = False) -> None:
        self.moderator, self.conversation = moderator, conversation
        self.raise_on_block, self.hold_controversial, self.structured = raise_on_block, hold_controversial, structured
        self.json_content = json_content
        self.relay = StreamRelay(moderator, conversation, self._on_decision, record_reviews=not moderator.has_gen) \
            if moderator.has_stream else None
        self.chunks: list[AIMessageChunk] = []
        self.decisions: list[Decision] = []
        self.blocked = self.held = self.stopped = False  # stopped: the model's stream need not be read further
        self._content = ""  # the message's text so far
        self._calls: dict[Any, bool] = {}  # tool-call chunk index -> whether it is a structured response
        self._args: dict[Any, str] = {}  # structured call index -> its arguments' JSON so far
        self._waiting: list[AIMessageChunk] = []  # judged so far, waiting for the structured answer's verdict
        self._holding = json_content  # whether chunks wait for that verdict
        self._sent, self._reported = "", 0

    @property
    def decision(self) -> Decision | None:
        """The decision that rules the message (None when it had no text)."""
        return strictest(self.decisions) if self.decisions else None

    def feed(self, chunk: AIMessageChunk) -> Flow[list[AIMessageChunk]]:
        """Take one chunk of the model's stream; returns the chunks the caller may have now."""
        chunk = as_chunk(chunk)  # a model that cannot stream yields its whole message
        self.chunks.append(chunk)
        texts = self._texts(chunk)
        if self.blocked or self.relay is None:
            return []
        relay = self.relay
        out = yield Step(lambda: relay.feed(chunk, texts), lambda: relay.afeed(chunk, texts))
        return (yield from self._settle(out))

    def end(self) -> Flow[list[AIMessageChunk]]:
        """The stream is over: Gen's verdict on the whole message, then the Stream gate's last word."""
        if self.stopped:
            return []
        texts = self._answer_texts()
        if self.moderator.has_gen and not self.blocked:
            decisions = yield from self.moderator.answers_flow(self.conversation, list(texts.values()), None, "gen")
            for decision in filter(None, decisions):
                self._record(decision)
        if self.blocked or self.relay is None:
            out = [] if self.blocked else self.chunks
        else:  # the structured answer's texts, whole, and the end of every gate
            relay, held = self.relay, [(key, text) for key, text in texts.items() if key != 0 or self.json_content]
            ended = [*relay.gates, *(key for key, _ in held)]
            out = yield Step(lambda: relay.feed(None, held, ended), lambda: relay.afeed(None, held, ended))
        out = yield from self._settle(out, end=True)
        return [*out, AIMessageChunk(content="", id=self.chunks[-1].id, chunk_position="last")] if self.held else out

    def close(self) -> None:
        """Free the guard sessions (also after an error or an early stop)."""
        if self.relay is not None:
            self.relay.close()

    def _texts(self, chunk: AIMessageChunk) -> list[tuple[Key, str]]:
        """The text ``chunk`` adds that is judged as it streams: the message's (key 0), unless it is
        JSON; a structured call's arguments are kept for ``end``."""
        text = chunk_text(chunk)
        self._content += text
        for call in chunk.tool_call_chunks:
            index = call.get("index")
            if call.get("name"):
                self._calls[index] = call["name"] in self.structured
            if self._calls.get(index):
                self._holding = True
                self._args[index] = self._args.get(index, "") + (call.get("args") or "")
        return [(0, text)] if text and not self.json_content else []

    def _answer_texts(self) -> dict[Key, str]:
        """The whole answer's text per key: the message's (decoded when it is JSON) and each
        structured call's decoded arguments."""
        texts = {0: json_source_text(self._content) if self.json_content else self._content}
        texts.update({("args", index): args_text(source) for index, source in self._args.items()})
        return {key: text for key, text in texts.items() if text}

    def _record(self, decision: Decision) -> None:
        self.decisions.append(decision)
        if decision.blocked and not self.blocked:
            self.blocked = True
            self.held = self.hold_controversial and decision.verdict.risk is RiskLevel.CONTROVERSIAL
            self.stopped = not self.held

    def _on_decision(self, key: Key, decision: Decision, relay: StreamRelay[AIMessageChunk]) -> None:
        """A blocked key's held chunks are cut to what was released (or all dropped, as is a blocked
        structured response: cut JSON is no answer): never judged safe."""
        self._record(decision)
        drop_all = self.held or self.raise_on_block or key != 0
        if decision.blocked and not drop_all:
            cut_text(relay.pending, key, len(relay.released(key)), chunk_text, _cut)
        for held in relay.pending:
            if decision.blocked and (drop_all or key not in held.ends):
                held.item = None

    def _settle(self, out: list[AIMessageChunk], end: bool = False) -> Flow[list[AIMessageChunk]]:
        """Hold what waits for the structured answer's verdict (released at the ``end``, dropped on a
        block); report new decisions; a block raises, or ends the message with the refusal."""
        if self.blocked:
            self._waiting = []
        elif self._holding:
            self._waiting += out
            out, self._waiting = (self._waiting, []) if end else ([], self._waiting)
        for decision in self.decisions[self._reported:]:
            yield event_step(decision)
        self._reported, self._sent = len(self.decisions), self._sent + "".join(map(chunk_text, out))
        if self.stopped and self.raise_on_block:
            raise GuardViolation(self.decisions[-1].verdict)
        if self.stopped:
            out = [*out, AIMessageChunk(content=self.moderator.refusal_after(self._sent), id=self.chunks[-1].id,
                                        chunk_position="last")]
        return out


def _cut(chunk: AIMessageChunk, keep: int) -> AIMessageChunk | None:
    """A held chunk cut to its released text; the tool calls of a blocked message are dropped."""
    return AIMessageChunk(content=chunk_text(chunk)[:keep], id=chunk.id) if keep else None


class GuardedChatModel(BaseChatModel):
    """The agent's model behind the guard: ``inner`` (tools bound by ``bind_tools``) streamed through
    a ``ModelTurn`` per call (``open_turn``), recorded in ``turns`` (shared with the bound copies).

    It shows the real model's ``profile`` and ``model_name``, which ``create_agent`` reads to choose
    how to ask for structured output (``ProviderStrategy`` or ``ToolStrategy``): the guard must not
    change that choice. A model bound with a ``response_format`` (``ProviderStrategy``, chosen or
    picked for a bare schema) answers JSON content, judged by what it says (``json_content``).
    """

    inner: Any
    open_turn: Any
    json_content: bool = False
    turns: list[ModelTurn] = Field(default_factory=list)
    cache: Any = False  # a cache hit would skip the guard; the real model keeps its own cache
    model_config = ConfigDict(arbitrary_types_allowed=True)

    @model_validator(mode="after")
    def _show_inner_profile(self) -> Self:
        if self.profile is None:
            self.profile = getattr(_model_of(self.inner), "profile", None)
        return self

    @property
    def model_name(self) -> str:
        """The real model's name (``create_agent`` reads it as ``model_name``, ``model`` or ``model_id``)."""
        real = _model_of(self.inner)
        return getattr(real, "model_name", None) or getattr(real, "model", None) or getattr(real, "model_id", None) or ""

    @property
    def _llm_type(self) -> str:
        return "qwen3guard-guarded"

    def bind_tools(self, tools: Any, **kwargs: Any) -> GuardedChatModel:
        """Bind the tools to the real model, keeping the guard around it."""
        return self.model_copy(update={"inner": self.inner.bind_tools(tools, **kwargs),
                                       "json_content": kwargs.get("response_format") is not None})

    def _open(self, messages: list[BaseMessage]) -> ModelTurn:
        self.turns.append(self.open_turn(messages_to_conversation(messages), json_content=self.json_content))
        return self.turns[-1]

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, **kwargs))

    async def _agenerate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                         **kwargs: Any) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, **kwargs))

    def _stream(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        turn, source = self._open(messages), _silenced(self.inner).stream(messages, {"callbacks": []}, stop=stop, **kwargs)
        try:
            for chunk in source:
                yield from (ChatGenerationChunk(message=c) for c in run(turn.feed(chunk)))
                if turn.stopped:
                    break
            yield from (ChatGenerationChunk(message=c) for c in run(turn.end()))
        finally:
            source.close()
            turn.close()

    async def _astream(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        turn, source = self._open(messages), _silenced(self.inner).astream(messages, {"callbacks": []}, stop=stop, **kwargs)
        try:
            async for chunk in source:
                for out in await arun(turn.feed(chunk)):
                    yield ChatGenerationChunk(message=out)
                if turn.stopped:
                    break
            for out in await arun(turn.end()):
                yield ChatGenerationChunk(message=out)
        finally:
            await source.aclose()
            turn.close()


def _model_of(runnable: Any) -> Any:
    """The model a ``RunnableBinding`` (``bind_tools``, ``with_config``) wraps, or ``runnable`` itself."""
    return _model_of(runnable.bound) if isinstance(runnable, RunnableBinding) else runnable


def _silenced(runnable: Any) -> Any:
    """``runnable`` with no callbacks of its own, on the model and on any binding around it: a
    model's ``callbacks`` field (a UI streamer set on it) would get every raw token."""
    if isinstance(runnable, RunnableBinding):
        config = {k: v for k, v in runnable.config.items() if k != "callbacks"}
        return runnable.model_copy(update={"bound": _silenced(runnable.bound), "config": config})
    if getattr(runnable, "callbacks", None):
        return runnable.model_copy(update={"callbacks": None})
    return runnable


class ToolResultScrubber(StreamTransformer):
    """Judges each ``tool-finished`` output on the v3 ``tools`` channel like ``wrap_tool_call`` does
    (verdicts are cached by content: one guard call per result) and replaces a blocked one; partial
    ``tool-output-delta`` outputs are emptied, since nothing can judge them before the tool ends."""

    before_builtins = True
    supports_sync = True
    required_stream_modes = ("tools",)

    def __init__(self, scope: tuple[str, ...] = (), *, moderator: Moderator) -> None:
        super().__init__(scope)
        self.moderator = moderator

    def init(self) -> dict[str, Any]:
        return {}

    def process(self, event: Any) -> bool:
        return run(self._scrub(event))

    async def aprocess(self, event: Any) -> bool:
        return await arun(self._scrub(event))

    def _scrub(self, event: Any) -> Flow[bool]:
        data = event["params"]["data"] if event["method"] == "tools" else None
        kind = data.get("event") if isinstance(data, dict) else None
        if kind == "tool-output-delta":
            data["delta"] = ""
        elif kind == "tool-finished":
            decision = yield from result_decision_flow(self.moderator, data.get("output"))
            if decision is not None and decision.blocked:
                data["output"] = withheld(decision, data.get("tool_call_id") or "", getattr(data["output"], "name", None))
        return True
