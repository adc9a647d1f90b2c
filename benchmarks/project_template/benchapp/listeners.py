import time

import pgpubsub
from benchapp.channels import EventTrigger, Tick
from benchapp.models import Effect, Item


@pgpubsub.post_insert_listener(EventTrigger)
def record_event(old, new):
    Effect.objects.create(key=f"event-{new.pk}", latency=time.time() - float(new.sent_at))


@pgpubsub.listener(Tick)
def record_tick(seq, sent):
    key = f"tick-{seq}" if seq >= 0 else f"probe-{-seq}"
    Item.objects.create(key=key, latency=time.time() - float(sent))
