"""``manage.py pgpubsub status``: what waits to be processed, per channel (never payloads);
``manage.py pgpubsub retry``: give failed notifications new attempts."""

from __future__ import annotations

import json

from django.core.management import BaseCommand, CommandError
from django.db import connections

from pgpubsub.exceptions import ChannelNotFound
from pgpubsub.health import DatabaseStatus, database_status


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"


class Command(BaseCommand):
    help = (
        "Inspect pgpubsub. `status`: the stored backlog per channel and the notification queue; "
        "`retry`: give stored notifications that were marked failed new attempts."
    )

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", metavar="ACTION")
        actions.required = True
        status = actions.add_parser(
            "status", help="Stored backlog per channel, its oldest row, the notification queue."
        )
        status.add_argument(
            "--database",
            default=None,
            help="Database alias (default: the one stored notifications live in).",
        )
        status.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
        retry = actions.add_parser(
            "retry",
            help="Retry the stored notifications marked failed (all of them, those of some "
            "channels, or some rows by id, failed or not).",
        )
        retry.add_argument(
            "--channels", nargs="+", help="Dotted paths of channels whose failed rows to retry."
        )
        retry.add_argument(
            "--ids", nargs="+", type=int, help="Ids of stored rows to retry, whatever their state."
        )
        retry.add_argument(
            "--database",
            default=None,
            help="Database alias (default: the one stored notifications live in).",
        )

    def handle(self, *args, **options):
        alias = options["database"]
        if alias is not None and alias not in connections:
            raise CommandError(f"Unknown database alias {alias!r}")
        if options["action"] == "retry":
            self._retry(options["channels"], options["ids"], alias)
            return
        status = database_status(alias)
        if options["json"]:
            self.stdout.write(json.dumps(status.as_dict(), indent=2))
        else:
            self._print_table(status)

    def _retry(self, channels: list[str] | None, ids: list[int] | None, alias: str | None) -> None:
        from pgpubsub.notify import retry_failed

        try:
            count = retry_failed(channels, ids, using=alias)
        except ChannelNotFound as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Retried {count} stored notification(s).")

    def _print_table(self, status: DatabaseStatus) -> None:
        self.stdout.write(
            f"Database {status.database!r}: {status.stored} stored notification(s), "
            f"{status.failed} failed, oldest {_age(status.oldest_age_seconds)}; notification "
            f"queue {status.notification_queue_usage:.1%} full"
        )
        if not status.channels:
            return
        width = max(len("channel"), *(len(backlog.channel) for backlog in status.channels))
        self.stdout.write(f"{'channel':<{width}}  {'stored':>8}  {'failed':>8}  {'oldest':>9}")
        for backlog in status.channels:
            self.stdout.write(
                f"{backlog.channel:<{width}}  {backlog.stored:>8}  {backlog.failed:>8}  "
                f"{_age(backlog.oldest_age_seconds):>9}"
            )
