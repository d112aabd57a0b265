"""What a review item is, how a conversation is identified, and the queue's errors.

Kept free of SQLAlchemy so items can be built, compared and serialised (``to_dict``) anywhere,
including by code that only reads exports.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Literal, Mapping

from ..messages import Message, MessageLike, normalize_messages
from ..types import Category, RiskLevel, Role

Status = Literal["pending", "approved", "rejected"]
Decision = Literal["approve", "reject"]

STATUSES: tuple[Status, ...] = ("pending", "approved", "rejected")
#: The status a decision leaves an item in.
DECISION_STATUS: Mapping[Decision, Status] = {"approve": "approved", "reject": "rejected"}


class ReviewNotFound(LookupError):
    """No review item has the given id (a typo, or an item from another database)."""


class ReviewAlreadyResolved(ValueError):
    """The item was already approved or rejected; a decision is final and is never overwritten."""


class ReviewStoreError(RuntimeError):
    """The review database failed (unreachable server, locked or read-only file, foreign schema)."""


def canonical_conversation(conversation: Iterable[MessageLike | Message]) -> str:
    """The one JSON text that stands for a conversation: what is hashed and, if opted in, stored.

    Messages are normalised first (text only, ``role`` and ``content`` keys), so the same
    conversation gets the same hash whichever adapter saw it (OpenAI content parts, LangChain
    messages, plain dicts). Keys are sorted, separators are compact and non-ASCII text is kept as
    is. A conversation the guard could not moderate raises ``ValueError``.
    """
    messages = normalize_messages(conversation)
    return json.dumps([m.as_dict() for m in messages], ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def conversation_hash(conversation: Iterable[MessageLike | Message]) -> str:
    """SHA-256 (hex) of ``canonical_conversation``: finds repeats without keeping the text."""
    return hashlib.sha256(canonical_conversation(conversation).encode("utf-8")).hexdigest()


def require_aware(value: datetime, name: str) -> datetime:
    """``value`` in UTC; a naive datetime is refused because its time zone would be a guess."""
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, e.g. datetime.now(timezone.utc), got {value.isoformat()}")
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:  # within a day of datetime's range ends: in UTC the instant lies past that end
        end = datetime.max if value.utcoffset() < timedelta(0) else datetime.min  # type: ignore[operator]
        return end.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class ReviewItem:
    """A moderated conversation waiting for, or carrying, a human decision.

    ``risk``, ``categories``, ``probabilities`` and ``model`` are the guard's verdict;
    ``source`` names the adapter that recorded it (``"langchain.callback"``, ``"openai.proxy"``)
    and ``request_id`` the caller's request or run id. ``content`` is the conversation as
    ``canonical_conversation`` JSON, or ``None`` unless the queue was opened with
    ``store_content=True``; ``conversation_hash`` is always set. ``status`` starts ``pending``;
    ``resolve`` sets ``decision``, ``resolved_at``, ``note`` and ``reviewer`` once.
    Times are UTC.
    """

    id: str
    created_at: datetime
    source: str
    role: Role
    risk: RiskLevel
    categories: tuple[Category, ...]
    probabilities: Mapping[RiskLevel, float]
    model: str
    request_id: str | None
    conversation_hash: str
    content: str | None
    status: Status
    resolved_at: datetime | None = None
    decision: Decision | None = None
    note: str | None = None
    reviewer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used by ``show``, the exports and application notifications."""
        return {
            "id": self.id,
            "created_at": self.created_at.isoformat(),
            "source": self.source,
            "role": self.role,
            "risk": self.risk.value,
            "categories": [c.value for c in self.categories],
            "probabilities": {k.value: v for k, v in self.probabilities.items()},
            "model": self.model,
            "request_id": self.request_id,
            "conversation_hash": self.conversation_hash,
            "content": self.content,
            "status": self.status,
            "resolved_at": None if self.resolved_at is None else self.resolved_at.isoformat(),
            "decision": self.decision,
            "note": self.note,
            "reviewer": self.reviewer,
        }
