"""runserver and uvicorn's worker processes end on SIGTERM without Python's exit handlers: the
Runtime inside still lets its running callback finish (gunicorn and a single uvicorn process:
tests/test_embedded.py). And a web process whose Runtime could not start says so on its health
view."""

import os
import re
import signal
import sys
import time

import pytest

import pgpubsub
from pgpubsub.models import Notification
from tests.processes import MANAGE, free_port, get_json, outputs, pid_alive, wait_for
from tests.testapp import channels
from tests.testapp.models import Effect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

EMBEDDED = {"PGPUBSUB_TEST_EMBEDDED": "1", "PGPUBSUB_TEST_SHUTDOWN_TIMEOUT": "20"}


def servers(port: int) -> dict[str, list[str]]:
    return {
        "runserver": [sys.executable, str(MANAGE), "runserver", f"127.0.0.1:{port}"],
        "runserver --noreload": [
            sys.executable, str(MANAGE), "runserver", "--noreload", f"127.0.0.1:{port}",
        ],
    }  # fmt: skip


@pytest.mark.parametrize("server", ["runserver", "runserver --noreload"])
def test_sigterm_lets_the_running_callback_finish(processes, server):
    process = processes.start_command(servers(free_port())[server], ready=1, env=EMBEDDED)
    pgpubsub.notify(channels.SlowJob, key="in-flight", seconds=2.0)
    wait_for(
        lambda: any(state == "idle in transaction" for state in process.session_states()),
        30,
        "the slow job to be claimed",
        watch=[process],
    )
    started = time.monotonic()
    if server == "runserver":
        # The autoreloader's parent passes no signal on: SIGTERM the serving child, whose exit
        # ends the parent too.
        (serving,) = process.children()
        os.kill(serving, signal.SIGTERM)
    else:
        process.send(signal.SIGTERM)
    process.wait(30)
    # The callback finished and was acknowledged before the process ended.
    assert Effect.objects.filter(key="in-flight").exists(), outputs([process])
    assert not Notification.objects.exists(), outputs([process])
    assert time.monotonic() - started < 20, outputs([process])
    process.wait_no_backends(10)


def uvicorn_workers(port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "tests.asgi_verbose:application",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
    ]  # fmt: skip


@pytest.mark.parametrize("how", ["SIGTERM to the parent", "Ctrl-C"])
def test_uvicorn_workers_let_the_running_callback_finish(processes, how):
    """uvicorn's parent passes SIGTERM on to its workers (and Ctrl-C reaches every process);
    a worker shuts down, then ends itself with the signal it got, skipping the exit handlers."""
    server = processes.start_command(uvicorn_workers(free_port()), ready=2, env=EMBEDDED)
    # Its children are the 2 workers, and multiprocessing's resource tracker.
    workers = {int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", server.output())}
    assert len(workers) == 2, outputs([server])
    children = server.children()
    pgpubsub.notify(channels.SlowJob, key="uvicorn-workers", seconds=3.0)
    wait_for(
        lambda: server.session_states().count("idle in transaction") == 1,
        30,
        "the slow job to be claimed",
        watch=[server],
    )

    if how == "Ctrl-C":
        os.killpg(server.pid, signal.SIGINT)
    else:
        server.send(signal.SIGTERM)
    server.wait(30)
    wait_for(
        lambda: not any(pid_alive(pid) for pid in children),
        10,
        lambda: (
            f"children {[pid for pid in children if pid_alive(pid)]} to exit{outputs([server])}"
        ),
    )

    # The callback ran once, to its end, and its row was acknowledged: nothing runs it again.
    assert Effect.objects.filter(key="uvicorn-workers").count() == 1, outputs([server])
    assert not Notification.objects.exists(), outputs([server])
    output = server.output()
    for pid in workers:
        assert re.search(rf"Runtime of process {pid} stopped", output), outputs([server])
    assert "still running" not in output, outputs([server])
    server.wait_no_backends(10)


def test_a_runtime_that_could_not_start_fails_the_health_view(processes):
    port = free_port()
    server = processes.start_command(
        [sys.executable, "-m", "gunicorn", "tests.wsgi:application", "-w", "1",
         "-b", f"127.0.0.1:{port}"],
        env={**EMBEDDED, "PGPUBSUB_TEST_CHANNELS": channels.Unheard.name()},
    )  # fmt: skip

    code, body = wait_for(
        lambda: get_json(f"http://127.0.0.1:{port}/pgpubsub/health/"),
        60,
        "a health answer",
        watch=[server],
    )
    assert code == 503, body
    # What anyone gets (the details are for staff and PGPUBSUB_HEALTH_TOKEN: test_health_view).
    assert body == {"status": "failing", "problems": ["runtime_not_running"]}
    assert "could not start" in server.output() and "Channel not found" in server.output()
