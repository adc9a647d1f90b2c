"""Writers' commits per second: CONNECTIONS processes, each with its own psycopg2 connection in
autocommit, INSERT one row per transaction into TABLE for SECONDS, all starting together.

    python writers.py '<json connection parameters>' TABLE CONNECTIONS SECONDS

Prints ``{"commits", "seconds", "rate"}``. Processes, not threads: 16 Python writers sharing one
GIL would measure the GIL. The server's ``fsync`` and ``synchronous_commit`` apply as set.
"""

import json
import multiprocessing
import sys
import time

import psycopg2

#: Seconds every writer gets to connect, and to report once the time is up.
TIMEOUT = 30.0


def write(params: dict, table: str, seconds: float, ready, go, start, results) -> None:
    conn = psycopg2.connect(**params)
    conn.autocommit = True  # one INSERT, one commit
    sql = f"INSERT INTO {table} (key, sent_at) VALUES (%s, extract(epoch FROM clock_timestamp()))"
    try:
        with conn.cursor() as cursor:
            ready.release()
            if not go.wait(TIMEOUT):
                return
            end = start.value + seconds
            commits = 0
            while time.time() < end:
                cursor.execute(sql, ["w"])
                commits += 1
        results.put((commits, time.time() - start.value))
    finally:
        conn.close()


def run(params: dict, table: str, connections: int, seconds: float) -> dict:
    context = multiprocessing.get_context("fork")
    ready, go = context.Semaphore(0), context.Event()
    start = context.Value("d", 0.0)
    results = context.Queue()
    writers = [
        context.Process(target=write, args=(params, table, seconds, ready, go, start, results))
        for _ in range(connections)
    ]
    for writer in writers:
        writer.start()
    try:
        for _ in writers:  # every writer connected before the clock starts
            if not ready.acquire(timeout=TIMEOUT):
                raise SystemExit("a writer did not connect in time")
        start.value = time.time()
        go.set()
        done = [results.get(timeout=seconds + TIMEOUT) for _ in writers]
    finally:
        go.set()
        for writer in writers:
            writer.join(TIMEOUT)
            if writer.is_alive():
                writer.kill()
    commits = sum(count for count, _ in done)
    elapsed = max(took for _, took in done)
    return {"commits": commits, "seconds": elapsed, "rate": commits / elapsed}


if __name__ == "__main__":
    params, table = json.loads(sys.argv[1]), sys.argv[2]
    print(json.dumps(run(params, table, int(sys.argv[3]), float(sys.argv[4]))))
