"""Callback handlers that moderate any LangChain chat model or LLM without changing the chain.

LangChain calls ``on_llm_new_token`` *before* it yields the chunk and re-raises the error of a
handler with ``raise_error=True`` (``run_inline=True`` runs it before other async handlers), so
raising ``GuardViolation`` there stops the chunk. A callback cannot hold text back: its gate has no
hold-back and the stream stops at the chunk whose tokens make the policy block (a token is judged
once it is complete, usually when the next chunk starts); ``QwenGuardRunnable`` after the model
releases only judged text. LangChain swallows async handlers' errors on sync calls: use the sync
handler with ``stream`` / ``invoke``, the async one with ``astream`` / ``ainvoke``.

A call LangChain marks as structured output (``with_structured_output``: ``ls_structured_output_format``
in its options) answers with tool-call arguments or JSON content: the answer is judged by what it
says once parsed (``answer_text``), its arguments as they stream, and the whole decoded answer at
the end when the streamed text was not all of it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, Self
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, AsyncCallbackManager, BaseCallbackHandler, CallbackManager
from langchain_core.callbacks.base import BaseCallbackManager
from langchain_core.callbacks.manager import BaseRunManager
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult

from guard_core import CONFIGURED, Decision, GuardViolation, Moderator
from guard_core.conversation import Conversation, from_text
from guard_core.gate import StreamGate
from guard_core.steps import Flow, Step, arun, run

from ._convert import answer_text, chunk_text, event_token, messages_to_conversation, token_text, tool_args_text
from ._core import GUARD_EVENT


@dataclass
class _Run:
    """What one model run needs between its start and its end; dropped when the run ends."""

    conversation: Conversation
    gate: StreamGate | None = None
    streamed: bool = False
    batch: Any = None  # the ``options`` dict the prompts of one multi-prompt call share (see ``_start``)
    structured: bool = False  # the call is structured output (see the module docstring)
    message: Any = None  # a structured call's message so far
    args: str = ""  # the text of its arguments pushed so far
    pushed: str = ""  # all text pushed into the gate so far
    source: str | None = None  # what feeds the gate: "token" (on_llm_new_token) or "event" (on_stream_event)


def _calling_manager(handler: BaseCallbackHandler) -> BaseCallbackManager | BaseRunManager | None:
    """The LangChain callback manager that is calling ``handler`` now (it knows the run's handlers).

    LangChain passes a handler no reference to its run. Events used to go through the ambient
    ``RunnableConfig``, which only a chain sets: a model called directly (``model.stream(...,
    config={"callbacks": [...]})``) has none, so its verdict events reached no handler.
    """
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, (BaseCallbackManager, BaseRunManager)) and handler in owner.handlers:
            return owner
        frame = frame.f_back
    return None


class _GuardHandlerBase(BaseCallbackHandler):
    """Configuration, run bookkeeping and the flows behind the sync and async handlers' hooks."""

    raise_error: bool = True
    run_inline: bool = True

    def __init__(self, stream_guard: Any = None, gen_guard: Any = None, *, policy: Any = None,
                 prompt_check: str | None = None, confirm_with_gen: bool = False, review: Any = CONFIGURED,
                 moderator: Moderator | None = None) -> None:
        if moderator is None:
            moderator = Moderator(gen_guard=gen_guard, stream_guard=stream_guard, policy=policy, holdback_tokens=0,
                                  prompt_check=prompt_check, review=review, source="langchain.callback")  # type: ignore[arg-type]
        elif not isinstance(moderator, Moderator):
            raise TypeError(f"moderator must be a guard_core.Moderator, got {type(moderator).__name__}")
        elif any(o is not None for o in (stream_guard, gen_guard, policy, prompt_check)) or review is not CONFIGURED:
            raise ValueError("pass moderator= or the guard options (guards, policy, prompt_check, review), not both")
        if confirm_with_gen and not moderator.has_gen:
            raise ValueError("confirm_with_gen=True needs a gen_guard")
        self.moderator = moderator
        self.confirm_with_gen = confirm_with_gen
        self._runs: dict[UUID, _Run] = {}

    @classmethod
    def from_pretrained(cls, stream_model: Any = CONFIGURED, gen_model: Any = None, **kwargs: Any) -> Self:
        """Guards named by hub id, directory, server URL (Gen) or ``CONFIGURED`` (the environment); None skips one."""
        return cls(stream_model, gen_model, **kwargs)

    @property
    def active_runs(self) -> int:
        """How many model runs hold guard state now (0 once every run has ended)."""
        return len(self._runs)

    def _start(self, run_id: UUID, prompt: list[BaseMessage] | str, kw: dict[str, Any]) -> Flow[None]:
        """Judge the model's input; a Stream prompt check keeps its gate open for the answer.

        A start that fails (a block, bad input) ends a multi-prompt ``generate()`` call, and LangChain
        then sends no end or error for its other prompts: their runs are freed here (a prompt of the
        call still being judged finds its run gone and frees its gate). The prompts of one call share
        its ``options`` dict, which marks them.
        """
        batch = kw.get("options") if (kw.get("batch_size") or 1) > 1 else None
        structured = bool((kw.get("options") or {}).get("ls_structured_output_format"))
        self._runs[run_id] = state = _Run(Conversation(), batch=batch, structured=structured)
        try:
            state.conversation = from_text(prompt) if isinstance(prompt, str) else messages_to_conversation(prompt)
            result = yield from self.moderator.prompt_flow(state.conversation, str(run_id), keep_gate=True)
            state.gate = result.gate
            if self._runs.get(run_id) is not state:
                if state.gate is not None:
                    state.gate.close()
            elif result.decision is not None:
                yield from self._publish(run_id, result.decision)
        except BaseException:
            for other, started in list(self._runs.items()):
                if other == run_id or (batch is not None and started.batch is batch):
                    self._close(other)
            raise

    def _token(self, run_id: UUID, token: Any, chunk: Any, source: str = "token") -> Flow[None]:
        """Push a token's text (and a structured call's new argument text) into the run's gate; a
        block raises before LangChain yields the chunk.

        ``stream_events(version="v3")`` sends the answer as protocol events (``source="event"``) and
        calls ``on_llm_new_token`` only where the model's ``_stream`` does itself, before the events
        of the same chunk: the first source a run uses feeds its gate, so no text is pushed twice.
        """
        state = self._runs.get(run_id)
        if state is None or not self.moderator.has_stream or state.source not in (None, source):
            return
        delta = chunk_text(chunk) if chunk is not None else token_text(token)
        message = getattr(chunk, "message", None)
        if state.structured and isinstance(message, BaseMessage):
            state.message = message if state.message is None else state.message + message
            args = tool_args_text(state.message, whole=False)
            if args.startswith(state.args):  # else a cut escape parsed shorter: wait for the next chunk
                delta, state.args = delta + args[len(state.args):], args
        if not delta:
            return
        state.source = source
        if state.gate is None:
            state.gate = yield from self.moderator.gate_flow(state.conversation, 0)
        state.streamed, state.pushed, gate = True, state.pushed + delta, state.gate
        yield Step(lambda: gate.push(delta), lambda: gate.apush(delta))
        if gate.blocked:
            yield from self._publish(run_id, (yield from self.moderator.stream_decision_flow(gate, state.conversation, str(run_id))))

    def _end(self, run_id: UUID, response: LLMResult) -> Flow[None]:
        """Decide a streamed answer, or judge the whole answer (Gen if configured; ``confirm_with_gen``
        re-checks; a structured answer whose streamed text was not all of it is judged whole too)."""
        state = self._runs.get(run_id)
        if state is None:
            return
        try:
            decisions: list[Decision | None] = []
            if state.streamed and state.gate is not None:
                yield Step(state.gate.finish, state.gate.afinish)
                decisions.append((yield from self.moderator.stream_decision_flow(
                    state.gate, state.conversation, str(run_id), record_review=not self.confirm_with_gen)))
            read = partial(answer_text, json_content=True) if state.structured else chunk_text
            texts = [read(getattr(g, "message", g.text)) for g in response.generations[0]] if response.generations else []
            if not state.streamed or self.confirm_with_gen or (state.structured and texts != [state.pushed]):
                engine = "gen" if self.confirm_with_gen else None
                decisions += yield from self.moderator.answers_flow(state.conversation, texts, str(run_id), engine)
            for decision in filter(None, decisions):
                yield from self._publish(run_id, decision)
        finally:
            self._close(run_id)

    def _publish(self, run_id: UUID, decision: Decision) -> Flow[None]:
        """Send the decision to the run's handlers as a ``qwen3guard_verdict`` event, then raise if it blocks."""
        owner = _calling_manager(self)
        if owner is not None:
            options = {"handlers": owner.handlers, "parent_run_id": owner.parent_run_id, "tags": owner.tags,
                       "metadata": owner.metadata}
            data = {**decision.to_dict(), "run_id": str(run_id)}
            yield Step(lambda: CallbackManager(**options).on_custom_event(GUARD_EVENT, data, run_id=run_id),
                       lambda: AsyncCallbackManager(**options).on_custom_event(GUARD_EVENT, data, run_id=run_id))
        if decision.blocked:
            self._close(run_id)
            raise GuardViolation(decision.verdict)

    def _close(self, run_id: UUID) -> None:
        """Forget a run and free its gate (idempotent)."""
        state = self._runs.pop(run_id, None)
        if state is not None and state.gate is not None:
            state.gate.close()


class QwenGuardCallbackHandler(_GuardHandlerBase):
    """Moderates the model's input before it runs and its answer token by token, for sync calls.

    Add it to the ``callbacks`` of a model or of ``config``; a block raises ``GuardViolation``. Every
    decision goes to the run's handlers as a ``qwen3guard_verdict`` event (``Decision.to_dict()``
    and ``run_id``), whether the model runs in a chain or is called directly.
    """

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kw: Any) -> None:
        """Judge the chat model's input before it is called (tool results as untrusted context)."""
        run(self._start(run_id, messages[0], kw))

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kw: Any) -> None:
        """Judge a completion model's prompt before it is called."""
        run(self._start(run_id, prompts[0], kw))

    def on_llm_new_token(self, token: str | list[str | dict[str, Any]], *, run_id: UUID, **kw: Any) -> None:
        """Judge the token before its chunk is yielded."""
        run(self._token(run_id, token, kw.get("chunk")))

    def on_stream_event(self, event: Any, *, run_id: UUID, **kw: Any) -> None:
        """Judge a ``stream_events(version="v3")`` event's text before the event is yielded."""
        run(self._token(run_id, event_token(event), None, "event"))

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kw: Any) -> None:
        """Decide the answer once the model has finished."""
        run(self._end(run_id, response))

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kw: Any) -> None:
        """Free the run's gate (also after this handler raised, and when a consumer stops early)."""
        self._close(run_id)


