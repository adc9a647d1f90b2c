"""The Runtime inside web processes: one per process that serves requests, none elsewhere.

With ``PGPUBSUB_EMBEDDED = True``, :func:`autostart` (called when the app is ready) starts a
Runtime in:

- runserver's serving process (the autoreloader's child, or the only process with
  ``--noreload``);
- each gunicorn worker; with ``--preload``, the master loads the app but only the workers it
  forks start a Runtime;
- a process whose WSGI or ASGI application is being loaded (uvicorn, hypercorn, daphne,
  waitress, ...).

Nothing starts in other management commands (``migrate``, ``shell``, ``test``, ``listen``
itself...) or in other scripts that set Django up. A Runtime never crosses a fork: a forked
child starts with none. :func:`start` and :func:`stop` are for projects that start it
themselves (see also :mod:`pgpubsub.gunicorn`).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from pgpubsub import conf
from pgpubsub.runtime import Runtime
from pgpubsub.wakeup import Wakeup
from pgpubsub.workers import IDLE_WAIT

logger = logging.getLogger(__name__)

#: Seconds autostart waits for Django's apps to be loaded.
APPS_READY_TIMEOUT = 60.0
#: Seconds a stop signal's handler waits beyond PGPUBSUB_SHUTDOWN_TIMEOUT for the Runtime to
#: stop (its threads close their connections) before it lets the process go on.
STOP_MARGIN = 2.0

_lock = threading.Lock()
_runtime: Runtime | None = None
# Runtimes inherited through a fork: their threads did not come along, and their connections'
# sockets are the parent's. They are kept referenced, so that garbage collection never closes
# those connections under the parent.
_inherited: list[Runtime] = []
# The pid of the gunicorn master (with --preload) whose forked workers start a Runtime.
_gunicorn_master: int | None = None
# True in a process where autostart decided a Runtime should run.
_expected = False


def expected() -> bool:
    """True when ``PGPUBSUB_EMBEDDED`` made this process start a Runtime (so one that is not
    running is a problem: see the process's log)."""
    return _expected


def runtime() -> Runtime | None:
    """The Runtime started in this process, if any."""
    current = _runtime
    return current if current is not None and current.running else None


def start() -> Runtime:
    """Start this process's Runtime from the settings, unless it runs already; returns it."""
    global _runtime
    with _lock:
        if _runtime is not None and _runtime.running:
            return _runtime
        _runtime = Runtime(
            conf.channels(),
            workers=conf.workers(),
            queue_size=conf.queue_size(),
            recover=conf.recover_on_start(),
            shutdown_timeout=conf.shutdown_timeout(),
        ).start()
        return _runtime


def stop(timeout: float | None = None) -> bool:
    """Stop this process's Runtime (see :meth:`Runtime.stop`); True if it stopped in time."""
    global _runtime
    with _lock:
        current, _runtime = _runtime, None
    if current is None:
        return True
    return current.stop(timeout)


def autostart() -> None:
    """Start a Runtime if ``PGPUBSUB_EMBEDDED`` is on and this process serves requests."""
    global _gunicorn_master, _expected
    if not conf.embedded():
        return
    role = _role(sys._getframe(1))
    if role in ("serving", "gunicorn worker"):
        _expected = True
        # gunicorn workers exit normally on SIGTERM; other servers may die of it.
        stopper = _stop_on_signals() if role == "serving" else None
        # Called from an AppConfig.ready(): the apps that come later, and the listeners they
        # import, are not loaded yet. Start once they are.
        threading.Thread(
            target=_start_when_ready, args=(stopper,), name="pgpubsub-autostart", daemon=True
        ).start()
    elif role == "gunicorn master":
        logger.debug("gunicorn master: a Runtime starts in each worker it forks")
        _gunicorn_master = os.getpid()


def _start_when_ready(stopper: _Stopper | None) -> None:
    """Start the Runtime once the apps are ready; then, with a ``stopper``, stay to stop it
    when a stop signal's handler asks."""
    from django.apps import apps

    if not apps.ready_event.wait(APPS_READY_TIMEOUT):
        logger.error(
            "Django's apps were not ready after %ss: no pgpubsub Runtime", APPS_READY_TIMEOUT
        )
    elif stopper is None or not stopper.asked.is_set:
        try:
            start()
        except Exception:
            logger.exception("The embedded pgpubsub Runtime could not start")
    if stopper is not None:
        stopper.serve()


def _role(frame: FrameType | None) -> str | None:
    """What this process is, judged from the code that is loading Django: "serving", "gunicorn
    worker", "gunicorn master", or None (anything else)."""
    callers: set[tuple[str, str]] = set()
    command_frame = None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        callers.add((module, frame.f_code.co_name))
        if module == "django.core.management" and frame.f_code.co_name == "execute":
            command_frame = frame
        frame = frame.f_back
    if command_frame is not None:
        return "serving" if _serving_runserver(command_frame) else None
    modules = {module for module, _ in callers}
    if "gunicorn.workers.base" in modules:
        return "gunicorn worker"
    if "gunicorn.arbiter" in modules:
        return "gunicorn master"
    if callers & {
        ("django.core.wsgi", "get_wsgi_application"),
        ("django.core.asgi", "get_asgi_application"),
    }:
        return "serving"
    # The project's WSGI or ASGI module is being imported, and calls django.setup() itself
    # before it builds the application (as ASGI routers often do).
    if modules & _application_modules():
        return "serving"
    return None


def _application_modules() -> set[str]:
    from django.conf import settings

    paths = (getattr(settings, name, None) for name in ("WSGI_APPLICATION", "ASGI_APPLICATION"))
    return {path.rpartition(".")[0] for path in paths if isinstance(path, str) and "." in path}


def _serving_runserver(command_frame: FrameType) -> bool:
    """True in the process of ``manage.py runserver`` that serves: the autoreloader's child
    (which the parent starts with ``RUN_MAIN=true``), or the only one with ``--noreload``."""
    from django.utils.autoreload import DJANGO_AUTORELOAD_ENV

    utility = command_frame.f_locals.get("self")
    argv = list(getattr(utility, "argv", None) or sys.argv)
    if len(argv) < 2 or argv[1] != "runserver":
        return False
    return os.environ.get(DJANGO_AUTORELOAD_ENV) == "true" or "--noreload" in argv


def _after_fork_in_child() -> None:
    global _runtime, _lock, _expected
    _lock = threading.Lock()  # another thread may have held it at the fork
    if _runtime is not None:
        _inherited.append(_runtime)
        _runtime = None
    _expected = False
    # Only the master's own children that become workers: not a process forked by a worker
    # (a view or a callback may fork), which still runs under spawn_worker's frame.
    if (
        _gunicorn_master is not None
        and os.getppid() == _gunicorn_master
        and _forked_by("gunicorn.arbiter", "spawn_worker")
    ):
        _expected = True
        try:
            start()
        except Exception:
            logger.exception("The embedded pgpubsub Runtime could not start")


class _Stopper:
    """Stops the Runtime when a stop signal comes, before the server's own handling of the
    signal, without doing anything in the handler that a second signal could deadlock on.

    The handler asks, by a flag and a pipe (:class:`~pgpubsub.runtime.Wakeup`); the autostart
    thread, which waits for that, stops the Runtime (running callbacks get their shutdown
    timeout) and says so through another pipe; meanwhile the handler waits on that pipe, then
    calls the server's handler. Waiting there, rather than leaving the stop to the exit handlers,
    is what makes it happen: servers that end on the signal skip the exit handlers, and
    uvicorn's workers load the application while their own handlers are set, put the default
    one back on the way out and raise the signal again, which ends the process at once.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.asked = Wakeup()
        self.done = Wakeup()
        self._handling = False

    def serve(self) -> None:
        """Wait for a handler to ask (on the autostart thread), stop the Runtime, say so."""
        while not self.asked.wait(IDLE_WAIT):
            pass
        try:
            stop()
        finally:
            self.done.set()

    def handler(self, previous: Any) -> Callable[[int, FrameType | None], None]:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            if os.getpid() != self.pid:
                # A process forked from this one: the stopper's thread did not come along.
                _pass_on(previous, signum, frame)
                return
            if not self._handling:
                self._handling = True
                # Read before asking: the stop takes the Runtime away. Attribute reads only,
                # no lock in a handler.
                current = _runtime
                timeout = current.shutdown_timeout if current is not None else 0.0
                self.asked.set()
                self.done.wait(timeout + STOP_MARGIN)
                self._handling = False
            elif not callable(previous):
                # A second signal while the first waits for the callbacks: the first one's
                # handler ends the process once they are done.
                return
            _pass_on(previous, signum, frame)

        return on_signal


def _pass_on(previous: Any, signum: int, frame: FrameType | None) -> None:
    """Do what was set for ``signum`` before pgpubsub's handler."""
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _stop_on_signals() -> _Stopper | None:
    """Stop the Runtime on SIGTERM (and on SIGINT where the server handles it itself), before
    what was set for the signal: servers that end on SIGTERM skip the exit handlers that would
    stop it. Only the main thread may set a handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    stopper = None
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if previous is None:  # set outside Python: leave it alone
            continue
        if signum == signal.SIGINT and (
            not callable(previous) or previous is signal.default_int_handler
        ):
            # Python's KeyboardInterrupt ends the process normally: the exit handler stops
            # the Runtime. A server's own handler (uvicorn's workers) may not.
            continue
        if stopper is None:
            stopper = _Stopper()
        signal.signal(signum, stopper.handler(previous))
    return stopper


def _forked_by(module: str, function: str) -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__") == module and frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def _stop_at_exit() -> None:
    current = _runtime
    if current is not None and current.running:
        stop()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_stop_at_exit)
