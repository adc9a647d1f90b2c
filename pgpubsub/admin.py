"""Django admin for stored notifications: see what waits to be processed and what failed, retry
it now, or delete it.

Built for a backlog of millions of rows: the list loads no payloads and counts its rows once, and
deleting many rows asks with a summary (how many, of which channels) rather than a list of every
row, then deletes them by id, a chunk per statement.

Django imports this module (admin autodiscovery) only when ``django.contrib.admin`` is
installed; it registers :class:`NotificationAdmin` on the default site only then, so importing
it elsewhere is harmless.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

from django.apps import apps
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.db import connections
from django.db.models import Count, Max, QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import ngettext

from pgpubsub import store
from pgpubsub.channel import registry
from pgpubsub.health import channel_label
from pgpubsub.models import Notification, NotificationQuerySet
from pgpubsub.notify import retry_failed

logger = logging.getLogger(__name__)


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

#: Rows removed per DELETE by the "Delete selected notifications" action: each statement is
#: short and locks few rows, whatever the size of the selection.
DELETE_CHUNK_SIZE = 5000

#: Channels named on the delete confirmation page; any others are summed up in one line.
SUMMARY_CHANNELS = 30

#: Hidden field of the delete confirmation page: the highest id it counted, so that confirming
#: a selection "across pages" does not also delete the rows stored since.
UPTO_FIELD = "pgpubsub_upto"


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

    def queryset(self, request: HttpRequest, queryset: NotificationQuerySet) -> QuerySet:
        value = self.value()
        if value == Notification.FAILED:
            return queryset.failed()
        if value == Notification.RETRYING:
            return queryset.retrying()
        if value == Notification.PENDING:
            return queryset.pending()
        return queryset


@admin.action(description="Retry now", permissions=["process"])
def retry_now(
    model_admin: NotificationAdmin, request: HttpRequest, queryset: QuerySet[Notification]
) -> None:
    """Make the selected rows due now with a fresh count of attempts (failed ones too), and
    send their NOTIFY again (payload: the row id), so that a running listener claims and
    processes each of them: what ``manage.py pgpubsub retry --ids`` does."""
    selected = list(queryset.order_by().values_list("pk", flat=True))
    sent = retry_failed(ids=selected, using=queryset.db)
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


def _channel_summary(queryset: QuerySet[Notification]) -> tuple[int, int, list[tuple[str, int]]]:
    """(rows, highest id, [(channel label, rows)] most rows first) of ``queryset``, in one
    query; a channel's rows stored under its LISTEN and under its dotted name count as one."""
    per_label: dict[str, int] = {}
    upto = 0
    for name, count, last in (
        queryset.order_by()
        .values("channel")
        .annotate(count=Count("pk"), last=Max("pk"))
        .values_list("channel", "count", "last")
    ):
        label = channel_label(name)
        per_label[label] = per_label.get(label, 0) + count
        upto = max(upto, last)
    channels = sorted(per_label.items(), key=lambda item: (-item[1], item[0]))
    return sum(per_label.values()), upto, channels


def _delete_by_id(queryset: QuerySet[Notification]) -> tuple[int, int]:
    """Delete the rows of ``queryset``, DELETE_CHUNK_SIZE ids per statement, in id order;
    return (deleted, left). Rows that a listener holds (it is processing them) are skipped, not
    waited for, and counted as left, as are rows it finished meanwhile."""
    alias = queryset.db
    table = connections[alias].ops.quote_name(Notification._meta.db_table)
    # Ids are read a chunk at a time from where the last chunk ended: memory and each
    # statement stay small for any number of rows, and the admin's filters and search apply.
    ids = queryset.order_by("pk").values_list("pk", flat=True)
    deleted = left = 0
    last = None
    while True:
        chunk = list((ids if last is None else ids.filter(pk__gt=last))[:DELETE_CHUNK_SIZE])
        if not chunk:
            return deleted, left
        last = chunk[-1]
        with connections[alias].cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {table} WHERE id IN "
                f"(SELECT id FROM {table} WHERE id = ANY(%s) FOR UPDATE SKIP LOCKED)",
                [chunk],
            )
            deleted += cursor.rowcount
            left += len(chunk) - cursor.rowcount


