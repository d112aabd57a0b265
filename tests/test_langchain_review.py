"""Action.REVIEW through the LangChain callback handlers and QwenGuardRunnable: Controversial
content passes unchanged, one pending review item is written, and its id travels with the result."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage

from langchain_helpers import Recorder
from guard_core import Action, Policy, RiskLevel
from guard_core.review import ReviewItem, ReviewQueue
from guard_core.stream import StreamGuard
from guard_core.testing.cases import CONTROVERSIAL_PROMPT
from guard_core.testing.stream_fixture import PLANTED_CONTROVERSIAL_TEXT, PLANTED_SAFE_PROMPT, PLANTED_SAFE_TEXT
from integrations.langchain import METADATA_KEY, AsyncQwenGuardCallbackHandler, QwenGuardCallbackHandler, QwenGuardRunnable

REVIEW_CONTROVERSIAL = Policy(actions={RiskLevel.CONTROVERSIAL: Action.REVIEW})
#: An answer whose planted tokens the Stream fixture labels Controversial (two in a row: not a near miss).
CONTROVERSIAL_ANSWER = "Some say it was a" + PLANTED_CONTROVERSIAL_TEXT + ", others disagree."


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[ReviewQueue]:
    with ReviewQueue(tmp_path / "review.db") as opened:
        yield opened


def model(text: str) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(content=text)]))


def the_one_pending(queue: ReviewQueue, role: str, source: str) -> ReviewItem:
    (item,) = queue.list(status="pending")
    assert (item.role, item.risk, item.source) == (role, RiskLevel.CONTROVERSIAL, source)
    assert item.content is None  # not opted in
    return item


def test_callback_sends_a_controversial_prompt_to_review(stream_guard: StreamGuard, gen_guard: Any, queue: ReviewQueue) -> None:
    recorder = Recorder()
    handler = QwenGuardCallbackHandler(stream_guard, gen_guard, policy=REVIEW_CONTROVERSIAL, review=queue)
    chunks = list(model(PLANTED_SAFE_TEXT).stream(CONTROVERSIAL_PROMPT, config={"callbacks": [handler, recorder]}))
    assert "".join(c.content for c in chunks) == PLANTED_SAFE_TEXT
    item = the_one_pending(queue, "prompt", "langchain.callback")
    assert [(e["role"], e["action"], e["review_id"]) for e in recorder.events] == [
        ("prompt", "review", item.id), ("response", "allow", None)]
    assert recorder.events[0]["run_id"] == item.request_id


def test_async_callback_sends_a_controversial_streamed_answer_to_review(stream_guard: StreamGuard, queue: ReviewQueue) -> None:
    recorder = Recorder()
    handler = AsyncQwenGuardCallbackHandler(stream_guard, policy=REVIEW_CONTROVERSIAL, review=queue)

    async def stream() -> str:
        config = {"callbacks": [handler, recorder]}
        return "".join([c.content async for c in model(CONTROVERSIAL_ANSWER).astream(PLANTED_SAFE_PROMPT, config=config)])

    assert asyncio.run(stream()) == CONTROVERSIAL_ANSWER
    review_id = the_one_pending(queue, "response", "langchain.callback").id
    assert [(e["role"], e["action"], e["review_id"]) for e in recorder.events] == [
        ("prompt", "allow", None), ("response", "review", review_id)]
    assert handler.active_runs == 0


def test_runnable_sends_a_controversial_prompt_to_review(gen_guard: Any, queue: ReviewQueue) -> None:
    guard_in = QwenGuardRunnable(role="prompt", gen_guard=gen_guard, policy=REVIEW_CONTROVERSIAL, review=queue)
    out = guard_in.invoke(HumanMessage(content=CONTROVERSIAL_PROMPT))
    assert out.content == CONTROVERSIAL_PROMPT
    review_id = the_one_pending(queue, "prompt", "langchain.runnable").id
    assert out.response_metadata[METADATA_KEY]["action"] == "review"
    assert out.response_metadata[METADATA_KEY]["review_id"] == review_id


def test_runnable_sends_a_controversial_streamed_answer_to_review(stream_guard: StreamGuard, queue: ReviewQueue) -> None:
    guard_out = QwenGuardRunnable(stream_guard=stream_guard, policy=REVIEW_CONTROVERSIAL, review=queue)
    plain = [c.content for c in model(CONTROVERSIAL_ANSWER).stream(PLANTED_SAFE_PROMPT)]
    chunks = list((model(CONTROVERSIAL_ANSWER) | guard_out).stream(PLANTED_SAFE_PROMPT))
    assert [c.content for c in chunks[:-1]] == plain
    review_id = the_one_pending(queue, "response", "langchain.runnable").id
    joined = sum(chunks[1:], chunks[0])
    assert joined.content == CONTROVERSIAL_ANSWER
    assert joined.response_metadata[METADATA_KEY]["review_id"] == review_id
    assert chunks[-1].content == "" and chunks[-1].response_metadata[METADATA_KEY]["action"] == "review"


def test_a_policy_that_reviews_needs_a_queue(stream_guard: StreamGuard, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWEN3GUARD_REVIEW_DB", raising=False)
    with pytest.raises(ValueError, match="review queue"):
        QwenGuardCallbackHandler(stream_guard, policy=REVIEW_CONTROVERSIAL)
    with pytest.raises(ValueError, match="review queue"):
        QwenGuardRunnable(stream_guard=stream_guard, policy=REVIEW_CONTROVERSIAL)
