"""``python -m integrations.openai_proxy`` / ``qwen3guard-proxy``: run the guard proxy with uvicorn.

Configuration is the library's (``guard_core.config``): ``QWEN3GUARD_UPSTREAM`` (default for
``--upstream``), ``QWEN3GUARD_UPSTREAM_API_KEY`` (or ``OPENAI_API_KEY``) sent upstream,
``QWEN3GUARD_PROXY_KEYS`` (keys clients must present; read from the environment only, so they
never show in ``ps``), and the guards' ``QWEN3GUARD_GEN_URL`` / ``QWEN3GUARD_GEN_MODEL`` /
``QWEN3GUARD_STREAM_MODEL`` / ``QWEN3GUARD_FAIL_OPEN`` / ``QWEN3GUARD_REVIEW_DB``. Any error is one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from guard_core import CONFIGURED, GuardUnavailableError, Moderator, Settings

from .exchange import DEFAULT_MAX_CHOICES
from .server import GUARD_MODES, create_app


def _parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3guard-proxy", description="OpenAI-compatible Qwen3Guard proxy.")
    parser.add_argument("--upstream", default=settings.upstream,
                        help="upstream OpenAI base URL, e.g. http://127.0.0.1:8001/v1 (env QWEN3GUARD_UPSTREAM)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--gen-model", help="Qwen3Guard-Gen id, directory or server URL (default: the environment)")
    parser.add_argument("--stream-model", help="Qwen3Guard-Stream id or directory (default: the environment)")
    parser.add_argument("--on-unsafe", choices=sorted(GUARD_MODES), default="finish",
                        help="end blocked answers with a content_filter finish, or with an error")
    parser.add_argument("--max-choices", type=int, default=DEFAULT_MAX_CHOICES, help="the largest 'n' a request may ask for")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, load the guards and serve until interrupted; returns the exit status."""
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"qwen3guard-proxy: error: {exc}", file=sys.stderr)
        return 2
    parser = _parser(settings)
    args = parser.parse_args(argv)
    if not args.upstream:
        parser.error("--upstream (or QWEN3GUARD_UPSTREAM) is required")
    import uvicorn

    try:
        moderator = Moderator(gen_guard=args.gen_model or CONFIGURED, stream_guard=args.stream_model or CONFIGURED,
                              source="openai.proxy", settings=settings)
        moderator.load()  # now, so /healthz and the first request are ready, and a bad model fails here
        app = create_app(args.upstream, moderator=moderator, api_keys=set(settings.proxy_keys) or None,
                         upstream_api_key=settings.upstream_api_key, on_unsafe=args.on_unsafe, max_choices=args.max_choices)
    except (ValueError, TypeError, OSError, GuardUnavailableError, ImportError, RuntimeError) as exc:
        print(f"qwen3guard-proxy: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
