"""The ``pgpubsub_listeners`` pytest fixture. Enable it in your ``conftest.py``::

    pytest_plugins = ["pgpubsub.testing.pytest_plugin"]

It needs pytest-django.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgpubsub.testing.listeners import ListenerRun, run_listeners


@pytest.fixture
def pgpubsub_listeners(db: None) -> Iterator[ListenerRun]:
    """Catches the messages the test publishes: ``pgpubsub_listeners.run()`` runs the listeners
    of those published so far; the others run when the test ends. Gives database access as
    pytest-django's ``db`` does (in autocommit with ``django_db(transaction=True)``)."""
    with run_listeners() as listeners:
        yield listeners
