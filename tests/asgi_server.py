"""Serving an ASGI app on a free 127.0.0.1 port in a thread, for tests and benchmarks."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


class _ThreadedServer(uvicorn.Server):
    """uvicorn without signal handlers, which only the main thread may install."""

    def install_signal_handlers(self) -> None:
        pass


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn until the block ends; yields its ``/v1`` base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _ThreadedServer(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
