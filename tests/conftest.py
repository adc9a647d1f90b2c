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
