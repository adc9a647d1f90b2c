import threading

import pytest

from pgpubsub.testing import postgres


def pytest_unconfigure(config):
    postgres.stop()


@pytest.fixture(autouse=True)
def _clear_received():
    from tests.testapp.listeners import received

    received.clear()
    yield
    received.clear()


@pytest.fixture
def processes():
    """Starts ``manage.py listen`` subprocesses (``processes.start(...)``); stops them after."""
    from tests.processes import ListenProcesses

    started = ListenProcesses()
    yield started
    started.stop_all()


@pytest.fixture
def listening(django_db_setup):
    """LISTEN on this thread's connection (as django-pgpubsub 1.x tests do); yields the wrapper."""
    from django.db import connection

    from pgpubsub.listen import listen_to_channels

    wrapper = listen_to_channels()
    yield wrapper
    wrapper.stop()
    with connection.cursor() as cursor:
        cursor.execute("UNLISTEN *")


@pytest.fixture
def runtimes():
    """``runtimes(**kwargs)`` starts a Runtime in this process and waits until it listens; all
    are stopped after the test, and none of their threads may outlive it."""
    from pgpubsub.runtime import Runtime
    from tests.processes import wait_for
    from tests.testapp.listeners import timings

    started: list[Runtime] = []

    def start(**kwargs) -> Runtime:
        runtime = Runtime(**kwargs)
        started.append(runtime)
        runtime.start()
        wait_for(lambda: runtime.status()["connected"], 30, "the Runtime to listen")
        return runtime

    timings.clear()
    yield start
    for runtime in started:
        runtime.stop(10)
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("pgpubsub-")]
    timings.clear()


def _notifying_on_write(django_db_blocker):
    """``PGPUBSUB_NOTIFY_ON_WRITE = True`` installed in the database while in the block; the
    test settings' functions after."""
    from django.test import override_settings

    from pgpubsub.db_functions import install_functions

    with django_db_blocker.unblock():
        with override_settings(PGPUBSUB_NOTIFY_ON_WRITE=True):
            install_functions("default")
        try:
            yield
        finally:
            install_functions("default")


@pytest.fixture
def notify_on_write(django_db_setup, django_db_blocker):
    """Writers of lockable channels send a NOTIFY with each stored row's id, from their
    transaction (``PGPUBSUB_NOTIFY_ON_WRITE = True``), for the test's duration."""
    yield from _notifying_on_write(django_db_blocker)


@pytest.fixture(params=["watcher", "notify on write"])
def write_mode(request, django_db_setup, django_db_blocker):
    """Runs a test in both ways lockable writers can wake the listeners: the default (writers
    only store; the elected watcher wakes them) and ``PGPUBSUB_NOTIFY_ON_WRITE = True`` (a
    NOTIFY per stored row, installed in the database for the test's duration)."""
    if request.param == "watcher":
        yield request.param
        return
    for _ in _notifying_on_write(django_db_blocker):
        yield request.param
