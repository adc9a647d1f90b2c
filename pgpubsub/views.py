"""A health view for readiness and liveness probes: ``path("pgpubsub/health/", health)``.

It answers JSON, never a payload: 200 with ``"status": "ok"``, or 503 with ``"status":
"failing"`` and the ``problems`` found, as short stable codes (:data:`PROBLEMS`): a database
that holds stored notifications cannot be read, its oldest stored notification still to be
processed has waited longer than ``PGPUBSUB_HEALTH_MAX_BACKLOG_AGE`` seconds for one (so no
listener is processing its channel; rows marked failed or waiting for their next attempt do not
count), a Runtime of this process has lost its listening connection, or notifications sent to
the database do not reach it (LISTEN through transaction pooling), or embedded mode should have
started one here and none runs.

Anyone gets only that. An active staff user, or a request with ``Authorization: Bearer <token>``
where the token is ``PGPUBSUB_HEALTH_TOKEN``, also gets the details: what each problem is, the
backlog of each database, and the status of each Runtime of the process that answers (channel
names, pid, the text of the last error).
"""

from __future__ import annotations

import hmac
from typing import Any

from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.utils.cache import patch_vary_headers
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from pgpubsub import conf, embedded
from pgpubsub.health import DatabaseFailure, databases_status
from pgpubsub.runtime import NOTIFICATIONS_NOT_RECEIVED, live_runtimes

#: The problem codes the health view reports, and what each means.
PROBLEMS = {
    "database_error": "a database that holds stored notifications cannot be reached or read",
    "backlog_too_old": "a stored notification has waited too long for a listener",
    "listener_disconnected": "a Runtime of this process has lost its LISTEN connection",
    "notifications_not_received": "notifications sent to the database do not reach a Runtime "
    "of this process (its LISTEN goes through transaction pooling?)",
    "runtime_not_running": "embedded mode is on but no Runtime runs in this process",
}


def can_see_details(request: HttpRequest) -> bool:
    """Whether ``request`` may see what pgpubsub's health view and status pages show beyond
    ok/failing: it comes from an active staff user (with Django's authentication middleware),
    or it bears ``Authorization: Bearer <PGPUBSUB_HEALTH_TOKEN>``."""
    token = conf.health_token()
    if token is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest takes as long whatever the first wrong character: the time of the
        # answer tells nothing of the token.
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return True
    try:
        user = getattr(request, "user", None)
        return bool(user is not None and user.is_active and user.is_staff)
    except DatabaseError:
        # The session or the user could not be loaded (database down): the probe still
        # gets its answer, without details.
        return False


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    max_age = conf.health_max_backlog_age()
    problems: list[str] = []
    details: list[str] = []

    def problem(code: str, detail: str) -> None:
        if code not in problems:
            problems.append(code)
        details.append(detail)

    databases = databases_status()
    for status in databases:
        if isinstance(status, DatabaseFailure):
            problem("database_error", f"database {status.database!r}: {status.error}")
            continue
        oldest = status.oldest_age_seconds
        if oldest is not None and oldest > max_age:
            problem(
                "backlog_too_old",
                f"database {status.database!r}: oldest stored notification waited "
                f"{oldest:.0f}s (more than {max_age:.0f}s)",
            )
    runtimes = [runtime.status() for runtime in live_runtimes()]
    if embedded.expected() and embedded.runtime() is None:
        problem(
            "runtime_not_running",
            "PGPUBSUB_EMBEDDED is on but no Runtime runs in this process (see its log)",
        )
    for runtime in runtimes:
        if NOTIFICATIONS_NOT_RECEIVED in runtime["problems"]:
            problem(
                NOTIFICATIONS_NOT_RECEIVED,
                f"Runtime of process {runtime['pid']}: notifications sent to the database do "
                "not reach its LISTEN connection (transaction pooling? see its last_error)",
            )
        elif not runtime["connected"]:
            problem(
                "listener_disconnected",
                f"Runtime of process {runtime['pid']}: listener not connected",
            )
    body: dict[str, Any] = {"status": "failing" if problems else "ok", "problems": problems}
    if can_see_details(request):
        body.update(
            details=details,
            max_backlog_age_seconds=max_age,
            databases=[status.as_dict() for status in databases],
            runtimes=runtimes,
        )
    response = JsonResponse(body, status=503 if problems else 200)
    # The answer depends on who asks; never_cache already keeps shared caches out.
    patch_vary_headers(response, ["Authorization"])
    return response
