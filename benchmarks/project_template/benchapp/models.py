from django.db import models


class Event(models.Model):
    """Insert-only source of the lockable trigger channel."""

    key = models.TextField()
    #: Epoch seconds when the row was inserted (set by the inserting statement).
    sent_at = models.FloatField()


class Effect(models.Model):
    """The per-message work of the lockable channel: one row per processed Event."""

    key = models.TextField(unique=True)
    #: Seconds from the Event's insert to its processing.
    latency = models.FloatField(null=True)
    #: Epoch seconds when the listener processed it.
    done_at = models.FloatField(null=True)
    #: ``<pid>:<thread id>`` of the thread that processed it (how many took part).
    worker = models.TextField(default="")


class Item(models.Model):
    """One row per plain message and process that received it: ``tick-<seq>-<pid>`` (a message
    reaches every listening process, each records it once), ``probe-<n>-<pid>`` for readiness
    probes."""

    key = models.TextField(unique=True)
    #: Seconds from ``notify()`` to the listener callback.
    latency = models.FloatField(null=True)
    #: Epoch seconds of the listener callback.
    done_at = models.FloatField(null=True)


class Row(models.Model):
    """Insert-only source of the no-op trigger channel: the same columns as ``Event``, but its
    listener does nothing (what the library costs per message, without the listener's work)."""

    key = models.TextField()
    sent_at = models.FloatField()
