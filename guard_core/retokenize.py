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

Before any of that, ``TextDeltas`` turns the caller's deltas (``str``, or UTF-8 ``bytes`` split
anywhere) into valid text in call order, refusing what is not Unicode with a clear error.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from .tokenization import TextTokenizer

_SURROGATE = re.compile("[\ud800-\udfff]")
#: A surrogate code point that is not half of a high+low pair.
_LONE_SURROGATE = re.compile("[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def _join_pair(match: re.Match[str]) -> str:
    high, low = (ord(c) for c in match.group())
    return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))


_NUL_IN_DELTA = "response delta contains NUL bytes (binary data?), which Qwen3Guard does not judge; the delta was not taken"


class TextDeltas:
    """Turns a response's deltas into valid text, in call order.

    - ``bytes`` (also ``bytearray``/``memoryview``) are UTF-8 split anywhere: a character cut
      between deltas waits for its remaining bytes; invalid bytes, and an unfinished character at
      the end, become U+FFFD (``bytes.decode(errors="replace")``).
    - ``str`` must be Unicode text. A surrogate pair split across two deltas (``"\\ud83d"`` then
      ``"\\ude00"``, as JSON escapes arrive) or kept as two code points is joined into its
      character; any other surrogate raises ``ValueError``: it is not a character, and no
      tokenizer (nor the reader of the answer) can use it.
    - NUL is refused in either kind, as in every text the guard reads (``messages.check_text``).
    - Mixing kinds must not reorder text, so a ``str`` delta while bytes of an unfinished
      character are pending raises ``ValueError`` (send the rest of the character first), and so
      does a ``bytes`` delta while the first half of a surrogate pair is pending.

    A delta that raises is not taken: nothing changes, and a corrected delta can follow. The one
    exception is a pending first half of a surrogate pair that the delta shows to be lone: it is
    dropped with the error, since nothing can complete it any more.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._high = ""

    def decode(self, delta: str | bytes | bytearray | memoryview) -> str:
        """The text ``delta`` completes (possibly ``""`` while a character is still cut)."""
        if isinstance(delta, (bytes, bytearray, memoryview)):
            if 0 in delta:
                raise ValueError(_NUL_IN_DELTA)
            if self._high:
                self._drop_high("a bytes delta cannot complete it")
            return self._utf8.decode(bytes(delta))
        if not isinstance(delta, str):
            raise TypeError(f"a response delta must be str or UTF-8 bytes, got {type(delta).__name__}")
        if not delta:
            return ""
        if "\x00" in delta:
            raise ValueError(_NUL_IN_DELTA)
        pending = self._utf8.getstate()[0]
        if pending:
            raise ValueError(
                f"a str delta arrived while {len(pending)} byte(s) of an unfinished UTF-8 character are pending; "
                "send the rest of that character as bytes first, or send all text as str"
            )
        prefix = self._high
        if prefix and not "\udc00" <= delta[:1] <= "\udfff":
            self._drop_high("the next delta does not start with its second half")
        text = prefix + delta
        if not _SURROGATE.search(text):
            return text
        lone = list(_LONE_SURROGATE.finditer(text))
        hold = ""
        if lone and lone[-1].end() == len(text) and text[-1] <= "\udbff":
            hold, text = text[-1], text[:-1]
            lone.pop()
        if lone:
            raise ValueError(
                f"lone surrogate U+{ord(lone[0].group()):04X} at position {lone[0].start() - len(prefix)} of the delta: "
                "response text must be valid Unicode (decode with errors='replace'); the delta was not taken"
            )
        self._high = hold
        return _SURROGATE_PAIR.sub(_join_pair, text)

    def flush(self) -> str:
        """End of the response: the rest of the text (an unfinished UTF-8 character becomes U+FFFD)."""
        if self._high:
            self._drop_high("the response ends there")
        return self._utf8.decode(b"", final=True)

    def _drop_high(self, reason: str) -> None:
        high, self._high = self._high, ""
        raise ValueError(
            f"lone surrogate U+{ord(high):04X} at the end of the previous delta ({reason}): response text must be "
            "valid Unicode; the lone half was dropped, make this call again"
        )


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


class IncrementalTokenizer:
    """Turns response text, arriving in pieces split anywhere, into final token ids.

    ``lead`` is template text that precedes the response in the same text run (``"\\n\\n"``
    after ``</think>``): it is tokenized together with the response, exactly as one-shot
    tokenization of the rendered conversation does.
    """

    def __init__(self, tokenizer: TextTokenizer, lead: str = "", *, max_pending_chars: int = 64, keep_tokens: int = 8) -> None:
        self._tok = tokenizer
        self._pending = lead
        self._base = -len(lead)
        self.max_pending_chars = max_pending_chars
        self.keep_tokens = keep_tokens

    def push(self, text: str) -> list[StreamToken]:
        """Add text; return the tokens that became final."""
        self._pending += text
        return self._commit(final=False) if text else []

    def flush(self) -> list[StreamToken]:
        """End of text: every pending character becomes tokens."""
        return self._commit(final=True)

    def _commit(self, *, final: bool) -> list[StreamToken]:
        if not self._pending:
            return []
        ids, offsets, words = self._tok.encode_words(self._pending)
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
