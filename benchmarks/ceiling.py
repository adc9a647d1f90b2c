"""The ceiling: a hand-written psycopg2 drain of a SKIP LOCKED queue doing the same per-message
work as the lockable listener (claim, one INSERT, delete), committing once per batch.

    python ceiling.py '<json connection parameters>' BATCH

Prints ``{"rows": N, "seconds": S}`` (the loop only, without interpreter start-up).
"""

import json
import sys
import time

import psycopg2


def drain(params: dict, batch: int) -> dict:
    conn = psycopg2.connect(**params)
    try:
        rows_done = 0
        clock = time.perf_counter()
        with conn.cursor() as cursor:
            while True:
                cursor.execute(
                    "SELECT id, payload FROM queue ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                    [batch],
                )
                claimed = cursor.fetchall()
                if not claimed:
                    conn.commit()
                    break
                for _, payload in claimed:
                    new = payload["new"]
                    now = time.time()
                    cursor.execute(
                        "INSERT INTO effect (key, latency, done_at) VALUES (%s, %s, %s)",
                        [f"event-{new['id']}", now - new["sent_at"], now],
                    )
                cursor.execute(
                    "DELETE FROM queue WHERE id = ANY(%s)", [[row_id for row_id, _ in claimed]]
                )
                conn.commit()
                rows_done += len(claimed)
        return {"rows": rows_done, "seconds": time.perf_counter() - clock}
    finally:
        conn.close()


if __name__ == "__main__":
    print(json.dumps(drain(json.loads(sys.argv[1]), int(sys.argv[2]))))
