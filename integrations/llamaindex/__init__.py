"""LlamaIndex adapters: a node postprocessor for queries and retrieved context, a query-engine wrapper for answers."""

from guard_core import DEFAULT_REFUSAL

from .postprocessor import DEFAULT_REDACTION_NOTICE, QwenGuardNodePostprocessor
from .query_engine import GuardedQueryEngine

__all__ = ["DEFAULT_REDACTION_NOTICE", "DEFAULT_REFUSAL", "GuardedQueryEngine", "QwenGuardNodePostprocessor"]
