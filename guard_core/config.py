"""Every setting the library reads from the environment, read in one place.

The CLI, the proxy, the examples and every adapter's defaults take their configuration from
``Settings.from_env()``, so one set of variables switches a whole deployment (a local model, a
GPU fleet, fail-open, the review database) without code changes. Explicit arguments always win
over the environment. The README's configuration table is this module's ``ENVIRONMENT``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

DEFAULT_GEN_MODEL = "Qwen/Qwen3Guard-Gen-0.6B"
DEFAULT_STREAM_MODEL = "Qwen/Qwen3Guard-Stream-0.6B"
#: Upstream's debounce: two consecutive non-safe tokens flag a streamed response.
DEFAULT_CONSECUTIVE = 2
#: The refusal every adapter answers with when it replaces blocked content.
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
#: Key of the verdicts attached to messages, nodes, responses and chunks in every adapter.
METADATA_KEY = "qwen3guard"

GEN_MODEL_ENV = "QWEN3GUARD_GEN_MODEL"
GEN_URL_ENV = "QWEN3GUARD_GEN_URL"
GEN_API_KEY_ENV = "QWEN3GUARD_GEN_API_KEY"
GEN_TIMEOUT_ENV = "QWEN3GUARD_GEN_TIMEOUT"
STREAM_MODEL_ENV = "QWEN3GUARD_STREAM_MODEL"
DEVICE_ENV = "QWEN3GUARD_DEVICE"
FAIL_OPEN_ENV = "QWEN3GUARD_FAIL_OPEN"
CONTROVERSIAL_ENV = "QWEN3GUARD_CONTROVERSIAL"
REVIEW_DB_ENV = "QWEN3GUARD_REVIEW_DB"
REVIEW_CONTENT_ENV = "QWEN3GUARD_REVIEW_STORE_CONTENT"
UPSTREAM_ENV = "QWEN3GUARD_UPSTREAM"
UPSTREAM_API_KEY_ENV = "QWEN3GUARD_UPSTREAM_API_KEY"
PROXY_KEYS_ENV = "QWEN3GUARD_PROXY_KEYS"

#: (variable, what it sets, default): the README's configuration table.
ENVIRONMENT: tuple[tuple[str, str, str], ...] = (
    (GEN_MODEL_ENV, "Gen model: hub id or local directory (local), or the served model name (remote)", DEFAULT_GEN_MODEL),
    (GEN_URL_ENV, "comma-separated vLLM / SGLang base URLs; when set, Gen runs remotely", "unset (local)"),
    (GEN_API_KEY_ENV, "bearer key for the Gen servers (never logged)", "unset"),
    (GEN_TIMEOUT_ENV, "seconds per request to a Gen server (at most 3600)", "30"),
    (STREAM_MODEL_ENV, "Stream model: hub id or local directory", DEFAULT_STREAM_MODEL),
    (DEVICE_ENV, "device for local models: cuda, cuda:N, mps or cpu", "best available"),
    (FAIL_OPEN_ENV, "1 lets content through while the guard is unavailable (never what it rejected)", "0 (fail closed)"),
    (CONTROVERSIAL_ENV, "what the default policy does with Controversial content: block, review (needs the review "
                        "queue), flag or allow", "block (strict)"),
    (REVIEW_DB_ENV, "review queue: SQLite file path or database URL (enables Action.REVIEW)", "unset"),
    (REVIEW_CONTENT_ENV, "1 stores the reviewed conversation's text in the queue (privacy: off by default)", "0"),
    (UPSTREAM_ENV, "proxy: the upstream OpenAI-compatible base URL", "required by the proxy"),
    (UPSTREAM_API_KEY_ENV, "proxy: key sent upstream (else OPENAI_API_KEY)", "unset"),
    (PROXY_KEYS_ENV, "proxy: comma-separated keys clients must present", "unset (open)"),
)

#: What ``QWEN3GUARD_CONTROVERSIAL`` may say (``guard_core.Action`` values).
CONTROVERSIAL_ACTIONS = ("block", "review", "flag", "allow")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    """The environment's configuration, validated; fields are None where a variable is unset."""

    gen_model: str | None = None
    gen_urls: str | None = None
    gen_api_key: str | None = None
    gen_timeout: float | None = None
    stream_model: str | None = None
    device: str | None = None
    fail_open: bool = False
    controversial: str | None = None
    review_db: str | None = None
    review_store_content: bool = False
    upstream: str | None = None
    upstream_api_key: str | None = None
    proxy_keys: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and check every variable; a malformed value raises ``ValueError`` naming it."""
        env = os.environ if environ is None else environ

        def text(name: str) -> str | None:
            return env.get(name, "").strip() or None

        keys = frozenset(k.strip() for k in env.get(PROXY_KEYS_ENV, "").split(",") if k.strip())
        timeout = text(GEN_TIMEOUT_ENV)
        return cls(
            gen_model=text(GEN_MODEL_ENV),
            gen_urls=text(GEN_URL_ENV),
            gen_api_key=text(GEN_API_KEY_ENV),
            gen_timeout=None if timeout is None else positive_seconds(timeout, GEN_TIMEOUT_ENV),
            stream_model=text(STREAM_MODEL_ENV),
            device=check_device(text(DEVICE_ENV), f"{DEVICE_ENV}="),
            fail_open=parse_bool(env.get(FAIL_OPEN_ENV, ""), FAIL_OPEN_ENV),
            controversial=_choice(text(CONTROVERSIAL_ENV), CONTROVERSIAL_ENV, CONTROVERSIAL_ACTIONS),
            review_db=text(REVIEW_DB_ENV),
            review_store_content=parse_bool(env.get(REVIEW_CONTENT_ENV, ""), REVIEW_CONTENT_ENV),
            upstream=text(UPSTREAM_ENV),
            upstream_api_key=text(UPSTREAM_API_KEY_ENV) or text("OPENAI_API_KEY"),
            proxy_keys=keys,
        )

    def check_keys(self) -> None:
        """``check_api_key`` of every key the settings hold, naming its variable (never the key): what
        the proxy runs on before it loads anything. Not done in ``from_env``: a placeholder
        ``OPENAI_API_KEY`` must not break tools that never send it."""
        named = [(self.gen_api_key, GEN_API_KEY_ENV), (self.upstream_api_key, f"{UPSTREAM_API_KEY_ENV} (or OPENAI_API_KEY)"),
                 *((k, f"a key in {PROXY_KEYS_ENV}") for k in self.proxy_keys)]
        for key, name in named:
            if key is not None:
                check_api_key(key, name)


def _choice(value: str | None, name: str, allowed: tuple[str, ...]) -> str | None:
    """A setting that names one of ``allowed`` (any case); a typo raises, naming the choices."""
    if value is None or value.lower() in allowed:
        return None if value is None else value.lower()
    raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def parse_bool(raw: str, name: str) -> bool:
    """A boolean setting; a typo raises instead of silently meaning "off" (or, worse, "fail open")."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean; use one of {', '.join(_TRUE + _FALSE[1:])}")


