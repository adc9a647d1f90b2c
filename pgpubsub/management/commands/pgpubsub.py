"""``manage.py pgpubsub status``: what waits to be processed, per database and channel (never
payloads); ``manage.py pgpubsub retry``: give failed notifications new attempts."""

from __future__ import annotations

import json

from django.core.management import BaseCommand, CommandError
from django.db import DatabaseError, connections

from pgpubsub.exceptions import ChannelNotFound
from pgpubsub.health import DatabaseFailure, DatabaseStatus, databases_status

#: The actions, and what each does (their --help, and the error without one).
ACTIONS = {
    "status": "show the stored backlog per database and channel, and the notification queue",
    "retry": "give the stored notifications marked failed new attempts",
}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"


class Command(BaseCommand):
    help = "Inspect pgpubsub's stored notifications. Actions: " + "; ".join(
        f"{name}: {text}" for name, text in ACTIONS.items()
    )
    # Django's parser reports this, with the usage, when no action is given (exit code 2).
    missing_args_message = (
        "an action is required, one of:\n"
        + "\n".join(f"  {name:<8}{text}" for name, text in ACTIONS.items())
        + "\nSee 'manage.py pgpubsub ACTION --help' for the options of each."
    )

    def add_arguments(self, parser):
        actions = parser.add_subparsers(
            title="actions",
            dest="action",
            required=True,
            help="'manage.py pgpubsub ACTION --help' shows its options",
        )
        status = actions.add_parser("status", help=ACTIONS["status"], description=ACTIONS["status"])
        status.add_argument(
            "--database",
            default=None,
            help="Database alias (default: every database that holds stored notifications: "
            "the Notification model's, and each one a channel with a listener names).",
        )
        status.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
        retry = actions.add_parser("retry", help=ACTIONS["retry"], description=ACTIONS["retry"])
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
        statuses = databases_status([alias] if alias else None)
        failures = [status for status in statuses if isinstance(status, DatabaseFailure)]
        if options["json"]:
            self.stdout.write(json.dumps(_report(statuses), indent=2))
        else:
            read = [status for status in statuses if isinstance(status, DatabaseStatus)]
            for index, status in enumerate(read):
                if index:
                    self.stdout.write("")
                self._print_table(status)
        if failures:
            # One line on stderr and exit code 1; what could be read is printed above.
            raise CommandError(
                "; ".join(
                    f"cannot read the stored notifications of database {failure.database!r}: "
                    f"{failure.error}"
                    for failure in failures
                )
            )

    def _retry(self, channels: list[str] | None, ids: list[int] | None, alias: str | None) -> None:
        from pgpubsub.notify import retry_failed

        try:
            count = retry_failed(channels, ids, using=alias)
        except ChannelNotFound as exc:
            raise CommandError(str(exc)) from exc
        except DatabaseError as exc:
            error = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise CommandError(f"cannot retry stored notifications: {error}") from exc
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


def _report(statuses: list[DatabaseStatus | DatabaseFailure]) -> dict:
    """The JSON of ``status --json``: totals over the databases that could be read, each
    database, and the errors of those that could not."""
    read = [status for status in statuses if isinstance(status, DatabaseStatus)]
    ages = [status.oldest_age_seconds for status in read if status.oldest_age_seconds is not None]
    return {
        "stored": sum(status.stored for status in read),
        "failed": sum(status.failed for status in read),
        "oldest_age_seconds": max(ages) if ages else None,
        "databases": [status.as_dict() for status in read],
        "errors": [s.as_dict() for s in statuses if isinstance(s, DatabaseFailure)],
    }
