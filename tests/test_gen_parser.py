"""The answer parser follows the official regexes and fails closed on garbage."""

from __future__ import annotations

import pytest

from guard_core.gen_parser import parse_answer
from guard_core.types import Category, RiskLevel


def test_well_formed_prompt_answer() -> None:
    parsed = parse_answer("Safety: Unsafe\nCategories: Violent", response=False)
    assert (parsed.risk, parsed.categories, parsed.refusal) == (RiskLevel.UNSAFE, (Category.VIOLENT,), None)


def test_well_formed_response_answer_with_refusal() -> None:
    parsed = parse_answer("Safety: Safe\nCategories: None\nRefusal: Yes", response=True)
    assert (parsed.risk, parsed.categories, parsed.refusal) == (RiskLevel.SAFE, (), True)


def test_every_category_string_is_recognised_including_pii() -> None:
    for category in Category:
        parsed = parse_answer(f"Safety: Unsafe\nCategories: {category.value}", response=False)
        assert parsed.categories == (category,)


def test_non_violent_is_not_read_as_violent() -> None:
    parsed = parse_answer("Safety: Unsafe\nCategories: Non-violent Illegal Acts", response=False)
    assert parsed.categories == (Category.NON_VIOLENT_ILLEGAL_ACTS,)


def test_extra_lines_are_ignored() -> None:
    text = "Safety: Controversial\nCategories: Politically Sensitive Topics, PII\nRefusal: No\nNote: Violent words below"
    parsed = parse_answer(text, response=False)
    assert parsed.risk is RiskLevel.CONTROVERSIAL
    assert parsed.categories == (Category.POLITICALLY_SENSITIVE, Category.PII)


def test_jailbreak_is_dropped_in_response_mode() -> None:
    parsed = parse_answer("Safety: Unsafe\nCategories: Jailbreak, Violent\nRefusal: No", response=True)
    assert parsed.categories == (Category.VIOLENT,)
    assert parsed.refusal is False


def test_truncated_answer_keeps_what_was_written() -> None:
    parsed = parse_answer("Safety: Unsafe\nCategor", response=True)
    assert parsed.ok and parsed.risk is RiskLevel.UNSAFE
    assert parsed.categories == () and parsed.refusal is None


@pytest.mark.parametrize("garbage", ["", "\n\n\n", "safety: unsafe", "I cannot judge this.", "Safety: Dangerous\nCategories: Violent"])
def test_garbage_is_a_parse_failure(garbage: str) -> None:
    assert not parse_answer(garbage, response=False).ok
