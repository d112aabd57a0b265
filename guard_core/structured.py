"""What structured output says: the text a reader gets from JSON, not its source.

Structured answers (tool-call arguments, JSON content, a parsed schema) reach their reader
decoded, so escapes in the source (``\\u0020``, or every non-ASCII letter once ``json.dumps``-ed)
would hide from the guard the words the reader gets. Every adapter judges them by ``json_text``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Container, Mapping
from typing import Any


def strings(value: Any, *, keys: bool = False, skip: Container[str] = (),
            other: Callable[[Any], list[str]] | None = None) -> list[str]:
    """Every non-empty string in ``value`` (nested dicts and lists), in order; with ``keys`` the
    dicts' keys too, each before its value; ``skip`` leaves out the fields of those names.

    Numbers, booleans and None hold no text. Any other object is read by ``other`` (an adapter's
    own types: a message, a document nested in a parsed answer), so a caller that may be handed
    such values can judge them, or refuse them, instead of dropping them; without ``other`` they
    are left out (pure JSON has none)."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, Mapping):
        return [t for k, v in value.items() if k not in skip
                for t in ([str(k)] if keys else []) + strings(v, keys=keys, skip=skip, other=other)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in strings(v, keys=keys, skip=skip, other=other)]
    if other is None or value is None or isinstance(value, (bool, int, float)):
        return []
    return [t for t in other(value) if t]


def json_text(value: Any) -> str:
    """What parsed JSON says: its object keys and string values, one a line. Structured output is
    judged by this, not by its JSON source, where escapes (``\\u0020``, or every non-ASCII letter
    once ``json.dumps``-ed) would hide the words its reader gets."""
    return "\n".join(strings(value, keys=True))


def json_source_text(source: str) -> str:
    """The text of a whole JSON document (``json_text``), read strictly as ``ProviderStrategy``
    reads it. A source that is not one (cut off by a token limit, in a code fence, nested past the
    parser's depth, split over parts) is read with its string escapes decoded (``unescaped``): a
    lenient reader (a partial parser, a model reading it back) still gets the words."""
    try:
        return json_text(json.loads(source))
    except (ValueError, RecursionError):
        return unescaped(source)


_ESCAPE = re.compile(r'\\(u[0-9a-fA-F]{4}|["\\/bfnrt])')
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def unescaped(source: str) -> str:
    """``source`` with every JSON string escape decoded (``\\u0020``, ``\\n``; a surrogate pair joined,
    a lone surrogate as U+FFFD), whether or not it is valid JSON."""
    def decode(match: re.Match[str]) -> str:
        escape = match.group(1)
        return chr(int(escape[1:], 16)) if escape[0] == "u" else _SIMPLE_ESCAPES[escape]

    text = _ESCAPE.sub(decode, source)
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
