"""Helpers for testing projects that use pgpubsub (and for pgpubsub's own tests).

Importing this package loads neither pytest nor the embedded PostgreSQL server:
``pgpubsub.testing.pytest_plugin`` and ``pgpubsub.testing.postgres`` are imported on demand.
"""

from pgpubsub.testing.listeners import ListenerRun, ListenersFailed, run_listeners

__all__ = ["ListenerRun", "ListenersFailed", "run_listeners"]
