"""The SQL functions every producer (triggers and ``notify()``) publishes through.

``pgpubsub_notify(channel, payload)`` sends a plain message. NOTIFY refuses payloads of 8000
bytes or more, so a longer message is sent as numbered chunks that listeners put back together;
a producer's write never fails because a message is large. The chunk format is
:mod:`pgpubsub.wire`'s: the SQL below is built from its constants.

``pgpubsub_store(channel, payload)`` stores a lockable message in ``pgpubsub_notification``. By
default that is all: the writer's commit takes no NOTIFY lock, and the elected watcher
(:mod:`pgpubsub.watcher`) tells the listeners that rows wait. For the channels that notify on
write (``pgpubsub_notify_on_write(channel)``, see :meth:`BaseChannel.notifies_on_write`) it
also NOTIFYs the new row's id, whatever the message's size.

They are (re)installed by migration 0007 and after every ``migrate``, so databases built without
migrations (``--nomigrations`` test runs) have them too; which channels notify on write is read
from the settings and the channel classes then.
"""

from __future__ import annotations

from django.db import connections

from pgpubsub.channel import BaseChannel
from pgpubsub.wire import (
    CHUNK_BYTES,
    CHUNK_MARK,
    CHUNK_SEPARATOR,
    LAST_CHUNK,
    MORE_CHUNKS,
    NOTIFY_LIMIT,
)


def _literal(text: str) -> str:
    """``text`` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


# wire's chunk format, as SQL literals for the function below.
_MARK, _SEP = _literal(CHUNK_MARK), _literal(CHUNK_SEPARATOR)
_LAST, _MORE = _literal(LAST_CHUNK), _literal(MORE_CHUNKS)

NOTIFY_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION pgpubsub_notify(p_channel text, p_payload text) RETURNS void
LANGUAGE plpgsql AS $pgpubsub$
DECLARE
    total integer;
    pos integer := 1;
    seq integer := 0;
    size integer;
    piece text;
    msgid text;
BEGIN
    IF octet_length(p_payload) < {NOTIFY_LIMIT} THEN
        PERFORM pg_notify(p_channel, p_payload);
        RETURN;
    END IF;
    msgid := md5(random()::text || clock_timestamp()::text || pg_backend_pid()::text);
    total := length(p_payload);
    WHILE pos <= total LOOP
        size := {CHUNK_BYTES};
        piece := substr(p_payload, pos, size);
        WHILE octet_length(piece) > {CHUNK_BYTES} LOOP
            size := greatest(1, (size * {CHUNK_BYTES}) / octet_length(piece) - 1);
            piece := substr(p_payload, pos, size);
        END LOOP;
        pos := pos + size;
        PERFORM pg_notify(
            p_channel,
            {_MARK} || msgid || {_SEP} || seq || {_SEP}
            || CASE WHEN pos > total THEN {_LAST} ELSE {_MORE} END || {_SEP} || piece
        );
        seq := seq + 1;
    END LOOP;
END
$pgpubsub$;
"""


def store_function_sql(name: str, publish: str) -> str:
    """``CREATE OR REPLACE FUNCTION name(p_channel text, p_payload jsonb)``: store the message
    in ``pgpubsub_notification``, then run ``publish``, a statement that may use ``p_channel``
    and the new row's ``new_id``; return ``new_id``."""
    return f"""
CREATE OR REPLACE FUNCTION {name}(p_channel text, p_payload jsonb) RETURNS bigint
LANGUAGE plpgsql AS $pgpubsub$
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO pgpubsub_notification (channel, payload)
    VALUES (p_channel, p_payload)
    RETURNING id INTO new_id;
    {publish}
    RETURN new_id;
END
$pgpubsub$;
"""


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def notify_on_write_sql(channel: str) -> str:
    """A boolean SQL expression: the channel named by the SQL text ``channel`` (a stored name)
    notifies on write, as the settings and the channel classes defined now say."""
    default = BaseChannel.notifies_on_write()
    exceptions = sorted(
        {
            name
            for cls in _subclasses(BaseChannel)
            if cls.lock_notifications and cls.notifies_on_write() != default
            for name in (cls.listen_safe_name(), cls.name())
        }
    )
    names = "ARRAY[" + ", ".join(_literal(name) for name in exceptions) + "]::text[]"
    return f"{channel} <> ALL({names})" if default else f"{channel} = ANY({names})"


#: A session that sets it to ``on`` gets a NOTIFY with each lockable row it stores, whatever the
#: channel: ``listen_to_channels()`` does, so that django-pgpubsub 1.x's synchronous API (and the
#: tests written for it) receives its own writes' notifications as before.
SESSION_SETTING = "pgpubsub.notify_on_write"


def notify_on_write_body() -> str:
    """The body of ``pgpubsub_notify_on_write(p_channel)``, as the settings say now (the
    system check pgpubsub.W006 compares it with the installed one)."""
    return f"SELECT {notify_on_write_sql('p_channel')}"


def functions_sql() -> str:
    """The SQL that creates or replaces every publishing function."""
    wake = notify_on_write_sql("p_channel")
    return (
        NOTIFY_FUNCTION_SQL
        + f"""
CREATE OR REPLACE FUNCTION pgpubsub_notify_on_write(p_channel text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $pgpubsub${notify_on_write_body()}$pgpubsub$;
"""
        + store_function_sql(
            "pgpubsub_store",
            f"IF {wake} OR current_setting({_literal(SESSION_SETTING)}, true) = 'on' THEN "
            "PERFORM pg_notify(p_channel, new_id::text); END IF;",
        )
    )


DROP_FUNCTIONS_SQL = """
DROP FUNCTION IF EXISTS pgpubsub_notify(text, text);
DROP FUNCTION IF EXISTS pgpubsub_store(text, jsonb);
DROP FUNCTION IF EXISTS pgpubsub_notify_on_write(text);
"""


# Rows are stored by INSERTs that name only channel and payload (the functions above, and the
# triggers of django-pgpubsub 1.x until they are regenerated): the columns added since need
# database defaults. Migration 0008 sets them; this sets them where tables were made without
# migrations, and only when missing (ALTER TABLE waits for every transaction on the table).
DEFAULTS_SQL = """
DO $pgpubsub$ BEGIN
    IF EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'pgpubsub_notification'
        AND column_name = 'attempts' AND column_default IS NULL
    ) THEN
        ALTER TABLE pgpubsub_notification ALTER COLUMN attempts SET DEFAULT 0;
    END IF;
END
$pgpubsub$;
"""


def install_functions(using: str = "default") -> None:
    """Create or replace the publishing functions in database ``using``."""
    with connections[using].cursor() as cursor:
        cursor.execute(functions_sql())


def install_defaults(using: str = "default") -> None:
    """Give the columns of ``pgpubsub_notification`` that need one their database default."""
    with connections[using].cursor() as cursor:
        cursor.execute(DEFAULTS_SQL)
