"""Value types shared by every guard backend and adapter.

They are plain frozen dataclasses and string enums so that verdicts can be logged, compared,
serialised to JSON (``Verdict.to_dict``) and attached to LangChain / LlamaIndex / OpenAI objects
without dragging torch along.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Mapping

Role = Literal["prompt", "response"]
#: Why no judgement was made: the guard could not be reached or loaded (the only failure a
#: fail-open policy may let through), the guard refused the input itself (too long for the
#: server's context), or the model's answer could not be read.
ErrorKind = Literal["unavailable", "rejected", "unparseable"]


class RiskLevel(str, Enum):
    """Qwen3Guard's three safety levels, spelled exactly as the models print them."""

    SAFE = "Safe"
    CONTROVERSIAL = "Controversial"
    UNSAFE = "Unsafe"

    @property
    def severity(self) -> int:
        """Order used to pick the worst of several verdicts (Safe < Controversial < Unsafe)."""
        return _SEVERITY[self]


_SEVERITY = {RiskLevel.SAFE: 0, RiskLevel.CONTROVERSIAL: 1, RiskLevel.UNSAFE: 2}
_BY_NAME = {level.value.lower(): level for level in RiskLevel}


def _risk_level(value: object) -> RiskLevel:
    """A level's name, in any case, as the ``RiskLevel``; else ``TypeError`` / ``ValueError``."""
    if not isinstance(value, str):
        raise TypeError(f"Verdict.risk must be a guard_core.RiskLevel or its name, got {type(value).__name__} {value!r}")
    level = _BY_NAME.get(value.strip().lower())
    if level is None:
        raise ValueError(f"Verdict.risk {value!r} is not one of {', '.join(repr(m.value) for m in RiskLevel)}")
    return level


class Category(str, Enum):
    """The nine upstream category strings; ``JAILBREAK`` exists only for prompts."""

    VIOLENT = "Violent"
    NON_VIOLENT_ILLEGAL_ACTS = "Non-violent Illegal Acts"
    SEXUAL_CONTENT = "Sexual Content or Sexual Acts"
    PII = "PII"
    SUICIDE_SELF_HARM = "Suicide & Self-Harm"
    UNETHICAL_ACTS = "Unethical Acts"
    POLITICALLY_SENSITIVE = "Politically Sensitive Topics"
    COPYRIGHT_VIOLATION = "Copyright Violation"
    JAILBREAK = "Jailbreak"

    @property
    def prompt_only(self) -> bool:
        """True for categories the models emit only when moderating a prompt."""
        return self is Category.JAILBREAK


PROMPT_CATEGORIES: tuple[Category, ...] = tuple(Category)
RESPONSE_CATEGORIES: tuple[Category, ...] = tuple(c for c in Category if not c.prompt_only)


@dataclass(frozen=True)
class Verdict:
    """One moderation decision about a prompt or a response.

    ``probabilities`` maps every risk level to its probability when the backend can compute it
    (local Gen reads the label logits, Stream applies a softmax to its head); it is empty when the
    backend only saw text (a remote server without logprobs). ``error`` is set when no real
    judgement was made and the risk is the policy's fallback; ``error_kind`` says which failure
    it was (only ``"unavailable"`` may fail open, see ``Policy.on_error``).
    """

    risk: RiskLevel
    categories: tuple[Category, ...] = ()
    refusal: bool | None = None
    probabilities: Mapping[RiskLevel, float] = field(default_factory=dict)
    role: Role = "prompt"
    model: str = ""
    elapsed_s: float = 0.0
    raw_output: str | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None

    def __post_init__(self) -> None:
        """Check ``risk`` (custom ``GenBackend``s build verdicts): a level's name, in any case, becomes
        the level, anything else raises here rather than as a bare ``KeyError`` inside a ``Policy``."""
        if type(self.risk) is not RiskLevel:  # the backends' own verdicts skip the lookup
            object.__setattr__(self, "risk", _risk_level(self.risk))

    @property
    def is_safe(self) -> bool:
        """True when the model's own label is Safe (no policy applied)."""
        return self.risk is RiskLevel.SAFE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used by the CLI, the proxy and adapter metadata."""
        return {
            "risk": self.risk.value,
            "categories": [c.value for c in self.categories],
            "refusal": self.refusal,
            "probabilities": {k.value: round(v, 6) for k, v in self.probabilities.items()},
            "role": self.role,
            "model": self.model,
            "elapsed_s": round(self.elapsed_s, 6),
            "error": self.error,
            "error_kind": self.error_kind,
        }


@dataclass(frozen=True)
class TokenVerdict:
    """The Stream guard's judgement of one response token.

    ``start`` / ``end`` are character offsets into the response text fed so far, so adapters can
    release or cut exactly the caller's original characters (the tokenizer normalises to NFC, so
    decoded token strings are not always the caller's bytes).
    """

    index: int
    token_id: int
    text: str
    start: int
    end: int
    risk: RiskLevel
    category: Category | None
    probabilities: Mapping[RiskLevel, float]
    category_probabilities: Mapping[Category, float] = field(default_factory=dict)


def violation_message(verdict: Verdict, where: str | None = None) -> str:
    """The one-line message of a block: the verdict, or, when no judgement was made, why not and
    what to do (an outage must not read as "your prompt is Unsafe")."""
    where = where or verdict.role
    if verdict.error is None:
        cats = ", ".join(c.value for c in verdict.categories) or "no category"
        return f"{where} blocked by Qwen3Guard: {verdict.risk.value} ({cats})"
    if verdict.error_kind == "unavailable":
        return (f"{where} not judged, so blocked (fail closed): {verdict.error}; retry when the guard is back, or let "
                "content through while it is down with QWEN3GUARD_FAIL_OPEN=1 / Policy(on_error=RiskLevel.SAFE)")
    return f"{where} blocked: Qwen3Guard could not judge it ({verdict.error})"


class GuardViolation(Exception):
    """Raised when a policy blocks content; carries the verdict that caused it."""

    def __init__(self, verdict: Verdict, message: str | None = None) -> None:
        self.verdict = verdict
        super().__init__(message or violation_message(verdict))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with its verdict (process pools, task queues send exceptions that way); a subclass
        keeps its own fields through ``__dict__``."""
        return _rebuild_violation, (type(self), self.args, self.__dict__)


def _rebuild_violation(cls: type[GuardViolation], args: tuple[Any, ...], state: dict[str, Any]) -> GuardViolation:
    """A ``GuardViolation`` (or subclass) back from pickle, without calling its ``__init__``."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class GuardUnavailableError(RuntimeError):
    """Raised when a guard model cannot be loaded or reached; the message says how to fix it."""
