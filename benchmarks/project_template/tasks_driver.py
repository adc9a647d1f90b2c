"""Producer of the tasks workloads (39-41), run with the side's Python and the TASKS backend its
settings name (pgpubsub's, or django-tasks-db's with BENCH_TASKS_BACKEND=db).

python tasks_driver.py store N        enqueue N no-op tasks in one transaction; prints
                                      {"count", "seconds"}
python tasks_driver.py paced N RATE   enqueue a probe task and wait until it succeeded (a worker
                                      runs), then N no-op tasks, each in its own transaction, on a
                                      fixed schedule (task n due at start + n / RATE); prints
                                      {"count", "probe" (its result id), "late_ms" (the most a
                                      task was late)}
python tasks_driver.py enqueue E [notify]
                                      time E enqueues, each in its own transaction.atomic(); with
                                      "notify", also E pgpubsub.notify() of the lockable channel
                                      Job, each in its own transaction, in alternating rounds;
                                      prints the mean microseconds of the call inside the
                                      transaction ("enqueue_us", "notify_us") and of the whole
                                      transaction, commit included ("enqueue_tx_us",
                                      "notify_tx_us")
"""

import json
import os
import sys
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import django  # noqa: E402

django.setup()

from benchapp.channels import Job  # noqa: E402
from benchapp.tasks import noop  # noqa: E402
from django.db import connection, transaction  # noqa: E402

import pgpubsub  # noqa: E402

#: Seconds the probe task of ``paced`` may take to succeed (the worker's start included).
PROBE_TIMEOUT = 90.0
#: Operations per round of ``enqueue``: the two kinds alternate round by round.
ROUND = 50
#: Untimed operations of each kind before the timed ones (imports, first queries).
WARM_UP = 20


def store(count):
    clock = time.perf_counter()
    with transaction.atomic():
        for n in range(count):
            noop.enqueue(n)
    return {"count": count, "seconds": time.perf_counter() - clock}


def paced(count, rate):
    probe = noop.enqueue(-1)
    deadline = time.monotonic() + PROBE_TIMEOUT
    while (status := noop.get_result(probe.id).status) != "SUCCESSFUL":
        if status == "FAILED" or time.monotonic() > deadline:
            sys.exit(
                f"the probe task {probe.id} did not succeed within {PROBE_TIMEOUT:g}s: {status}"
            )
        time.sleep(0.01)
    clock = time.perf_counter()
    late = 0.0
    for n in range(count):
        delay = clock + n / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            late = max(late, -delay)
        with transaction.atomic():
            noop.enqueue(n)
    return {"count": count, "probe": str(probe.id), "late_ms": late * 1000.0}


def _enqueue(n):
    noop.enqueue(n)


def _notify(n):
    pgpubsub.notify(Job, n=n)


def timed(operation, count, totals):
    """``count`` transactions, each running ``operation`` once: adds the seconds of the calls
    and of the whole transactions to ``totals``."""
    for n in range(count):
        begin = time.perf_counter()
        with transaction.atomic():
            call = time.perf_counter()
            operation(n)
            totals[0] += time.perf_counter() - call
        totals[1] += time.perf_counter() - begin


def enqueue(count, notify):
    kinds = {"enqueue": _enqueue}
    if notify:
        kinds["notify"] = _notify
    connection.ensure_connection()
    for operation in kinds.values():
        timed(operation, WARM_UP, [0.0, 0.0])
    totals = {name: [0.0, 0.0] for name in kinds}
    done = 0
    rounds = 0
    while done < count:
        size = min(ROUND, count - done)
        names = list(kinds) if rounds % 2 == 0 else list(reversed(kinds))
        for name in names:
            timed(kinds[name], size, totals[name])
        done += size
        rounds += 1
    out = {"count": count}
    for name, (calls, transactions) in totals.items():
        out[f"{name}_us"] = calls / count * 1e6
        out[f"{name}_tx_us"] = transactions / count * 1e6
    return out


if __name__ == "__main__":
    command, count = sys.argv[1], int(sys.argv[2])
    if command == "store":
        print(json.dumps(store(count)))
    elif command == "paced":
        print(json.dumps(paced(count, float(sys.argv[3]))))
    elif command == "enqueue":
        print(json.dumps(enqueue(count, sys.argv[3:] == ["notify"])))
    else:
        sys.exit(f"unknown command {command!r}")
