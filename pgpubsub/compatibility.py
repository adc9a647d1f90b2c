"""Names django-pgpubsub 1.x exposed here: the driver's ``Notify`` and ``ConnectionWrapper``."""

from __future__ import annotations

from django.db.backends.postgresql.psycopg_any import is_psycopg3

from pgpubsub.listen import ConnectionWrapper

# The notification type of the driver Django uses (psycopg 3 when both are installed).
if is_psycopg3:
    from psycopg import Notify
else:
    from psycopg2.extensions import Notify

__all__ = ["ConnectionWrapper", "Notify"]
