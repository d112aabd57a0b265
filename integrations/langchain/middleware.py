"""``QwenGuardMiddleware``: Qwen3Guard around a LangChain ``create_agent`` agent, streams included.

    agent = create_agent(model, tools, middleware=[QwenGuardMiddleware.from_pretrained()])

The model runs behind ``_agent_stream.GuardedChatModel``, so no stream mode, state or checkpoint
gets text the guard has not judged. Put the middleware last, so it wraps the model others chose.
"""

from __future__ import annotations

import hashlib
import json
import operator
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial, reduce
from itertools import takewhile
from typing import Annotated, Any, Literal, NotRequired, get_args
from uuid import uuid4

from langchain.agents.middleware.types import (AgentMiddleware, AgentState, ContextT, ExtendedModelResponse,
                                               ModelRequest, ModelResponse, PrivateStateAttr, ResponseT,
                                               ToolCallRequest, hook_config)
from langchain.agents.structured_output import ProviderStrategy, StructuredOutputError, ToolStrategy
from langchain_core.messages import (AIMessage, AnyMessage, HumanMessage, RemoveMessage, ToolMessage, convert_to_messages,
                                     message_chunk_to_message)
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph.message import REMOVE_ALL_MESSAGES, add_messages
from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt

from guard_core import CONFIGURED, DEFAULT_REFUSAL, METADATA_KEY, Action, Decision, GuardViolation, Moderator, Policy
from guard_core.config import DEFAULT_CONSECUTIVE
from guard_core.conversation import Conversation, definition_texts
from guard_core.steps import Flow, arun, run

from ._agent_stream import GuardedChatModel, ModelTurn, ToolResultScrubber, result_decision_flow, withheld
from ._core import event_step
from ._convert import chunk_text, messages_to_conversation

#: Private state keys of the answer held back for a human (kept out of the agent's output) and of
#: the message it answers (a new turn sent before the review is placed after the reviewed answer).
HELD_KEY, HELD_AFTER_KEY = "qwen3guard_held", "qwen3guard_held_after"
ExitBehavior = Literal["error", "end", "replace"]
OnControversial = Literal["policy", "interrupt"]
ReviewDecision = Literal["approve", "reject", "edit"]


class GuardState(AgentState[ResponseT]):
    """The agent state plus the answer held for a human (private channels)."""

    qwen3guard_held: NotRequired[Annotated[AIMessage | None, PrivateStateAttr]]
    qwen3guard_held_after: NotRequired[Annotated[str | None, PrivateStateAttr]]


