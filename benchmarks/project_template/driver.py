"""Producer side of the benchmark, run with the side's own Python and pgpubsub.

python driver.py send M [RATE]    send M plain messages with notify() in autocommit, as fast
                                  as possible, or RATE per second on a fixed schedule (message
                                  n is due at start + n / RATE); prints {"count", "started"
                                  (epoch), "seconds", "late_ms" (the most a send was late)}
python driver.py ping M           the same with the Ping channel (its listener makes no query)
python driver.py store M          store M messages of the lockable Job channel with notify(),
                                  in one transaction; prints {"count", "seconds"}
"""

import json
import os
import sys
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import django  # noqa: E402

django.setup()

from benchapp.channels import Job, Ping, Tick  # noqa: E402
from django.db import connection, transaction  # noqa: E402

import pgpubsub  # noqa: E402


def send(count, rate=0.0, channel=Tick):
    connection.ensure_connection()
    started = time.time()
    clock = time.perf_counter()
    late = 0.0
    for seq in range(count):
        if rate:
            delay = clock + seq / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                late = max(late, -delay)
        pgpubsub.notify(channel, seq=seq, sent=time.time())
    elapsed = time.perf_counter() - clock
    return {"count": count, "started": started, "seconds": elapsed, "late_ms": late * 1000.0}


def store(count):
    clock = time.perf_counter()
    with transaction.atomic():
        for n in range(count):
            pgpubsub.notify(Job, n=n)
    return {"count": count, "seconds": time.perf_counter() - clock}


if __name__ == "__main__":
    command, count = sys.argv[1], int(sys.argv[2])
    rate = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    if command == "send":
        print(json.dumps(send(count, rate)))
    elif command == "ping":
        print(json.dumps(send(count, rate, Ping)))
    elif command == "store":
        print(json.dumps(store(count)))
    else:
        sys.exit(f"unknown command {command!r}")
