"""Names django-pgpubsub 1.x exposed here: the driver's ``Notify`` and ``ConnectionWrapper``."""

from __future__ import annotations

from pgpubsub.connection import Notify
from pgpubsub.listen import ConnectionWrapper

__all__ = ["ConnectionWrapper", "Notify"]