class QwenGuardMiddleware(AgentMiddleware[GuardState[ResponseT], ContextT, ResponseT]):
    """Moderates an agent's input (``before_model``: Gen, else Stream's prompt head; a blocked turn
    costs no model call), streamed answers (``wrap_model_call``) and tool results (``wrap_tool_call``:
    injected instructions come back as Jailbreak); with ``apply_to_tools``, the tools' definitions.

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
                 apply_to_tools: bool = False, holdback_tokens: int = DEFAULT_CONSECUTIVE,
                 on_controversial: OnControversial = "policy", review: Any = CONFIGURED) -> None:
        super().__init__()
        for name, flag in (("apply_to_input", apply_to_input), ("apply_to_output", apply_to_output),
                           ("apply_to_tool_results", apply_to_tool_results), ("apply_to_tools", apply_to_tools)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        for name, value, allowed in (("exit_behavior", exit_behavior, ExitBehavior),
                                     ("on_controversial", on_controversial, OnControversial)):
            if value not in get_args(allowed):
                raise ValueError(f"{name} must be one of {', '.join(map(repr, get_args(allowed)))}, got {value!r}")
        if on_controversial == "interrupt" and not apply_to_output:
            raise ValueError("on_controversial='interrupt' holds answers for a human, but apply_to_output=False "
                             "judges no answer: turn the output guard on, or leave on_controversial='policy'")
        self.moderator = Moderator(gen_guard=gen_guard, stream_guard=stream_guard, policy=policy, review=review,
                                   holdback_tokens=holdback_tokens, refusal=violation_message, source="langchain.middleware")
        self.exit_behavior, self.on_controversial = exit_behavior, on_controversial
        self.apply_to_input, self.apply_to_output, self.apply_to_tool_results = apply_to_input, apply_to_output, apply_to_tool_results
        self.apply_to_tools = apply_to_tools
        self.transformers = (partial(ToolResultScrubber, moderator=self.moderator),) if apply_to_tool_results else ()
        # Fingerprints of the tool results this instance judged (``_remember``): only those count as
        # judged in ``before_model``, since a caller can send any ``response_metadata``.
        self._judged: OrderedDict[str, None] = OrderedDict()
        self._judged_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, gen_model: Any = CONFIGURED, stream_model: Any = CONFIGURED, **options: Any) -> QwenGuardMiddleware:
        """Load the guards now: hub ids, directories, Gen server URLs; ``CONFIGURED`` reads the environment."""
        middleware = cls(gen_model, stream_model, **options)
        middleware.moderator.load()
        return middleware

    @hook_config(can_jump_to=["end"])
    def before_model(self, state: GuardState[Any], runtime: Runtime[ContextT]) -> dict[str, Any] | None:
        """Judge a new user turn before the model sees it (and stop after a blocked tool result)."""
        messages = self._late_review(state)
        return _after_review(messages, run(self._input_flow(messages or state["messages"])))

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: GuardState[Any], runtime: Runtime[ContextT]) -> dict[str, Any] | None:
        """``before_model`` for asyncio."""
        messages = self._late_review(state)
        return _after_review(messages, await arun(self._input_flow(messages or state["messages"])))

    def _late_review(self, state: GuardState[Any]) -> list[AnyMessage] | None:
        """New input sent to a thread whose answer waits for review (instead of ``Command(resume=...)``):
        the review comes first (the same interrupt), and its answer goes back in its place, before the
        new input, which is then judged and answered as usual. None when no review is pending."""
        if (held := state.get(HELD_KEY)) is None:
            return None
        answer, _ = self._review(held)
        messages = list(state["messages"])
        at = next((i + 1 for i, m in enumerate(messages) if m.id == state.get(HELD_AFTER_KEY)), len(messages))
        return [*messages[:at], answer, *messages[at:]]

    def _input_flow(self, messages: Sequence[AnyMessage]) -> Flow[dict[str, Any] | None]:
        """Mid-run (only tool results this middleware judged since the model's last answer) there is
        nothing new to judge; otherwise the input is new, whatever its last turn (a user turn, a
        prefill, a late system message, tool results the caller supplied). Tool results this
        middleware did not judge are judged first, each on its own (one it cannot read is blocked),
        and a blocked one is replaced by the notice in the state; then the whole conversation is
        judged by the one conversation rule."""
        results = list(takewhile(lambda m: isinstance(m, ToolMessage), reversed(messages)))
        if not self.apply_to_tool_results:  # tool results are the app's to trust, and stay out of the check
            user = next((m for m in reversed(messages) if isinstance(m, HumanMessage)), None)
            mid_run = bool(results) and (user is None or self._judged_here(user))  # else a caller's new input
            if mid_run or not (self.apply_to_input and messages):
                return None
            return (yield from self._prompt_update(messages, []))
        ours = [m for m in results if self._judged_here(m)]
        # A block is honoured from any result, remembered or not (one judged so long ago that it was
        # forgotten): a forged one can only end the run, never let text through.
        noted = (m.response_metadata.get(METADATA_KEY) for m in results)
        blocked = [verdict for verdict in noted if isinstance(verdict, dict) and verdict.get("action") == "block"]
        if blocked and self.exit_behavior == "end":
            return self._end([], blocked[0])
        if results and len(ours) == len(results):
            return None
        messages, notices, first_block = list(messages), [], None
        for i, message in enumerate(messages):
            if isinstance(message, ToolMessage) and not self._judged_here(message):
                judged, decision = yield from self._judged_result(message)
                if decision is not None and decision.blocked:
                    messages[i], first_block = judged, first_block or decision
                    notices.append(judged)
                else:  # the state keeps it as sent
                    self._remember(message)
        if first_block is not None and self.exit_behavior == "end":
            return self._end(notices, first_block.to_dict())
        if not (self.apply_to_input and messages):
            return {"messages": notices} if notices else None
        return (yield from self._prompt_update(messages, notices))

    def _prompt_update(self, messages: Sequence[AnyMessage], notices: list[AnyMessage]) -> Flow[dict[str, Any] | None]:
        """The input check of the conversation, as a state update on top of ``notices`` (withheld tool
        results): a blocked user turn is noted, or replaced by the notice (``replace``), and the run
        ends; blocked context (a late system message, a prefill) ends the run and leaves the user's turn alone."""
        decision = (yield from self.moderator.prompt_flow(self._conversation(messages))).decision
        if decision is None:
            return {"messages": notices} if notices else None
        yield event_step(decision)
        if decision.blocked and self.exit_behavior == "error":
            raise GuardViolation(decision.verdict)
        last = next((m for m in reversed(messages) if isinstance(m, HumanMessage)), None)
        if last is None or (decision.blocked and decision.context_index is not None):
            return self._end(notices, decision.to_dict()) if decision.blocked else ({"messages": notices} if notices else None)
        content = withheld(decision).content if decision.blocked and self.exit_behavior == "replace" else last.content
        turn = last.model_copy(update={"content": content, "response_metadata": _noted(last, decision.to_dict())})
        return self._end([*notices, turn], decision.to_dict()) if decision.blocked else {"messages": [*notices, self._remember(turn)]}

    def _remember(self, message: AnyMessage) -> AnyMessage:
        """Record that this middleware judged ``message`` (a tool result or a user turn, as the state will keep it)."""
        with self._judged_lock:
            self._judged[_fingerprint(message)] = None
            while len(self._judged) > _JUDGED_SIZE:
                self._judged.popitem(last=False)
        return message

    def _judged_here(self, message: AnyMessage) -> bool:
        """True for a message this middleware judged (``_remember``); a forgotten one (evicted, or
        judged by another process before a restart) is judged again, which costs a guard call, not safety."""
        with self._judged_lock:
            return _fingerprint(message) in self._judged

    def _conversation(self, messages: Sequence[AnyMessage]) -> Conversation:
        """What the input check reads of ``messages`` (tool results only when this middleware judges them)."""
        return messages_to_conversation(messages if self.apply_to_tool_results else
                                        [m for m in messages if not isinstance(m, ToolMessage)])

    def _end(self, messages: list[AnyMessage], verdict: dict[str, Any]) -> dict[str, Any]:
        return {"messages": [*messages, self._refusal(verdict)], "jump_to": "end"}

    def _refusal(self, verdict: dict[str, Any]) -> AIMessage:
        return AIMessage(content=self.moderator.refusal, response_metadata={METADATA_KEY: verdict})

    def wrap_model_call(self, request: ModelRequest[ContextT],
                        handler: Callable[[ModelRequest[ContextT]], ModelResponse[ResponseT]]) -> Any:
        """Run the model behind the guard: its stream is released only as far as it is judged."""
        request = run(self._request_flow(request))
        if isinstance(request, ModelResponse):
            return request
        if not self.apply_to_output:
            return handler(request)
        model = self._guarded(request)
        try:
            response = handler(request.override(model=model))
        except StructuredOutputError as exc:
            response = _unparsed(exc, model)
        return self._answer(response, model, request)

    async def awrap_model_call(self, request: ModelRequest[ContextT],
                               handler: Callable[[ModelRequest[ContextT]], Awaitable[ModelResponse[ResponseT]]]) -> Any:
        """``wrap_model_call`` for asyncio."""
        request = await arun(self._request_flow(request))
        if isinstance(request, ModelResponse):
            return request
        if not self.apply_to_output:
            return await handler(request)
        model = self._guarded(request)
        try:
            response = await handler(request.override(model=model))
        except StructuredOutputError as exc:
            response = _unparsed(exc, model)
        return self._answer(response, model, request)

    def _request_flow(self, request: ModelRequest[ContextT]) -> Flow[ModelRequest[ContextT] | ModelResponse[Any]]:
        """What ``before_model`` could not see, judged before the model reads it: messages an outer
        middleware put in the request (retrieved text, a rewritten history), then, with
        ``apply_to_tools``, the tools' definitions."""
        response = yield from self._added_input_flow(request)
        return response if response is not None else (yield from self._tools_flow(request))

    def _added_input_flow(self, request: ModelRequest[ContextT]) -> Flow[ModelResponse[Any] | None]:
        """An outer ``wrap_model_call`` that changed ``request.messages`` hands the model messages
        not in the state, which ``before_model`` judged: the request's whole conversation is judged
        by the one rule (an added user turn as the prompt, added tool or late system text as
        context). A block ends the run with the refusal, with no model call (``error``: raises)."""
        state = request.state.get("messages") or []
        if not self.apply_to_input or all(m in state for m in request.messages):
            return None
        decision = (yield from self.moderator.prompt_flow(self._conversation(request.messages))).decision
        if decision is None:
            return None
        yield event_step(decision)
        if not decision.blocked:
            return None
        if self.exit_behavior == "error":
            raise GuardViolation(decision.verdict)
        return ModelResponse(result=[self._refusal(decision.to_dict())])

    def _tools_flow(self, request: ModelRequest[ContextT]) -> Flow[ModelRequest[ContextT] | ModelResponse[Any]]:
        """With ``apply_to_tools``, the definitions of the model's tools are judged as untrusted context
        by the one rule (``definition_texts``, as the OpenAI adapters judge a request's): the model
        reads them like a tool result, and a poisoned description (tools from an MCP server or a
        plugin) instructs it. A blocked tool is dropped from the call (``replace``), ends the run with
        the refusal (``end``) or raises (``error``); a repeated definition is judged once (the cache)."""
        if not (self.apply_to_tools and request.tools):
            return request
        per_tool = [definition_texts({"tools": [convert_to_openai_tool(tool)]}) for tool in request.tools]
        owners = [i for i, texts in enumerate(per_tool) for _ in texts]
        decisions = yield from self.moderator.context_flow([text for texts in per_tool for text in texts])
        blocked: dict[int, Decision] = {}
        for owner, decision in zip(owners, decisions):
            if decision.action is not Action.ALLOW:
                yield event_step(decision)
            if decision.blocked:
                blocked.setdefault(owner, decision)
        if not blocked:
            return request
        first = next(iter(blocked.values()))
        if self.exit_behavior == "error":
            raise GuardViolation(first.verdict)
        if self.exit_behavior == "end":
            return ModelResponse(result=[self._refusal(first.to_dict())])
        return request.override(tools=[tool for i, tool in enumerate(request.tools) if i not in blocked])

    def _guarded(self, request: ModelRequest[ContextT]) -> GuardedChatModel:
        turn = partial(ModelTurn, self.moderator, raise_on_block=self.exit_behavior == "error",
                       hold_controversial=self.on_controversial == "interrupt",
                       structured=_structured_tools(request.response_format))
        return GuardedChatModel(inner=request.model, open_turn=turn)

    def _answer(self, response: ModelResponse[Any], model: GuardedChatModel, request: ModelRequest[ContextT]) -> Any:
        """Attach the verdict; a blocked answer loses its tool calls and structured response, a held
        one goes to the private channel."""
        turn = model.turns[-1] if model.turns else None
        if turn is None or (decision := turn.decision) is None:
            return response
        if turn.held:
            held = message_chunk_to_message(reduce(operator.add, turn.chunks))
            held.response_metadata = _noted(held, decision.to_dict())
            after = request.state["messages"][-1].id if request.state.get("messages") else None
            return ExtendedModelResponse(ModelResponse(result=[]), Command(update={HELD_KEY: held, HELD_AFTER_KEY: after}))
        answer = next(m for m in response.result if isinstance(m, AIMessage))
        update: dict[str, Any] = {"response_metadata": _noted(answer, decision.to_dict())}
        if decision.blocked:  # the results LangChain made of its tool calls (a structured response) go too
            update.update(content=chunk_text(answer), additional_kwargs={}, tool_calls=[], invalid_tool_calls=[])
        dropped = {call["id"] for call in answer.tool_calls} if decision.blocked else set()
        result = [answer.model_copy(update=update) if m is answer else m for m in response.result
                  if not (isinstance(m, ToolMessage) and m.tool_call_id in dropped)]
        return replace(response, result=result, structured_response=None if decision.blocked else response.structured_response)

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: GuardState[Any], runtime: Runtime[ContextT]) -> dict[str, Any] | None:
        """Pause for a human when an answer is held; go on with their decision (no guard call)."""
        if (held := state.get(HELD_KEY)) is None:
            return None
        answer, rejected = self._review(held)
        return {"messages": [answer], HELD_KEY: None, HELD_AFTER_KEY: None, **({"jump_to": "end"} if rejected else {})}

    def _review(self, held: AIMessage) -> tuple[AIMessage, bool]:
        """Ask a human about the held answer (``interrupt``): the answer to keep, and whether they rejected it."""
        choice, content = _review_answer(interrupt({
            "type": "qwen3guard_review", "decision": held.response_metadata[METADATA_KEY], "content": chunk_text(held),
            "allowed_decisions": list(get_args(ReviewDecision))}))
        if choice == "reject":
            return AIMessage(content=content or self.moderator.refusal, response_metadata=held.response_metadata), True
        return held.model_copy(update={"id": str(uuid4()), **({"content": content} if choice == "edit" else {})}), False

    def wrap_tool_call(self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Any]) -> Any:
        """Judge a tool's result before the model reads it."""
        result = handler(request)
        return run(self._tool_flow(result)) if self.apply_to_tool_results else result

    async def awrap_tool_call(self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[Any]]) -> Any:
        """``wrap_tool_call`` for asyncio."""
        result = await handler(request)
        return await arun(self._tool_flow(result)) if self.apply_to_tool_results else result

    def _tool_flow(self, result: Any) -> Flow[Any]:
        """A tool's result as ToolNode takes it: a message, a ``Command``, or a list of them (each judged)."""
        if isinstance(result, list):
            judged = []
            for item in result:
                judged.append((yield from self._tool_flow(item)))
            return judged
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
        """One message a tool hands the model, judged (``_judged_result``)."""
        return (yield from self._judged_result(message))[0]

    def _judged_result(self, message: AnyMessage) -> Flow[tuple[AnyMessage, Decision | None]]:
        """One message a tool hands the model, judged as untrusted context, and its decision: noted, or
        withheld (``error``: raised); one the guard cannot read is withheld too (``result_decision_flow``).
        What comes back is remembered as judged here."""
        decision = yield from result_decision_flow(self.moderator, message)
        if decision is None:
            return self._remember(message), None
        yield event_step(decision)
        if not decision.blocked:
            return self._remember(message.model_copy(update={"response_metadata": _noted(message, decision.to_dict())})), decision
        if self.exit_behavior == "error":
            raise GuardViolation(decision.verdict)
        notice = withheld(decision, getattr(message, "tool_call_id", ""), message.name, message.id)
        if not isinstance(message, ToolMessage):
            notice = message.model_copy(update={"content": notice.content, "response_metadata": notice.response_metadata})
        return self._remember(notice), decision


