"""Acceptance tests of the embedded Runtime: real gunicorn, uvicorn and runserver processes,
real management commands, the test database.

The servers run the test project (``tests.wsgi`` / ``tests.asgi`` / ``tests/manage.py``) with
``PGPUBSUB_TEST_EMBEDDED=1`` (``PGPUBSUB_EMBEDDED = True``). Each test finds the database
sessions of the server it started by their ``application_name`` and what its processes did by
the ``Effect`` rows the test app's listeners write (with the pid of the process that ran them).
"""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request
from collections import Counter

import pytest
from django.db import transaction
from django.db.models import Count

import pgpubsub
from pgpubsub.models import Notification
from tests.processes import (
    MANAGE,
    ServerProcess,
    free_port,
    gunicorn_command,
    outputs,
    pid_alive,
    wait_for,
)
from tests.testapp import channels
from tests.testapp.models import Author, Effect, Post

pytestmark = pytest.mark.django_db(transaction=True)

#: PGPUBSUB_SHUTDOWN_TIMEOUT of the servers, in seconds.
SHUTDOWN_TIMEOUT = 5.0
#: What a process may take beyond the shutdown timeout to exit (interpreter teardown...).
EXIT_MARGIN = 3.0
#: PGPUBSUB_WORKERS of the servers: worker threads of each Runtime.
RUNTIME_WORKERS = 2
#: Processes of each gunicorn server.
GUNICORN_WORKERS = 2

EMBEDDED = {
    "PGPUBSUB_TEST_EMBEDDED": "1",
    "PGPUBSUB_TEST_WORKERS": str(RUNTIME_WORKERS),
    "PGPUBSUB_TEST_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
}
NOT_EMBEDDED = {**EMBEDDED, "PGPUBSUB_TEST_EMBEDDED": "0"}

AUTHORS = 1000
BROADCASTS = 200


def gunicorn(*options: str) -> list[str]:
    return gunicorn_command(GUNICORN_WORKERS, *options)


def uvicorn(application: str = "tests.asgi:application") -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        application,
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
    ]


def runserver(*options: str) -> list[str]:
    return [sys.executable, str(MANAGE), "runserver", *options, f"127.0.0.1:{free_port()}"]


def stored() -> int:
    return Notification.objects.count()


def wait_children(server: ServerProcess, count: int) -> set[int]:
    return wait_for(
        lambda: (found := server.children()) and len(found) == count and found,
        30,
        lambda: f"{count} child process(es) of {server.name}, have {server.children()}",
        watch=[server],
    )


def assert_no_traceback(*servers: ServerProcess) -> None:
    for server in servers:
        assert "Traceback" not in server.output(), outputs([server])


def assert_stops(server: ServerProcess, *others: int, codes: tuple[int, ...] = (0,)) -> None:
    """SIGTERM ``server``: it and the processes ``others`` exit within the shutdown timeout
    (plus a margin), with one of ``codes``, and none of their database sessions is left."""
    started = time.monotonic()
    server.send(signal.SIGTERM)
    code = server.wait(SHUTDOWN_TIMEOUT + EXIT_MARGIN)
    wait_for(
        lambda: not any(pid_alive(pid) for pid in others),
        max(0.1, started + SHUTDOWN_TIMEOUT + EXIT_MARGIN - time.monotonic()),
        lambda: f"processes {[pid for pid in others if pid_alive(pid)]} to exit",
    )
    assert code in codes, outputs([server])
    server.wait_no_backends(5)


def create_authors(count: int, per_transaction: int = 250) -> list[int]:
    """Insert ``count`` authors (each fires the lockable AuthorTrigger); their pks."""
    pks: list[int] = []
    for start in range(0, count, per_transaction):
        with transaction.atomic():
            created = Author.objects.bulk_create(
                Author(name=f"author {number}")
                for number in range(start, min(count, start + per_transaction))
            )
        pks.extend(author.pk for author in created)
    return pks


def send_broadcasts(prefix: str, count: int) -> None:
    for number in range(count):
        pgpubsub.notify(channels.Broadcast, key=f"{prefix}{number}")


def effects(channel: str) -> int:
    return Effect.objects.filter(channel=channel).count()


def pids_of(channel: str) -> Counter:
    return Counter(Effect.objects.filter(channel=channel).values_list("pid", flat=True))


def seen_listening(server: ServerProcess, timeout: float) -> list:
    """Wait for ``server`` (a command that ends by itself) to exit, watching its sessions
    meanwhile; returns every LISTEN session it was seen with."""
    seen: list = []

    def exited() -> bool:
        seen.extend(server.backends(listening=True))
        return not server.alive

    wait_for(exited, timeout, lambda: f"{server.name} to exit{outputs([server])}")
    return seen


# -- gunicorn ---------------------------------------------------------------------------------

