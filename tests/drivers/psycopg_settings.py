"""psycopg 3 through pgwarden with prepare_threshold=0: settings made with SET
outside a transaction stay with their connection. With prepare_threshold=0 psycopg
sends the SET itself as a named prepared statement (Parse/Bind/Execute), so the
pooler must notice settings changed through the extended protocol too.

Each of several connections sets its own search_path (and statement_timeout) and
reads its own schema's table, many times, while the others do the same over the
same few server connections.

usage: psycopg_settings.py HOST PORT USER PASSWORD DBNAME
Exits non-zero with a message on any wrong result or error; prints one summary line.
"""

import sys
import threading
import time

import psycopg
from psycopg.conninfo import make_conninfo

CONNECTIONS = 6
ROUNDS = 40

failures = []


def fail(message):
    print(f"psycopg_settings: FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def work(conninfo, c, default_timeout):
    with psycopg.connect(conninfo, autocommit=True, prepare_threshold=0) as conn:
        timeout = f"{c + 10}s"
        conn.execute(f"SET search_path TO s{c}, public")
        conn.execute(f"SET statement_timeout = '{timeout}'")
        for i in range(ROUNDS):
            got = conn.execute("SELECT v FROM mine").fetchone()[0]
            if got != c:
                raise AssertionError(f"connection {c}, round {i}: read table mine of s{got}")
            shown = conn.execute("SHOW statement_timeout").fetchone()[0]
            if shown != timeout:
                raise AssertionError(
                    f"connection {c}, round {i}: statement_timeout is {shown}, set {timeout}"
                    + (" (the default)" if shown == default_timeout else " (another connection's)")
                )
            with conn.transaction():
                path = conn.execute("SHOW search_path").fetchone()[0]
                if path != f"s{c}, public":
                    raise AssertionError(f"connection {c}, round {i}: search_path is {path!r}")


def main():
    if len(sys.argv) != 6:
        fail(f"usage: {sys.argv[0]} HOST PORT USER PASSWORD DBNAME")
    host, port, user, password, dbname = sys.argv[1:]
    conninfo = make_conninfo(host=host, port=port, user=user, password=password, dbname=dbname)
    started = time.monotonic()
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            for c in range(CONNECTIONS):
                conn.execute(f"DROP SCHEMA IF EXISTS s{c} CASCADE")
                conn.execute(f"CREATE SCHEMA s{c}")
                conn.execute(f"CREATE TABLE s{c}.mine AS SELECT {c} AS v")
            default_timeout = conn.execute("SHOW statement_timeout").fetchone()[0]
    except psycopg.Error as e:
        fail(f"setup: {type(e).__name__}: {e}")

    def run(c):
        try:
            work(conninfo, c, default_timeout)
        except (psycopg.Error, AssertionError) as e:
            failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(c,)) for c in range(CONNECTIONS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if failures:
        fail("; ".join(sorted(failures)))
    print(
        f"psycopg_settings: ok psycopg {psycopg.__version__}: {CONNECTIONS} connections kept "
        f"their search_path and statement_timeout over {ROUNDS} rounds each, "
        f"{time.monotonic() - started:.1f}s"
    )


main()