#: How many judged tool results an instance remembers (``QwenGuardMiddleware._remember``).
_JUDGED_SIZE = 4096


def _fingerprint(message: AnyMessage) -> str:
    """What identifies a tool result across the state's copies of it (its id is set only when the
    state stores it): its tool call, content and verdict."""
    key = [getattr(message, "tool_call_id", None), message.content, message.response_metadata.get(METADATA_KEY)]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode("utf-8", "surrogatepass")).hexdigest()


def _structured_tools(response_format: Any) -> frozenset[str]:
    """The tools whose arguments are the agent's structured response (``ToolStrategy``; a bare schema
    or ``AutoStrategy`` may become one): the guard judges those arguments as the answer."""
    if response_format is None or isinstance(response_format, ProviderStrategy):
        return frozenset()
    if not isinstance(response_format, ToolStrategy):
        response_format = ToolStrategy(getattr(response_format, "schema", response_format))
    return frozenset(spec.name for spec in response_format.schema_specs)


def _unparsed(error: StructuredOutputError, model: GuardedChatModel) -> ModelResponse[Any]:
    """A blocked answer is no structured response (it ends with the refusal, or was held): the run
    goes on with the message as it is. Any other parse error is the agent's own, raised."""
    if not (model.turns and model.turns[-1].blocked):
        raise error
    return ModelResponse(result=[error.ai_message])


def _after_review(messages: list[AnyMessage] | None, update: dict[str, Any] | None) -> dict[str, Any] | None:
    """The input check's ``update`` applied to the reordered ``messages`` of a late review (None:
    no review), which replace the whole list; the review is no longer pending."""
    if messages is None:
        return update
    merged = add_messages(messages, (update or {}).get("messages", []))
    return {**(update or {}), "messages": [RemoveMessage(id=REMOVE_ALL_MESSAGES), *merged], HELD_KEY: None,
            HELD_AFTER_KEY: None}


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
