"""Moderating conversations longer than the model's context, without cutting anything off.

Strategy (documented in the README): the moderated turn (the last message) is split on token
boundaries into windows that overlap by ``overlap`` tokens, so a harmful sentence is whole in at
least one window unless it is longer than the overlap. Each window is moderated together with as
much of the preceding conversation as fits in a quarter of the budget (the most recent text is
kept: it is what the last turn answers). The worst verdict over the windows wins; the refusal
flag comes from the first window, because refusals open a response.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from .gen_template import render_pieces
from .messages import Message
from .tokenization import TextTokenizer
from .types import Verdict


def _token_count(messages: Sequence[Message], tokens: TextTokenizer) -> int:
    return len(tokens.encode_pieces(render_pieces(messages)))


def _keep_tail(text: str, tokens: TextTokenizer, budget: int) -> str:
    ids, offsets = tokens.encode_with_offsets(text)
    if len(ids) <= budget:
        return text
    return text[offsets[len(ids) - budget][0] :] if budget > 0 else ""


class _TurnCost:
    """Tokens a context turn adds to a window: its text plus its role's share of the template.

    Measured per role against the template holding only the (empty) moderated turn, so a
    conversation of thousands of short turns costs only the turns a window keeps.
    """

    def __init__(self, tokens: TextTokenizer, last: Message) -> None:
        self.tokens, self.last = tokens, Message(last.role, "")
        self.base = _token_count([self.last], tokens)
        self._overhead: dict[str, int] = {}

    def overhead(self, role: str) -> int:
        if role not in self._overhead:
            self._overhead[role] = _token_count([Message(role, ""), self.last], self.tokens) - self.base
        return self._overhead[role]

    def __call__(self, message: Message) -> int:
        return len(self.tokens.encode_text(message.content)) + self.overhead(message.role)


def _fit_context(context: list[Message], cost: _TurnCost, budget: int) -> list[Message]:
    """The most recent part of the earlier turns that fits in ``budget`` tokens."""
    kept: list[Message] = []
    for message in reversed(context):
        size = cost(message)
        if size <= budget:
            kept.insert(0, message)
            budget -= size
            continue
        text_budget = budget - cost.overhead(message.role)
        if text_budget > 0 and message.role != "system":
            kept.insert(0, Message(message.role, _keep_tail(message.content, cost.tokens, text_budget)))
        break
    while kept and kept[0].role == "assistant" and len(kept) < len(context):
        kept.pop(0)
    return kept


def plan_windows(messages: list[Message], tokens: TextTokenizer, max_tokens: int, overlap: int) -> list[list[Message]]:
    """The conversations to moderate for ``messages``: itself when it fits, else overlapping windows."""
    if _token_count(messages, tokens) <= max_tokens:
        return [messages]
    last, context = messages[-1], messages[:-1]
    cost = _TurnCost(tokens, last)
    available = max_tokens - cost.base
    if available < 64:
        raise ValueError(f"the context window ({max_tokens} tokens) is too small for the moderation template")
    kept = _fit_context(context, cost, available // 4)
    width = available - sum(cost(m) for m in kept)
    ids, offsets = tokens.encode_with_offsets(last.content)
    while True:
        windows = _split(last, kept, ids, offsets, width, overlap)
        excess = max(_token_count(w, tokens) for w in windows) - max_tokens
        if excess <= 0:
            return windows
        width -= excess
        if width < 16:
            raise ValueError(f"the context window ({max_tokens} tokens) is too small for the moderation template")


def _split(last: Message, kept: list[Message], ids: list[int], offsets: list[tuple[int, int]], width: int, overlap: int) -> list[list[Message]]:
    """Windows of ``width`` tokens over the last message, each starting ``overlap`` tokens early.

    Tokens merged across a window edge re-tokenize slightly differently inside the template, which
    is why the caller re-measures every window and narrows ``width`` until all fit.
    """
    step = max(width - min(overlap, width // 4), 1)
    windows = []
    for start in range(0, len(ids), step):
        end = min(start + width, len(ids))
        windows.append([*kept, Message(last.role, last.content[offsets[start][0] : offsets[end - 1][1]])])
        if end == len(ids):
            break
    return windows


def worst_verdict(verdicts: Sequence[Verdict]) -> Verdict:
    """The verdict of the most severe window (errors count as worst), refusal from the first."""
    if len(verdicts) == 1:
        return verdicts[0]
    worst = max(verdicts, key=lambda v: (v.error is not None, v.risk.severity))
    categories = tuple(dict.fromkeys(c for v in verdicts if v.risk is worst.risk for c in v.categories))
    return replace(worst, categories=categories, refusal=verdicts[0].refusal, elapsed_s=sum(v.elapsed_s for v in verdicts))
