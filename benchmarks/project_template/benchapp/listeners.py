import os
import time

import pgpubsub
from benchapp.channels import EventTrigger, Tick
from benchapp.models import Effect, Item


@pgpubsub.post_insert_listener(EventTrigger)
def record_event(old, new):
    now = time.time()
    Effect.objects.create(key=f"event-{new.pk}", latency=now - float(new.sent_at), done_at=now)


@pgpubsub.listener(Tick)
def record_tick(seq, sent):
    # A probe reaches every listening process: its key names the process, so that each one
    # records it (and the runner can count the processes that listen).
    key = f"tick-{seq}" if seq >= 0 else f"probe-{-seq}-{os.getpid()}"
    now = time.time()
    Item.objects.create(key=key, latency=now - float(sent), done_at=now)
