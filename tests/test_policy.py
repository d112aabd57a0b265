"""Policy decisions: strict/loose, thresholds, per-category overrides and failing closed."""

from __future__ import annotations

import pytest

from guard_core import Action, Category, Mode, Policy, RiskLevel, Verdict


def verdict(risk: RiskLevel, *cats: Category, probs: dict[RiskLevel, float] | None = None, error: str | None = None,
            error_kind: str | None = None) -> Verdict:
    return Verdict(risk, tuple(cats), probabilities=probs or {}, error=error, error_kind=error_kind)  # type: ignore[arg-type]


def test_strict_blocks_controversial_and_loose_allows_it() -> None:
    controversial = verdict(RiskLevel.CONTROVERSIAL, Category.POLITICALLY_SENSITIVE)
    assert Policy.strict().blocks(controversial)
    assert not Policy.loose().blocks(controversial)
    assert Policy.strict().effective_level(controversial) is RiskLevel.UNSAFE
    assert Policy.loose().effective_level(controversial) is RiskLevel.SAFE


def test_unsafe_is_blocked_and_safe_allowed_in_both_modes() -> None:
    for policy in (Policy.strict(), Policy.loose()):
        assert policy.action_for(verdict(RiskLevel.UNSAFE, Category.VIOLENT)) is Action.BLOCK
        assert policy.action_for(verdict(RiskLevel.SAFE)) is Action.ALLOW


def test_controversial_can_be_flagged_instead_of_blocked() -> None:
    policy = Policy(actions={RiskLevel.CONTROVERSIAL: Action.FLAG})
    assert policy.action_for(verdict(RiskLevel.CONTROVERSIAL, Category.PII)) is Action.FLAG


def test_threshold_decides_from_probabilities() -> None:
    policy = Policy(mode=Mode.LOOSE, unsafe_threshold=0.9)
    unsure = verdict(RiskLevel.UNSAFE, Category.VIOLENT, probs={RiskLevel.SAFE: 0.3, RiskLevel.CONTROVERSIAL: 0.1, RiskLevel.UNSAFE: 0.6})
    sure = verdict(RiskLevel.SAFE, probs={RiskLevel.SAFE: 0.05, RiskLevel.CONTROVERSIAL: 0.0, RiskLevel.UNSAFE: 0.95})
    assert policy.model_level(unsure) is RiskLevel.SAFE and not policy.blocks(unsure)
    assert policy.model_level(sure) is RiskLevel.UNSAFE and policy.blocks(sure)


def test_threshold_is_ignored_without_probabilities() -> None:
    assert Policy(unsafe_threshold=0.99).blocks(verdict(RiskLevel.UNSAFE, Category.VIOLENT))


def test_category_overrides_win_and_the_strictest_applies() -> None:
    policy = Policy(category_actions={Category.POLITICALLY_SENSITIVE: Action.ALLOW, Category.JAILBREAK: Action.BLOCK})
    assert not policy.blocks(verdict(RiskLevel.UNSAFE, Category.POLITICALLY_SENSITIVE))
    assert policy.blocks(verdict(RiskLevel.UNSAFE, Category.POLITICALLY_SENSITIVE, Category.JAILBREAK))
    assert Policy.loose().with_overrides(category_actions={Category.PII: "block"}).blocks(verdict(RiskLevel.CONTROVERSIAL, Category.PII))


def test_an_override_on_one_category_does_not_let_another_category_through() -> None:
    violent_and_political = verdict(RiskLevel.UNSAFE, Category.VIOLENT, Category.POLITICALLY_SENSITIVE)
    assert Policy(category_actions={Category.POLITICALLY_SENSITIVE: Action.ALLOW}).blocks(violent_and_political)
    flag_politics = Policy(actions={RiskLevel.UNSAFE: Action.BLOCK}, category_actions={Category.POLITICALLY_SENSITIVE: Action.FLAG})
    assert flag_politics.action_for(violent_and_political) is Action.BLOCK
    review_politics = Policy(mode="loose", category_actions={Category.POLITICALLY_SENSITIVE: Action.REVIEW})
    assert review_politics.action_for(verdict(RiskLevel.CONTROVERSIAL, Category.PII, Category.POLITICALLY_SENSITIVE)) is Action.REVIEW


