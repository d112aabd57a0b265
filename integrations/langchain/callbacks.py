"""Callback handlers that moderate any LangChain chat model or LLM without changing the chain.

LangChain calls ``on_llm_new_token`` *before* it yields the chunk, and re-raises a handler's
exception when the handler has ``raise_error=True``; with ``run_inline=True`` the handler also
runs before other async handlers. Raising ``GuardViolation`` there is therefore the one place a
callback can stop a chunk from reaching the consumer of ``.stream()`` / ``.astream()``.

A callback cannot hold text back (the chunk is yielded as soon as the handler returns), so the
Stream gate runs with ``holdback_tokens=0``: the stream stops at the chunk whose tokens make the
policy block. A token is judged once the tokenizer knows it is complete, which is usually when
the next chunk starts; use ``QwenGuardRunnable`` after the model to release only judged text.

Use ``QwenGuardCallbackHandler`` with ``.stream()`` / ``.invoke()`` and
``AsyncQwenGuardCallbackHandler`` with ``.astream()`` / ``.ainvoke()``: LangChain swallows the
errors of async handlers driven from sync code, so an async handler cannot stop a sync stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Self, Sequence
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult
from langchain_core.runnables.config import (
    ensure_config,
    get_async_callback_manager_for_config,
    get_callback_manager_for_config,
)

from guard_core import Action, GenGuard, GuardViolation, Policy, Verdict
from guard_core.gate import StreamGate
from guard_core.stream import DEFAULT_STREAM_MODEL, StreamGuard

from ._convert import Conversation, messages_to_conversation, token_text
from ._core import GUARD_EVENT, event_data, gate_action

PromptCheck = Literal["gen", "stream", "off"]


@dataclass
class _Run:
    """What one model run needs between its start and its end; dropped when the run ends."""

    prompt: Conversation
    gate: StreamGate | None = None
    streamed: bool = False


class _GuardHandlerBase:
    """Configuration and run bookkeeping shared by the sync and async handlers."""

    raise_error: bool = True
    run_inline: bool = True

    def __init__(
        self,
        stream_guard: StreamGuard | None = None,
        gen_guard: GenGuard | None = None,
        *,
        policy: Policy | None = None,
        prompt_check: PromptCheck | None = None,
        confirm_with_gen: bool = False,
    ) -> None:
        if stream_guard is None and gen_guard is None:
            raise ValueError("pass a stream_guard (token-level moderation), a gen_guard, or both")
        check = prompt_check or ("gen" if gen_guard is not None else "stream")
        if check not in ("gen", "stream", "off"):
            raise ValueError(f"prompt_check must be 'gen', 'stream' or 'off', got {prompt_check!r}")
        if check == "gen" and gen_guard is None:
            raise ValueError("prompt_check='gen' needs a gen_guard")
        if check == "stream" and stream_guard is None:
            raise ValueError("prompt_check='stream' needs a stream_guard")
        if confirm_with_gen and gen_guard is None:
            raise ValueError("confirm_with_gen=True needs a gen_guard")
        self.stream_guard = stream_guard
        self.gen_guard = gen_guard
        self.policy = policy or Policy()
        self.prompt_check: PromptCheck = check
        self.confirm_with_gen = confirm_with_gen
        self._runs: dict[UUID, _Run] = {}

    @classmethod
    def from_pretrained(
        cls,
        stream_model: str | None = DEFAULT_STREAM_MODEL,
        gen_model: str | None = None,
        *,
        device: str | None = None,
        **kwargs: Any,
    ) -> Self:
        """Load the guards from hub ids or local directories (``None`` skips that guard)."""
        if stream_model is None and gen_model is None:
            raise ValueError("give stream_model, gen_model or both")
        stream = StreamGuard.from_pretrained(stream_model, device=device) if stream_model else None
        gen = GenGuard.from_pretrained(gen_model, device=device) if gen_model else None
        return cls(stream, gen, **kwargs)

    @property
    def active_runs(self) -> int:
        """How many model runs hold guard state now (0 once every run has ended)."""
        return len(self._runs)

    def _gen_response_needed(self, run: _Run) -> bool:
        """Gen judges the whole response when asked to, or when no token was streamed and it is the better judge."""
        return self.gen_guard is not None and (self.confirm_with_gen or not run.streamed)

    def _stream_full_needed(self, run: _Run) -> bool:
        """A non-streamed response goes through a Stream gate only when there is no Gen guard."""
        return not run.streamed and self.gen_guard is None

    @staticmethod
    def _responses(response: LLMResult) -> list[str]:
        return [g.text for g in (response.generations[0] if response.generations else []) if g.text.strip()]

    @staticmethod
    def _chat_prompt(messages: list[list[BaseMessage]]) -> Conversation:
        conversation = messages_to_conversation(messages[0])
        if conversation[-1]["role"] != "user":
            raise ValueError("the chat model input must end with a user, tool or system message to be moderated")
        return conversation

    @staticmethod
    def _llm_prompt(prompts: Sequence[str]) -> Conversation:
        return [{"role": "user", "content": prompts[0]}]


class QwenGuardCallbackHandler(_GuardHandlerBase, BaseCallbackHandler):
    """Moderates prompts before the model runs and responses token by token, for sync calls.

    Add it to ``callbacks`` of a model or of ``config``; a blocked prompt or response raises
    ``GuardViolation``. Every verdict is dispatched as a ``qwen3guard_verdict`` custom event to
    the enclosing run's handlers (visible in ``astream_events`` and custom handlers).
    """

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Judge the prompt before the chat model is called."""
        self._start(run_id, self._chat_prompt(messages))

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Judge a completion model's prompt before it is called."""
        self._start(run_id, self._llm_prompt(prompts))

    def on_llm_new_token(self, token: str | list[str | dict[str, Any]], *, run_id: UUID, **kwargs: Any) -> None:
        """Feed the token to this run's gate; raising here keeps the chunk from being yielded."""
        run = self._runs.get(run_id)
        delta = token_text(token)
        if run is None or self.stream_guard is None or not delta:
            return
        run.streamed = True
        if run.gate is None:
            run.gate = self.stream_guard.gate(run.prompt, self.policy, holdback_tokens=0)
        run.gate.push(delta)
        if run.gate.blocked:
            verdict = run.gate.verdict
            self._end(run_id)
            self._decide(run_id, verdict, Action.BLOCK)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Judge what the token stream left undecided, or the whole response if nothing streamed."""
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        try:
            texts = self._responses(response)
            if run.streamed and run.gate is not None:
                run.gate.finish()
                self._decide(run_id, run.gate.verdict, gate_action(run.gate, self.policy))
            elif self._stream_full_needed(run) and self.stream_guard is not None:
                for text in texts:
                    gate = run.gate or self.stream_guard.gate(run.prompt, self.policy, holdback_tokens=0)
                    run.gate = None
                    with gate:
                        gate.push(text)
                        gate.finish()
                        self._decide(run_id, gate.verdict, gate_action(gate, self.policy))
            if texts and self._gen_response_needed(run) and self.gen_guard is not None:
                for verdict in self.gen_guard.moderate_batch([[*run.prompt, {"role": "assistant", "content": t}] for t in texts]):
                    self._decide(run_id, verdict, self.policy.action_for(verdict))
        finally:
            if run.gate is not None:
                run.gate.close()

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Free the run's gate (also reached after this handler raised, and when a consumer stops early)."""
        self._end(run_id)

    def _start(self, run_id: UUID, prompt: Conversation) -> None:
        gate = None
        if self.prompt_check == "gen" and self.gen_guard is not None:
            verdict = self.gen_guard.moderate(prompt)
            self._decide(run_id, verdict, self.policy.action_for(verdict))
        elif self.prompt_check == "stream" and self.stream_guard is not None:
            gate = self.stream_guard.gate(prompt, self.policy, holdback_tokens=0)
            try:
                self._decide(run_id, gate.prompt_verdict, self.policy.action_for(gate.prompt_verdict))
            except BaseException:
                gate.close()
                raise
        self._runs[run_id] = _Run(prompt, gate)

    def _end(self, run_id: UUID) -> None:
        run = self._runs.pop(run_id, None)
        if run is not None and run.gate is not None:
            run.gate.close()

    def _decide(self, run_id: UUID, verdict: Verdict, action: Action) -> None:
        """Publish the verdict, then raise if it blocks."""
        manager = get_callback_manager_for_config(ensure_config())
        manager.on_custom_event(GUARD_EVENT, event_data(verdict, action, run_id=str(run_id)), run_id=run_id)
        if action is Action.BLOCK:
            raise GuardViolation(verdict)


