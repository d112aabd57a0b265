"""What structured output says: the text a reader gets from JSON, not its source.

Structured answers (tool-call arguments, JSON content, a parsed schema) reach their reader
decoded, so escapes in the source (``\\u0020``, or every non-ASCII letter once ``json.dumps``-ed)
would hide from the guard the words the reader gets. Every adapter judges them by ``json_text``.
"""

from __future__ import annotations

import json
from collections.abc import Container, Mapping
from typing import Any


def strings(value: Any, *, keys: bool = False, skip: Container[str] = ()) -> list[str]:
    """Every non-empty string in ``value`` (nested dicts and lists), in order; with ``keys`` the
    dicts' keys too, each before its value; ``skip`` leaves out the fields of those names."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, Mapping):
        return [t for k, v in value.items() if k not in skip for t in ([str(k)] if keys else []) + strings(v, keys=keys, skip=skip)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in strings(v, keys=keys, skip=skip)]
    return []


def json_text(value: Any) -> str:
    """What parsed JSON says: its object keys and string values, one a line. Structured output is
    judged by this, not by its JSON source, where escapes (``\\u0020``, or every non-ASCII letter
    once ``json.dumps``-ed) would hide the words its reader gets."""
    return "\n".join(strings(value, keys=True))


def json_source_text(source: str) -> str:
    """The text of a whole JSON document (``json_text``), read strictly as ``ProviderStrategy``
    reads it; ``source`` itself when it is not one (it then reaches the reader as it is)."""
    try:
        return json_text(json.loads(source))
    except (ValueError, RecursionError):
        return source
