"""``QwenGuardMiddleware``: Qwen3Guard around a LangChain ``create_agent`` agent, streams included.

    agent = create_agent(model, tools, middleware=[QwenGuardMiddleware.from_pretrained()])

The model runs behind ``_agent_stream.GuardedChatModel``, so no stream mode, state or checkpoint
gets text the guard has not judged. Put the middleware last, so it wraps the model others chose.
"""

from __future__ import annotations

import operator
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial, reduce
from itertools import takewhile
from typing import Annotated, Any, Literal, NotRequired, get_args
from uuid import uuid4

from langchain.agents.middleware.types import (AgentMiddleware, AgentState, ContextT, ExtendedModelResponse,
                                               ModelRequest, ModelResponse, PrivateStateAttr, ResponseT,
                                               ToolCallRequest, hook_config)
from langchain_core.messages import (AIMessage, AnyMessage, HumanMessage, ToolMessage, convert_to_messages,
                                     message_chunk_to_message)
from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt

from guard_core import CONFIGURED, DEFAULT_REFUSAL, METADATA_KEY, GuardViolation, Moderator, Policy
from guard_core.config import DEFAULT_CONSECUTIVE
from guard_core.messages import content_to_text
from guard_core.steps import Flow, arun, run

from ._agent_stream import GuardedChatModel, ModelTurn, ToolResultScrubber, withheld
from ._core import event_step
from ._convert import messages_to_conversation

#: Private state key of the answer held back for a human (kept out of the agent's output).
HELD_KEY = "qwen3guard_held"
ExitBehavior = Literal["error", "end", "replace"]
OnControversial = Literal["policy", "interrupt"]
ReviewDecision = Literal["approve", "reject", "edit"]


class GuardState(AgentState[ResponseT]):
    """The agent state plus the answer held for a human (a private channel)."""

    qwen3guard_held: NotRequired[Annotated[AIMessage | None, PrivateStateAttr]]


