"""Ctrl-C and stop signals that arrive together: a terminal's Ctrl-C sends SIGINT to the whole
process group of ``listen --processes N`` (supervisor and children at once), and the supervisor
then sends each child SIGTERM, often while the child is still handling the SIGINT. Every process
must exit promptly, each child stopping its Runtime itself: never hung until the supervisor
kills it."""

import os
import re
import signal
import time

import pytest

from tests.processes import outputs, pid_alive, wait_for

pytestmark = [pytest.mark.django_db(transaction=True)]

#: Rounds of each test: the signals' race is lost in some rounds only.
ROUNDS = 8
#: Seconds every process gets to exit after the signals (nothing is running: no callback to
#: wait for), well below the supervisor's kill deadline (shutdown timeout + 5 s).
EXIT_WITHIN = 6.0
#: What a Runtime logs once its threads stopped.
STOPPED = re.compile(r"Runtime of process \d+ stopped")


def assert_all_exit(processes, *pids: int) -> None:
    wait_for(
        lambda: not any(pid_alive(pid) for pid in pids),
        EXIT_WITHIN,
        lambda: f"processes {[pid for pid in pids if pid_alive(pid)]} to exit" + outputs(processes),
    )


@pytest.mark.timeout(300)
def test_ctrl_c_stops_the_supervisor_and_every_child(processes):
    for _ in range(ROUNDS):
        supervisor = processes.start(
            "--processes", "2", "--threads", "2", "--loglevel", "info", ready=2
        )
        children = supervisor.children()
        assert len(children) == 2, outputs([supervisor])

        os.killpg(supervisor.pid, signal.SIGINT)  # what Ctrl-C in a terminal does

        assert_all_exit([supervisor], supervisor.pid, *children)
        assert supervisor.wait(1) == 0, outputs([supervisor])
        output = supervisor.output()
        assert "did not stop in time" not in output, outputs([supervisor])
        assert len(STOPPED.findall(output)) == 2, outputs([supervisor])  # each child's Runtime
        assert "Traceback" not in output, outputs([supervisor])
        supervisor.wait_no_backends(5)


@pytest.mark.timeout(180)
def test_sigint_and_sigterm_back_to_back_stop_a_listener(processes):
    for number in range(ROUNDS):
        listener = processes.start("--threads", "2", "--loglevel", "info")
        first, second = (signal.SIGINT, signal.SIGTERM)[:: 1 if number % 2 else -1]
        listener.send(first)
        listener.send(second)

        started = time.monotonic()
        assert_all_exit([listener], listener.pid)
        assert time.monotonic() - started < EXIT_WITHIN
        assert listener.wait(1) == 0, outputs([listener])
        assert len(STOPPED.findall(listener.output())) == 1, outputs([listener])
        assert "Traceback" not in listener.output(), outputs([listener])
        listener.wait_no_backends(5)
