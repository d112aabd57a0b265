"""One way to name a guard: a loaded guard, a hub id, a local directory, server URLs, or the environment.

Every adapter, the CLI and the proxy accept the same things wherever a guard goes and hand them
to ``gen_backend`` / ``stream_backend``, so a ``RemoteGenGuard`` (or any object with the
``GenBackend`` methods) works everywhere a local ``GenGuard`` does, and ``QWEN3GUARD_GEN_URL``
switches a whole deployment to a GPU fleet. ``CONFIGURED`` (the adapters' default) means "as the
environment says" (``guard_core.config``): for Gen, the servers of ``QWEN3GUARD_GEN_URL`` if set,
else the model of ``QWEN3GUARD_GEN_MODEL``, else ``Qwen/Qwen3Guard-Gen-0.6B``; for Stream,
``QWEN3GUARD_STREAM_MODEL`` else ``Qwen/Qwen3Guard-Stream-0.6B``. Explicit arguments win.

Nothing here imports torch: local models are imported only when one is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol, Union, runtime_checkable

from .config import DEFAULT_GEN_MODEL, DEFAULT_STREAM_MODEL, Settings
from .messages import MessageLike
from .policy import Action, Policy
from .remote_gen import RemoteGenGuard
from .types import RiskLevel, Verdict

if TYPE_CHECKING:
    from .stream import StreamGuard


@runtime_checkable
class GenBackend(Protocol):
    """What every Gen guard offers (``GenGuard`` locally, ``RemoteGenGuard`` over HTTP)."""

    @property
    def model_id(self) -> str:
        """The model's name, recorded in every verdict."""

    def moderate(self, messages: Iterable[MessageLike]) -> Verdict:
        """Judge one conversation (prompt or response by the last role)."""

    def moderate_batch(self, conversations: Iterable[Iterable[MessageLike]]) -> list[Verdict]:
        """Judge many conversations; results keep the input order."""

    async def amoderate(self, messages: Iterable[MessageLike]) -> Verdict:
        """``moderate`` without blocking the event loop."""

    async def amoderate_batch(self, conversations: Iterable[Iterable[MessageLike]]) -> list[Verdict]:
        """``moderate_batch`` without blocking the event loop."""


class _Configured:
    """The default of every guard argument: resolved from the environment when first needed."""

    def __repr__(self) -> str:
        return "CONFIGURED"


CONFIGURED: Any = _Configured()
GenSpec = Union[GenBackend, str, None]
StreamSpec = Union["StreamGuard", str, None]


def is_server_url(value: str) -> bool:
    """True when ``value`` names servers (``http(s)://...``, possibly comma-separated), not a model."""
    return value.strip().lower().startswith(("http://", "https://"))


def check_guard_name(kind: str, name: str) -> str:
    """A guard name that can be seen to be wrong without loading anything (empty; a server URL for
    Stream) is a ``ValueError`` now, so a bad option fails where it is given, not in a first request."""
    if not name.strip():
        raise ValueError(f"a {kind} guard name is empty; pass a model id, a directory"
                         f"{' or a server URL' if kind == 'Gen' else ''}")
    if kind == "Stream" and is_server_url(name):
        raise ValueError(f"a Stream guard must be a model id or a directory, got {name!r} "
                         "(Qwen3Guard-Stream has no server form; only Gen can run on vLLM / SGLang)")
    return name


def gen_backend(spec: Any = CONFIGURED, *, settings: Settings | None = None, **kwargs: Any) -> GenBackend:
    """The Gen guard ``spec`` names; ``kwargs`` go to ``RemoteGenGuard`` or ``GenGuard.from_pretrained``."""
    if spec is not CONFIGURED and not isinstance(spec, str):
        if isinstance(spec, GenBackend):
            return spec
        raise TypeError(f"a Gen guard must be a GenGuard, a RemoteGenGuard, a model id, a directory or a server URL, "
                        f"got {type(spec).__name__}")
    env = settings or Settings.from_env()
    remote = bool(env.gen_urls) if spec is CONFIGURED else is_server_url(spec)
    if spec is CONFIGURED:
        spec = env.gen_urls or env.gen_model or DEFAULT_GEN_MODEL
    check_guard_name("Gen", spec)
    if remote:
        options: dict[str, Any] = {"model": env.gen_model, "api_key": env.gen_api_key, "fail_open": env.fail_open}
        if env.gen_timeout is not None:
            options["timeout"] = env.gen_timeout
        return RemoteGenGuard(spec, **{**options, **kwargs})
    from .gen import GenGuard

    return GenGuard.from_pretrained(spec, **{"device": env.device, **kwargs})


def stream_backend(spec: Any = CONFIGURED, *, settings: Settings | None = None, **kwargs: Any) -> StreamGuard:
    """The Stream guard ``spec`` names (a loaded ``StreamGuard``, a hub id or a directory)."""
    if spec is not CONFIGURED and not isinstance(spec, str):
        if callable(getattr(spec, "gate", None)) and callable(getattr(spec, "session", None)):
            return spec  # type: ignore[no-any-return]
        raise TypeError(f"a Stream guard must be a StreamGuard, a model id or a directory, got {type(spec).__name__}")
    env = settings or Settings.from_env()
    if spec is CONFIGURED:
        spec = env.stream_model or DEFAULT_STREAM_MODEL
    check_guard_name("Stream", spec)
    from .stream import StreamGuard

    return StreamGuard.from_pretrained(spec, **{"device": env.device, **kwargs})


def load_gen_guard(model_or_url: str | None = None, *, environ: Mapping[str, str] | None = None, **kwargs: Any) -> GenBackend:
    """A Gen guard: remote for server URL(s) or ``QWEN3GUARD_GEN_URL``, else the local model.

    ``model_or_url`` is a hub id, a local directory or ``http(s)://`` base URL(s); None reads the
    environment. ``kwargs`` go to ``RemoteGenGuard`` or ``GenGuard.from_pretrained``.
    """
    return gen_backend(CONFIGURED if model_or_url is None else model_or_url, settings=Settings.from_env(environ), **kwargs)


def fail_open_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """``QWEN3GUARD_FAIL_OPEN`` as a bool (False when unset); a typo raises instead of silently failing open."""
    return Settings.from_env(environ).fail_open


def default_policy(settings: Settings, base: Policy | None = None) -> Policy:
    """``base`` (default ``Policy()``, Controversial handled as ``QWEN3GUARD_CONTROVERSIAL`` says)
    with ``on_error=Safe`` when the settings fail open.

    This is the default policy of every adapter; a policy passed in code keeps its actions.
    """
    actions = {RiskLevel.CONTROVERSIAL: Action(settings.controversial)} if settings.controversial else {}
    policy = base or Policy(actions=actions)
    if settings.fail_open and policy.on_error is RiskLevel.UNSAFE:
        return policy.with_overrides(on_error=RiskLevel.SAFE)
    return policy


def policy_from_env(base: Policy | None = None, environ: Mapping[str, str] | None = None) -> Policy:
    """``default_policy`` for the environment (``QWEN3GUARD_FAIL_OPEN``)."""
    return default_policy(Settings.from_env(environ), base)
