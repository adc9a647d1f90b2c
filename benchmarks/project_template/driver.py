"""Producer side of the benchmark, run with the side's own Python and pgpubsub.

python driver.py send M    send M plain messages with notify(), as fast as possible, in
                           autocommit; prints {"count", "started" (epoch), "seconds"}
"""

import json
import os
import sys
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import django  # noqa: E402

django.setup()

from benchapp.channels import Tick  # noqa: E402
from django.db import connection  # noqa: E402

import pgpubsub  # noqa: E402


def send(count):
    connection.ensure_connection()
    started = time.time()
    clock = time.perf_counter()
    for seq in range(count):
        pgpubsub.notify(Tick, seq=seq, sent=time.time())
    elapsed = time.perf_counter() - clock
    return {"count": count, "started": started, "seconds": elapsed}


if __name__ == "__main__":
    command, count = sys.argv[1], int(sys.argv[2])
    if command != "send":
        sys.exit(f"unknown command {command!r}")
    print(json.dumps(send(count)))
