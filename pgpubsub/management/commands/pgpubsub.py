"""``manage.py pgpubsub status``: what waits to be processed, per channel (never payloads)."""

from __future__ import annotations

import json

from django.core.management import BaseCommand, CommandError
from django.db import connections

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
    help = "Inspect pgpubsub. `status`: the stored backlog per channel and the notification queue."

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

    def handle(self, *args, **options):
        alias = options["database"]
        if alias is not None and alias not in connections:
            raise CommandError(f"Unknown database alias {alias!r}")
        status = database_status(alias)
        if options["json"]:
            self.stdout.write(json.dumps(status.as_dict(), indent=2))
        else:
            self._print_table(status)

    def _print_table(self, status: DatabaseStatus) -> None:
        self.stdout.write(
            f"Database {status.database!r}: {status.stored} stored notification(s), oldest "
            f"{_age(status.oldest_age_seconds)}; notification queue "
            f"{status.notification_queue_usage:.1%} full"
        )
        if not status.channels:
            return
        width = max(len("channel"), *(len(backlog.channel) for backlog in status.channels))
        self.stdout.write(f"{'channel':<{width}}  {'stored':>8}  {'oldest':>9}")
        for backlog in status.channels:
            self.stdout.write(
                f"{backlog.channel:<{width}}  {backlog.stored:>8}  "
                f"{_age(backlog.oldest_age_seconds):>9}"
            )
