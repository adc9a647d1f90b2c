"""Names django-pgpubsub 1.x exposed here: the driver's ``Notify`` and ``ConnectionWrapper``."""

from __future__ import annotations

from pgpubsub.listen import ConnectionWrapper

try:
    from psycopg2.extensions import Notify
except ImportError:  # psycopg 3 only
    from psycopg import Notify

__all__ = ["ConnectionWrapper", "Notify"]
