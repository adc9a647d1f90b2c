"""The ``listen --processes N`` supervisor (pgpubsub.supervisor): its restart policy on its own,
then ``--no-restart-on-failure`` with real processes. The restarts themselves are tested end to
end in tests/test_listen_command.py (``test_supervisor_*``, a killed child mid-run) and
tests/test_shutdown_signals.py (Ctrl-C)."""

from __future__ import annotations

import os
import signal

import pytest

from pgpubsub.supervisor import RESTART_DELAY, AfterExit, RestartPolicy, Supervisor
from tests.processes import outputs, wait_for
from tests.test_listen_command import send_jobs, wait_processed

SIGKILLED = -signal.SIGKILL  # the exit code of a process killed by SIGKILL


# --- the policy ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, SIGKILLED])
def test_with_restarts_every_exit_is_replaced_and_none_fails_the_supervisor(code):
    policy = RestartPolicy(restart=True, min_interval=1.0)
    assert policy.after_exit(code, lifetime=30.0) == AfterExit(replace=True, pause=0.0)


def test_a_child_that_dies_young_is_replaced_no_sooner_than_the_interval_after_its_start():
    policy = RestartPolicy(restart=True, min_interval=1.0)
    assert policy.after_exit(1, lifetime=0.0) == AfterExit(replace=True, pause=1.0)
    assert policy.after_exit(1, lifetime=0.25).pause == pytest.approx(0.75)
    assert policy.after_exit(1, lifetime=1.0).pause == 0.0


def test_the_default_interval():
    assert RestartPolicy(restart=True).min_interval == RESTART_DELAY > 0
    assert RestartPolicy(restart=True).after_exit(1, 0.0).pause == RESTART_DELAY


@pytest.mark.parametrize(
    ("code", "failed"), [(0, False), (1, True), (SIGKILLED, True), (-signal.SIGTERM, True)]
)
def test_without_restarts_nothing_is_replaced_and_a_failure_fails_the_supervisor(code, failed):
    policy = RestartPolicy(restart=False)
    assert policy.after_exit(code, lifetime=0.0) == AfterExit(replace=False, failed=failed)
    assert policy.after_exit(code, lifetime=3600.0) == AfterExit(replace=False, failed=failed)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"processes": 0}, "processes must be at least 1, got 0"),
        ({"processes": 2, "start_method": "forkserver"}, "Unsupported start method 'forkserver'"),
    ],
)
def test_a_supervisor_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Supervisor(**kwargs)


# --- with real processes ---------------------------------------------------------------------


def exited(supervisor, pid: int, code: int) -> bool:
    return f"(pid {pid}) exited with code {code}" in supervisor.output()


def not_replaced(supervisor, left: set[int]) -> None:
    """The supervisor, having seen a child exit, runs only the children in ``left``: it would
    have started a replacement within RESTART_DELAY."""
    with pytest.raises(AssertionError, match="timed out"):
        wait_for(
            lambda: supervisor.children() != left,
            RESTART_DELAY + 2,
            lambda: f"a replacement; children {supervisor.children()}",
            watch=[supervisor],
        )


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90)
def test_no_restart_on_failure_a_clean_exit_is_not_replaced_and_no_failure(processes):
    supervisor = processes.start("--processes", "2", "--no-restart-on-failure", ready=2)
    children = supervisor.children()
    assert len(children) == 2, outputs([supervisor])
    stopped, kept = sorted(children)
    os.kill(stopped, signal.SIGTERM)  # a clean exit (code 0) the supervisor did not ask for
    wait_for(lambda: exited(supervisor, stopped, 0), 30, "the exit to be seen", [supervisor])
    not_replaced(supervisor, {kept})

    send_jobs("kept-", 20)  # the other child goes on
    wait_processed("kept-", 20, [supervisor])

    supervisor.send(signal.SIGTERM)
    assert supervisor.wait(40) == 0, outputs([supervisor])
    supervisor.wait_no_backends(10)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90)
def test_no_restart_on_failure_a_killed_child_is_not_replaced_and_fails_the_supervisor(processes):
    supervisor = processes.start("--processes", "2", "--no-restart-on-failure", ready=2)
    children = supervisor.children()
    assert len(children) == 2, outputs([supervisor])
    first, second = sorted(children)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: exited(supervisor, first, SIGKILLED), 30, "the exit to be seen", [supervisor])
    not_replaced(supervisor, {second})

    # With no child left, the supervisor ends by itself, and says that one failed.
    os.kill(second, signal.SIGKILL)
    assert supervisor.wait(30) == 1, outputs([supervisor])
    assert "A listener process failed" in supervisor.output(), outputs([supervisor])
    supervisor.wait_no_backends(10)
