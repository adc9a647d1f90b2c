"""The stored form of lockable notifications (table ``pgpubsub_notification``)."""

from __future__ import annotations

import pgtrigger
from django.db import models, router
from django.db.models import Q
from django.db.models.functions import Now

from pgpubsub.channel import BaseChannel

#: Postgres identifiers (and so LISTEN channel names) stop at 63 bytes.
MAX_POSTGRES_CHANNEL_LENGTH = 63

# A database built without migrations (a test database of ``--no-migrations``) has no
# django_migrations table: db_version stays empty there, instead of every store failing.
_SET_DB_VERSION = """
                    IF to_regclass('django_migrations') IS NOT NULL THEN
                        NEW.db_version := (
                            SELECT max(id)
                            FROM django_migrations
                            WHERE app = NEW.payload ->> 'app'
                        );
                    END IF;
                    NEW.created_at := NOW();
                    RETURN NEW;
                """


class NotificationQuerySet(models.QuerySet):
    """Stored notifications, with the states an operator and a listener see them in.

    The conditions are also there as ``Q`` objects, for aggregates (``Count("id",
    filter=NotificationQuerySet.FAILED)``). They mean what the SQL of :mod:`pgpubsub.store`
    means (``_DUE``, the rows its claims take) and what :attr:`Notification.status` says of
    one row: change them together.
    """

    #: Given up on: not tried again unless retried.
    FAILED = Q(failed_at__isnull=False)
    #: Failed before, to be tried again (whether or not the next attempt is due yet).
    RETRYING = Q(failed_at__isnull=True, attempts__gt=0)
    #: Not tried yet (possibly claimed by a listener right now).
    PENDING = Q(failed_at__isnull=True, attempts=0)
    #: What a listener may claim now: not failed, and not waiting for its next attempt (nor
    #: under a claim's lease). store.py's ``_DUE`` compares with now(), the start of the
    #: transaction; Django's ``Now()`` is the start of the statement: the same in autocommit.
    DUE = Q(failed_at__isnull=True) & (
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=Now())
    )

    def failed(self) -> NotificationQuerySet:
        """Marked failed: kept, not tried again until retried."""
        return self.filter(self.FAILED)

    def retrying(self) -> NotificationQuerySet:
        """Failed before and to be tried again, due or not yet."""
        return self.filter(self.RETRYING)

    def pending(self) -> NotificationQuerySet:
        """Not tried yet."""
        return self.filter(self.PENDING)

    def due(self) -> NotificationQuerySet:
        """What a listener may claim now."""
        return self.filter(self.DUE)


