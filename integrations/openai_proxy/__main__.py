"""``python -m integrations.openai_proxy`` / ``qwen3guard-proxy``: run the guard proxy with uvicorn.

Configuration is the library's (``guard_core.config``): ``QWEN3GUARD_UPSTREAM`` (default for
``--upstream``), ``QWEN3GUARD_UPSTREAM_API_KEY`` (or ``OPENAI_API_KEY``) sent upstream,
``QWEN3GUARD_PROXY_KEYS`` (keys clients must present; read from the environment only, so they
never show in ``ps``; set, it must hold a key), and the guards' ``QWEN3GUARD_GEN_URL`` / ``QWEN3GUARD_GEN_MODEL`` /
``QWEN3GUARD_STREAM_MODEL`` / ``QWEN3GUARD_FAIL_OPEN`` / ``QWEN3GUARD_REVIEW_DB``. Any error is one
line on stderr and exit status 2; the flags, the upstream URL and the listening address are
checked before the models load, and the port is bound then. Ctrl-C stops it, loading or serving, with
exit status 130.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from argparse import ArgumentTypeError, Namespace
from collections.abc import Sequence
from types import FrameType

from guard_core import CONFIGURED, Moderator, Settings
from guard_core.cli import LOAD_ERRORS, Parser, bounded_int, check_model_path, one_line, quiet_model_loading
from guard_core.config import PROXY_KEYS_ENV, UPSTREAM_ENV, check_http_url, shown_url

from .exchange import DEFAULT_MAX_CHOICES, MAX_CHOICES
from .server import GUARD_MODES, create_app

PROG = "qwen3guard-proxy"
EXIT_ERROR = 2
#: Stopped by Ctrl-C (SIGINT), loading or serving: 128 + SIGINT, the status a shell gives a program the
#: signal ended, so a script or supervisor tells an interrupt from a clean exit (0).
EXIT_INTERRUPTED = 130


def _model(text: str) -> str:
    """An argparse ``type`` for a model flag: an empty value is a mistake, not the environment's model."""
    if not text.strip():
        raise ArgumentTypeError("is empty; give a model id, directory or server URL, or leave the flag out to use "
                                "the environment's")
    return text


def _parser() -> Parser:
    parser = Parser(prog=PROG, description="OpenAI-compatible Qwen3Guard proxy.")
    parser.add_argument("--upstream",
                        help=f"upstream OpenAI base URL, e.g. http://127.0.0.1:8001/v1 (default: ${UPSTREAM_ENV})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=bounded_int(0, 65535), default=8000, help="0 to 65535 (default 8000)")
    parser.add_argument("--gen-model", type=_model, help="Qwen3Guard-Gen id, directory or server URL (default: the environment)")
    parser.add_argument("--stream-model", type=_model, help="Qwen3Guard-Stream id or directory (default: the environment)")
    parser.add_argument("--on-unsafe", choices=sorted(GUARD_MODES), default="finish",
                        help="end blocked answers with a content_filter finish, or with an error")
    parser.add_argument("--max-choices", type=bounded_int(1, MAX_CHOICES), default=DEFAULT_MAX_CHOICES,
                        help=f"the largest 'n' a request may ask for, 1 to {MAX_CHOICES} (default {DEFAULT_MAX_CHOICES})")
    return parser


def _listen(host: str, port: int) -> socket.socket:
    """The socket the proxy serves on, bound now, before the models load.

    Listening here rather than in uvicorn means a busy port is one line before minutes of model
    loading, and no other process can take the port in between (connections made while the
    models load wait in the backlog).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"--host {host!r} cannot be resolved ({exc})") from None
    family, kind, proto, _, address = infos[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        listener.bind(address)
        listener.listen(2048)  # as uvicorn listens; a port is only exclusive once listened on
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is in use; pick another with --port") from None
        raise ValueError(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None
    return listener


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, load the guards and serve until interrupted; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        settings.check_keys()
        if PROXY_KEYS_ENV in os.environ and not settings.proxy_keys:  # "," or " " would otherwise run the proxy open
            raise ValueError(f"{PROXY_KEYS_ENV}={os.environ[PROXY_KEYS_ENV]!r} holds no key; set it to the comma-separated "
                             "keys clients must present, or unset it to run the proxy without keys")
        if args.upstream is not None:
            upstream = check_http_url(args.upstream, "--upstream ")
        elif settings.upstream is not None:
            upstream = check_http_url(settings.upstream, f"{UPSTREAM_ENV}=")
        else:
            parser.error(f"--upstream (or {UPSTREAM_ENV}) is required")
        check_model_path(args.gen_model, "--gen-model ")
        check_model_path(args.stream_model, "--stream-model ")
        listener = _listen(args.host, args.port)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        with listener:
            status = _serve(args, settings, upstream, listener)
    except KeyboardInterrupt:  # Ctrl-C while the models load
        status = EXIT_INTERRUPTED
    if status == EXIT_INTERRUPTED:
        print(f"{PROG}: interrupted", file=sys.stderr)
    return status


def _serve(args: Namespace, settings: Settings, upstream: str, listener: socket.socket) -> int:
    """Load the guards and serve on ``listener`` until interrupted; returns the exit status."""
    import uvicorn

    try:
        quiet_model_loading()
        moderator = Moderator(gen_guard=args.gen_model or CONFIGURED, stream_guard=args.stream_model or CONFIGURED,
                              source="openai.proxy", settings=settings)
        moderator.load()  # now, so /healthz and the first request are ready, and a bad model fails here
        app = create_app(upstream, moderator=moderator, api_keys=set(settings.proxy_keys) or None,
                         upstream_api_key=settings.upstream_api_key, on_unsafe=args.on_unsafe, max_choices=args.max_choices)
    except LOAD_ERRORS as exc:
        print(f"{PROG}: error: {one_line(exc, None)}", file=sys.stderr)
        return EXIT_ERROR
    host, port = listener.getsockname()[:2]
    print(f"{PROG}: serving http://{f'[{host}]' if ':' in host else host}:{port}/v1 in front of {shown_url(upstream)}",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    interrupted = False

    def stop(sig: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted = True
        server.handle_exit(sig, frame)

    # Ctrl-C is uvicorn's clean shutdown from here on, also before uvicorn takes the signal over (asyncio would
    # raise KeyboardInterrupt mid-startup, with tracebacks); uvicorn hands it back here once it has shut down.
    previous = signal.signal(signal.SIGINT, stop)
    try:
        server.run(sockets=[listener])
    finally:
        signal.signal(signal.SIGINT, previous)
    return EXIT_INTERRUPTED if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
