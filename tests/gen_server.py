"""A local OpenAI-compatible server for a Gen checkpoint, standing in for vLLM / SGLang in tests.

It does what vLLM does with a Qwen3Guard-Gen checkpoint: renders the request's ordinary chat
messages with the tokenizer's own chat template (which builds the moderation prompt), tokenizes
that string as a whole, decodes greedily and answers a ``chat.completion`` JSON body, with
logprobs when asked. Faults can be queued (``fail_next``), requests held until enough of them are
in flight at once (``hold``), and the server stopped and restarted on the same port, so tests
exercise real sockets, real HTTP and real model output, and prove timing behaviour by events.

Usage::

    model, tokenizer = load_gen_model(gen_checkpoint())
    with GenServer(model, tokenizer) as server:
        guard = RemoteGenGuard(server.base_url, model=server.model_name)
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

Fault = Literal["500", "429", "400", "hang", "malformed", "empty"]

#: One lock for every server sharing a model: two CPU cores, and generate() is not reentrant-safe.
_MODEL_LOCK = threading.Lock()


def load_gen_model(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The checkpoint and its tokenizer (with the chat template the server will apply)."""
    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def unused_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


#: How often a waiting request re-checks what it waits for.
_POLL_S = 0.002


@dataclass
class _Pending:
    fault: Fault
    retry_after: str | None
    hang_s: float


@dataclass
class _Hold:
    """The next ``count`` requests wait until ``in_flight`` are in flight at once (see ``GenServer.hold``)."""

    count: int
    in_flight: int
    safety_s: float
    arrived: int = 0
    ended: bool = False


