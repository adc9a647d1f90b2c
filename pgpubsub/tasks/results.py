"""Django's ``TaskResult`` objects, made from what pgpubsub stores of a task."""

from __future__ import annotations

import datetime
from typing import Any

from pgpubsub.tasks import compat, rows


def make_result(
    task: Any,
    row_id: int,
    payload: dict[str, Any],
    status: Any,
    *,
    enqueued_at: datetime.datetime | None,
    started_at: datetime.datetime | None,
    finished_at: datetime.datetime | None,
    last_attempted_at: datetime.datetime | None,
    errors: list[dict[str, str]],
    worker_ids: list[str],
    return_value: Any = None,
) -> Any:
    result = compat.TaskResult(
        task=task,
        id=str(row_id),
        status=compat.TaskResultStatus(status),
        enqueued_at=enqueued_at,
        started_at=started_at,
        finished_at=finished_at,
        last_attempted_at=last_attempted_at,
        args=payload.get("args", []),
        kwargs=payload.get("kwargs", {}),
        backend=task.backend,
        errors=[
            compat.TaskError(
                exception_class_path=error.get("exception_class_path", ""),
                traceback=error.get("traceback", ""),
            )
            for error in errors
        ],
        worker_ids=list(worker_ids),
    )
    if status == compat.TaskResultStatus.SUCCESSFUL:
        object.__setattr__(result, "_return_value", return_value)
    return result


def parse_id(result_id: Any) -> int | None:
    """The stored row id a result id names, or None for one pgpubsub never gave."""
    try:
        row_id = int(str(result_id), 10)
    except (TypeError, ValueError):
        return None
    return row_id if 0 < row_id < 2**63 else None


def stored_result(alias: str, result_id: Any, using: str) -> Any:
    """The ``TaskResult`` of ``result_id``; ``TaskResultDoesNotExist`` if there is none (never
    enqueued, or pruned), or if its task can no longer be imported."""
    from pgpubsub.tasks.runner import TaskNotFound, task_of

    row_id = parse_id(result_id)
    found = None if row_id is None else rows.read(row_id, using)
    if found is None:
        raise compat.TaskResultDoesNotExist(result_id)
    try:
        task = task_of(found.payload, alias)
    except (TaskNotFound, compat.InvalidTask) as exc:
        raise compat.TaskResultDoesNotExist(f"{result_id}: {exc}") from None
    return make_result(
        task,
        row_id,
        found.payload,
        found.status,
        enqueued_at=found.enqueued_at,
        started_at=found.started_at,
        finished_at=found.finished_at,
        last_attempted_at=found.last_attempted_at,
        errors=found.errors,
        worker_ids=found.worker_ids,
        return_value=found.return_value,
    )
