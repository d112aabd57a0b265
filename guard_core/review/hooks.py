"""Running the application's resolution hooks, sync or async, from sync or async code.

Every hook finishes before ``resolve`` / ``aresolve`` returns, so an application knows its
notification was sent (or why not) when the call comes back:

- ``aresolve`` awaits async hooks on the caller's event loop and runs sync hooks in a worker
  thread (a slow hook never blocks the loop);
- ``resolve`` calls sync hooks directly and runs async hooks with ``asyncio.run``, in a helper
  thread when the calling thread is already running an event loop.

Hooks run in registration order; one failing does not stop the others, and the failures are
raised together afterwards as ``ReviewHookError`` (the decision itself is already saved).
"""

from __future__ import annotations

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Sequence

from .model import ReviewItem

#: A resolution hook: called with the resolved item; may be a coroutine function.
ResolveHook = Callable[[ReviewItem], Any]


class ReviewHookError(RuntimeError):
    """The item was resolved and saved, but at least one resolution hook raised.

    ``item`` is the resolved item and ``errors`` the exceptions, in hook order (the first is
    also the ``__cause__``), so the caller can retry just the notification.
    """

    def __init__(self, item: ReviewItem, errors: Sequence[BaseException]) -> None:
        self.item = item
        self.errors = tuple(errors)
        first = self.errors[0]
        super().__init__(f"review item {item.id} was {item.status}, but {len(self.errors)} resolution hook(s) "
                         f"failed; first: {type(first).__name__}: {first}")


def is_async_hook(hook: ResolveHook) -> bool:
    """True for coroutine functions, including objects whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(getattr(hook, "__call__", None))


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _finish(awaitable: Awaitable[Any]) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(_await(awaitable))
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen3guard-review-hook") as pool:
        pool.submit(asyncio.run, _await(awaitable)).result()


def run_hooks(hooks: Sequence[ResolveHook], item: ReviewItem) -> None:
    """Run every hook to completion from synchronous code."""
    errors: list[BaseException] = []
    for hook in hooks:
        try:
            result = hook(item)
            if inspect.isawaitable(result):
                _finish(result)
        except Exception as exc:  # noqa: BLE001 - collected and re-raised as ReviewHookError
            errors.append(exc)
    _raise_if_failed(item, errors)


async def arun_hooks(hooks: Sequence[ResolveHook], item: ReviewItem) -> None:
    """Run every hook to completion from a coroutine without blocking its event loop."""
    errors: list[BaseException] = []
    for hook in hooks:
        try:
            result = hook(item) if is_async_hook(hook) else await asyncio.to_thread(hook, item)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # noqa: BLE001 - collected and re-raised as ReviewHookError
            errors.append(exc)
    _raise_if_failed(item, errors)


def _raise_if_failed(item: ReviewItem, errors: list[BaseException]) -> None:
    if errors:
        raise ReviewHookError(item, errors) from errors[0]
