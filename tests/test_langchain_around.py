"""QwenGuardRunnable.around(chain): the response guard judges the chain's output with its input in view."""

from __future__ import annotations

import asyncio
import datetime
import uuid
import itertools
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any, Iterable

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.output_parsers import JsonOutputParser, StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from pydantic import BaseModel

from langchain_helpers import Recorder, collect
from guard_core import GuardViolation, Message, RiskLevel
from guard_core.stream import StreamGuard
from guard_core.testing.cases import REFUSAL_ANSWER, SAFE_ANSWER, SAFE_PROMPT, UNSAFE_PROMPT
from guard_core.testing.stream_fixture import PLANTED_SAFE_PROMPT, PLANTED_SAFE_TEXT, PLANTED_UNSAFE_PROMPT
from integrations.langchain import DEFAULT_REFUSAL, METADATA_KEY, QwenGuardRunnable

UNSAFE_REPLY = "Sure, take a pipe bomb. Then light it."
SAFE_PREFIX = ["Sure,", " ", "take", " ", "a"]


class SpyGen:
    """A Gen guard that records every conversation it is asked to judge, then asks the real one."""

    def __init__(self, guard: Any) -> None:
        self.guard, self.seen = guard, []

    @property
    def model_id(self) -> str:
        return self.guard.model_id

    def moderate(self, messages: Iterable[Any]) -> Any:
        return self.moderate_batch([messages])[0]

    def moderate_batch(self, conversations: Iterable[Iterable[Any]]) -> Any:
        batch = [list(c) for c in conversations]
        self.seen += batch
        return self.guard.moderate_batch(batch)

    async def amoderate(self, messages: Iterable[Any]) -> Any:
        return self.moderate(messages)

    async def amoderate_batch(self, conversations: Iterable[Iterable[Any]]) -> Any:
        return self.moderate_batch(conversations)


class SpyStream:
    """A Stream guard that records the conversation of every gate it opens."""

    def __init__(self, guard: StreamGuard) -> None:
        self.guard, self.gates = guard, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.guard, name)

    def gate(self, messages: Iterable[Any], *args: Any) -> Any:
        self.gates.append(list(messages))
        return self.guard.gate(self.gates[-1], *args)

    async def agate(self, messages: Iterable[Any], *args: Any) -> Any:
        return self.gate(messages, *args)


def chain_answering(*answers: str) -> Any:
    model = GenericFakeChatModel(messages=iter([AIMessage(content=a) for a in answers]))
    return ChatPromptTemplate.from_messages([("human", "{question}")]) | model


def test_gen_judges_the_answer_as_a_reply_to_the_question(gen_guard: Any) -> None:
    spy, recorder = SpyGen(gen_guard), Recorder()
    guarded = QwenGuardRunnable.around(chain_answering(REFUSAL_ANSWER), gen_guard=spy, prompt_check="off")
    out = guarded.invoke({"question": UNSAFE_PROMPT}, config={"callbacks": [recorder]})
    assert out.content == REFUSAL_ANSWER
    assert spy.seen == [[Message("user", UNSAFE_PROMPT), Message("assistant", REFUSAL_ANSWER)]]
    (event,) = recorder.events
    assert (event["role"], event["risk"], event["refusal"], event["action"]) == ("response", "Safe", True, "allow")


def test_the_input_is_judged_as_the_prompt_before_the_chain_runs(gen_guard: Any) -> None:
    chain = chain_answering(SAFE_ANSWER)
    with pytest.raises(GuardViolation) as info:
        QwenGuardRunnable.around(chain, gen_guard=gen_guard).invoke({"question": UNSAFE_PROMPT})
    assert info.value.verdict.role == "prompt"
    replaced = QwenGuardRunnable.around(chain, gen_guard=gen_guard, on_violation="replace").invoke({"question": UNSAFE_PROMPT})
    assert isinstance(replaced, AIMessage) and replaced.content == DEFAULT_REFUSAL
    assert replaced.response_metadata[METADATA_KEY]["role"] == "prompt"
    assert QwenGuardRunnable.around(chain, gen_guard=gen_guard).invoke({"question": SAFE_PROMPT}).content == SAFE_ANSWER