class AsyncQwenGuardCallbackHandler(_GuardHandlerBase, AsyncCallbackHandler):
    """``QwenGuardCallbackHandler`` for ``ainvoke`` / ``astream``: guard work runs off the event loop."""

    async def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID,
                                  **kw: Any) -> None:
        """Judge the chat model's input before it is called (tool results as untrusted context)."""
        await arun(self._start(run_id, messages[0], kw))

    async def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kw: Any) -> None:
        """Judge a completion model's prompt before it is called."""
        await arun(self._start(run_id, prompts[0], kw))

    async def on_llm_new_token(self, token: str | list[str | dict[str, Any]], *, run_id: UUID, **kw: Any) -> None:
        """Judge the token before its chunk is yielded."""
        await arun(self._token(run_id, token, kw.get("chunk")))

    async def on_stream_event(self, event: Any, *, run_id: UUID, **kw: Any) -> None:
        """Judge a ``astream_events(version="v3")`` event's text before the event is yielded."""
        await arun(self._token(run_id, event_token(event), None, "event"))

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kw: Any) -> None:
        """Decide the answer once the model has finished."""
        await arun(self._end(run_id, response))

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, **kw: Any) -> None:
        """Free the run's gate (also after this handler raised, and when a consumer stops early)."""
        self._close(run_id)
