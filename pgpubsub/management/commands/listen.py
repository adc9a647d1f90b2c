"""``manage.py listen``: listen to channels and process their notifications."""

from __future__ import annotations

import logging

from django.core.exceptions import ImproperlyConfigured
from django.core.management import BaseCommand, CommandError

from pgpubsub.channel import locate_channel
from pgpubsub.exceptions import ChannelNotFound

logger = logging.getLogger("pgpubsub.listen")


class Command(BaseCommand):
    help = "Listen to pgpubsub channels and process their notifications."

    def add_arguments(self, parser):
        parser.add_argument(
            "--channels",
            nargs="+",
            dest="channels",
            help="Dotted paths of the channels to listen to (default: all).",
        )
        parser.add_argument(
            "--queues",
            nargs="+",
            dest="queues",
            help="Task queues to run (names from TASKS' QUEUES, e.g. --queues emails,reports; "
            "default: every queue, unless --channels is given alone).",
        )
        parser.add_argument(
            "--processes",
            type=int,
            dest="processes",
            default=1,
            help="Number of listener processes to run under a supervisor.",
        )
        parser.add_argument(
            "--threads",
            type=int,
            dest="threads",
            default=1,
            help="Worker threads per listener process (default 1: one message at a time, in "
            "arrival order). Each uses a database connection of its own.",
        )
        parser.add_argument(
            "--worker",
            action="store_true",
            default=False,
            help="Run one listener in this process (what supervised children do).",
        )
        parser.add_argument(
            "--worker-start-method",
            dest="worker_start_method",
            default="spawn",
            choices=["spawn", "fork"],
            help="How --processes starts children: 'spawn' (a fresh interpreter) "
            "or 'fork' (faster; unsafe if threads were started at import).",
        )
        parser.add_argument(
            "--no-restart-on-failure",
            action="store_true",
            default=False,
            help="Do not replace a listener process that dies.",
        )
        parser.add_argument(
            "--recover",
            action="store_true",
            default=False,
            help="First process every stored notification of the channels.",
        )
        parser.add_argument(
            "--loglevel",
            default=None,
            help="Logging level of pgpubsub's messages, e.g. debug (default: info, unless the "
            "LOGGING setting sets one for the 'pgpubsub' logger).",
        )
        parser.add_argument(
            "--logformat",
            default="%(asctime)s %(levelname).4s %(message)s",
            help="Logging format, e.g. '%%(asctime)s %%(levelname)s %%(message)s'.",
        )

    def handle(self, *args, **options):
        self._configure_logging(options["loglevel"], options["logformat"])
        channels = options["channels"]
        if options["queues"]:
            channels = [*(channels or []), *self._queue_channels(options["queues"])]
        for name in channels or []:
            try:
                locate_channel(name)
            except ChannelNotFound as exc:
                raise CommandError(str(exc)) from exc
        processes = options["processes"]
        if processes < 1:
            raise CommandError(f"--processes must be at least 1, got {processes}")
        threads = options["threads"]
        if threads < 1:
            raise CommandError(f"--threads must be at least 1, got {threads}")
        restart = not options["no_restart_on_failure"]
        if options["worker"] and processes > 1:
            raise CommandError(
                f"Only 1 process is allowed with --worker, got --processes {processes}"
            )
        if options["worker"] or processes == 1:
            self._run_listener(channels, options["recover"], threads)
            return
        from pgpubsub.supervisor import Supervisor

        extra = ["--logformat", options["logformat"], "--threads", str(threads)]
        if options["loglevel"]:
            extra += ["--loglevel", options["loglevel"]]
        if not restart:
            extra.append("--no-restart-on-failure")
        status = Supervisor(
            processes,
            channels,
            options["recover"],
            restart,
            options["worker_start_method"],
            extra_args=extra,
            threads=threads,
        ).run()
        if status:
            raise CommandError("A listener process failed")

    @staticmethod
    def _queue_channels(names: list[str]) -> list[str]:
        """The channel names of the task queues ``names`` (comma-separated or not)."""
        from pgpubsub.tasks import queues

        wanted = [name.strip() for value in names for name in value.split(",") if name.strip()]
        try:
            return [cls.listen_safe_name() for cls in queues.channels_named(wanted)]
        except LookupError as exc:
            raise CommandError(str(exc)) from exc

    @staticmethod
    def _configure_logging(loglevel: str | None, logformat: str) -> None:
        """As django-pgpubsub 1.x: a root handler with ``--logformat``, unless the project's
        logging already writes pgpubsub's records somewhere (a handler on ``pgpubsub``, on one
        of its parents or on the root): a second handler would print every line twice.
        ``--loglevel`` also sets the level of the ``pgpubsub`` logger, so it wins over a level
        the LOGGING setting gave that logger."""
        level = (loglevel or "info").upper()
        if not isinstance(logging.getLevelName(level), int):
            raise CommandError(
                f"--loglevel {loglevel!r} is not a logging level (debug, info, warning, error)"
            )
        package_logger = logging.getLogger("pgpubsub")
        if not package_logger.hasHandlers():
            logging.basicConfig(format=logformat, level=level)
        if loglevel or package_logger.level == logging.NOTSET:
            package_logger.setLevel(level)

    def _run_listener(self, channels, recover: bool, threads: int) -> None:
        """Run a Runtime in the foreground until SIGTERM or SIGINT; it lets running callbacks
        finish within PGPUBSUB_SHUTDOWN_TIMEOUT."""
        from pgpubsub.runtime import Runtime

        try:
            runtime = Runtime(channels, workers=threads, recover=recover)
        except (ChannelNotFound, ImproperlyConfigured, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        try:
            # The signal handlers are set before the Runtime starts: a signal that comes while
            # it starts stops it too.
            runtime.run_until_signalled()
        except ImproperlyConfigured as exc:  # from start(): e.g. PGPUBSUB_LISTENER_FILTER
            raise CommandError(str(exc)) from exc
