"""Django admin for stored notifications: see what waits to be processed, have it processed
now, or delete it.

Django imports this module (admin autodiscovery) only when ``django.contrib.admin`` is
installed; it registers :class:`NotificationAdmin` on the default site only then, so importing
it elsewhere is harmless.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

from django.apps import apps
from django.contrib import admin, messages
from django.contrib.auth import get_permission_codename
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import ngettext

from pgpubsub.channel import BaseChannel, listen_name, registry
from pgpubsub.health import channel_label
from pgpubsub.models import Notification

_LISTEN_NAME = re.compile(r"^pgpubsub_[0-9a-f]{5}$")


def wire_channel(stored: str) -> str:
    """The LISTEN name the listeners of a row's channel wait on.

    Rows that django-pgpubsub 1.x ``notify()`` stored carry the channel's dotted path, whose
    listeners wait on the LISTEN name derived from that path.
    """
    if _LISTEN_NAME.match(stored) or BaseChannel.get(stored) or "." not in stored:
        return stored
    return listen_name(stored)  # as BaseChannel.listen_safe_name() derives it


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
        return queryset.filter(channel__in={value, wire_channel(value)})


@admin.action(description="Process now", permissions=["process"])
def process_now(
    model_admin: NotificationAdmin, request: HttpRequest, queryset: QuerySet[Notification]
) -> None:
    """Send the selected rows' NOTIFY again (payload: the row id), so that a running listener
    claims and processes each of them."""
    stored = [
        name
        for name in queryset.order_by().values_list("channel", flat=True).distinct()
        if name  # Postgres refuses to NOTIFY an empty channel name
    ]
    sent = 0
    if stored:
        connection = connections[queryset.db]
        opts = Notification._meta
        table = connection.ops.quote_name(opts.db_table)
        pk, channel = (
            connection.ops.quote_name(opts.get_field(f).column) for f in ("id", "channel")
        )
        selected = queryset.order_by().values("pk").query
        selected_sql, params = selected.get_compiler(queryset.db).as_sql()
        # One statement for any number of rows: nothing is loaded into Python.
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT pg_notify(names.wire, n.{pk}::text) FROM {table} AS n "
                "JOIN unnest(%s::text[], %s::text[]) AS names(stored, wire) "
                f"ON n.{channel} = names.stored WHERE n.{pk} IN ({selected_sql}) ORDER BY n.{pk}",
                [stored, [wire_channel(name) for name in stored], *params],
            )
            sent = cursor.rowcount
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

    list_display = ("id", "channel_name", "created_at", "age", "db_version")
    list_filter = (ChannelFilter,)
    search_fields = ("channel",)
    search_help_text = "Part of a channel's dotted or LISTEN name, or a notification id."
    ordering = ("id",)
    fields = ("id", "channel_name", "created_at", "age", "db_version", "payload_pretty")
    readonly_fields = fields
    actions = ("delete_selected", process_now)

    @admin.display(description="channel", ordering="channel")
    def channel_name(self, obj: Notification) -> str:
        return channel_label(obj.channel)

    @admin.display(description="age", ordering="-created_at")
    def age(self, obj: Notification) -> str | None:
        if obj.created_at is None:  # rows stored before the column existed
            return None
        return format_age(timezone.now() - obj.created_at)

    @admin.display(description="payload")
    def payload_pretty(self, obj: Notification) -> str:
        return format_html(
            '<pre style="white-space: pre-wrap; margin: 0">{}</pre>', pretty_json(obj.payload)
        )

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
        """The "Process now" action needs the model's change permission (no form uses it here)."""
        opts = self.opts
        codename = get_permission_codename("change", opts)
        return request.user.has_perm(f"{opts.app_label}.{codename}")


if apps.is_installed("django.contrib.admin"):
    admin.site.register(Notification, NotificationAdmin)
