"""A health view for readiness and liveness probes: ``path("pgpubsub/health/", health)``.

It answers JSON, never a payload: 200 with ``"status": "ok"``, or 503 with ``"status":
"failing"`` and the ``problems`` found: the database cannot be reached, its oldest stored
notification still to be processed has waited longer than ``PGPUBSUB_HEALTH_MAX_BACKLOG_AGE``
seconds for one (so no listener is processing its channel; rows marked failed or waiting for
their next attempt do not count), a Runtime
of this process has lost its listening connection, or embedded mode should have started one
here and none runs.
``runtimes`` has the status of each Runtime running in the process that answers.
"""

from __future__ import annotations

from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from pgpubsub import conf, embedded
from pgpubsub.health import database_status
from pgpubsub.runtime import live_runtimes


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    max_age = conf.health_max_backlog_age()
    problems = []
    body: dict = {"max_backlog_age_seconds": max_age}
    try:
        status = database_status()
    except DatabaseError as exc:
        problems.append(f"database unreachable: {type(exc).__name__}")
    else:
        body["database"] = status.as_dict()
        oldest = status.oldest_age_seconds
        if oldest is not None and oldest > max_age:
            problems.append(
                f"oldest stored notification waited {oldest:.0f}s (more than {max_age:.0f}s)"
            )
    body["runtimes"] = [runtime.status() for runtime in live_runtimes()]
    if embedded.expected() and embedded.runtime() is None:
        problems.append("PGPUBSUB_EMBEDDED is on but no Runtime runs in this process (see its log)")
    for runtime in body["runtimes"]:
        if not runtime["connected"]:
            problems.append(f"Runtime of process {runtime['pid']}: listener not connected")
    body["status"] = "failing" if problems else "ok"
    body["problems"] = problems
    return JsonResponse(body, status=503 if problems else 200)