class GenServer:
    """A threaded uvicorn server on 127.0.0.1 serving one model under ``model_name``.

    Observability for tests: ``requests`` (chat request bodies in arrival order), ``headers``
    (their headers), ``completions`` (requests answered successfully), ``max_in_flight`` (the
    most chat requests being handled at once), ``hanging`` (requests inside a ``hang`` fault now)
    and ``hold_timeouts`` (held requests that gave up waiting, see ``hold``).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                 model_name: str = "qwen3guard-gen-test", api_key: str | None = None, port: int = 0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.port = port
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.completions = 0
        self.max_in_flight = 0
        self.hanging = 0
        self.hold_timeouts = 0
        self._in_flight = 0
        self._releases = 0
        self._hold: _Hold | None = None
        self._faults: deque[_Pending] = deque()
        self._lock = threading.Lock()
        self._stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ])

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (ends in ``/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._server is not None

    def start(self) -> GenServer:
        """Listen (again) on ``port`` (a free one the first time) and wait until requests are accepted."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name=f"gen-server-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the test Gen server on port {self.port} did not start")
            time.sleep(0.01)
        self._sock = sock
        return self

    def stop(self) -> None:
        """Shut down: the listening socket closes at once, open connections within a second."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> GenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, count: int, fault: Fault, *, retry_after: str | None = None, hang_s: float = 30.0) -> None:
        """Answer the next ``count`` chat requests with ``fault`` instead of a completion.

        ``500``: an OpenAI-style error body; ``429``: Too Many Requests with ``Retry-After:
        retry_after`` when given; ``400``: the request rejected, as vLLM rejects a conversation
        longer than the model's context; ``hang``: answer normally only after ``release_hangs()`` (or
        ``reset()``), at the latest after ``hang_s`` (past any client's timeout); ``malformed``:
        status 200 with a truncated JSON body; ``empty``: status 200 with an empty message.
        """
        with self._lock:
            self._faults.extend(_Pending(fault, retry_after, hang_s) for _ in range(count))

    def release_hangs(self) -> None:
        """Let every request now inside a ``hang`` fault go on and answer."""
        with self._lock:
            self._releases += 1

    def hold(self, count: int, *, in_flight: int, safety_s: float = 20.0) -> None:
        """Hold each of the next ``count`` chat requests until ``in_flight`` requests are in flight at once.

        A batch's tail, fewer than ``in_flight``, goes on once the last of the ``count`` has arrived.
        A client that never has ``in_flight`` requests open at once (it sends one after another)
        leaves the first held request waiting: after ``safety_s`` it counts in ``hold_timeouts`` and
        the hold ends, so such a test fails on that count instead of hanging.
        """
        with self._lock:
            self._hold = _Hold(count, in_flight, safety_s)

    def reset(self) -> None:
        """Forget recorded requests, counters, holds and queued faults; release hanging requests."""
        with self._lock:
            self.requests.clear()
            self.headers.clear()
            self._faults.clear()
            if self._hold is not None:
                self._hold.ended = True
            self._hold = None
            self._releases += 1
            self.completions = self.max_in_flight = self.hold_timeouts = 0

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "test"}]})

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        with self._lock:
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            pending = self._faults.popleft() if self._faults else None
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            hold = self._hold if self._hold is not None and self._hold.arrived < self._hold.count else None
            if hold is not None:
                hold.arrived += 1
        try:
            if hold is not None:
                await self._wait_for_company(hold)
            return await self._answer(request, body, pending)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _wait_for_company(self, hold: _Hold) -> None:
        def enough() -> bool:
            return hold.ended or self._in_flight >= hold.in_flight or hold.arrived == hold.count

        if not await self._wait_until(enough, hold.safety_s):
            with self._lock:
                self.hold_timeouts += 1
                hold.ended = True

    async def _hang(self, pending: _Pending) -> None:
        with self._lock:
            releases = self._releases
            self.hanging += 1
        try:
            await self._wait_until(lambda: self._releases != releases, pending.hang_s)
        finally:
            with self._lock:
                self.hanging -= 1

    async def _wait_until(self, ready: Callable[[], bool], timeout_s: float) -> bool:
        """Poll ``ready`` (under the lock) without blocking the server; False if ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if ready():
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)

    async def _answer(self, request: Request, body: dict[str, Any], pending: _Pending | None) -> Response:
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Unauthorized", "AuthenticationError")
        if pending is not None and pending.fault == "500":
            return _error(500, "injected internal error", "InternalServerError")
        if pending is not None and pending.fault == "400":
            return _error(400, "injected rejection: the conversation is longer than the model's context", "BadRequestError")
        if pending is not None and pending.fault == "429":
            headers = {"Retry-After": pending.retry_after} if pending.retry_after is not None else {}
            return _error(429, "injected rate limit", "RateLimitError", headers)
        if pending is not None and pending.fault == "malformed":
            return Response('{"id": "chatcmpl-x", "choices": [{"message": {"content": "Saf', media_type="application/json")
        if pending is not None and pending.fault == "empty":
            return JSONResponse({"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}}]})
        if pending is not None and pending.fault == "hang":
            await self._hang(pending)
        if body.get("model") != self.model_name:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else None
        text, logprobs, prompt_tokens = await asyncio.to_thread(
            self._generate, body["messages"], int(body.get("max_tokens") or 128), top)
        with self._lock:
            self.completions += 1
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": []},
                "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(logprobs or []),
                      "total_tokens": prompt_tokens + len(logprobs or [])},
        })

    def _generate(self, messages: list[dict[str, Any]], max_tokens: int, top: int | None) -> tuple[str, list[dict[str, Any]] | None, int]:
        """Template, tokenize and greedy-decode as vLLM does; logprobs per generated token when ``top`` is set."""
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        with _MODEL_LOCK, torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=self._stop_ids,
                                      pad_token_id=self._stop_ids[1], output_logits=True, return_dict_in_generate=True)
        prompt_len = inputs["input_ids"].shape[1]
        new = out.sequences[0, prompt_len:].tolist()
        while new and new[-1] in self._stop_ids:
            new.pop()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        if top is None:
            return text, None, prompt_len
        entries = []
        for step, token_id in enumerate(new):
            logp = torch.log_softmax(out.logits[step][0].float(), dim=-1)
            values, ids = logp.topk(max(top, 1))
            entries.append({**self._token(token_id, float(logp[token_id])),
                            "top_logprobs": [self._token(i, v) for i, v in zip(ids.tolist(), values.tolist())][:top]})
        return text, entries, prompt_len

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"object": "error", "error": {"message": message, "type": kind, "code": status}},
                        status_code=status, headers=headers)
