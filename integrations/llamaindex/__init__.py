"""LlamaIndex adapters: a node postprocessor for queries and retrieved context, a query-engine wrapper for answers."""

from .postprocessor import DEFAULT_METADATA_KEY, DEFAULT_REDACTION_NOTICE, QwenGuardNodePostprocessor
from .query_engine import DEFAULT_REFUSAL, GuardedQueryEngine

__all__ = [
    "DEFAULT_METADATA_KEY",
    "DEFAULT_REDACTION_NOTICE",
    "DEFAULT_REFUSAL",
    "GuardedQueryEngine",
    "QwenGuardNodePostprocessor",
]
