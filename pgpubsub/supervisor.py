"""``listen --processes N``: start N listener processes, replace any that dies, stop them all on
SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connections

from pgpubsub import conf
from pgpubsub.wakeup import Wakeup

logger = logging.getLogger(__name__)

#: How often the supervisor looks at its children, in seconds.
CHECK_INTERVAL = 0.5
#: Seconds children get to exit after SIGTERM beyond their own PGPUBSUB_SHUTDOWN_TIMEOUT,
#: before they are killed.
STOP_MARGIN = 5.0
#: Shortest time between two starts of the same child slot, in seconds.
RESTART_DELAY = 1.0


def _forked_worker(channels: list[str] | None, recover: bool, threads: int) -> None:
    from pgpubsub.runtime import Runtime

    Runtime(channels, workers=threads, recover=recover).run_until_signalled()


def _command_prefix() -> list[str]:
    """How to run a management command again: through the project's own ``manage.py`` when
    that is what started us (it may set things up before Django loads), else ``-m django``."""
    script = sys.argv[0] if sys.argv else ""
    if os.path.basename(script) != "__main__.py" and os.path.isfile(script):
        return [sys.executable, os.path.abspath(script)]
    return [sys.executable, "-m", "django"]


@dataclass(frozen=True)
class AfterExit:
    """What the supervisor does about a listener process that exited."""

    replace: bool  # start another in its slot
    pause: float = 0.0  # seconds to wait before starting it
    failed: bool = False  # the supervisor itself ends with a failure status


class RestartPolicy:
    """Whether a listener process that exited is replaced, and when.

    With ``restart``, every exit is followed by a replacement (a clean exit the supervisor did
    not ask for is no reason to run fewer processes), started no sooner than ``min_interval``
    seconds after the process it replaces was: a child that dies at once is not restarted in a
    busy loop. Without, nothing replaces it, and an exit with a non-zero code fails the
    supervisor (``listen --no-restart-on-failure``).
    """

    def __init__(self, restart: bool, min_interval: float = RESTART_DELAY) -> None:
        self.restart = restart
        self.min_interval = min_interval

    def after_exit(self, code: int, lifetime: float) -> AfterExit:
        """The decision for a process that exited with ``code`` (negative: killed by that
        signal) after running ``lifetime`` seconds."""
        if not self.restart:
            return AfterExit(replace=False, failed=code != 0)
        return AfterExit(replace=True, pause=max(0.0, self.min_interval - lifetime))


class _Child:
    """One running worker: a spawned ``manage.py listen --worker`` or a forked process."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.handle.pid

    def exitcode(self) -> int | None:
        if isinstance(self.handle, subprocess.Popen):
            return self.handle.poll()
        return self.handle.exitcode

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def join(self, timeout: float) -> None:
        if isinstance(self.handle, subprocess.Popen):
            try:
                self.handle.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        else:
            self.handle.join(timeout)


class Supervisor:
    """Runs ``processes`` listener processes until stopped, replacing those that exit as its
    :class:`RestartPolicy` says."""

    def __init__(
        self,
        processes: int,
        channels: list[str] | None = None,
        recover: bool = False,
        restart: bool = True,
        start_method: str = "spawn",
        extra_args: list[str] | None = None,
        threads: int = 1,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        if start_method not in ("spawn", "fork"):
            raise ValueError(f"Unsupported start method {start_method!r}: use 'spawn' or 'fork'")
        self.processes = processes
        self.channels = channels
        self.recover = recover
        self.restart = restart
        self.policy = RestartPolicy(restart)
        self.start_method = start_method
        self.extra_args = extra_args or []
        self.threads = threads
        self._stop = Wakeup()  # set by SIGTERM/SIGINT: a signal handler may do no more
        self.children: list[_Child | None] = [None] * processes

    def _start(self, slot: int, recover: bool) -> _Child:
        if self.start_method == "fork":
            connections.close_all()  # a child must never share the parent's sockets
            process = multiprocessing.get_context("fork").Process(
                target=_forked_worker,
                args=(self.channels, recover, self.threads),
                name=f"pgpubsub-{slot}",
            )
            process.start()
            child = _Child(process)
        else:
            args = [*_command_prefix(), "listen", "--worker", *self.extra_args]
            if recover:
                args.append("--recover")
            if self.channels:
                args += ["--channels", *self.channels]
            env = dict(os.environ)
            env["DJANGO_SETTINGS_MODULE"] = settings.SETTINGS_MODULE
            env["PYTHONPATH"] = os.pathsep.join(path or os.getcwd() for path in sys.path)
            child = _Child(subprocess.Popen(args, env=env))
        logger.info("Started listener process %s (pid %s)", slot, child.pid)
        return child

    def stop(self) -> None:
        """Ask ``run()`` to stop the children and return (from any thread, or a signal
        handler)."""
        self._stop.set()

    def run(self) -> int:
        """Supervise until stopped; returns 0, or 1 if a child failed while restarts were off
        (with restarts on, a replaced child is not a failure of the whole)."""
        status = 0
        try:
            with self._stop.catching(signal.SIGTERM, signal.SIGINT, exiting=True):
                try:
                    status = self._supervise()
                finally:
                    # Still catching: a second signal (Ctrl-C's SIGINT, then a process
                    # manager's SIGTERM) cuts nothing short.
                    self._stop_children()
        finally:
            self._stop.close()
        return status

    def _supervise(self) -> int:
        status = 0
        for slot in range(self.processes):
            if self._stop.is_set:
                return status
            self.children[slot] = self._start(slot, self.recover)
        while not self._stop.wait(CHECK_INTERVAL):
            for slot, child in enumerate(self.children):
                code = child.exitcode() if child is not None else None
                if child is None or code is None:
                    continue
                logger.warning(
                    "Listener process %s (pid %s) exited with code %s", slot, child.pid, code
                )
                self.children[slot] = None
                decision = self.policy.after_exit(code, time.monotonic() - child.started)
                if decision.failed:
                    status = 1
                if not decision.replace:
                    continue
                if decision.pause > 0 and self._stop.wait(decision.pause):
                    return status
                # The dead process's claimed rows were released: look for them again.
                self.children[slot] = self._start(slot, True)
            if not any(self.children):
                break
        return status

    def _stop_children(self) -> None:
        running = [child for child in self.children if child is not None]
        for child in running:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + conf.shutdown_timeout() + STOP_MARGIN
        for child in running:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.exitcode() is None:
                logger.warning(
                    "Listener process pid %s did not stop in time; killing it", child.pid
                )
                child.signal(signal.SIGKILL)
                child.join(5.0)