_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")


def check_device(value: str | None, where: str = "device ") -> str | None:
    """The one check of a device name (``cpu``, ``mps``, ``cuda``, ``cuda:N``) for every CLI and the environment.

    ``where`` starts the error message: ``"--device "`` for a flag, ``"QWEN3GUARD_DEVICE="`` for
    the variable. ``meta`` is refused: meta tensors hold no data, so a model on it cannot run.
    """
    if value is None or _DEVICE.fullmatch(value):
        return value
    if value.split(":")[0].strip().lower() == "meta":
        raise ValueError(f"{where}{value!r} cannot run a model (meta tensors hold no data); use cpu, mps, cuda or cuda:N")
    raise ValueError(f"{where}{value!r} is not one of cpu, mps, cuda, cuda:N")


#: The longest request timeout accepted: a guard answer taking longer is an outage, and far larger
#: values (``inf``, ``1e10``) overflow the socket layer on every call.
MAX_TIMEOUT_S = 3600.0


def positive_seconds(raw: str, name: str) -> float:
    """A request timeout setting in seconds, checked like the argument (see ``check_timeout``)."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be a number of seconds") from None
    return check_timeout(value, f"{name}={raw!r}")


def check_timeout(value: object, what: str = "timeout") -> float:
    """The one check of a request timeout (seconds, finite, > 0, at most ``MAX_TIMEOUT_S``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__} {value!r}")
    if not 0 < value <= MAX_TIMEOUT_S:
        raise ValueError(f"{what} must be > 0 and <= {MAX_TIMEOUT_S:g} seconds, got {value!r}")
    return float(value)


