"""The DuckDB baseline of the SQL window benchmark (benchmark only, never part of the service).

Runs the saved queries of queries/ over the Parquet file `sql_window --parquet PATH` wrote
(the same rows the window held), with DuckDB from PyPI, and prints the median latency of each.

    pip install duckdb
    python3 benches/duckdb_baseline.py /tmp/window.parquet [runs]
"""

import pathlib
import re
import statistics
import sys
import time

import duckdb

PARAMS = {"experiment": "reward-animation"}
ADHOC = ("adhoc: events by type, last hour",
         "SELECT type, count(*) AS n, count(DISTINCT subject) AS s FROM events "
         "WHERE event_time >= now() - INTERVAL '1 hour' GROUP BY type")


def bind(sql: str) -> str:
    """Fills $params with the request's values or the declared defaults, as literals, and
    spells the two constructs DuckDB names differently."""
    defaults = dict(re.findall(r"--\s*@param\s+(\w+)=(\S+)", sql))
    values = {**defaults, **PARAMS}
    sql = re.sub(r"\$(\w+)", lambda m: "'" + values[m.group(1)] + "'", sql)
    sql = sql.replace("first_value(", "first(")
    return sql


def main() -> None:
    path, runs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
    con = duckdb.connect()
    con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet('{path}')")
    con.execute(
        "CREATE VIEW exposures AS SELECT event_time, subject, properties['flag'] AS flag, "
        "properties['variant'] AS variant FROM events WHERE type = '$exposure'")
    cases = [(p.stem, bind(p.read_text())) for p in sorted(pathlib.Path("queries").glob("*.sql"))]
    cases.append(ADHOC)
    print(f"duckdb {duckdb.__version__}, {con.execute('SELECT count(*) FROM events').fetchone()[0]} events")
    print("| query | p50 | rows |\n|---|---|---|")
    for name, sql in cases:
        times, rows = [], 0
        for _ in range(runs):
            started = time.perf_counter()
            rows = len(con.execute(sql).fetchall())
            times.append(time.perf_counter() - started)
        print(f"| {name} | {statistics.median(times) * 1000:.0f} ms | {rows} |")


if __name__ == "__main__":
    main()
