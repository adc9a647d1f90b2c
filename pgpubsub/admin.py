"""Django admin for stored notifications: see what waits to be processed and what failed, retry
it now, or delete it.

Django imports this module (admin autodiscovery) only when ``django.contrib.admin`` is
installed; it registers :class:`NotificationAdmin` on the default site only then, so importing
it elsewhere is harmless.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from django.apps import apps
from django.contrib import admin, messages
from django.contrib.auth import get_permission_codename
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import ngettext

from pgpubsub import store
from pgpubsub.channel import registry
from pgpubsub.health import channel_label
from pgpubsub.models import Notification


def format_age(delta: datetime.timedelta) -> str:
    """``delta`` in its two largest units: ``45s``, ``3m 07s``, ``2h 05m``, ``4d 3h``."""
    seconds = max(0, int(delta.total_seconds()))  # a clock ahead of the database's
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


def pretty_json(payload: Any) -> str:
    """``payload`` as indented JSON; rows of older versions hold JSON text inside a JSON string,
    which is unwrapped."""
    while isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            break
    return json.dumps(payload, indent=2, ensure_ascii=False)


#: Characters of the last error shown in the list (the row's page shows all of it).
ERROR_COLUMN_LENGTH = 80


def _pre(text: str) -> str:
    return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>', text)


class ChannelFilter(admin.SimpleListFilter):
    """The channels that have stored rows, by dotted class name (one choice per channel, also
    when some of its rows are stored under its LISTEN name and others under its dotted name)."""

    title = "channel"
    parameter_name = "channel"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        stored = (
            model_admin.get_queryset(request)
            .order_by("channel")
            .values_list("channel", flat=True)
            .distinct()
        )
        return [(label, label) for label in sorted({channel_label(name) for name in stored})]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if not value:
            return queryset
        return queryset.filter(channel__in={value, store.wire_name(value)})


class StatusFilter(admin.SimpleListFilter):
    """Pending (not tried yet), retrying (failed, tried again later) or failed (given up)."""

    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [
            (Notification.PENDING, "pending"),
            (Notification.RETRYING, "retrying"),
            (Notification.FAILED, "failed"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value == Notification.FAILED:
            return queryset.filter(failed_at__isnull=False)
        if value == Notification.RETRYING:
            return queryset.filter(failed_at__isnull=True, attempts__gt=0)
        if value == Notification.PENDING:
            return queryset.filter(failed_at__isnull=True, attempts=0)
        return queryset


@admin.action(description="Retry now", permissions=["process"])
def retry_now(
    model_admin: NotificationAdmin, request: HttpRequest, queryset: QuerySet[Notification]
) -> None:
    """Make the selected rows due now with a fresh count of attempts (failed ones too), and
    send their NOTIFY again (payload: the row id), so that a running listener claims and
    processes each of them."""
    selected = list(queryset.order_by().values_list("pk", flat=True))
    with transaction.atomic(using=queryset.db):  # the NOTIFYs go out with the commit
        rows = store.retry(row_ids=selected, using=queryset.db)
        sent = store.notify_rows(rows, queryset.db)
    model_admin.message_user(
        request,
        ngettext(
            "Sent %(count)d notification; a running listener will process it.",
            "Sent %(count)d notifications; running listeners will process them.",
            sent,
        )
        % {"count": sent},
        messages.SUCCESS,
    )


class NotificationAdmin(admin.ModelAdmin):
    """Stored notifications, oldest first (the order listeners process them in); read-only.

    Columns and detail fields are plain tuples: subclasses (and later versions) extend them.
    """

    list_display = (
        "id",
        "channel_name",
        "status",
        "attempts",
        "created_at",
        "age",
        "next_attempt_at",
        "error",
        "db_version",
    )
    list_filter = (ChannelFilter, StatusFilter)
    search_fields = ("channel", "last_error")
    search_help_text = (
        "Part of a channel's dotted or LISTEN name or of the last error, or a notification id."
    )
    ordering = ("id",)
    fields = (
        "id",
        "channel_name",
        "status",
        "attempts",
        "created_at",
        "age",
        "next_attempt_at",
        "failed_at",
        "db_version",
        "payload_pretty",
        "last_error",
        "traceback_pretty",
    )
    readonly_fields = fields
    actions = ("delete_selected", retry_now)

    @admin.display(description="channel", ordering="channel")
    def channel_name(self, obj: Notification) -> str:
        return channel_label(obj.channel)

    @admin.display(description="age", ordering="-created_at")
    def age(self, obj: Notification) -> str | None:
        if obj.created_at is None:  # rows stored before the column existed
            return None
        return format_age(timezone.now() - obj.created_at)

    @admin.display(description="status", ordering="failed_at")
    def status(self, obj: Notification) -> str:
        return obj.status

    @admin.display(description="last error", ordering="last_error")
    def error(self, obj: Notification) -> str | None:
        text = obj.last_error
        if not text:
            return None
        first = text.splitlines()[0]
        return (
            first if len(first) <= ERROR_COLUMN_LENGTH else first[: ERROR_COLUMN_LENGTH - 1] + "…"
        )

    @admin.display(description="payload")
    def payload_pretty(self, obj: Notification) -> str:
        return _pre(pretty_json(obj.payload))

    @admin.display(description="traceback")
    def traceback_pretty(self, obj: Notification) -> str | None:
        return _pre(obj.last_traceback) if obj.last_traceback else None

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        """A number finds the row with that id; other terms also find the rows of registered
        channels whose dotted name contains them (the list shows dotted names, rows store
        LISTEN names)."""
        term = search_term.strip()
        if term.isascii() and term.isdigit():
            return queryset.filter(pk=int(term)), False
        found, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        names = [
            channel_cls.listen_safe_name()
            for channel_cls in list(registry)
            if term and term.lower() in channel_cls.name().lower()
        ]
        if names:
            found = found | queryset.filter(channel__in=names)
        return found, may_have_duplicates

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # rows come from notify() and triggers

    def has_change_permission(self, request: HttpRequest, obj: Notification | None = None) -> bool:
        return False  # the detail view is read-only

    def has_process_permission(self, request: HttpRequest) -> bool:
        """The "Retry now" action needs the model's change permission (no form uses it here)."""
        opts = self.opts
        codename = get_permission_codename("change", opts)
        return request.user.has_perm(f"{opts.app_label}.{codename}")


if apps.is_installed("django.contrib.admin"):
    admin.site.register(Notification, NotificationAdmin)