def test_a_stream_is_judged_with_the_question_prefilled_once(stream_guard: StreamGuard) -> None:
    spy = SpyStream(stream_guard)
    guarded = QwenGuardRunnable.around(chain_answering(UNSAFE_REPLY), stream_guard=spy) | StrOutputParser()
    got, exc = collect(guarded.stream({"question": PLANTED_SAFE_PROMPT}))
    assert got == SAFE_PREFIX and isinstance(exc, GuardViolation) and exc.verdict.role == "response"
    # The Stream prompt check's gate judges the answer too: one prefill, of the user's question.
    assert spy.gates == [[Message("user", PLANTED_SAFE_PROMPT)]]


def test_a_safe_stream_passes_as_the_models_own_chunks(stream_guard: StreamGuard) -> None:
    plain = list(chain_answering(PLANTED_SAFE_TEXT).stream({"question": PLANTED_SAFE_PROMPT}))
    guarded = list(QwenGuardRunnable.around(chain_answering(PLANTED_SAFE_TEXT), stream_guard=stream_guard)
                   .stream({"question": PLANTED_SAFE_PROMPT}))
    assert [c.content for c in guarded] == [c.content for c in plain]
    assert all(isinstance(c, AIMessageChunk) for c in guarded)


def test_astream_events_show_the_prompt_and_answer_decisions_and_the_chain(stream_guard: StreamGuard) -> None:
    guarded = QwenGuardRunnable.around(chain_answering(PLANTED_SAFE_TEXT), stream_guard=stream_guard)

    async def events() -> list[dict[str, Any]]:
        return [e async for e in guarded.astream_events({"question": PLANTED_SAFE_PROMPT}, version="v2")]

    seen = asyncio.run(events())
    decisions = [(e["data"]["role"], e["data"]["risk"]) for e in seen if e["event"] == "on_custom_event"]
    assert decisions == [("prompt", "Safe"), ("response", "Safe")]
    streamed = "".join(e["data"]["chunk"].content for e in seen if e["event"] == "on_chat_model_stream")
    assert streamed == PLANTED_SAFE_TEXT


def test_astream_blocks_an_unsafe_question_before_the_chain_runs(stream_guard: StreamGuard) -> None:
    guarded = QwenGuardRunnable.around(chain_answering(PLANTED_SAFE_TEXT), stream_guard=stream_guard, on_violation="replace")

    async def chunks() -> list[Any]:
        return [c async for c in guarded.astream({"question": PLANTED_UNSAFE_PROMPT})]

    (refusal,) = asyncio.run(chunks())
    assert isinstance(refusal, AIMessageChunk) and refusal.content == DEFAULT_REFUSAL
    assert refusal.response_metadata[METADATA_KEY]["risk"] == RiskLevel.UNSAFE.value


def test_batch_keeps_each_input_with_its_own_answer(gen_guard: Any) -> None:
    spy = SpyGen(gen_guard)
    guarded = QwenGuardRunnable.around(chain_answering(SAFE_ANSWER, SAFE_ANSWER), gen_guard=spy)
    out = guarded.batch([{"question": SAFE_PROMPT}, {"question": UNSAFE_PROMPT}], return_exceptions=True)
    assert out[0].content == SAFE_ANSWER and isinstance(out[1], GuardViolation)
    assert [Message("user", SAFE_PROMPT), Message("assistant", SAFE_ANSWER)] in spy.seen


def test_without_a_stream_guard_the_streamed_answer_is_judged_whole(gen_guard: Any) -> None:
    guarded = QwenGuardRunnable.around(chain_answering(REFUSAL_ANSWER), gen_guard=gen_guard, prompt_check="off")
    assert [c.content for c in guarded.stream({"question": UNSAFE_PROMPT})] == [REFUSAL_ANSWER]


def test_around_rejects_a_prompt_role(gen_guard: Any) -> None:
    with pytest.raises(ValueError, match="around"):
        QwenGuardRunnable.around(chain_answering(SAFE_ANSWER), role="prompt", gen_guard=gen_guard)