GUNICORN_MODES = {
    "sync": [],
    "sync-preload": ["--preload"],
    "gthread": ["--worker-class", "gthread", "--threads", "4"],
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("options", GUNICORN_MODES.values(), ids=GUNICORN_MODES.keys())
def test_gunicorn_workers_each_run_a_runtime(processes, options):
    server = processes.start_command(gunicorn(*options), ready=GUNICORN_WORKERS, env=EMBEDDED)
    workers = wait_children(server, GUNICORN_WORKERS)
    assert len(server.backends(listening=True)) == GUNICORN_WORKERS

    pks = create_authors(AUTHORS)
    send_broadcasts("broadcast-", BROADCASTS)

    wait_for(
        lambda: (
            effects("AuthorTrigger") == AUTHORS
            and effects("Broadcast") == GUNICORN_WORKERS * BROADCASTS
            and stored() == 0
        ),
        60,
        lambda: (
            f"{AUTHORS} author effects, {GUNICORN_WORKERS * BROADCASTS} broadcast effects and "
            f"no stored rows; have {effects('AuthorTrigger')}, {effects('Broadcast')} and "
            f"{stored()}"
        ),
        watch=[server],
    )

    # Each author was processed once, by one of the workers; both took part.
    author_effects = Effect.objects.filter(channel="AuthorTrigger")
    assert set(author_effects.values_list("key", flat=True)) == {f"author-{pk}" for pk in pks}
    posts = Post.objects.filter(author_id__in=pks).values("author_id").annotate(n=Count("id"))
    assert len(posts) == AUTHORS and {row["n"] for row in posts} == {1}
    assert set(pids_of("AuthorTrigger")) == workers, (pids_of("AuthorTrigger"), workers)
    # Each worker received every broadcast, once; the master nothing.
    assert pids_of("Broadcast") == {pid: BROADCASTS for pid in workers}
    assert server.pid not in set(Effect.objects.values_list("pid", flat=True))

    # Connection budget once idle: per worker, 1 listening + at most PGPUBSUB_WORKERS.
    budget = GUNICORN_WORKERS * (1 + RUNTIME_WORKERS)
    assert len(server.backends()) <= budget, server.backends()
    assert len(server.backends(listening=True)) == GUNICORN_WORKERS

    # The server still serves requests (their connection is closed after each, CONN_MAX_AGE
    # being 0), and its workers are those it started with.
    port = server.args[server.args.index("--bind") + 1].rsplit(":", 1)[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/pgpubsub/health/", timeout=10) as r:
        assert r.status == 200 and json.load(r)["status"] == "ok"
    wait_for(
        lambda: len(server.backends()) <= budget,
        10,
        lambda: f"at most {budget} sessions, have {server.backends()}",
        watch=[server],
    )
    assert server.children() == workers
    assert_no_traceback(server)

    assert_stops(server, *workers)
    assert_no_traceback(server)


@pytest.mark.timeout(60)
def test_gunicorn_hooks_start_a_runtime_per_worker(processes, tmp_path):
    config = tmp_path / "gunicorn_conf.py"
    config.write_text("from pgpubsub.gunicorn import post_worker_init, worker_exit  # noqa\n")
    server = processes.start_command(
        gunicorn("--config", str(config)), ready=GUNICORN_WORKERS, env=NOT_EMBEDDED
    )
    workers = wait_children(server, GUNICORN_WORKERS)

    for number in range(50):
        pgpubsub.notify(channels.Job, key=f"job-{number}", text="work")
    send_broadcasts("hooks-", 10)
    wait_for(
        lambda: effects("Job") == 50 and effects("Broadcast") == 20 and stored() == 0,
        30,
        lambda: f"50 jobs and 20 broadcasts; have {effects('Job')} and {effects('Broadcast')}",
        watch=[server],
    )
    assert set(pids_of("Job")) <= workers, (pids_of("Job"), workers)
    assert pids_of("Broadcast") == {pid: 10 for pid in workers}
    assert len(server.backends(listening=True)) == GUNICORN_WORKERS
    assert_no_traceback(server)

    assert_stops(server, *workers)
    assert_no_traceback(server)


SERVERS = {"gunicorn": (gunicorn, GUNICORN_WORKERS), "uvicorn": (uvicorn, 1)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", SERVERS)
def test_sigterm_lets_a_running_callback_finish(processes, kind):
    command, runtimes = SERVERS[kind]
    server = processes.start_command(command(), ready=runtimes, env=EMBEDDED)
    children = server.children()

    pgpubsub.notify(channels.SlowJob, key="slow", seconds=2)
    wait_for(
        lambda: server.session_states().count("idle in transaction") == 1,
        30,
        "the slow job running",
        watch=[server],
    )
    assert_stops(server, *children, codes=(0, -signal.SIGTERM))

    finished = Effect.objects.filter(key="slow").exists()
    assert finished and stored() == 0, (
        f"slow job finished: {finished}, stored rows left: {stored()}{outputs([server])}"
    )


# -- uvicorn ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "application",
    ["tests.asgi:application", "tests.asgi_router:application"],
    ids=["asgi", "setup-first"],
)
def test_uvicorn_runs_one_runtime(processes, application):
    server = processes.start_command(uvicorn(application), ready=1, env=EMBEDDED)

    pgpubsub.notify(channels.Job, key="uvicorn-job", text="work")
    pgpubsub.notify(channels.Broadcast, key="uvicorn-broadcast")
    wait_for(
        lambda: effects("Job") == 1 and effects("Broadcast") == 1 and stored() == 0,
        30,
        lambda: f"the job and the broadcast; have {list(Effect.objects.values_list('key'))}",
        watch=[server],
    )
    assert set(Effect.objects.values_list("pid", flat=True)) == {server.pid}
    assert len(server.backends(listening=True)) == 1
    assert len(server.backends()) <= 1 + RUNTIME_WORKERS

    # uvicorn ends itself with the signal it got, once it has shut down.
    assert_stops(server, codes=(0, -signal.SIGTERM))
    assert_no_traceback(server)


# -- runserver --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_runserver_with_autoreloader_runs_one_runtime_in_the_serving_child(processes):
    server = processes.start_command(runserver(), ready=1, env=EMBEDDED)
    (child,) = wait_children(server, 1)

    pgpubsub.notify(channels.Job, key="runserver-job", text="work")
    wait_for(lambda: effects("Job") == 1 and stored() == 0, 30, "the job processed", watch=[server])
    assert Effect.objects.get(key="runserver-job").pid == child
    # Still one Runtime: the autoreloader's parent never started one.
    assert len(server.backends(listening=True)) == 1
    assert server.children() == {child}
    assert_no_traceback(server)

    # Django's autoreloader kills its child when it gets SIGTERM: what a user sees is that
    # both end and leave no session behind.
    server.send(signal.SIGTERM)
    server.wait(SHUTDOWN_TIMEOUT + EXIT_MARGIN)
    wait_for(lambda: not pid_alive(child), EXIT_MARGIN, "the serving child to exit")
    server.wait_no_backends(5)


@pytest.mark.timeout(60)
def test_runserver_noreload_runs_one_runtime_in_its_process(processes):
    server = processes.start_command(runserver("--noreload"), ready=1, env=EMBEDDED)

    pgpubsub.notify(channels.Job, key="noreload-job", text="work")
    wait_for(lambda: effects("Job") == 1 and stored() == 0, 30, "the job processed", watch=[server])
    assert Effect.objects.get(key="noreload-job").pid == server.pid
    assert len(server.backends(listening=True)) == 1
    assert_no_traceback(server)

    server.send(signal.SIGTERM)
    server.wait(SHUTDOWN_TIMEOUT + EXIT_MARGIN)
    server.wait_no_backends(5)


# -- other management commands ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_shell_starts_no_runtime(processes):
    code = (
        "import time\n"
        "from django.conf import settings\n"
        "import pgpubsub.embedded\n"
        "time.sleep(2)\n"
        "print('embedded:', settings.PGPUBSUB_EMBEDDED)\n"
        "print('runtime:', pgpubsub.embedded.runtime())\n"
    )
    shell = processes.start_command(
        [sys.executable, str(MANAGE), "shell", "-c", code], env=EMBEDDED
    )
    assert seen_listening(shell, 30) == []
    assert shell.returncode == 0, outputs([shell])
    assert "embedded: True" in shell.output(), outputs([shell])
    assert "runtime: None" in shell.output(), outputs([shell])


@pytest.mark.timeout(60)
def test_migrate_starts_no_runtime(processes):
    migrate = processes.start_command(
        [sys.executable, str(MANAGE), "migrate", "--no-input"], env=EMBEDDED
    )
    assert seen_listening(migrate, 30) == []
    assert migrate.returncode == 0, outputs([migrate])
    assert_no_traceback(migrate)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("options", [[], ["--preload"]], ids=["no-preload", "preload"])
def test_a_process_forked_by_a_worker_starts_no_runtime(processes, options):
    """A view (or a callback using multiprocessing) that forks: the child has no Runtime, and
    the worker's goes on."""
    server = processes.start_command(gunicorn(*options), ready=GUNICORN_WORKERS, env=EMBEDDED)
    port = server.args[server.args.index("--bind") + 1].rsplit(":", 1)[1]
    for _ in range(GUNICORN_WORKERS):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/fork/", timeout=10) as response:
            assert response.read() == b"runtime=False", outputs([server])
    assert len(server.backends(listening=True)) == GUNICORN_WORKERS
    pgpubsub.notify(channels.Job, key="after-fork")
    wait_for(lambda: Effect.objects.filter(key="after-fork").exists(), 30, "a job", watch=[server])
    assert_no_traceback(server)
