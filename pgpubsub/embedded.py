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
from types import FrameType

from pgpubsub import conf
from pgpubsub.runtime import Runtime

logger = logging.getLogger(__name__)

#: Seconds autostart waits for Django's apps to be loaded.
APPS_READY_TIMEOUT = 60.0

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
        if role == "serving":
            # gunicorn workers exit normally on SIGTERM; other servers may die of it.
            _stop_on_sigterm()
        # Called from an AppConfig.ready(): the apps that come later, and the listeners they
        # import, are not loaded yet. Start once they are.
        threading.Thread(target=_start_when_ready, name="pgpubsub-autostart", daemon=True).start()
    elif role == "gunicorn master":
        logger.debug("gunicorn master: a Runtime starts in each worker it forks")
        _gunicorn_master = os.getpid()


def _start_when_ready() -> None:
    from django.apps import apps

    if not apps.ready_event.wait(APPS_READY_TIMEOUT):
        logger.error(
            "Django's apps were not ready after %ss: no pgpubsub Runtime", APPS_READY_TIMEOUT
        )
        return
    try:
        start()
    except Exception:
        logger.exception("The embedded pgpubsub Runtime could not start")


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


def _stop_on_sigterm() -> None:
    """On SIGTERM, stop the Runtime (running callbacks get their shutdown timeout), then do
    what was set for SIGTERM before: servers that end on SIGTERM skip the exit handlers that
    would stop it. Only the main thread may set a handler."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # set outside Python: leave it alone
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if callable(previous):
            # The server's own shutdown comes next; the exit handler waits for the callbacks.
            current = _runtime
            if current is not None:
                current.request_stop()
            previous(signum, frame)
            return
        stop()  # the process ends right after: wait for the running callbacks here
        if previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)


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
