"""Ready-made gunicorn server hooks, for projects that start the Runtime themselves.

In ``gunicorn.conf.py``::

    from pgpubsub.gunicorn import post_worker_init, worker_exit

Each worker then starts a Runtime once it has loaded the application, and stops it when it
exits, whether ``PGPUBSUB_EMBEDDED`` is on or not (with it on, the hooks change nothing).
"""

from __future__ import annotations

from typing import Any

# pgpubsub.embedded is imported by the hooks: gunicorn reads its configuration file before
# Django is set up, and importing it then would fail.


def post_worker_init(worker: Any) -> None:
    """Start this worker's Runtime (the application, and so Django, is loaded by now)."""
    from pgpubsub import embedded

    embedded.start()


def worker_exit(server: Any, worker: Any) -> None:
    """Stop this worker's Runtime, letting running callbacks finish within
    ``PGPUBSUB_SHUTDOWN_TIMEOUT``."""
    from pgpubsub import embedded

    embedded.stop()