def check_count(value: object, name: str, *, minimum: int = 1, maximum: int | None = None, hint: str = "") -> int:
    """The one check of a count argument (sessions, attempts, choices, tokens): an int, not a bool,
    from ``minimum`` (to ``maximum``); ``ValueError`` names the argument and ``hint`` what a bound means."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ValueError(f"{name} must be an int {bound}{hint}, got {value!r}")
    return value


def check_holdback_tokens(value: object) -> int:
    """The one check of a hold-back window (tokens kept back until judged): an int >= 0."""
    return check_count(value, "holdback_tokens", minimum=0, hint=" (0 releases text before it is judged)")


def check_api_key(key: str, what: str) -> str:
    """The one check of a key sent or expected as an ``Authorization: Bearer`` token: printable ASCII with no
    blank around it, else ``ValueError`` naming ``what`` (the variable or argument) but never the key.

    A header carries bytes: a control character (a line end pasted with the key) fails every request
    as if the server were unreachable, and a non-ASCII key can never be presented (clients encode
    header text differently, and the proxy refuses non-ASCII headers), so either is refused up front.
    Blanks around a key are refused too: the presented token is read without them.
    """
    if not isinstance(key, str):
        raise TypeError(f"{what} must be a string, got {type(key).__name__}")
    odd = next((i for i, c in enumerate(key) if not " " <= c <= "~"), None)
    if odd is not None:
        kind = "a control character (a line end or tab?)" if key[odd].isascii() else "a character that is not ASCII"
        raise ValueError(f"{what} has {kind} at position {odd}, which an HTTP header cannot carry; remove it from the key")
    if key != key.strip():
        raise ValueError(f"{what} starts or ends with a space; remove it from the key")
    return key


def check_http_url(url: str, where: str = "") -> str:
    """An ``http(s)://host[:port]/...`` base URL (the proxy's upstream, a Gen server), else ``ValueError``
    (every request would otherwise fail); ``where`` starts the message (``"--upstream "``).

    Control characters are refused before ``urlsplit``, which silently drops tabs and line ends and so
    would check another URL than the one used.
    """
    if not isinstance(url, str):
        raise TypeError(f"{where}must be a URL string, got {type(url).__name__}")
    stripped = url.strip()
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in stripped):
        raise ValueError(f"{where}{shown_url(url)!r} contains a control character (a line end or tab?); remove it from the URL")
    try:
        parts = urlsplit(stripped)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError as exc:
        raise ValueError(f"{where}{shown_url(url)!r} is not a valid URL ({exc}); use one like http://127.0.0.1:8001/v1, "
                         "with an IPv6 address in brackets: http://[::1]:8001/v1") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}{shown_url(url)!r} is not an http(s):// URL; use one like http://127.0.0.1:8001/v1")
    import httpx  # here: the settings module stays light

    try:
        httpx.URL(stripped)
    except httpx.InvalidURL as exc:
        raise ValueError(f"{where}{shown_url(url)!r} is not a valid URL ({exc}); use one like http://127.0.0.1:8001/v1") from None
    return stripped


def shown_url(url: str) -> str:
    """``url`` fit to print: credentials in it (``http://user:token@host/v1``, ``?api-key=...``) become
    ``***``, since keys are never logged or echoed. Works on URLs that do not parse, for error messages."""
    url = re.sub(r"(?<=://)[^/?#]*@", "***@", url)
    return re.sub(r"([?&][^=&#]*(?:key|token|secret|password|sig)[^=&#]*=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)