class Notification(models.Model):
    """One message of a lockable channel, stored until a listener has processed it.

    ``channel`` holds the channel's LISTEN name, ``payload`` the whole message, ``db_version``
    the latest migration id of the payload's app when it was stored (set by a trigger).
    """

    channel = models.CharField(max_length=MAX_POSTGRES_CHANNEL_LENGTH)
    payload = models.JSONField()
    # Nullable because the column was added to a table that already had rows.
    created_at = models.DateTimeField(auto_now_add=True, null=True)
    # The id of the payload app's latest row of django_migrations (set by the insert trigger).
    # Migration 0003 made it a foreign key; 0011 dropped the constraint (its check locked a row
    # in every store).
    db_version = models.IntegerField(null=True)
    # What went wrong so far (see pgpubsub.retries). The database gives ``attempts`` its default
    # too: the SQL functions that store rows name only ``channel`` and ``payload``.
    attempts = models.PositiveIntegerField(default=0, help_text="Failed attempts so far.")
    next_attempt_at = models.DateTimeField(
        null=True, blank=True, help_text="Not claimed before this time (empty: at once)."
    )
    failed_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When pgpubsub gave up on it; it is not tried again unless retried.",
    )
    last_error = models.TextField(null=True, blank=True, help_text="Type and message.")
    last_traceback = models.TextField(null=True, blank=True)
    # Set while a listener processes the row (see pgpubsub.store); left behind by a process
    # that died doing so, which the next claim counts as a failed attempt.
    claimed_by = models.TextField(
        null=True,
        blank=True,
        help_text="The claim (host:pid:random) of the listener processing it, if any.",
    )

    objects = NotificationQuerySet.as_manager()

    class Meta:
        ordering = ["created_at"]
        indexes = [
            # What listeners look for: a channel's rows not tried yet, by id...
            models.Index(
                fields=["channel", "id"],
                name="pgpubsub_pending_idx",
                condition=models.Q(failed_at__isnull=True, next_attempt_at__isnull=True),
            ),
            # ... and those waiting for their next attempt, by when it is due (kept apart, so
            # that many of them do not slow down looking for the others).
            models.Index(
                fields=["channel", "next_attempt_at"],
                name="pgpubsub_retry_idx",
                condition=models.Q(failed_at__isnull=True, next_attempt_at__isnull=False),
            ),
        ]
        triggers = [
            pgtrigger.Trigger(
                name="pgpubsub_notification_set_db_version",
                operation=pgtrigger.Insert,
                when=pgtrigger.Before,
                func=_SET_DB_VERSION,
            )
        ]

    @property
    def status(self) -> str:
        """``"failed"`` (given up), ``"retrying"`` (failed before, will be tried again) or
        ``"pending"``."""
        # One row's answer to NotificationQuerySet.FAILED / RETRYING / PENDING.
        if self.failed_at is not None:
            return self.FAILED
        return self.RETRYING if self.attempts else self.PENDING

    PENDING, RETRYING, FAILED = "pending", "retrying", "failed"

    def __str__(self) -> str:
        """``Notification 759 (blog.channels.AuthorTriggerChannel, pending)``: the channel's
        dotted name when this process knows the channel, else its stored name."""
        from pgpubsub.health import channel_label

        return f"Notification {self.pk} ({channel_label(self.channel)}, {self.status})"

    def __repr__(self) -> str:
        return (
            f"Notification(id={self.pk}, channel={self.channel}, payload={self.payload}, "
            f"created_at={self.created_at}, db_version={self.db_version})"
        )

    @classmethod
    def from_channel(cls, channel: type[BaseChannel]) -> NotificationQuerySet:
        """The stored notifications of ``channel``."""
        return cls.objects.filter(channel=channel.listen_safe_name())


class TaskResultRecord(models.Model):
    """What became of a task of :mod:`pgpubsub.tasks` (table ``pgpubsub_taskresult``).

    A task waits as a row of ``pgpubsub_notification`` (its id is the result's id); each
    attempt writes here, in the transaction that runs it: a failed one adds its error and
    worker, a successful one the return value (and the row of ``pgpubsub_notification`` goes).
    Rows are pruned once ``RESULT_TTL`` has passed since the task finished."""

    id = models.BigIntegerField(primary_key=True, help_text="The task's result id.")
    task_path = models.TextField(blank=True, default="")
    queue_name = models.CharField(max_length=100, blank=True, default="")
    # The stored message (task path, args, kwargs, priority, queue, backend, run_after): kept
    # here once the row of pgpubsub_notification is gone.
    payload = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=10)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    last_attempted_at = models.DateTimeField(null=True, blank=True)
    return_value = models.JSONField(null=True, blank=True)
    # [{"exception_class_path": ..., "traceback": ...}], one per failed attempt.
    errors = models.JSONField(default=list, blank=True)
    worker_ids = models.JSONField(default=list, blank=True)

    class Meta:
        db_table = "pgpubsub_taskresult"
        verbose_name = "task result"
        indexes = [models.Index(fields=["finished_at"], name="pgpubsub_taskresult_done_idx")]

    def __str__(self) -> str:
        return f"Task result {self.pk} ({self.task_path or 'task'}, {self.status})"


def notifications_alias() -> str:
    """The alias stored notifications live in: ``"default"`` unless a database router sends
    the ``Notification`` model elsewhere. Lockable messages are stored, claimed and processed
    there, so a listener's writes on it commit together with the acknowledgement."""
    return router.db_for_write(Notification)


def database_for(channel: type[BaseChannel]) -> str:
    """The alias of the database that serves ``channel``: its messages are published, stored,
    claimed and processed there. The channel's ``database``, else :func:`notifications_alias`
    (listening may go through another alias: :func:`pgpubsub.conf.listen_alias`)."""
    return channel.database or notifications_alias()
