"""The moderation core (guard_core.Moderator) on the offline checkpoints: one rule set for every adapter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gen_server import GenServer, load_gen_model, unused_url

from guard_core import CONFIGURED, Action, Category, GenGuard, Moderator, Policy, RemoteGenGuard, RiskLevel, Settings
from guard_core.conversation import from_messages, from_text
from guard_core.stream import StreamGuard
from guard_core.testing.cases import (
    CONTROVERSIAL_PROMPT,
    JAILBREAK_PROMPT,
    REFUSAL_ANSWER,
    SAFE_ANSWER,
    SAFE_PROMPT,
    UNSAFE_ANSWER,
    UNSAFE_PROMPT,
)
from guard_core.testing.stream_fixture import PLANTED_CONTROVERSIAL_TEXT, PLANTED_UNSAFE_PROMPT

TOOL_INJECTION = [{"role": "user", "content": SAFE_PROMPT}, {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]},
                  {"role": "tool", "content": JAILBREAK_PROMPT}]


class CountingGen:
    """A GenBackend that records every conversation it is asked to judge (and judges with the real guard)."""

    def __init__(self, guard: GenGuard) -> None:
        self.guard, self.seen = guard, []  # type: ignore[var-annotated]
        self.model_id = guard.model_id

    def moderate(self, messages: Any) -> Any:
        return self.moderate_batch([messages])[0]

    def moderate_batch(self, conversations: Any) -> Any:
        batch = [list(c) for c in conversations]
        self.seen += batch
        return self.guard.moderate_batch(batch)

    async def amoderate(self, messages: Any) -> Any:
        return self.moderate(messages)

    async def amoderate_batch(self, conversations: Any) -> Any:
        return self.moderate_batch(conversations)


@pytest.fixture(scope="module")
def server(gen_dir: Path) -> Iterator[GenServer]:
    with GenServer(*load_gen_model(gen_dir)) as running:
        yield running


def test_the_prompt_checker_is_gen_when_configured_else_the_stream_heads(gen_guard: GenGuard, stream_guard: StreamGuard) -> None:
    both = Moderator(gen_guard=gen_guard, stream_guard=stream_guard)
    decision = both.check_prompt(from_text(UNSAFE_PROMPT)).decision
    assert decision is not None and decision.blocked and decision.verdict.model == gen_guard.model_id
    stream_only = Moderator(stream_guard=stream_guard)
    result = stream_only.check_prompt(from_text(PLANTED_UNSAFE_PROMPT), keep_gate=True)
    assert result.decision.blocked and result.gate is None, "a blocked prompt's gate is closed at once"  # type: ignore[union-attr]
    kept = stream_only.check_prompt(from_text(SAFE_PROMPT), keep_gate=True)
    assert kept.decision.action is Action.ALLOW and kept.gate is not None  # type: ignore[union-attr]
    assert kept.gate.push("Preheat the oven.") + kept.gate.finish() == "Preheat the oven."
    kept.gate.close()
    assert Moderator(gen_guard=gen_guard, prompt_check="off").check_prompt(from_text(UNSAFE_PROMPT)).decision is None


def test_a_tool_result_with_an_injection_is_judged_as_untrusted_context(gen_guard: GenGuard) -> None:
    counting = CountingGen(gen_guard)
    moderator = Moderator(gen_guard=counting)
    decision = moderator.check_prompt(from_messages(TOOL_INJECTION)).decision
    assert decision is not None and decision.blocked and decision.context_index == 0
    assert decision.verdict.categories == (Category.JAILBREAK,)
    assert [m.content for m in counting.seen[-1]] == [JAILBREAK_PROMPT], "judged on its own, as a prompt"
    seen = len(counting.seen)
    again = asyncio.run(moderator.acheck_prompt(from_messages(TOOL_INJECTION))).decision
    assert again == decision and len(counting.seen) == seen + 1, "the context verdict comes from the cache"


def test_context_is_judged_one_text_at_a_time_in_one_batch(gen_guard: GenGuard, stream_guard: StreamGuard) -> None:
    counting = CountingGen(gen_guard)
    decisions = Moderator(gen_guard=counting).check_context([SAFE_PROMPT, JAILBREAK_PROMPT, SAFE_PROMPT])
    assert [d.action for d in decisions] == [Action.ALLOW, Action.BLOCK, Action.ALLOW]
    assert [d.context_index for d in decisions] == [0, 1, 2] and len(counting.seen) == 2
    stream_decisions = Moderator(stream_guard=stream_guard).check_context(["Fine text.", PLANTED_UNSAFE_PROMPT])
    assert [d.action for d in stream_decisions] == [Action.ALLOW, Action.BLOCK]


def test_whole_answers_go_to_gen_with_the_question_else_through_a_stream_gate(gen_guard: GenGuard, stream_guard: StreamGuard) -> None:
    counting = CountingGen(gen_guard)
    moderator = Moderator(gen_guard=counting, stream_guard=stream_guard)
    unsafe, empty, refusal = moderator.check_answers(from_text(UNSAFE_PROMPT), [UNSAFE_ANSWER, " ", REFUSAL_ANSWER])
    assert unsafe.blocked and empty is None and refusal.action is Action.ALLOW and refusal.verdict.refusal is True  # type: ignore[union-attr]
    assert [m.content for m in counting.seen[0]] == [UNSAFE_PROMPT, UNSAFE_ANSWER], "the question is in view"
    streamed = Moderator(stream_guard=stream_guard).check_answers(from_text(SAFE_PROMPT), ["Take a pipe bomb now.", SAFE_ANSWER])
    assert [d.action for d in streamed] == [Action.BLOCK, Action.ALLOW]  # type: ignore[union-attr]
    again = asyncio.run(moderator.acheck_answers(from_text(UNSAFE_PROMPT), [UNSAFE_ANSWER]))[0]
    assert (again.action, again.verdict.categories) == (unsafe.action, unsafe.verdict.categories)  # type: ignore[union-attr]


def test_a_streamed_answer_blocks_only_through_its_gate_and_flags_what_it_let_through(stream_guard: StreamGuard) -> None:
    moderator = Moderator(stream_guard=stream_guard, policy=Policy.loose())
    gate = moderator.open_gate(from_text(SAFE_PROMPT))
    gate.push(f"That is a{PLANTED_CONTROVERSIAL_TEXT} story.")
    gate.finish()
    decision = moderator.stream_decision(gate, from_text(SAFE_PROMPT))
    assert decision.action is Action.ALLOW and decision.verdict.risk is RiskLevel.CONTROVERSIAL
    strict = Moderator(stream_guard=stream_guard, policy=Policy(actions={RiskLevel.CONTROVERSIAL: Action.FLAG}))
    gate = strict.open_gate(from_text(SAFE_PROMPT), holdback_tokens=0)
    assert gate.push(f"That is a{PLANTED_CONTROVERSIAL_TEXT} story.") + gate.finish() == f"That is a{PLANTED_CONTROVERSIAL_TEXT} story."
    assert strict.stream_decision(gate, from_text(SAFE_PROMPT)).action is Action.FLAG
    gate = strict.open_gate(from_text(SAFE_PROMPT))
    gate.push("Take a pipe bomb now.")
    assert gate.blocked and asyncio.run(strict.astream_decision(gate, from_text(SAFE_PROMPT))).blocked


def test_a_remote_gen_guard_is_a_gen_guard_like_any_other(server: GenServer) -> None:
    remote = RemoteGenGuard(server.base_url, model=server.model_name)
    moderator = Moderator(gen_guard=remote)
    assert moderator.check_prompt(from_text(UNSAFE_PROMPT)).decision.blocked  # type: ignore[union-attr]
    assert moderator.check_prompt(from_messages(TOOL_INJECTION)).decision.context_index == 0  # type: ignore[union-attr]
    assert not Moderator(gen_guard=server.base_url, settings=Settings(gen_model=server.model_name)).check_prompt(
        from_text(SAFE_PROMPT)).decision.blocked  # type: ignore[union-attr]


def test_fail_open_opens_only_for_an_unavailable_guard(monkeypatch: pytest.MonkeyPatch, server: GenServer) -> None:
    monkeypatch.setenv("QWEN3GUARD_FAIL_OPEN", "1")
    down = Moderator(gen_guard=RemoteGenGuard(unused_url(), model="m", timeout=2))
    decision = down.check_prompt(from_text(UNSAFE_PROMPT)).decision
    assert decision.action is Action.ALLOW and decision.verdict.error_kind == "unavailable"  # type: ignore[union-attr]
    server.fail_next(1, "400")
    rejected = Moderator(gen_guard=RemoteGenGuard(server.base_url, model=server.model_name)).check_prompt(from_text(SAFE_PROMPT))
    assert rejected.decision.blocked and rejected.decision.verdict.error_kind == "rejected"  # type: ignore[union-attr]
    monkeypatch.delenv("QWEN3GUARD_FAIL_OPEN")
    assert Moderator(gen_guard=RemoteGenGuard(unused_url(), model="m", timeout=2)).check_prompt(from_text(SAFE_PROMPT)).decision.blocked  # type: ignore[union-attr]


def test_guards_given_by_name_load_on_first_use_and_configured_reads_the_environment(
        monkeypatch: pytest.MonkeyPatch, gen_dir: Path) -> None:
    lazy = Moderator(gen_guard=str(gen_dir))
    assert lazy.has_gen and not lazy.has_stream and isinstance(lazy._gen, str)
    assert lazy.check_prompt(from_text(CONTROVERSIAL_PROMPT)).decision.verdict.risk is RiskLevel.CONTROVERSIAL  # type: ignore[union-attr]
    assert isinstance(lazy.gen_guard, GenGuard)
    monkeypatch.setenv("QWEN3GUARD_GEN_MODEL", str(gen_dir))
    assert Moderator(gen_guard=CONFIGURED).check_prompt(from_text(SAFE_PROMPT)).decision.action is Action.ALLOW  # type: ignore[union-attr]


def test_bad_settings_fail_at_construction(gen_guard: GenGuard) -> None:
    with pytest.raises(ValueError, match="gen_guard, a stream_guard"):
        Moderator()
    with pytest.raises(ValueError, match="needs a stream_guard"):
        Moderator(gen_guard=gen_guard, prompt_check="stream")
    with pytest.raises(ValueError, match="holdback_tokens"):
        Moderator(gen_guard=gen_guard, holdback_tokens=-1)
    with pytest.raises(ValueError, match="review queue"):
        Moderator(gen_guard=gen_guard, policy=Policy(actions={RiskLevel.CONTROVERSIAL: Action.REVIEW}), review=None)
    with pytest.raises(TypeError, match="Gen guard"):
        Moderator(gen_guard=42)
    with pytest.raises(TypeError, match="Policy"):
        Moderator(gen_guard=gen_guard, policy="strict")  # type: ignore[arg-type]


def test_the_public_checks_refuse_what_they_would_misread(gen_guard: GenGuard, tmp_path: Path) -> None:
    moderator = Moderator(gen_guard=gen_guard)
    with pytest.raises(TypeError, match="texts must be a list of strings, got str; wrap one text in a list"):
        moderator.check_context(JAILBREAK_PROMPT)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="texts must be a list of strings, got str"):
        asyncio.run(moderator.acheck_answers(from_text(SAFE_PROMPT), SAFE_ANSWER))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[1\] must be a string, got int"):
        moderator.check_context([SAFE_PROMPT, 5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="texts must be a list of strings, got dict"):
        moderator.check_context({"doc": JAILBREAK_PROMPT})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="build one with from_messages"):
        moderator.check_prompt([{"role": "user", "content": SAFE_PROMPT}])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="build one with from_messages"):
        moderator.stream_decision(None, [{"role": "user", "content": SAFE_PROMPT}])  # type: ignore[arg-type]


def test_keys_in_the_environment_that_nothing_here_sends_are_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A placeholder ``OPENAI_API_KEY`` ("sk-…") is the app's business: only the proxy, which sends it, checks it."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-\u2026")
    monkeypatch.setenv("QWEN3GUARD_PROXY_KEYS", "cl\u00e9")
    assert Moderator(gen_guard=None, stream_guard="Qwen/Qwen3Guard-Stream-0.6B").has_stream
    with pytest.raises(ValueError, match=r"^QWEN3GUARD_UPSTREAM_API_KEY \(or OPENAI_API_KEY\) has a character that is not"):
        Settings.from_env().check_keys()  # the proxy's check, before it sends the key upstream


def test_a_stream_server_url_from_the_environment_is_refused_when_the_moderator_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN3GUARD_STREAM_MODEL", "http://127.0.0.1:8000/v1")
    with pytest.raises(ValueError, match="no server form"):
        Moderator(gen_guard=None, stream_guard=CONFIGURED)


def test_review_takes_a_database_path_like_the_environment(gen_guard: GenGuard, tmp_path: Path) -> None:
    reviewing = Policy(actions={RiskLevel.CONTROVERSIAL: Action.REVIEW})
    moderator = Moderator(gen_guard=gen_guard, policy=reviewing, review=str(tmp_path / "review.db"))
    decision = moderator.check_prompt(from_text(CONTROVERSIAL_PROMPT)).decision
    assert decision is not None and decision.action is Action.REVIEW and moderator.review.get(decision.review_id) is not None
    with pytest.raises(TypeError, match="review must be a guard_core.review.ReviewQueue, a database path or URL"):
        Moderator(gen_guard=gen_guard, review=True)
