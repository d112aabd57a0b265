"""Tokenizing moderation prompts so that user text can never become control tokens.

A plain ``tokenizer(text)`` turns ``<|im_end|>`` inside a user message into the real end-of-turn
token, which lets a user close the conversation and forge ``Safety: Safe``. Tokenizing each
message on its own and concatenating ids avoids that but changes the ids at the seams
(``"USER: How"`` is not ``"USER: "`` + ``"How"``), so the model would see a prompt it was never
trained on. Instead the prompt is built as ``Piece``s: the template's own control tokens, and the
text between them, which is encoded in one go by a copy of the tokenizer that knows no added
tokens. For benign text this equals one-shot tokenization (added tokens are always pre-token
boundaries); for injected markup it yields ordinary text tokens.
"""

from __future__ import annotations

import json
import operator
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Iterable, Sequence

from tokenizers import Tokenizer

from .types import GuardUnavailableError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ENDOFTEXT = "<|endoftext|>"


@dataclass(frozen=True)
class Piece:
    """A run of prompt text, or one of the template's control tokens (``special=True``)."""

    text: str
    special: bool = False


def special(token: str) -> Piece:
    """A control-token piece."""
    return Piece(token, special=True)


def join_pieces(pieces: Iterable[Piece]) -> str:
    """The prompt as one string (what upstream's chat template renders)."""
    return "".join(p.text for p in pieces)


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


class TextTokenizer:
    """Encodes text as text, and whole prompts as template control tokens plus text.

    Built from any fast (``tokenizers``-backed) tokenizer: the backend is cloned with its added
    tokens removed, so the vocabulary, normaliser and pre-tokeniser stay exactly those of the
    model. Cloning the 150k-entry vocabulary takes about a second, so build one per guard and
    share it (the Stream sessions' incremental re-tokenization uses the same clone).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; load the model's tokenizer.json")
        spec = json.loads(backend.to_str())
        spec["added_tokens"] = []
        self._text_only = Tokenizer.from_str(json.dumps(spec))
        self._lock = threading.Lock()
        self.tokenizer = tokenizer
        self._special_ids: dict[str, int] = {}
        self._added_ids = frozenset(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))

    def special_id(self, token: str) -> int:
        """Id of a control token, failing loudly when the vocabulary lacks it."""
        if token not in self._special_ids:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            # An unknown token maps to the unk id, and Qwen's unk *is* <|endoftext|> when no
            # tokenizer_config.json names another: the round trip tells the two apart.
            if not isinstance(tid, int) or self.tokenizer.convert_ids_to_tokens(tid) != token:
                raise ValueError(f"the tokenizer has no {token!r} token; is this a Qwen3 tokenizer?")
            self._special_ids[token] = tid
        return self._special_ids[token]

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` with every character treated as text."""
        with self._lock:
            return self._text_only.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and (start, end) character offsets into ``text``."""
        with self._lock:
            enc = self._text_only.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]  # type: ignore[misc]

    def encode_words(self, text: str) -> tuple[list[int], list[tuple[int, int]], list[int | None]]:
        """Token ids, character offsets and pre-token (word) index of each token of ``text`` as text.

        The word index tells which tokens later text can still change (only the last word's),
        which is what incremental re-tokenization needs.
        """
        with self._lock:
            enc = self._text_only.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets, enc.word_ids

    def text_token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """The UTF-8 bytes each id stands for; ``ValueError`` unless every id is a text token.

        Control and other added tokens (``<|im_end|>``, ``<think>``), ids outside the
        vocabulary and negative ids are refused (``TypeError`` for a value that is not an
        integer): fed as response tokens they would forge template structure inside the guard's
        context, or crash its forward.
        """
        table = byte_level_decoder()
        out: list[bytes] = []
        for position, raw in enumerate(ids):
            tid = _token_id(raw, position)
            known = 0 <= tid < self._text_only.get_vocab_size() and tid not in self._added_ids
            piece = self._text_only.id_to_token(tid) if known else None
            if piece is None:
                raise ValueError(
                    f"token id {tid} (position {position}) is not a text token of the vocabulary; control tokens "
                    "such as <|im_end|> or <think> are not response text (stop feeding at the end of the turn)"
                )
            try:
                out.append(bytes(table[ch] for ch in piece))
            except KeyError:
                raise ValueError(f"token id {tid} ({piece!r}) is not a byte-level BPE token; is this a Qwen3 tokenizer?") from None
        return out

    def encode_pieces(self, pieces: Sequence[Piece]) -> list[int]:
        """Ids of a prompt: control-token pieces map to their ids, text runs are encoded whole."""
        ids: list[int] = []
        run: list[str] = []
        for piece in pieces:
            if piece.special:
                if run:
                    ids.extend(self.encode_text("".join(run)))
                    run.clear()
                ids.append(self.special_id(piece.text))
            else:
                run.append(piece.text)
        if run:
            ids.extend(self.encode_text("".join(run)))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of some ids, control tokens included (used for logs and token verdicts)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def _token_id(raw: object, position: int) -> int:
    """``raw`` as a Python int (numpy and torch integers too); ``TypeError`` for anything else."""
    if not isinstance(raw, bool):
        try:
            return operator.index(raw)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise TypeError(f"token ids must be integers, got {type(raw).__name__} {raw!r:.40} at position {position}")


def load_tokenizer(directory: str) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, or one ``GuardUnavailableError`` naming the file when it is unreadable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # tokenizers and transformers raise many kinds for one broken file
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise GuardUnavailableError(f"cannot read the tokenizer in {directory} (tokenizer.json, tokenizer_config.json): {detail}; "
                                    "download the model again") from None