@admin.action(description="Delete selected notifications", permissions=["delete"])
def delete_selected(
    model_admin: NotificationAdmin, request: HttpRequest, queryset: QuerySet[Notification]
) -> TemplateResponse | None:
    """Delete the selected rows without processing them, after a confirmation page that shows
    how many rows of which channels (never every row: a selection across pages may hold
    millions). Replaces Django's action of the same name for this model.

    Rows go with plain SQL, as listeners acknowledge them: no model signals, and
    ``ModelAdmin.delete_queryset`` is not called."""
    if not model_admin.has_delete_permission(request):
        raise PermissionDenied
    upto = request.POST.get(UPTO_FIELD)
    if request.POST.get("post") == "yes" and upto and upto.isascii() and upto.isdigit():
        return _delete_confirmed(model_admin, request, queryset.filter(pk__lte=int(upto)))
    return _confirmation_page(model_admin, request, queryset)


def _delete_confirmed(
    model_admin: NotificationAdmin, request: HttpRequest, queryset: QuerySet[Notification]
) -> None:
    """Delete the rows the confirmation page showed, and say how many went."""
    deleted, left = _delete_by_id(queryset)
    logger.info(
        "%s deleted %d stored notifications in the admin (%d left to listeners)",
        request.user,
        deleted,
        left,
    )
    text = ngettext(
        "Successfully deleted %(count)d notification.",
        "Successfully deleted %(count)d notifications.",
        deleted,
    ) % {"count": deleted}
    if left:
        text += " " + ngettext(
            "%(count)d that a listener was processing was left to it.",
            "%(count)d that listeners were processing were left to them.",
            left,
        ) % {"count": left}
    model_admin.message_user(request, text, messages.SUCCESS)


def _confirmation_page(
    model_admin: NotificationAdmin, request: HttpRequest, queryset: QuerySet[Notification]
) -> TemplateResponse | None:
    """The page that asks before deleting: how many rows, of which channels."""
    count, upto_id, channels = _channel_summary(queryset)
    if not count:
        model_admin.message_user(
            request, "None of the selected notifications is stored any more.", messages.INFO
        )
        return None
    opts = model_admin.opts
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "Delete notifications",
        "subtitle": None,
        "opts": opts,
        "media": model_admin.media,
        "count": count,
        "channels": channels[:SUMMARY_CHANNELS],
        "other_channels": len(channels[SUMMARY_CHANNELS:]),
        "other_count": sum(n for _, n in channels[SUMMARY_CHANNELS:]),
        # Posted back as they came: the ids of the rows ticked on the page (a page's worth at
        # most) and "select across", so that the changelist selects the same rows again.
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
        "select_across": request.POST.get("select_across", "0"),
        "upto_field": UPTO_FIELD,
        "upto": upto_id,
        "action": "delete_selected",
        # The changelist with its filters and search: where the rows were selected.
        "changelist_url": request.get_full_path(),
    }
    request.current_app = model_admin.admin_site.name
    return TemplateResponse(
        request, "admin/pgpubsub/notification/delete_selected_notifications.html", context
    )


class NotificationChangeList(ChangeList):
    """The list loads neither payloads nor tracebacks, which it does not show: with large
    payloads they would be most of what a page reads."""

    def get_queryset(self, request: HttpRequest, *args: Any, **kwargs: Any) -> QuerySet:
        return super().get_queryset(request, *args, **kwargs).defer("payload", "last_traceback")


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
    actions = (delete_selected, retry_now)
    # Django otherwise counts the rows twice per view of the list (the matching rows, and all
    # of them for a search's "N total"): each a scan of a table that may hold millions.
    show_full_result_count = False

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

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return NotificationChangeList

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
    from pgpubsub.tasks.admin import TaskResultAdmin, TaskResultRecord

    admin.site.register(Notification, NotificationAdmin)
    admin.site.register(TaskResultRecord, TaskResultAdmin)
