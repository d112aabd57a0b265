"""Parsing Qwen3Guard-Gen's text answer.

Follows the official README regexes (PII included, case-sensitive, ``findall`` over the output)
but reads categories from the ``Categories:`` line only, so a category word elsewhere in a
rambling answer cannot sneak in, and tolerates extra lines (the 8B model sometimes adds a
``Refusal:`` line in prompt mode). An answer without a ``Safety:`` line is a parse failure, which
``Verdict.error`` reports and ``Policy.on_error`` turns into a decision (fail closed by default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .types import Category, RiskLevel

SAFETY_PATTERN = re.compile(r"Safety: (Safe|Unsafe|Controversial)")
CATEGORY_PATTERN = re.compile(
    r"(Violent|Non-violent Illegal Acts|Sexual Content or Sexual Acts|PII|Suicide & Self-Harm|Unethical Acts"
    r"|Politically Sensitive Topics|Copyright Violation|Jailbreak|None)"
)
REFUSAL_PATTERN = re.compile(r"Refusal: (Yes|No)")
_CATEGORIES_LINE = re.compile(r"^Categories:(.*)$", re.MULTILINE)


@dataclass(frozen=True)
class ParsedAnswer:
    """What a Gen answer says; ``risk`` is None when the answer has no ``Safety:`` line."""

    risk: RiskLevel | None
    categories: tuple[Category, ...]
    refusal: bool | None

    @property
    def ok(self) -> bool:
        """True when a safety label was found."""
        return self.risk is not None


def parse_answer(text: str, *, response: bool) -> ParsedAnswer:
    """Parse a Gen answer; ``response`` selects response mode (Jailbreak ignored, refusal read)."""
    safety = SAFETY_PATTERN.search(text)
    risk = RiskLevel(safety.group(1)) if safety else None
    line = _CATEGORIES_LINE.search(text)
    found = CATEGORY_PATTERN.findall(line.group(1)) if line else []
    categories: list[Category] = []
    for name in found:
        if name == "None":
            continue
        category = Category(name)
        if (response and category.prompt_only) or category in categories:
            continue
        categories.append(category)
    refusal = None
    if response:
        match = REFUSAL_PATTERN.search(text)
        refusal = None if match is None else match.group(1) == "Yes"
    if risk is RiskLevel.SAFE:
        categories = []
    return ParsedAnswer(risk, tuple(categories), refusal)