def test_errors_fail_closed_by_default_and_open_only_for_an_unavailable_guard() -> None:
    down = verdict(RiskLevel.UNSAFE, error="guard unavailable: connection refused", error_kind="unavailable")
    assert Policy().blocks(down)
    assert not Policy(on_error=RiskLevel.SAFE).blocks(down)
    for kind in ("rejected", "unparseable"):
        refused = verdict(RiskLevel.SAFE, error=f"{kind} input", error_kind=kind)
        assert Policy(on_error=RiskLevel.SAFE).blocks(refused), kind


def test_bad_threshold_is_rejected() -> None:
    with pytest.raises(ValueError, match="unsafe_threshold"):
        Policy(unsafe_threshold=1.5)
    with pytest.raises(ValueError):
        Policy(mode="lenient")  # type: ignore[arg-type]


@pytest.mark.parametrize(("options", "error", "reason"), [
    ({"unsafe_threshold": "0.5"}, TypeError, "must be a number"),
    ({"unsafe_threshold": True}, TypeError, "must be a number"),
    ({"mode": "medium"}, ValueError, "mode 'medium' is not one of 'strict', 'loose'"),
    ({"on_error": "safe"}, ValueError, "on_error 'safe' is not one of 'Safe'"),
    ({"actions": {"Bad": "block"}}, ValueError, "actions key 'Bad'"),
    ({"category_actions": {"Violent": "nuke"}}, ValueError, "action 'nuke' is not one of 'allow'"),
    ({"actions": [("Unsafe", "block")]}, TypeError, "actions must be a dict"),
])
def test_every_field_is_checked_when_the_policy_is_built(options: dict, error: type, reason: str) -> None:
    with pytest.raises(error, match=reason):
        Policy(**options)


def test_values_are_taken_by_their_names_too() -> None:
    policy = Policy(mode="loose", on_error="Safe", actions={"Controversial": "review"}, category_actions={"Violent": "flag"})
    assert (policy.mode, policy.on_error, policy.actions[RiskLevel.CONTROVERSIAL]) == (Mode.LOOSE, RiskLevel.SAFE, Action.REVIEW)
    assert policy.category_actions == {Category.VIOLENT: Action.FLAG}


@pytest.mark.parametrize("given", [None, {"risk": "Unsafe"}, "Unsafe"], ids=["none", "dict", "str"])
def test_deciding_on_something_that_is_not_a_verdict_is_a_type_error(given: object) -> None:
    for decide in (Policy().blocks, Policy().action_for, Policy().effective_level):
        with pytest.raises(TypeError, match="a Policy decides on a guard_core.Verdict, got"):
            decide(given)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["Unsafe", "unsafe", " UNSAFE "])
def test_a_verdict_takes_its_risk_by_name_in_any_case(name: str) -> None:
    verdict = Verdict(name)  # type: ignore[arg-type]  # a custom GenBackend building verdicts from its model's text
    assert verdict.risk is RiskLevel.UNSAFE and Policy().blocks(verdict)


@pytest.mark.parametrize(("risk", "error", "reason"), [
    ("harmful", ValueError, "Verdict.risk 'harmful' is not one of 'Safe', 'Controversial', 'Unsafe'"),
    (None, TypeError, "Verdict.risk must be a guard_core.RiskLevel or its name, got NoneType None"),
    (2, TypeError, "Verdict.risk must be a guard_core.RiskLevel or its name, got int 2"),
])
def test_a_verdict_with_no_risk_level_is_refused_when_built(risk: object, error: type, reason: str) -> None:
    with pytest.raises(error, match=reason.replace("(", r"\(")):
        Verdict(risk)  # type: ignore[arg-type]
