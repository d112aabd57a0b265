"""``python -m integrations.openai_proxy`` / ``qwen3guard-proxy``: run the guard proxy with uvicorn.

Environment: ``QWEN3GUARD_UPSTREAM`` (default for ``--upstream``), ``QWEN3GUARD_UPSTREAM_API_KEY``
(or ``OPENAI_API_KEY``) sent upstream, ``QWEN3GUARD_PROXY_KEYS`` (comma-separated keys clients
must present). Keys are read from the environment only, so they never show in ``ps``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from guard_core import DEFAULT_GEN_MODEL
from guard_core.stream import DEFAULT_STREAM_MODEL

from .moderation import Moderator
from .server import MODERATOR_MODES, create_app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3guard-proxy", description="OpenAI-compatible Qwen3Guard proxy.")
    parser.add_argument("--upstream", default=os.environ.get("QWEN3GUARD_UPSTREAM"),
                        help="upstream OpenAI base URL, e.g. http://127.0.0.1:8001/v1 (env QWEN3GUARD_UPSTREAM)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--gen-model", default=DEFAULT_GEN_MODEL, help="Qwen3Guard-Gen model id or directory")
    parser.add_argument("--stream-model", default=DEFAULT_STREAM_MODEL, help="Qwen3Guard-Stream model id or directory")
    parser.add_argument("--on-unsafe", choices=sorted(MODERATOR_MODES), default="finish",
                        help="end blocked answers with a content_filter finish, or with an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, load the guards and serve until interrupted; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.upstream:
        parser.error("--upstream (or QWEN3GUARD_UPSTREAM) is required")
    import uvicorn

    keys = {k.strip() for k in os.environ.get("QWEN3GUARD_PROXY_KEYS", "").split(",") if k.strip()} or None
    upstream_key = os.environ.get("QWEN3GUARD_UPSTREAM_API_KEY") or os.environ.get("OPENAI_API_KEY") or None
    moderator = Moderator(stream_guard=args.stream_model, gen_guard=args.gen_model, on_unsafe=MODERATOR_MODES[args.on_unsafe])  # type: ignore[arg-type]
    moderator.stream_guard, moderator.gen_guard  # load both now, so /healthz and the first request are ready
    app = create_app(args.upstream, moderator=moderator, api_keys=keys, upstream_api_key=upstream_key, on_unsafe=args.on_unsafe)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
