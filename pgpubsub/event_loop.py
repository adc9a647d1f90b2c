"""The event loop a Runtime owns, where ``async def`` listeners and tasks run.

One loop thread per Runtime; at most ``PGPUBSUB_ASYNC_CONCURRENCY`` coroutines run on it at
once. A worker thread that runs an async listener hands the coroutine to the loop and waits
for it: the message's transaction (the row's lock and acknowledgement, for a lockable message
or a task) is the worker's, and commits once the coroutine is done. Database access in the
coroutine follows Django's async rules: the async ORM methods or ``sync_to_async``, whose work
runs on a thread and connections of the coroutine's own (as in a request of Django's ASGI
handler), closed when it ends, and commits on its own (not in the message's transaction).

Without a running Runtime (``listen_to_channels()``, a test calling a listener), a coroutine
runs on a loop of its own, on the calling thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections

logger = logging.getLogger("pgpubsub.runtime")


async def _own_context(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coroutine`` with a thread of its own for its sync_to_async() work, whose database
    connections are closed once it is done."""
    async with ThreadSensitiveContext():
        try:
            return await coroutine
        finally:
            await sync_to_async(connections.close_all)()


class EventLoop:
    """An asyncio loop on a thread of its own, running at most ``concurrency`` coroutines."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.loop = asyncio.new_event_loop()
        self._slots: asyncio.Semaphore | None = None
        self._thread = threading.Thread(target=self._run, name="pgpubsub-event-loop", daemon=True)
        self._start_lock = threading.Lock()
        self.stopped = False

    def _started(self) -> bool:
        """Start the loop's thread at the first coroutine (most Runtimes never run one)."""
        with self._start_lock:
            if self.stopped:
                return False
            if not self._thread.is_alive():
                self._thread.start()
            return True

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def _bounded(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        if self._slots is None:  # made on the loop's thread, for the loop
            self._slots = asyncio.Semaphore(self.concurrency)
        async with self._slots:
            return await _own_context(coroutine)

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> concurrent.futures.Future | None:
        """Hand ``coroutine`` to the loop; None once the loop stopped."""
        if not self._started():
            return None
        return asyncio.run_coroutine_threadsafe(self._bounded(coroutine), self.loop)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (coroutines still running are cancelled) and its thread."""
        with self._start_lock:
            self.stopped = True
            started = self._thread.is_alive()
        if started:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        elif not self.loop.is_closed():
            self.loop.close()


_current: EventLoop | None = None
_lock = threading.Lock()


def install(concurrency: int) -> EventLoop:
    """Start this process's loop (a Runtime's, as it starts); the one running if there is one."""
    global _current
    with _lock:
        if _current is None or _current.stopped:
            _current = EventLoop(concurrency)
        return _current


def uninstall(loop: EventLoop, timeout: float = 5.0) -> None:
    """Stop ``loop`` (a Runtime's, as it stops), if it is still this process's."""
    global _current
    with _lock:
        if _current is loop:
            _current = None
    loop.stop(timeout)


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coroutine`` to its end and return its result (or raise its error): on the
    Runtime's loop when one runs in this process, else on a loop of its own."""
    loop = _current
    future = None if loop is None else loop.submit(coroutine)
    if future is None:
        return asyncio.run(_own_context(coroutine))
    try:
        return future.result()
    except concurrent.futures.CancelledError:
        raise RuntimeError("The Runtime stopped while the coroutine ran") from None


def _forget_after_fork() -> None:
    global _current, _lock
    _current = None  # the parent's loop thread is not in the child
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def call(callback: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Call a listener: an ``async def`` one's coroutine runs to its end (:func:`run`)."""
    result = callback(**kwargs)
    if inspect.iscoroutine(result):
        return run(result)
    return result
