"""asyncpg through pgwarden: a pool of 10 connections, 50 concurrent tasks x 100
parameterized fetches (asyncpg prepares every query as a named statement and keeps
it in its statement cache), and a conn.prepare() statement reused across many
transactions while the pool keeps pgwarden's server connections busy.

usage: asyncpg_pool.py HOST PORT USER PASSWORD DBNAME
Exits non-zero with a message on any wrong result or error; prints one summary line.
"""

import asyncio
import sys
import time

import asyncpg

TASKS = 50
FETCHES = 100
ITEMS = 100
PREPARED_ROUNDS = 200


def fail(message):
    print(f"asyncpg_pool: FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def check(ok, message):
    if not ok:
        fail(message)


async def worker(pool, task, stats):
    for i in range(FETCHES):
        n = task * 1000 + i
        if i % 10 == 9:
            # An explicit transaction on one pooled connection.
            async with pool.acquire() as conn:
                async with conn.transaction():
                    got = await conn.fetchval("SELECT $1::int + 1", n)
                    check(got == n + 1, f"task {task}: SELECT {n} + 1 in a transaction gave {got!r}")
                    row = await conn.fetchrow("SELECT id, label FROM items WHERE id = $1", i + 1)
                    check(
                        row is not None and row["id"] == i + 1 and row["label"] == f"item-{i + 1}",
                        f"task {task}: item {i + 1} in a transaction gave {row!r}",
                    )
            stats["transactions"] += 1
        elif i % 2 == 0:
            got = await pool.fetchval("SELECT $1::int + 1", n)
            check(got == n + 1, f"task {task}: SELECT {n} + 1 gave {got!r}")
        else:
            item = (task + i) % ITEMS + 1
            row = await pool.fetchrow("SELECT id, label FROM items WHERE id = $1", item)
            check(
                row is not None and row["id"] == item and row["label"] == f"item-{item}",
                f"task {task}: item {item} gave {row!r}",
            )
        stats["fetches"] += 1


async def prepared_across_transactions(conn, stats):
    """One conn.prepare() statement, parsed once, executed in many transactions."""
    stmt = await conn.prepare(
        "SELECT $1::int * 2 AS doubled, current_database() AS db, pg_backend_pid() AS pid"
    )
    database = await conn.fetchval("SELECT current_database()")
    pids = set()
    for i in range(PREPARED_ROUNDS):
        if i % 2 == 0:
            async with conn.transaction():
                row = await stmt.fetchrow(i)
                again = await stmt.fetchval(i + 1)
                check(again == 2 * (i + 1), f"prepared: {i + 1} * 2 gave {again!r} (in a transaction)")
        else:
            row = await stmt.fetchrow(i)
        check(
            row is not None and row["doubled"] == 2 * i and row["db"] == database,
            f"prepared: round {i} gave {row!r}",
        )
        pids.add(row["pid"])
        stats["prepared"] += 1
        await asyncio.sleep(0)
    stats["prepared_servers"] = len(pids)


async def main():
    if len(sys.argv) != 6:
        fail(f"usage: {sys.argv[0]} HOST PORT USER PASSWORD DBNAME")
    host, port, user, password, dbname = sys.argv[1:]
    params = dict(host=host, port=int(port), user=user, password=password, database=dbname)
    started = time.monotonic()
    stats = {"fetches": 0, "transactions": 0, "prepared": 0, "prepared_servers": 0}
    try:
        pool = await asyncpg.create_pool(min_size=10, max_size=10, **params)
        await pool.execute("DROP TABLE IF EXISTS items")
        await pool.execute("CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL)")
        await pool.executemany(
            "INSERT INTO items VALUES ($1, $2)",
            [(i, f"item-{i}") for i in range(1, ITEMS + 1)],
        )
        count = await pool.fetchval("SELECT count(*) FROM items")
        check(count == ITEMS, f"{count} items after inserting {ITEMS}")
        single = await asyncpg.connect(**params)
        try:
            await asyncio.gather(
                prepared_across_transactions(single, stats),
                *(worker(pool, t, stats) for t in range(TASKS)),
            )
        finally:
            await single.close()
        await pool.close()
    except asyncpg.PostgresError as e:
        fail(f"{type(e).__name__} (SQLSTATE {e.sqlstate}): {e}")
    except (OSError, asyncpg.InterfaceError) as e:
        fail(f"{type(e).__name__}: {e}")
    check(stats["fetches"] == TASKS * FETCHES, f"only {stats['fetches']} fetches")
    # The point of the prepared part: the statement was used on several server connections.
    check(
        stats["prepared_servers"] >= 2,
        f"the prepared statement only ever ran on {stats['prepared_servers']} server connection(s)",
    )
    print(
        f"asyncpg_pool: ok asyncpg {asyncpg.__version__}: {stats['fetches']} fetches from "
        f"{TASKS} tasks ({stats['transactions']} in transactions), {stats['prepared']} "
        f"executions of one prepared statement on {stats['prepared_servers']} server "
        f"connections, {time.monotonic() - started:.1f}s"
    )


asyncio.run(main())
