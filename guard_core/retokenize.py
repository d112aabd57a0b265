"""Incremental re-tokenization of streamed text into Qwen3 ids.

An LLM's deltas split text anywhere (mid-word, mid-character when bytes arrive, inside an emoji
sequence), and BPE is not prefix-stable: ``" bo"`` + ``"mb"`` is not ``tok(" bo") + tok("mb")``.
The guard must see exactly the ids of the whole text, so we only commit tokens that no future
text can change, and keep the tail pending.

Why the tail is enough: Qwen3's tokenizer NFC-normalises, splits the text into pre-tokens with a
regex that has no look-behind, and runs BPE inside each pre-token. Appending text can only change
the *last* pre-token (it may grow, merge with what follows or split, and NFC composition only
touches the last character), so every token of the earlier pre-tokens is final, and the
remainder can be tokenized on its own from that pre-token boundary.

A single pre-token can be long (a Chinese clause has no spaces; base64 blobs). To bound the
delay, once the pending pre-token exceeds ``max_pending_chars`` all but its last
``keep_tokens`` tokens are committed: that places one extra pre-token boundary, which changes
the ids only in the rare case where BPE would have merged across it. A cut never falls inside
one of the caller's characters: NFC can expand one character into a letter and a mark that land
in different pre-tokens, and such tokens are committed together. Nothing is lost or repeated
either way: tokens partition the caller's text exactly.
"""

from __future__ import annotations

import codecs
import json
import threading
from functools import lru_cache
import weakref
from dataclasses import dataclass

from tokenizers import Tokenizer

from .tokenization import TextTokenizer


@dataclass(frozen=True)
class StreamToken:
    """A committed token: its id and the slice ``[start, end)`` of the response text it covers.

    Offsets are relative to the response (the scaffolding ``lead`` has negative offsets);
    ``context_only`` tokens lie entirely in the lead and get no verdict.
    """

    id: int
    start: int
    end: int
    text: str

    @property
    def context_only(self) -> bool:
        """True for tokens that belong to the template scaffolding, not to the response."""
        return self.end <= 0 and self.start < 0


_CLONES: weakref.WeakKeyDictionary[TextTokenizer, tuple[Tokenizer, threading.Lock]] = weakref.WeakKeyDictionary()
_CLONES_LOCK = threading.Lock()


def _word_tokenizer(tokenizer: TextTokenizer) -> tuple[Tokenizer, threading.Lock]:
    """A text-only backend exposing pre-token (word) ids, built once per ``TextTokenizer``.

    Cloning the 150k-entry vocabulary takes about a second, far too slow per session.
    """
    with _CLONES_LOCK:
        if tokenizer not in _CLONES:
            spec = json.loads(tokenizer.tokenizer.backend_tokenizer.to_str())
            spec["added_tokens"] = []
            _CLONES[tokenizer] = (Tokenizer.from_str(json.dumps(spec)), threading.Lock())
        return _CLONES[tokenizer]


class IncrementalTokenizer:
    """Turns text deltas (``str``, or UTF-8 ``bytes`` split anywhere) into final token ids.

    ``lead`` is template text that precedes the response in the same text run (``"\\n\\n"``
    after ``</think>``): it is tokenized together with the response, exactly as one-shot
    tokenization of the rendered conversation does.
    """

    def __init__(self, tokenizer: TextTokenizer, lead: str = "", *, max_pending_chars: int = 64, keep_tokens: int = 8) -> None:
        self._tok, self._lock = _word_tokenizer(tokenizer)
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = lead
        self._base = -len(lead)
        self._received = 0
        self.max_pending_chars = max_pending_chars
        self.keep_tokens = keep_tokens

    @property
    def committed_chars(self) -> int:
        """Response characters covered by committed tokens."""
        return max(self._base, 0)

    @property
    def received_chars(self) -> int:
        """Response characters received so far."""
        return self._received

    def push(self, delta: str | bytes) -> list[StreamToken]:
        """Add a delta; return the tokens that became final."""
        text = self._bytes.decode(bytes(delta)) if isinstance(delta, (bytes, bytearray)) else delta
        if not isinstance(text, str):
            raise TypeError(f"delta must be str or bytes, got {type(delta).__name__}")
        self._pending += text
        self._received += len(text)
        return self._commit(final=False)

    def flush(self) -> list[StreamToken]:
        """End of text: every pending character becomes tokens."""
        rest = self._bytes.decode(b"", final=True)
        self._pending += rest
        self._received += len(rest)
        return self._commit(final=True)

    def _commit(self, *, final: bool) -> list[StreamToken]:
        if not self._pending:
            return []
        with self._lock:
            enc = self._tok.encode(self._pending, add_special_tokens=False)
        ids, offsets, words = enc.ids, enc.offsets, enc.word_ids
        if not ids:
            return []
        if final:
            count, boundary = len(ids), len(self._pending)
        else:
            last_word = words[-1]
            count = next(i for i, w in enumerate(words) if w == last_word)
            if len(self._pending) - offsets[count][0] > self.max_pending_chars:
                count = max(count, len(ids) - self.keep_tokens)
            boundary = min(start for start, _ in offsets[count:])
            while count and offsets[count - 1][1] > boundary:
                count -= 1
                boundary = min(boundary, offsets[count][0])
            if count == 0:
                return []
        ends = [0] * count
        running = boundary
        for i in range(count - 1, -1, -1):
            ends[i] = running
            running = min(running, offsets[i][0])
        out: list[StreamToken] = []
        start = 0
        for i in range(count):
            end = max(ends[i], start)
            a, b = self._base + start, self._base + end
            if b > 0:
                a = max(a, 0)
            out.append(StreamToken(ids[i], a, b, self._pending[a - self._base : b - self._base]))
            start = end
        self._pending = self._pending[boundary:]
        self._base += boundary
        return out


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for (GPT-2 table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}
