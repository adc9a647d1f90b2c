"""Django admin for task results (``pgpubsub_taskresult``): what tasks did, read-only.

Tasks that wait (or failed for good) are stored notifications too: the notifications admin
lists them under their queue's channel (``pgpubsub.tasks.<alias>.<queue>``), where a failed one
can be retried. Registered by :mod:`pgpubsub.admin`, on the default site, when
``django.contrib.admin`` is installed.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html

from pgpubsub.models import TaskResultRecord


class TaskResultAdmin(admin.ModelAdmin):
    list_display = ["id", "task_path", "queue_name", "status", "attempts", "finished_at"]
    list_filter = ["status", "queue_name"]
    search_fields = ["task_path", "=id"]
    date_hierarchy = None
    ordering = ["-id"]
    show_full_result_count = False  # no count of a big table on every page
    readonly_fields = [
        "id",
        "task_path",
        "queue_name",
        "status",
        "enqueued_at",
        "started_at",
        "finished_at",
        "last_attempted_at",
        "attempts",
        "workers",
        "arguments",
        "result",
        "error_list",
    ]
    exclude = ["payload", "return_value", "errors", "worker_ids"]

    @admin.display(description="attempts")
    def attempts(self, obj: TaskResultRecord) -> int:
        return len(obj.worker_ids or [])

    @admin.display(description="workers")
    def workers(self, obj: TaskResultRecord) -> str:
        return ", ".join(obj.worker_ids or [])

    @admin.display(description="arguments")
    def arguments(self, obj: TaskResultRecord) -> str:
        payload = obj.payload or {}
        return _pre(
            {"args": payload.get("args", []), "kwargs": payload.get("kwargs", {})}
            if payload
            else ""
        )

    @admin.display(description="return value")
    def result(self, obj: TaskResultRecord) -> str:
        return _pre(obj.return_value) if obj.status == "SUCCESSFUL" else "-"

    @admin.display(description="errors")
    def error_list(self, obj: TaskResultRecord) -> str:
        errors = obj.errors or []
        if not errors:
            return "-"
        return format_html(
            "<pre>{}</pre>",
            "\n\n".join(
                f"{error.get('exception_class_path', '')}\n{error.get('traceback', '')}"
                for error in errors
            ),
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # results come from the tasks' attempts

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _pre(value: Any) -> str:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False))
