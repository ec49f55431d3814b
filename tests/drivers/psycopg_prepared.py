"""psycopg 3 through pgwarden with prepare_threshold=0 (every query is a named
server-side statement from its first execution): several connections in threads,
parameterized queries, executemany (pipelined), a pipeline block, transactions
that roll back, an error inside a transaction, and a statement cache small enough
that psycopg deallocates statements as it goes.

usage: psycopg_prepared.py HOST PORT USER PASSWORD DBNAME
Exits non-zero with a message on any wrong result or error; prints one summary line.
"""

import sys
import threading
import time

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

THREADS = 8
ROUNDS = 60
ITEMS = 50

failures = []
stats_lock = threading.Lock()


def fail(message):
    print(f"psycopg_prepared: FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


class Wrong(Exception):
    pass


def check(ok, message):
    if not ok:
        raise Wrong(message)


def connect(conninfo, **kwargs):
    return psycopg.connect(conninfo, prepare_threshold=0, **kwargs)


def setup(conninfo):
    with connect(conninfo, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS items, events")
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL)")
        conn.execute("CREATE TABLE events (thread int, n int, payload text)")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO items VALUES (%s, %s)",
                [(i, f"item-{i}") for i in range(1, ITEMS + 1)],
            )
        n = conn.execute("SELECT count(*) FROM items").fetchone()[0]
        check(n == ITEMS, f"{n} items after inserting {ITEMS}")


def thread_work(conninfo, t, totals):
    stats = {"queries": 0, "executemany": 0, "pipelined": 0}
    # Half the threads use psycopg's implicit transactions, half autocommit.
    with connect(conninfo, autocommit=(t % 2 == 0)) as conn:
        # A small statement cache: psycopg deallocates the least recently used ones.
        conn.prepared_max = 4
        with conn.cursor() as cur:
            for i in range(ROUNDS):
                n = t * 1000 + i
                got = cur.execute("SELECT %s::int + %s::int", (n, 1)).fetchone()[0]
                check(got == n + 1, f"thread {t}: {n} + 1 gave {got!r}")
                item = (t + i) % ITEMS + 1
                row = cur.execute("SELECT id, label FROM items WHERE id = %s", (item,)).fetchone()
                check(row == (item, f"item-{item}"), f"thread {t}: item {item} gave {row!r}")
                # More distinct statements than prepared_max, in turn.
                k = i % 7
                got = cur.execute(
                    sql.SQL("SELECT %s::int * {}").format(sql.Literal(k + 2)), (n,)
                ).fetchone()[0]
                check(got == n * (k + 2), f"thread {t}: {n} * {k + 2} gave {got!r}")
                if not conn.autocommit:
                    conn.commit()
                stats["queries"] += 3

            # executemany (pipelined where libpq can) in its own transaction.
            with conn.transaction():
                cur.executemany(
                    "INSERT INTO events VALUES (%s, %s, %s)",
                    [(t, i, f"t{t}-e{i}") for i in range(25)],
                )
            if not conn.autocommit:
                conn.commit()
            got = cur.execute("SELECT count(*), sum(n) FROM events WHERE thread = %s", (t,)).fetchone()
            check(got == (25, sum(range(25))), f"thread {t}: events after executemany: {got!r}")
            stats["executemany"] += 25

            # A transaction that rolls back leaves nothing behind.
            with conn.transaction():
                cur.execute("INSERT INTO events VALUES (%s, %s, %s)", (t, -1, "rolled back"))
                seen = cur.execute("SELECT count(*) FROM events WHERE thread = %s AND n = -1", (t,)).fetchone()[0]
                check(seen == 1, f"thread {t}: own uncommitted row not visible ({seen})")
                raise psycopg.Rollback()
            if not conn.autocommit:
                conn.commit()
            left = cur.execute("SELECT count(*) FROM events WHERE thread = %s AND n = -1", (t,)).fetchone()[0]
            check(left == 0, f"thread {t}: {left} rows of a rolled-back transaction")

            # An error inside a transaction: the whole transaction is gone, the connection works.
            try:
                with conn.transaction():
                    cur.execute("INSERT INTO events VALUES (%s, %s, %s)", (t, -2, "lost"))
                    cur.execute("SELECT 1 / %s::int", (0,))
                raise Wrong(f"thread {t}: division by zero did not fail")
            except errors.DivisionByZero:
                pass
            if not conn.autocommit:
                conn.rollback()
            left = cur.execute("SELECT count(*) FROM events WHERE thread = %s AND n = -2", (t,)).fetchone()[0]
            check(left == 0, f"thread {t}: {left} rows of a failed transaction")
            got = cur.execute("SELECT %s::int + %s::int", (t, 1)).fetchone()[0]
            check(got == t + 1, f"thread {t}: after the error, {t} + 1 gave {got!r}")

            # A pipeline of prepared statements.
            if psycopg.Pipeline.is_supported():
                with conn.pipeline():
                    curs = [
                        conn.execute("SELECT %s::int + %s::int", (t, i)) for i in range(10)
                    ]
                got = [c.fetchone()[0] for c in curs]
                check(got == [t + i for i in range(10)], f"thread {t}: pipeline gave {got!r}")
                stats["pipelined"] += 10
            if not conn.autocommit:
                conn.commit()
    with stats_lock:
        for key, n in stats.items():
            totals[key] += n


def main():
    if len(sys.argv) != 6:
        fail(f"usage: {sys.argv[0]} HOST PORT USER PASSWORD DBNAME")
    host, port, user, password, dbname = sys.argv[1:]
    conninfo = make_conninfo(host=host, port=port, user=user, password=password, dbname=dbname)
    started = time.monotonic()
    stats = {"queries": 0, "executemany": 0, "pipelined": 0}
    try:
        setup(conninfo)
    except (psycopg.Error, Wrong) as e:
        fail(f"setup: {type(e).__name__}: {e}")

    def run(t):
        try:
            thread_work(conninfo, t, stats)
        except (psycopg.Error, Wrong) as e:
            failures.append(f"thread {t}: {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - report anything a thread dies of
            failures.append(f"thread {t}: unexpected {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if failures:
        fail("; ".join(failures))
    try:
        with connect(conninfo, autocommit=True) as conn:
            got = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    except psycopg.Error as e:
        fail(f"final count: {type(e).__name__}: {e}")
    if got != THREADS * 25:
        fail(f"{got} events in the table, expected {THREADS * 25}")
    print(
        f"psycopg_prepared: ok psycopg {psycopg.__version__} (libpq {psycopg.pq.version()}): "
        f"{THREADS} connections, {stats['queries']} prepared queries, "
        f"{stats['executemany']} executemany rows, {stats['pipelined']} pipelined, "
        f"{time.monotonic() - started:.1f}s"
    )


main()
