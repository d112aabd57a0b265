"""Choosing the Gen backend from configuration, so deployments switch without code changes.

The proxy, the CLI and every adapter call ``load_gen_guard()``; whether that loads the model
in-process or talks to a vLLM / SGLang fleet is decided by arguments or environment variables:

- ``QWEN3GUARD_GEN_URL``: comma-separated server base URLs (``http://gpu-1:8000/v1,http://gpu-2:8000/v1``);
  when set, the guard is remote.
- ``QWEN3GUARD_GEN_MODEL``: the served model name (remote) or the hub id / local directory to load
  (local; default ``Qwen/Qwen3Guard-Gen-0.6B``).
- ``QWEN3GUARD_GEN_API_KEY``: bearer token for the servers (never logged).
- ``QWEN3GUARD_GEN_TIMEOUT``: per-request timeout in seconds (remote; default 30).
- ``QWEN3GUARD_FAIL_OPEN``: ``1/true/yes/on`` lets content through when no verdict could be made;
  the default is to fail closed. See ``policy_from_env`` for adapters that decide with a ``Policy``.

Explicit arguments always win over the environment.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Union

from .policy import Policy
from .remote_gen import RemoteGenGuard
from .types import RiskLevel

if TYPE_CHECKING:
    from .gen import GenGuard

URL_ENV = "QWEN3GUARD_GEN_URL"
MODEL_ENV = "QWEN3GUARD_GEN_MODEL"
API_KEY_ENV = "QWEN3GUARD_GEN_API_KEY"
TIMEOUT_ENV = "QWEN3GUARD_GEN_TIMEOUT"
FAIL_OPEN_ENV = "QWEN3GUARD_FAIL_OPEN"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")

AnyGenGuard = Union["GenGuard", RemoteGenGuard]


def is_server_url(value: str) -> bool:
    """True when ``value`` names servers (``http(s)://...``, possibly comma-separated), not a model."""
    return value.strip().lower().startswith(("http://", "https://"))


def fail_open_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """``QWEN3GUARD_FAIL_OPEN`` as a bool (False when unset); a typo raises instead of silently failing open."""
    raw = (os.environ if environ is None else environ).get(FAIL_OPEN_ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{FAIL_OPEN_ENV}={raw!r} is not a boolean; use one of {', '.join(_TRUE + _FALSE[1:])}")


def policy_from_env(base: Policy | None = None, environ: Mapping[str, str] | None = None) -> Policy:
    """``base`` (default ``Policy()``) with ``on_error=Safe`` when ``QWEN3GUARD_FAIL_OPEN`` is on.

    Adapters decide with ``Policy.on_error``, not with ``verdict.risk``, so this is how the
    environment switch reaches them; an explicit ``base.on_error`` other than the default wins.
    """
    policy = base or Policy()
    if fail_open_from_env(environ) and policy.on_error is RiskLevel.UNSAFE:
        return policy.with_overrides(on_error=RiskLevel.SAFE)
    return policy


def load_gen_guard(model_or_url: str | None = None, *, environ: Mapping[str, str] | None = None, **kwargs: Any) -> AnyGenGuard:
    """A Gen guard: remote when given server URL(s) or ``QWEN3GUARD_GEN_URL`` is set, else the local model.

    ``model_or_url`` is a hub id, a local directory or ``http(s)://`` base URL(s). ``kwargs`` go to
    ``RemoteGenGuard`` (``model``, ``api_key``, ``timeout``, ``fail_open``, ``retry`` ...) or to
    ``GenGuard.from_pretrained`` (``device``, ``dtype`` ...); they override the environment.
    """
    env = os.environ if environ is None else environ
    urls = model_or_url if model_or_url is not None and is_server_url(model_or_url) else None
    if urls is None and model_or_url is None and env.get(URL_ENV, "").strip():
        urls = env[URL_ENV]
    if urls is not None:
        settings: dict[str, Any] = {"model": env.get(MODEL_ENV) or None, "api_key": env.get(API_KEY_ENV) or None,
                                    "fail_open": fail_open_from_env(env)}
        if env.get(TIMEOUT_ENV, "").strip():
            settings["timeout"] = _seconds(env[TIMEOUT_ENV])
        return RemoteGenGuard(urls, **{**settings, **kwargs})
    from .gen import DEFAULT_GEN_MODEL, GenGuard

    return GenGuard.from_pretrained(model_or_url or env.get(MODEL_ENV) or DEFAULT_GEN_MODEL, **kwargs)


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value
