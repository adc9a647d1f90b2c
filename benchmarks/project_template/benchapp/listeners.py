import os
import threading
import time

import pgpubsub
from benchapp.channels import EventTrigger, Tick
from benchapp.models import Effect, Item


@pgpubsub.post_insert_listener(EventTrigger)
def record_event(old, new):
    now = time.time()
    Effect.objects.create(
        key=f"event-{new.pk}",
        latency=now - float(new.sent_at),
        done_at=now,
        worker=f"{os.getpid()}:{threading.get_ident()}",
    )


@pgpubsub.listener(Tick)
def record_tick(seq, sent):
    # A plain message reaches every listening process: the key names the process, so that each
    # one records it once (the runner counts the copies per process, and the processes that
    # answered a readiness probe).
    key = f"tick-{seq}-{os.getpid()}" if seq >= 0 else f"probe-{-seq}-{os.getpid()}"
    now = time.time()
    Item.objects.create(key=key, latency=now - float(sent), done_at=now)
