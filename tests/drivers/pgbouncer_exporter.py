"""spreaker's prometheus-pgbouncer-exporter scraping pgwarden's admin console as
it scrapes PgBouncer's (`dbname=pgbouncer`, a stats user). It runs SHOW STATS,
POOLS, DATABASES and CONFIG through psycopg2 and reads columns and keys by
PgBouncer's names; a query that fails or a name that is missing sets
pgbouncer_up to 0 or drops the gauge.

Three transactions go through pgwarden first, so the counters have figures.

usage: pgbouncer_exporter.py HOST PORT USER PASSWORD DBNAME
Prints every metric the exporter made, one per line (`name{label=value,...} value`),
then `pgbouncer_exporter: ok`; exits non-zero when the scrape failed.
"""

import sys

import psycopg2
from prometheus_pgbouncer_exporter.collector import PgbouncerMetricsCollector
from prometheus_pgbouncer_exporter.config import PgbouncerConfig

host, port, user, password, dbname = sys.argv[1:6]

app = psycopg2.connect(host=host, port=port, user=user, password=password, dbname=dbname)
app.autocommit = True
with app.cursor() as cursor:
    for _ in range(3):
        cursor.execute("SELECT 1")
app.close()

dsn = f"postgresql://{user}:{password}@{host}:{port}/pgbouncer"
metrics = PgbouncerMetricsCollector(PgbouncerConfig({"dsn": dsn})).collect()
for metric in metrics:
    labels = ",".join(f"{k}={v}" for k, v in sorted(metric["labels"].items()))
    print(f"{metric['name']}{{{labels}}} {metric['value']}")

up = [m["value"] for m in metrics if m["name"] == "pgbouncer_up"]
if up != [1]:
    print(f"pgbouncer_exporter: FAILED: pgbouncer_up is {up}", file=sys.stderr)
    sys.exit(1)
print("pgbouncer_exporter: ok")
