"""What signal handlers and the listener's logs rely on in pgpubsub.runtime: a Wakeup ends the
main thread's wait whichever thread the kernel hands the signal to; a lost connection is one
log line."""

import logging
import os
import signal
import threading
import time

import pytest
from django.db import connection

from pgpubsub.wakeup import Wakeup
from tests.processes import LISTEN_SESSION, wait_for
from tests.testapp import channels


def test_a_signal_received_by_another_thread_ends_the_main_threads_wait():
    wakeup = Wakeup()
    release = threading.Event()
    other = threading.Thread(target=release.wait, args=(30,), name="test-signal-receiver")
    other.start()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        with wakeup.catching(signal.SIGUSR1):
            # The kernel may hand a process's signal to any thread: here, another one. Python
            # runs the handler on the main thread, which the wake-up fd must wake.
            signal.pthread_kill(other.ident, signal.SIGUSR1)
            started = time.monotonic()
            assert wakeup.wait(20) is True
            assert time.monotonic() - started < 5
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.set_wakeup_fd(-1) == -1  # no wake-up fd left behind
    finally:
        release.set()
        other.join(10)
        wakeup.close()


def test_once_a_signal_came_an_exiting_block_leaves_the_signals_ignored():
    """The life of a process (listen, its supervisor): a second Ctrl-C or SIGTERM that comes
    while the process exits must not kill it there (it died of SIGINT, exit code -2)."""
    previous = signal.getsignal(signal.SIGUSR1)
    wakeup = Wakeup()
    try:
        with wakeup.catching(signal.SIGUSR1, exiting=True):
            os.kill(os.getpid(), signal.SIGUSR1)
            assert wakeup.wait(20) is True
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        with wakeup.catching(signal.SIGUSR2, exiting=True):
            pass  # no signal came: the previous handler is back
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)
        wakeup.close()


def test_wait_times_out_without_a_signal():
    wakeup = Wakeup()
    try:
        assert wakeup.wait(0.05) is False
        wakeup.set()
        assert wakeup.wait(0) is True
    finally:
        wakeup.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_a_lost_listening_connection_is_logged_on_one_line(runtimes, caplog):
    caplog.set_level(logging.WARNING, logger="pgpubsub")
    runtime = runtimes(channels=[channels.Job], workers=1)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
            f"current_database() AND pid <> pg_backend_pid() AND {LISTEN_SESSION}"
        )
        assert cursor.fetchall() == [(True,)]
    wait_for(lambda: runtime.status()["reconnects"] == 1, 30, lambda: str(runtime.status()))
    (lost,) = [r for r in caplog.records if r.getMessage().startswith("Lost the listening")]
    message = lost.getMessage()
    assert "\n" not in message and "\t" not in message, repr(message)
    assert "server closed the connection unexpectedly This probably means" in message, message