def test_a_prompt_template_input_is_judged_with_every_text_it_holds(gen_guard: Any) -> None:
    from langchain_core.messages import HumanMessage

    spy = SpyGen(gen_guard)
    guard_in = QwenGuardRunnable(role="prompt", gen_guard=spy)
    # A MessagesPlaceholder history, a nested dict and a list of strings: no field passes unjudged.
    for value in ({"history": [HumanMessage(UNSAFE_PROMPT)], "k": 3}, {"ctx": {"docs": [UNSAFE_PROMPT]}, "top": None}):
        with pytest.raises(GuardViolation):
            guard_in.invoke(value)
    spy.seen.clear()
    mixed = {"question": SAFE_PROMPT, "history": [HumanMessage("earlier turn"), AIMessage("earlier answer")], "n": 2}
    try:  # an untrained text: only what the guard was asked is asserted, not its answer
        guard_in.invoke(mixed)
    except GuardViolation:
        pass
    (judged,) = spy.seen
    assert [m.content if isinstance(m, Message) else m["content"] for m in judged] == [
        f"{SAFE_PROMPT}\n\nearlier turn\n\nearlier answer"]
    with pytest.raises(ValueError, match="no text to moderate"):
        guard_in.invoke({"k": 3})


def test_a_blocked_prompt_is_replaced_by_text_when_the_chain_answers_text(stream_guard: StreamGuard) -> None:
    chain = chain_answering(PLANTED_SAFE_TEXT) | StrOutputParser()
    guarded = QwenGuardRunnable.around(chain, stream_guard=stream_guard, on_violation="replace")
    question = {"question": PLANTED_UNSAFE_PROMPT}
    assert (guarded | (lambda text: text.upper())).invoke(question) == DEFAULT_REFUSAL.upper()
    assert list(guarded.stream(question)) == [DEFAULT_REFUSAL]
    assert guarded.batch([question, question]) == [DEFAULT_REFUSAL, DEFAULT_REFUSAL]
    messages = QwenGuardRunnable.around(chain_answering(PLANTED_SAFE_TEXT), stream_guard=stream_guard, on_violation="replace")
    assert isinstance(messages.invoke(question), AIMessage), "a chat model's refusal stays a message"


def test_a_misspelt_option_is_an_error_not_a_silent_default(stream_guard: StreamGuard) -> None:
    with pytest.raises(ValueError, match="on_violations"):
        QwenGuardRunnable(stream_guard=stream_guard, on_violations="replace")


@pytest.mark.parametrize("answer, blocked", [(f'{{"answer": "{PLANTED_SAFE_TEXT}"}}', False),
                                             ('{"answer": "Sure, take a\\u0020pipe\\u0020bomb."}', True)], ids=["safe", "unsafe"])
def test_a_chain_with_structured_output_is_judged_by_what_it_says(stream_guard: StreamGuard, answer: str, blocked: bool) -> None:
    def guarded() -> QwenGuardRunnable:
        return QwenGuardRunnable.around(chain_answering(answer) | JsonOutputParser(), stream_guard=stream_guard)

    if blocked:
        with pytest.raises(GuardViolation):
            guarded().invoke({"question": PLANTED_SAFE_PROMPT})
        got, exc = collect(guarded().stream({"question": PLANTED_SAFE_PROMPT}))
        assert got == [] and isinstance(exc, GuardViolation), "a parsed stream is held until it is judged whole"
    else:
        assert guarded().invoke({"question": PLANTED_SAFE_PROMPT}) == {"answer": PLANTED_SAFE_TEXT}
        assert list(guarded().stream({"question": PLANTED_SAFE_PROMPT}))[-1] == {"answer": PLANTED_SAFE_TEXT}


class Answer(BaseModel):
    """A parsed answer (``with_structured_output``)."""

    text: str


def outputs(text: str) -> dict[str, Any]:
    """Chains whose output holds ``text`` inside a dict or list: a message, a parsed model, documents."""
    model = GenericFakeChatModel(messages=itertools.cycle([AIMessage(content=text)]))
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    return {"assign": RunnablePassthrough.assign(answer=prompt | model),
            "include-raw": RunnableLambda(lambda _: {"raw": AIMessage(""), "parsed": Answer(text=text), "parsing_error": None}),
            "documents": RunnableLambda(lambda _: [Document(text)])}