class AsyncQwenGuardCallbackHandler(_GuardHandlerBase, AsyncCallbackHandler):
    """The async twin of ``QwenGuardCallbackHandler`` for ``ainvoke`` / ``astream``.

    Guard work runs off the event loop (the guards' async methods), so other requests keep
    streaming while a token is judged.
    """

    async def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Judge the prompt before the chat model is called."""
        await self._start(run_id, self._chat_prompt(messages))

    async def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Judge a completion model's prompt before it is called."""
        await self._start(run_id, self._llm_prompt(prompts))

    async def on_llm_new_token(self, token: str | list[str | dict[str, Any]], *, run_id: UUID, **kwargs: Any) -> None:
        """Feed the token to this run's gate; raising here keeps the chunk from being yielded."""
        run = self._runs.get(run_id)
        delta = token_text(token)
        if run is None or self.stream_guard is None or not delta:
            return
        run.streamed = True
        if run.gate is None:
            run.gate = await self.stream_guard.agate(run.prompt, self.policy, holdback_tokens=0)
        await run.gate.apush(delta)
        if run.gate.blocked:
            verdict = run.gate.verdict
            await self._end(run_id)
            await self._decide(run_id, verdict, Action.BLOCK)

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Judge what the token stream left undecided, or the whole response if nothing streamed."""
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        try:
            texts = self._responses(response)
            if run.streamed and run.gate is not None:
                await run.gate.afinish()
                await self._decide(run_id, run.gate.verdict, gate_action(run.gate, self.policy))
            elif self._stream_full_needed(run) and self.stream_guard is not None:
                for text in texts:
                    gate = run.gate or await self.stream_guard.agate(run.prompt, self.policy, holdback_tokens=0)
                    run.gate = None
                    try:
                        await gate.apush(text)
                        await gate.afinish()
                        await self._decide(run_id, gate.verdict, gate_action(gate, self.policy))
                    finally:
                        await gate.aclose()
            if texts and self._gen_response_needed(run) and self.gen_guard is not None:
                conversations = [[*run.prompt, {"role": "assistant", "content": t}] for t in texts]
                for verdict in await self.gen_guard.amoderate_batch(conversations):
                    await self._decide(run_id, verdict, self.policy.action_for(verdict))
        finally:
            if run.gate is not None:
                await run.gate.aclose()

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Free the run's gate (also reached after this handler raised, and when a consumer stops early)."""
        await self._end(run_id)

    async def _start(self, run_id: UUID, prompt: Conversation) -> None:
        gate = None
        if self.prompt_check == "gen" and self.gen_guard is not None:
            verdict = await self.gen_guard.amoderate(prompt)
            await self._decide(run_id, verdict, self.policy.action_for(verdict))
        elif self.prompt_check == "stream" and self.stream_guard is not None:
            gate = await self.stream_guard.agate(prompt, self.policy, holdback_tokens=0)
            try:
                await self._decide(run_id, gate.prompt_verdict, self.policy.action_for(gate.prompt_verdict))
            except BaseException:
                await gate.aclose()
                raise
        self._runs[run_id] = _Run(prompt, gate)

    async def _end(self, run_id: UUID) -> None:
        run = self._runs.pop(run_id, None)
        if run is not None and run.gate is not None:
            await run.gate.aclose()

    async def _decide(self, run_id: UUID, verdict: Verdict, action: Action) -> None:
        """Publish the verdict, then raise if it blocks."""
        manager = get_async_callback_manager_for_config(ensure_config())
        await manager.on_custom_event(GUARD_EVENT, event_data(verdict, action, run_id=str(run_id)), run_id=run_id)
        if action is Action.BLOCK:
            raise GuardViolation(verdict)
