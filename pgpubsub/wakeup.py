"""A flag that a signal handler may set, and the pipe that wakes whoever waits for it.

``listen``, its supervisor and the embedded Runtime's stopper wait on a :class:`Wakeup` for a
stop request; its ``catching()`` block routes SIGTERM/SIGINT to it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Wakeup:
    """A flag, and a pipe that wakes whoever waits for it: all a signal handler may safely do.

    Python runs a handler on the main thread between two bytecodes of whatever it interrupted:
    maybe while that code holds a lock (``threading.Event.set()`` takes one, and so do logging
    and the Runtime's queue), maybe inside the handler of an earlier signal (Ctrl-C's SIGINT,
    then a supervisor's SIGTERM). So ``set()`` takes no lock and logs nothing; the thread that
    waits does the real work, outside any handler.
    """

    def __init__(self) -> None:
        self.is_set = False
        self.signalled = False  # set() was called by one of catching()'s signals
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._closed = False

    def set(self) -> None:
        self.is_set = True
        if not self._closed:
            try:
                os.write(self._write, b"\0")
            except OSError:  # full: a wake-up is pending anyway
                pass

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``set()``; True once it was called."""
        if not self.is_set and not self._closed:
            select.select([self._read], [], [], timeout)
            # A Python function call: the handler of a signal that ended the wait has run
            # when it returns (see catching()).
            self._drain()
        return self.is_set

    def _drain(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except OSError:  # empty
            pass

    @contextlib.contextmanager
    def catching(self, *signums: int, exiting: bool = False) -> Iterator[None]:
        """Within the block, ``signums`` call ``set()`` (on the main thread; elsewhere no handler
        can be set, and nothing changes). After it, the previous handlers are back; with
        ``exiting`` (the block was the life of the process), once one of the signals came they
        are ignored instead: the process is on its way out, and a second Ctrl-C or SIGTERM
        arriving then must not kill it halfway through its exit.

        The pipe is also Python's wake-up fd meanwhile: a signal that the kernel delivers to
        another thread (any thread may receive a signal sent to the process) then ends the main
        thread's ``wait()`` at once; otherwise its handler would only run when the wait times
        out, as the main thread runs no bytecode until then."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.signalled = False
        previous = {signum: signal.signal(signum, self._on_signal) for signum in signums}
        previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                if exiting and self.signalled:
                    signal.signal(signum, signal.SIG_IGN)
                elif handler is not None:  # None: set outside Python, cannot be restored
                    signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True
        self.set()

    def close(self) -> None:
        self._closed = True
        for fd in (self._read, self._write):
            os.close(fd)
