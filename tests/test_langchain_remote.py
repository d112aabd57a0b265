"""The LangChain callback handlers and QwenGuardRunnable with Gen served over HTTP (a real local vLLM-like server)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from gen_server import GenServer, load_gen_model
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.prompts import ChatPromptTemplate

from guard_core import Category, GuardViolation, RemoteGenGuard
from guard_core.testing.cases import REFUSAL_ANSWER, SAFE_ANSWER, SAFE_PROMPT, UNSAFE_ANSWER, UNSAFE_PROMPT
from integrations.langchain import AsyncQwenGuardCallbackHandler, QwenGuardCallbackHandler, QwenGuardRunnable


@pytest.fixture(scope="module")
def server(gen_dir: Path) -> Iterator[GenServer]:
    with GenServer(*load_gen_model(gen_dir)) as running:
        yield running


def model(text: str) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(content=text)]))


def test_callback_with_a_remote_guard_judges_prompt_and_answer(server: GenServer) -> None:
    remote = RemoteGenGuard(server.base_url, model=server.model_name)
    handler = QwenGuardCallbackHandler(gen_guard=remote)
    with pytest.raises(GuardViolation) as blocked_prompt:
        model(SAFE_ANSWER).invoke(UNSAFE_PROMPT, config={"callbacks": [handler]})
    assert blocked_prompt.value.verdict.role == "prompt" and blocked_prompt.value.verdict.model == server.model_name
    assert model(SAFE_ANSWER).invoke(SAFE_PROMPT, config={"callbacks": [handler]}).content == SAFE_ANSWER
    answers_only = AsyncQwenGuardCallbackHandler(gen_guard=remote, prompt_check="off")
    with pytest.raises(GuardViolation) as blocked_answer:
        asyncio.run(model(UNSAFE_ANSWER).ainvoke(UNSAFE_PROMPT, config={"callbacks": [answers_only]}))
    assert blocked_answer.value.verdict.role == "response" and blocked_answer.value.verdict.categories == (Category.VIOLENT,)


def test_runnable_with_a_server_url_guards_the_input_and_the_chain(server: GenServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWEN3GUARD_GEN_MODEL", raising=False)  # the served name is discovered
    guard_in = QwenGuardRunnable(role="prompt", gen_guard=server.base_url)
    with pytest.raises(GuardViolation) as blocked:
        guard_in.invoke({"question": UNSAFE_PROMPT})
    assert blocked.value.verdict.model == server.model_name
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | model(REFUSAL_ANSWER)
    guarded = QwenGuardRunnable.around(chain, gen_guard=RemoteGenGuard(server.base_url), prompt_check="off")
    assert asyncio.run(guarded.ainvoke({"question": UNSAFE_PROMPT})).content == REFUSAL_ANSWER
