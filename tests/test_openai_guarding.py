"""guard_openai on the shared core: untrusted context, bad requests, remote Gen, the environment, review."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
import pytest
from gen_server import GenServer, load_gen_model, unused_url
from openai import AsyncOpenAI, OpenAI
from openai_fake_upstream import SAFE_PIECES, Script, chat_completion, chat_events, responses_body

from guard_core import Action, Policy, RemoteGenGuard, RiskLevel
from guard_core.review import ReviewQueue
from guard_core.testing.cases import CONTROVERSIAL_PROMPT, JAILBREAK_PROMPT, SAFE_ANSWER, SAFE_PROMPT, UNSAFE_ANSWER, UNSAFE_PROMPT
from guard_core.testing.stream_fixture import PLANTED_CONTROVERSIAL_TEXT, stream_checkpoint
from integrations.openai_proxy import DEFAULT_REFUSAL, UnsafeContentError, guard_openai

INJECTED = [{"role": "user", "content": SAFE_PROMPT},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "fetch", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": JAILBREAK_PROMPT}]
REVIEW = Policy(actions={RiskLevel.CONTROVERSIAL: Action.REVIEW})
#: The trained Controversial answer to CONTROVERSIAL_PROMPT (guard_core.testing.GEN_CASES).
CONTROVERSIAL_ANSWER = "You should vote for the party that bans the other one."


@pytest.fixture(scope="module")
def server(gen_dir: Path) -> Iterator[GenServer]:
    with GenServer(*load_gen_model(gen_dir)) as running:
        yield running


def test_an_injected_tool_result_is_judged_and_never_sent_upstream(upstream, bare, stream_guard, gen_guard) -> None:
    before = len(upstream.exchanges)
    client = guard_openai(bare, stream_guard=stream_guard, gen_guard=gen_guard)
    for stream in (False, True):
        with pytest.raises(UnsafeContentError) as info:
            client.chat.completions.create(model="fake-model", messages=INJECTED, stream=stream)
        assert info.value.decision.context_index == 0 and info.value.verdict.categories[0].value == "Jailbreak"
    items = [{"role": "user", "content": SAFE_PROMPT}, {"type": "function_call_output", "call_id": "c1", "output": JAILBREAK_PROMPT}]
    refused = guard_openai(bare, stream_guard=stream_guard, gen_guard=gen_guard, on_unsafe="rewrite").responses.create(
        model="fake-model", input=items)
    assert refused.output_text == DEFAULT_REFUSAL and refused.qwen3guard["prompt"]["context_index"] == 0
    assert len(upstream.exchanges) == before


async def test_an_unknown_role_is_a_clear_error_in_both_clients(upstream, stream_guard, gen_guard) -> None:
    before = len(upstream.exchanges)
    wizard = [{"role": "wizard", "content": UNSAFE_PROMPT}]
    with pytest.raises(ValueError, match="role 'wizard'"):
        guard_openai(OpenAI(base_url=upstream.base_url, api_key="k"), stream_guard=stream_guard, gen_guard=gen_guard).chat.completions.create(
            model="fake-model", messages=wizard)
    aclient = guard_openai(AsyncOpenAI(base_url=upstream.base_url, api_key="k"), stream_guard=stream_guard, gen_guard=gen_guard)
    with pytest.raises(ValueError, match="'stream' must be true or false"):
        await aclient.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}], stream="false")
    with pytest.raises(ValueError, match="'n' must be an int from 1 to 8"):
        await aclient.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}], n=2000)
    assert len(upstream.exchanges) == before


def test_a_remote_gen_guard_judges_prompts_and_whole_answers(upstream, bare, stream_guard, server) -> None:
    client = guard_openai(bare, stream_guard=stream_guard, gen_guard=RemoteGenGuard(server.base_url, model=server.model_name))
    with pytest.raises(UnsafeContentError):
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": UNSAFE_PROMPT}])
    upstream.push(Script(body=chat_completion([SAFE_ANSWER])))
    completion = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": SAFE_PROMPT}])
    assert completion.choices[0].message.content == SAFE_ANSWER
    assert completion.qwen3guard["choices"][0]["response"]["model"] == server.model_name


def test_the_environment_chooses_the_guards_and_fail_open(monkeypatch, upstream, bare, server) -> None:
    monkeypatch.setenv("QWEN3GUARD_GEN_URL", server.base_url)
    monkeypatch.setenv("QWEN3GUARD_GEN_MODEL", server.model_name)
    monkeypatch.setenv("QWEN3GUARD_STREAM_MODEL", str(stream_checkpoint("planted")))
    client = guard_openai(bare)
    with pytest.raises(UnsafeContentError):
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": UNSAFE_PROMPT}])
    assert isinstance(client.guard.moderator.gen_guard, RemoteGenGuard)

    monkeypatch.setenv("QWEN3GUARD_GEN_URL", unused_url())
    with pytest.raises(UnsafeContentError) as info:
        guard_openai(bare).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": SAFE_PROMPT}])
    assert info.value.verdict.error_kind == "unavailable", "fails closed by default"
    assert str(info.value).startswith("prompt not judged, so blocked (fail closed): guard unavailable")
    assert "QWEN3GUARD_FAIL_OPEN=1" in str(info.value) and "Unsafe" not in str(info.value)
    monkeypatch.setenv("QWEN3GUARD_FAIL_OPEN", "1")
    upstream.push(Script(events=chat_events(SAFE_PIECES)))
    streamed = guard_openai(bare).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": SAFE_PROMPT}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "".join(SAFE_PIECES)
    assert streamed.prompt_verdict is not None and streamed.prompt_verdict.error_kind == "unavailable"


def test_an_older_servers_reply_is_read_as_the_bare_client_reads_it(upstream, bare, stream_guard, gen_guard) -> None:
    old = {**responses_body(UNSAFE_ANSWER), "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}}
    upstream.push(Script(body=old), Script(body={**old, "output": responses_body(SAFE_ANSWER)["output"]}))
    rewrite = guard_openai(bare, stream_guard=stream_guard, gen_guard=gen_guard, on_unsafe="rewrite",
                           prompt_policy=Policy(category_actions={"Violent": Action.FLAG}))
    refused = rewrite.responses.create(model="fake-model", input=UNSAFE_PROMPT)
    assert refused.output_text == DEFAULT_REFUSAL and refused.usage.output_tokens == 2
    answer = rewrite.responses.create(model="fake-model", input=SAFE_PROMPT)
    assert answer.output_text == SAFE_ANSWER and answer.qwen3guard["response"]["action"] == "allow"


def test_controversial_content_passes_and_is_queued_for_review(tmp_path, upstream, bare, stream_guard, gen_guard) -> None:
    queue = ReviewQueue(tmp_path / "review.db")
    client = guard_openai(bare, stream_guard=stream_guard, gen_guard=gen_guard, policy=REVIEW, review=queue)
    upstream.push(Script(body=chat_completion([CONTROVERSIAL_ANSWER])))
    completion = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": CONTROVERSIAL_PROMPT}])
    assert completion.choices[0].message.content == CONTROVERSIAL_ANSWER, "reviewed content passes unchanged"
    prompt_review = completion.qwen3guard["prompt"]["review_id"]
    answer_review = completion.qwen3guard["choices"][0]["response"]["review_id"]
    assert [i.id for i in queue.list(status="pending")] == [prompt_review, answer_review]
    assert [queue.get(i).role for i in (prompt_review, answer_review)] == ["prompt", "response"]
    assert queue.get(prompt_review).source == "openai.client"

    pieces = ["They say it was a", " rigged", " election", ", but courts disagreed."]
    upstream.push(Script(events=chat_events(pieces)), Script(events=chat_events(pieces)))
    plain = list(bare.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": SAFE_PROMPT}], stream=True))
    guarded = list(client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": SAFE_PROMPT}], stream=True))
    text = lambda got: "".join(c.choices[0].delta.content or "" for c in got if c.choices)  # noqa: E731
    assert text(guarded) == text(plain) == "".join(pieces) and PLANTED_CONTROVERSIAL_TEXT.strip() in text(guarded)
    notes = [c.qwen3guard for c in guarded if getattr(c, "qwen3guard", None)]
    assert len(notes) == 1 and notes[0]["response"]["action"] == "review"
    pending = queue.list(status="pending")
    assert len(pending) == 3 and notes[0]["response"]["review_id"] == pending[-1].id and pending[-1].role == "response"
    assert pending[-1].content is None, "content is stored only when opted in"

