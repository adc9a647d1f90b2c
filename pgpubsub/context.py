"""The notification context: what ``set_notification_context()`` attaches to the trigger
notifications a connection sends (``pgpubsub.channel`` and ``pgpubsub`` export it, as
django-pgpubsub 1.3.1 did)."""

from __future__ import annotations

import json
from typing import Any

from django.db import connections
from django.db.utils import DEFAULT_DB_ALIAS, InternalError

from pgpubsub import conf
from pgpubsub.exceptions import InvalidPayload

TX_ABORTED_ERROR_MESSAGE = "current transaction is aborted"


def set_notification_context(context: dict[str, Any], using: str | None = None) -> None:
    """Attach ``context`` to every trigger notification this connection sends from now on.

    The context lasts for the session, or for the current transaction when
    ``PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT`` is set (then an atomic block is required), and
    inside an atomic block on an alias declared to go through transaction pooling
    (``DISABLE_SERVER_SIDE_CURSORS``), where session state would leak to other clients.
    """
    conn = connections[using or DEFAULT_DB_ALIAS]
    if conn.needs_rollback:
        return
    local = conf.tx_bound_notification_context()
    if not local and conn.in_atomic_block and conf.transaction_pooled(conn.alias):
        # Through transaction pooling, session state passes to the server connection's next
        # clients: inside a transaction, the context ends with it (pgpubsub.W005).
        local = True
    if local and not conn.in_atomic_block:
        raise RuntimeError(
            "A transaction-bound notification context can only be set inside an atomic block: "
            "wrap the code in transaction.atomic(), or set "
            "PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT = False for a session-wide context."
        )
    try:
        # NaN and Infinity would be accepted here but make every later trigger fail.
        text = json.dumps(context, ensure_ascii=False, default=str, allow_nan=False)
    except ValueError as exc:
        raise InvalidPayload(f"Notification context is not valid JSON: {exc}") from None
    if _contains_nul(json.loads(text)):
        raise InvalidPayload("Notification context contains U+0000 (NUL), which jsonb refuses")
    with conn.cursor() as cursor:
        try:
            cursor.execute(
                "SELECT set_config('pgpubsub.notification_context', %s, %s)", [text, local]
            )
        except InternalError as exc:
            if TX_ABORTED_ERROR_MESSAGE in str(exc):
                return
            raise


def _contains_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_contains_nul(key) or _contains_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_contains_nul(item) for item in value)
    return False


__all__ = ["set_notification_context"]