@pytest.mark.parametrize("name", ["assign", "include-raw", "documents"])
def test_messages_models_and_documents_in_a_chains_output_are_judged(stream_guard: StreamGuard, name: str) -> None:
    def guarded(text: str) -> QwenGuardRunnable:
        return QwenGuardRunnable.around(outputs(text)[name], stream_guard=stream_guard, prompt_check="off")

    question = {"question": PLANTED_SAFE_PROMPT}
    with pytest.raises(GuardViolation):
        guarded(UNSAFE_REPLY).invoke(question)
    got, exc = collect(guarded(UNSAFE_REPLY).stream(question))
    assert "pipe bomb" not in repr(got) and isinstance(exc, GuardViolation)
    got, exc = collect((outputs(UNSAFE_REPLY)[name] | QwenGuardRunnable(stream_guard=stream_guard)).stream(question))
    assert "pipe bomb" not in repr(got) and isinstance(exc, GuardViolation), "a step after the chain judges it the same"
    safe = guarded(PLANTED_SAFE_TEXT)
    assert safe.invoke(question) and list(safe.stream(question)), "a safe answer comes out"


@pytest.mark.parametrize("value", [[1, 2, 3], {}, [], [Document("")]], ids=["numbers", "empty-dict", "empty-list", "empty-document"])
def test_a_streamed_value_without_text_comes_out_as_on_invoke(stream_guard: StreamGuard, value: Any) -> None:
    chain = RunnableLambda(lambda _: value)
    assert QwenGuardRunnable.around(chain, stream_guard=stream_guard, prompt_check="off").invoke("q") == value
    assert list(QwenGuardRunnable.around(chain, stream_guard=stream_guard, prompt_check="off").stream("q")) == [value]
    assert list((chain | QwenGuardRunnable(stream_guard=stream_guard)).stream("q")) == [value]


@dataclass
class _Row:
    note: str


class _Tone(Enum):
    CALM = "a calm note"


_PARSE_ERROR = ValueError("bad JSON")  # one instance: exceptions compare by identity


def _values(text: str) -> dict[str, Any]:
    """Chain outputs holding values that are not JSON, each carrying ``text`` somewhere it is shown."""
    return {"include-raw-failed": {"raw": AIMessage(text), "parsed": None, "parsing_error": _PARSE_ERROR},
            "scalars": {"answer": text, "at": datetime.date(2026, 1, 2), "price": Decimal("9.50"), "id": uuid.UUID(int=1),
                        "blob": b"\x00", "tags": {"a"}, "tone": _Tone.CALM},
            "dataclass": {"row": _Row(text)},
            "scored-documents": [(Document(text), 0.83)],
            "pairs": [("What is X?", text)]}


@pytest.mark.parametrize("name", ["include-raw-failed", "scalars", "dataclass", "scored-documents", "pairs"])
def test_values_that_are_not_json_are_read_by_what_they_say(stream_guard: StreamGuard, name: str) -> None:
    """Dates, ids, prices, enums, a parser's error, dataclasses and (item, score) pairs sit in real chain
    outputs: each is read as text (``str()``), none refused, and the unsafe text among them is still judged."""
    def guarded(text: str) -> QwenGuardRunnable:
        return QwenGuardRunnable.around(RunnableLambda(lambda _: _values(text)[name]), stream_guard=stream_guard,
                                        prompt_check="off")

    assert guarded(PLANTED_SAFE_TEXT).invoke("q") == _values(PLANTED_SAFE_TEXT)[name]
    assert list(guarded(PLANTED_SAFE_TEXT).stream("q")) == [_values(PLANTED_SAFE_TEXT)[name]]
    with pytest.raises(GuardViolation):
        guarded(UNSAFE_REPLY).invoke("q")
    got, exc = collect(guarded(UNSAFE_REPLY).stream("q"))
    assert "pipe bomb" not in repr(got) and isinstance(exc, GuardViolation)
