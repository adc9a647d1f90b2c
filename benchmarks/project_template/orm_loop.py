"""A hand-written drain of the stored ``EventTrigger`` rows that calls the benchmark's own
listener function, ``record_event``, with the same batching and atomicity as a Runtime: BATCH
rows claimed and deleted by one statement in a transaction, each message's callback in a
savepoint of its own (a failing one would roll back alone, its row with it), one commit per
batch. No pgpubsub code runs in the loop: the reference for what the library adds around an
ORM listener.

    python orm_loop.py CHANNEL [BATCH]    (BATCH: pgpubsub.batch_size.MAX_BATCH by default)

Prints ``{"rows", "seconds", "batch"}`` (the loop only, without start-up).
"""

import json
import os
import sys
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import django  # noqa: E402

django.setup()

from benchapp.listeners import record_event  # noqa: E402
from benchapp.models import Event  # noqa: E402
from django.db import connection, transaction  # noqa: E402

CLAIM = (
    "DELETE FROM pgpubsub_notification WHERE id IN ("
    "SELECT id FROM pgpubsub_notification WHERE channel = %s "
    "AND failed_at IS NULL AND next_attempt_at IS NULL "
    "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING payload"
)
#: (attribute, column) of the model's fields: an instance is built from the row image's columns.
FIELDS = [(field.attname, field.column) for field in Event._meta.concrete_fields]


def drain(channel, batch):
    rows = 0
    clock = time.perf_counter()
    while True:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(CLAIM, [channel, batch])
                claimed = cursor.fetchall()
            for (payload,) in claimed:
                if isinstance(payload, str):  # Django leaves jsonb undecoded
                    payload = json.loads(payload)
                new = Event(**{attname: payload["new"][column] for attname, column in FIELDS})
                with transaction.atomic():  # the message's savepoint
                    record_event(None, new)
        if not claimed:
            break
        rows += len(claimed)
    return {"rows": rows, "seconds": time.perf_counter() - clock, "batch": batch}


if __name__ == "__main__":
    if len(sys.argv) > 2:
        size = int(sys.argv[2])
    else:
        # The Runtime's largest batch, which fast listeners get (pgpubsub.batch_size).
        from pgpubsub import batch_size

        size = batch_size.MAX_BATCH
    print(json.dumps(drain(sys.argv[1], size)))
