import json
import os
import threading
import time

import pgpubsub
from benchapp.channels import EventTrigger, Job, Ping, RowTrigger, Tick
from benchapp.models import Effect, Item


@pgpubsub.post_insert_listener(EventTrigger)
def record_event(old, new):
    now = time.time()
    Effect.objects.create(
        key=f"event-{new.pk}",
        latency=now - float(new.sent_at),
        done_at=now,
        worker=f"{os.getpid()}:{threading.get_ident()}",
    )


@pgpubsub.listener(Tick)
def record_tick(seq, sent):
    # A plain message reaches every listening process: the key names the process, so that each
    # one records it once (the runner counts the copies per process, and the processes that
    # answered a readiness probe).
    key = f"tick-{seq}-{os.getpid()}" if seq >= 0 else f"probe-{-seq}-{os.getpid()}"
    now = time.time()
    Item.objects.create(key=key, latency=now - float(sent), done_at=now)


class Tally:
    """Counts the callbacks of a no-op listener in memory (no query, so that the library's own
    cost is what is measured) and, once ``BENCH_EXPECTED`` of them ran, writes
    ``<BENCH_RESULT_DIR>/<name>-<pid>.json``: the count, the first and last callback times
    (epoch seconds) and the latencies recorded. A callback beyond the expected count (a message
    processed twice) writes the file again with the higher count."""

    def __init__(self, name):
        self.name = name
        self.expected = int(os.environ.get("BENCH_EXPECTED") or 0)
        self.directory = os.environ.get("BENCH_RESULT_DIR")
        self.lock = threading.Lock()
        self.count = 0
        self.first = self.last = 0.0
        self.latencies = []

    def hit(self, latency=None):
        now = time.time()
        with self.lock:
            self.count += 1
            if self.count == 1:
                self.first = now
            self.last = now
            if latency is not None:
                self.latencies.append(latency)
            if self.directory and self.expected and self.count >= self.expected:
                self.write()

    def write(self):
        path = os.path.join(self.directory, f"{self.name}-{os.getpid()}.json")
        with open(path + ".tmp", "w") as out:
            json.dump(
                {
                    "count": self.count,
                    "first": self.first,
                    "last": self.last,
                    "latencies": self.latencies,
                },
                out,
            )
        os.replace(path + ".tmp", path)  # the runner never reads half a file


JOBS = Tally("job")
ROWS = Tally("row")
PINGS = Tally("ping")


@pgpubsub.listener(Job)
def noop_job(n):
    JOBS.hit()


@pgpubsub.post_insert_listener(RowTrigger)
def noop_row(old, new):
    ROWS.hit()


@pgpubsub.listener(Ping)
def record_ping(seq, sent):
    PINGS.hit(time.time() - sent)
