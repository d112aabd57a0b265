"""Human review of Controversial content: the queue behind ``Action.REVIEW``.

Qwen3Guard's Controversial tier exists so that borderline content can be "permitted with human
review" instead of rejected. With ``Policy(actions={RiskLevel.CONTROVERSIAL: Action.REVIEW})``
adapters let such content through and record it here; people decide later with
``qwen3guard review`` or ``ReviewQueue.resolve``; applications follow the decisions with
``on_resolve`` hooks or ``ReviewQueue.resolved()``.

Storage is SQLite (a file, shared by several processes) or PostgreSQL (a fleet), through
SQLAlchemy Core, which is imported only when a queue is opened (the ``review`` extra).
"""

from ..config import REVIEW_DB_ENV
from .hooks import ResolveHook, ReviewHookError
from .model import (
    STATUSES,
    Decision,
    ReviewAlreadyResolved,
    ReviewItem,
    ReviewNotFound,
    ReviewStoreError,
    Status,
    canonical_conversation,
    conversation_hash,
)
from .queue import ReviewQueue

__all__ = [
    "REVIEW_DB_ENV",
    "STATUSES",
    "Decision",
    "ResolveHook",
    "ReviewAlreadyResolved",
    "ReviewHookError",
    "ReviewItem",
    "ReviewNotFound",
    "ReviewQueue",
    "ReviewStoreError",
    "Status",
    "canonical_conversation",
    "conversation_hash",
]