class QwenGuardMiddleware(AgentMiddleware[GuardState[ResponseT], ContextT, ResponseT]):
    """Moderates an agent's input (``before_model``: Gen, else Stream's prompt head; a blocked turn
    costs no model call), streamed answers (``wrap_model_call``) and tool results (``wrap_tool_call``:
    injected instructions come back as Jailbreak).

    Guards are what ``guard_core.backends`` takes (a loaded guard, hub id, directory, Gen server
    URLs, ``CONFIGURED``: the environment; None: not used). On a block, ``exit_behavior="error"``
    raises ``GuardViolation``, ``"end"`` ends the run with ``violation_message``, ``"replace"`` puts
    a notice in place of the user turn or tool result (the model reads a tool notice and goes on);
    a blocked answer ends with the refusal after what was streamed. ``on_controversial="interrupt"``
    holds a blocked Controversial answer for a human (``after_model``; needs a checkpointer).
    Verdicts go to each judged message's ``response_metadata["qwen3guard"]`` and custom events.
    """

    state_schema = GuardState  # type: ignore[assignment]

    def __init__(self, gen_guard: Any = CONFIGURED, stream_guard: Any = CONFIGURED, *, policy: Policy | None = None,
                 exit_behavior: ExitBehavior = "end", violation_message: str = DEFAULT_REFUSAL,
                 apply_to_input: bool = True, apply_to_output: bool = True, apply_to_tool_results: bool = True,
                 holdback_tokens: int = DEFAULT_CONSECUTIVE, on_controversial: OnControversial = "policy",
                 review: Any = CONFIGURED) -> None:
        super().__init__()
        for name, value, allowed in (("exit_behavior", exit_behavior, ExitBehavior),
                                     ("on_controversial", on_controversial, OnControversial)):
            if value not in get_args(allowed):
                raise ValueError(f"{name} must be one of {', '.join(map(repr, get_args(allowed)))}, got {value!r}")
        self.moderator = Moderator(gen_guard=gen_guard, stream_guard=stream_guard, policy=policy, review=review,
                                   holdback_tokens=holdback_tokens, refusal=violation_message, source="langchain.middleware")
        self.exit_behavior, self.on_controversial = exit_behavior, on_controversial
        self.apply_to_input, self.apply_to_output, self.apply_to_tool_results = apply_to_input, apply_to_output, apply_to_tool_results
        self.transformers = (partial(ToolResultScrubber, moderator=self.moderator),) if apply_to_tool_results else ()

    @classmethod
    def from_pretrained(cls, gen_model: Any = CONFIGURED, stream_model: Any = CONFIGURED, **options: Any) -> QwenGuardMiddleware:
        """Load the guards now: hub ids, directories, Gen server URLs; ``CONFIGURED`` reads the environment."""
        middleware = cls(gen_model, stream_model, **options)
        middleware.moderator.load()
        return middleware

    @hook_config(can_jump_to=["end"])
    def before_model(self, state: GuardState[Any], runtime: Runtime[ContextT]) -> dict[str, Any] | None:
        """Judge a new user turn before the model sees it (and stop after a blocked tool result)."""
        return run(self._input_flow(state["messages"]))

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: GuardState[Any], runtime: Runtime[ContextT]) -> dict[str, Any] | None:
        """``before_model`` for asyncio."""
        return await arun(self._input_flow(state["messages"]))

    def _input_flow(self, messages: Sequence[AnyMessage]) -> Flow[dict[str, Any] | None]:
        """Mid-run (only tool results this middleware judged since the model's last answer) there is
        nothing new to judge; otherwise the input is new, whatever its last turn (a user turn, a
        prefill, a late system message, tool results the caller supplied), and the whole
        conversation is judged by the one conversation rule."""
        results = list(takewhile(lambda m: isinstance(m, ToolMessage), reversed(messages)))
        blocked = [verdict for m in results if (verdict := m.response_metadata.get(METADATA_KEY, {})).get("action") == "block"]
        if blocked and self.exit_behavior == "end":
            return self._end([], blocked[0])
        judged_here = self.apply_to_tool_results  # else tool results are the app's to trust, and stay out of the check
        mid_run = bool(results) and (not judged_here or all(METADATA_KEY in m.response_metadata or not m.text.strip()
                                                            for m in results))
        if not (self.apply_to_input and messages) or mid_run:
            return None
        seen = messages if judged_here else [m for m in messages if not isinstance(m, ToolMessage)]
        decision = (yield from self.moderator.prompt_flow(messages_to_conversation(seen))).decision
        if decision is None:
            return None
        yield event_step(decision)
        if decision.blocked and self.exit_behavior == "error":
            raise GuardViolation(decision.verdict)
        last = next((m for m in reversed(messages) if isinstance(m, HumanMessage)), None)
        if last is None:
            return self._end([], decision.to_dict()) if decision.blocked else None
        content = withheld(decision).content if decision.blocked and self.exit_behavior == "replace" else last.content
        turn = last.model_copy(update={"content": content, "response_metadata": _noted(last, decision.to_dict())})
        return self._end([turn], decision.to_dict()) if decision.blocked else {"messages": [turn]}

    def _end(self, messages: list[AnyMessage], verdict: dict[str, Any]) -> dict[str, Any]:
        refusal = AIMessage(content=self.moderator.refusal, response_metadata={METADATA_KEY: verdict})
        return {"messages": [*messages, refusal], "jump_to": "end"}

    def wrap_model_call(self, request: ModelRequest[ContextT],
                        handler: Callable[[ModelRequest[ContextT]], ModelResponse[ResponseT]]) -> Any:
        """Run the model behind the guard: its stream is released only as far as it is judged."""
        if not self.apply_to_output:
            return handler(request)
        model = self._guarded(request)
        return self._answer(handler(request.override(model=model)), model)

    async def awrap_model_call(self, request: ModelRequest[ContextT],
                               handler: Callable[[ModelRequest[ContextT]], Awaitable[ModelResponse[ResponseT]]]) -> Any:
        """``wrap_model_call`` for asyncio."""
        if not self.apply_to_output:
            return await handler(request)
        model = self._guarded(request)
        return self._answer(await handler(request.override(model=model)), model)

    def _guarded(self, request: ModelRequest[ContextT]) -> GuardedChatModel:
        turn = partial(ModelTurn, self.moderator, raise_on_block=self.exit_behavior == "error",
                       hold_controversial=self.on_controversial == "interrupt")
        return GuardedChatModel(inner=request.model, open_turn=turn)

    def _answer(self, response: ModelResponse[Any], model: GuardedChatModel) -> Any:
        """Attach the verdict; a blocked answer loses its tool calls, a held one goes to the private channel."""
        turn = model.turns[-1] if model.turns else None
        if turn is None or (decision := turn.decision) is None:
            return response
        if turn.held:
            held = message_chunk_to_message(reduce(operator.add, turn.chunks))
            held.response_metadata = _noted(held, decision.to_dict())
            return ExtendedModelResponse(ModelResponse(result=[]), Command(update={HELD_KEY: held}))
        result = list(response.result)
        index = next(i for i, m in enumerate(result) if isinstance(m, AIMessage))
        update: dict[str, Any] = {"response_metadata": _noted(result[index], decision.to_dict())}
        if decision.blocked:
            update.update(content=result[index].text, tool_calls=[], invalid_tool_calls=[])
        result[index] = result[index].model_copy(update=update)
        return replace(response, result=result)

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: GuardState[Any], runtime: Runtime[ContextT]) -> dict[str, Any] | None:
        """Pause for a human when an answer is held; go on with their decision (no guard call)."""
        if (held := state.get(HELD_KEY)) is None:
            return None
        choice, content = _review_answer(interrupt({
            "type": "qwen3guard_review", "decision": held.response_metadata[METADATA_KEY], "content": held.text,
            "allowed_decisions": list(get_args(ReviewDecision))}))
        if choice == "reject":
            answer = AIMessage(content=content or self.moderator.refusal, response_metadata=held.response_metadata)
            return {"messages": [answer], HELD_KEY: None, "jump_to": "end"}
        update = {"id": str(uuid4()), **({"content": content} if choice == "edit" else {})}
        return {"messages": [held.model_copy(update=update)], HELD_KEY: None}

    def wrap_tool_call(self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Any]) -> Any:
        """Judge a tool's result before the model reads it."""
        result = handler(request)
        return run(self._tool_flow(result)) if self.apply_to_tool_results else result

    async def awrap_tool_call(self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[Any]]) -> Any:
        """``wrap_tool_call`` for asyncio."""
        result = await handler(request)
        return await arun(self._tool_flow(result)) if self.apply_to_tool_results else result

    def _tool_flow(self, result: Any) -> Flow[Any]:
        if isinstance(result, Command):
            return (yield from self._command_flow(result))
        return (yield from self._result_flow(result)) if isinstance(result, ToolMessage) else result

    def _command_flow(self, command: Command) -> Flow[Command]:
        """A tool that steers the graph: every message its ``Command`` adds to the state is judged as its result."""
        update = command.update
        if not isinstance(update, Mapping) or not update.get("messages"):
            return command
        messages = update["messages"]
        judged = []
        for message in convert_to_messages(messages if isinstance(messages, list) else [messages]):
            judged.append((yield from self._result_flow(message)))
        return replace(command, update={**update, "messages": judged})

    def _result_flow(self, message: AnyMessage) -> Flow[AnyMessage]:
        """One message a tool hands the model, judged as untrusted context: noted, or withheld (``error``: raised)."""
        text = content_to_text(message.content, where="tool result")
        if not text.strip():
            return message
        decision = (yield from self.moderator.context_flow([text]))[0]
        yield event_step(decision)
        if not decision.blocked:
            return message.model_copy(update={"response_metadata": _noted(message, decision.to_dict())})
        if self.exit_behavior == "error":
            raise GuardViolation(decision.verdict)
        notice = withheld(decision, getattr(message, "tool_call_id", ""), message.name, message.id)
        if isinstance(message, ToolMessage):
            return notice
        return message.model_copy(update={"content": notice.content, "response_metadata": notice.response_metadata})


def _noted(message: AnyMessage, verdict: dict[str, Any]) -> dict[str, Any]:
    return {**message.response_metadata, METADATA_KEY: verdict}


def _review_answer(answer: Any) -> tuple[ReviewDecision, str | None]:
    """A reviewer's ``Command(resume=...)``: ours, or ``HumanInTheLoopMiddleware``'s ``{"decisions": [...]}``."""
    if isinstance(answer, Mapping) and isinstance(answer.get("decisions"), list) and answer["decisions"]:
        answer = answer["decisions"][0]
    answer = answer if isinstance(answer, Mapping) else {}
    choice, content = answer.get("decision", answer.get("type")), answer.get("content", answer.get("message"))
    if choice not in get_args(ReviewDecision) or not isinstance(content, (str, type(None))) or (choice == "edit" and not content):
        raise ValueError('resume a Qwen3Guard review with Command(resume={"decision": "approve" | "reject" | "edit", '
                         '"content": "..."}); edit needs the new content')
    return choice, content
