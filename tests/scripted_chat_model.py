"""A scripted chat model for agent tests: it streams in seeded random chunks and makes tool calls.

``GenericFakeChatModel`` has no ``bind_tools`` and drops tool calls when it streams, so agent
tests with tools need their own model. ``ScriptedChatModel`` answers from a script keyed by the
last user message: the n-th model call after that message gets the n-th scripted turn, so one
model can serve concurrent runs with different prompts. Each turn streams as text chunks of random
sizes (a ``random.Random`` seeded with ``seed`` and the text, so the same turn is always cut the
same way and a failure reproduces from its seed), then its tool calls, their arguments cut too.
``block=(type, field)`` sends the text as content blocks instead (``("reasoning", "reasoning")``);
``args_json`` streams the JSON source given for a call id in place of its arguments (escapes included).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr


def ai(text: str = "", *calls: tuple[str, dict[str, Any]]) -> AIMessage:
    """A scripted turn: ``text`` and tool calls given as ``(tool name, arguments)``."""
    tool_calls = [{"name": name, "args": args, "id": f"call_{i}", "type": "tool_call"} for i, (name, args) in enumerate(calls)]
    return AIMessage(content=text, tool_calls=tool_calls)


class ScriptedChatModel(BaseChatModel):
    """Answers each user prompt with its scripted turns, streamed in reproducible random chunks.

    ``script`` maps a user prompt to the turns the model gives after it (a tool-calling turn, then
    the answer once the tool result is in). ``max_chunk`` bounds a chunk's length in characters;
    ``delay_s`` paces each chunk like a real model. ``calls`` records the prompt of every model
    call, ``bound`` the names of the tools bound for it and ``max_in_flight`` the most streams open
    at once; with ``rendezvous=n`` an async stream waits until n have started, so concurrent runs
    provably overlap.
    """

    script: dict[str, list[AIMessage]]
    seed: int = 0
    max_chunk: int = 6
    delay_s: float = 0.0
    calls: list[str] = Field(default_factory=list)
    bound: list[list[str]] = Field(default_factory=list)
    max_in_flight: int = 0
    rendezvous: int = 0
    block: tuple[str, str] | None = None
    args_json: dict[str, str] = Field(default_factory=dict)
    _in_flight: int = PrivateAttr(default=0)
    _started: int = PrivateAttr(default=0)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        """The script decides which tools are called, so binding only records the tools' names (``bound``)."""
        self.bound.append([getattr(t, "name", None) or t.get("name") for t in tools])
        return self

    def turn(self, messages: list[BaseMessage]) -> AIMessage:
        """The scripted turn for this conversation (and record the call)."""
        last = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=None)
        if last is None:
            raise ValueError("the scripted model needs a user message")
        prompt = messages[last].text
        turns = self.script.get(prompt)
        step = sum(isinstance(m, AIMessage) for m in messages[last + 1 :])
        if turns is None or step >= len(turns):
            raise KeyError(f"no scripted turn {step} for the prompt {prompt!r}")
        self.calls.append(prompt)
        return turns[step]

    def chunks(self, message: AIMessage) -> list[AIMessageChunk]:
        """``message`` as the chunks it streams in: random cuts of its text, then its tool calls."""
        rng = random.Random(f"{self.seed}|{message.text}")
        out = [AIMessageChunk(content=self.content(piece)) for piece in _cut(message.text, rng, self.max_chunk)]
        for index, call in enumerate(message.tool_calls):
            pieces = _cut(self.args_json.get(call["id"]) or json.dumps(call["args"]), rng, self.max_chunk) or [""]
            out.append(AIMessageChunk(content="", tool_call_chunks=[
                {"name": call["name"], "args": pieces[0], "id": call["id"], "index": index}]))
            out += [AIMessageChunk(content="", tool_call_chunks=[{"args": p, "index": index}]) for p in pieces[1:]]
        return out

    def content(self, text: str) -> str | list[str | dict[str, Any]]:
        """``text`` as a message's content: a string, or one content block of type ``block``."""
        return [{"type": self.block[0], self.block[1]: text, "index": 0}] if self.block else text

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        message = self.turn(messages)
        return ChatResult(generations=[ChatGeneration(message=message.model_copy(update={"content": self.content(message.text)}))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for chunk in self.chunks(self.turn(messages)):
            if self.delay_s:
                time.sleep(self.delay_s)
            yield ChatGenerationChunk(message=chunk)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        self._enter(1)
        try:
            for _ in range(1000):  # a bounded wait: a run that never comes fails the caller's overlap check
                if self._started >= self.rendezvous:
                    break
                await asyncio.sleep(0.01)
            for chunk in self.chunks(self.turn(messages)):
                await asyncio.sleep(self.delay_s)
                yield ChatGenerationChunk(message=chunk)
        finally:
            self._enter(-1)

    def _enter(self, change: int) -> None:
        with self._lock:
            self._started += max(change, 0)
            self._in_flight += change
            self.max_in_flight = max(self.max_in_flight, self._in_flight)


def _cut(text: str, rng: random.Random, longest: int) -> list[str]:
    """``text`` cut into pieces of 1..``longest`` characters chosen by ``rng``."""
    pieces, start = [], 0
    while start < len(text):
        end = start + rng.randint(1, longest)
        pieces.append(text[start:end])
        start = end
    return pieces
