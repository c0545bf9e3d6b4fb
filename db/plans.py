"""The plan Postgres runs a statement with once it is prepared: its generic plan.

psycopg prepares a statement on the server after its fifth execution on a connection; from
then on Postgres may plan it once, without the parameter values (a generic plan). A query
whose index only matches for some values (a partial index on `status = 'queued'` and a
bound status) is then either planned afresh on every execution or run without its index.
`EXPLAIN` of the statement with its values inlined shows neither, so the benchmarks and the
plan tests ask for the generic plan itself (Postgres 15 has no `EXPLAIN (GENERIC_PLAN)`).
"""

from __future__ import annotations

import re
from typing import Any

from psycopg import ClientCursor
from psycopg import Connection as PsycopgConnection
from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import asyncpg


def generic_plan(
    conn: Connection,
    statement: Any,
    params: dict[str, Any],
    *,
    analyze: bool = False,
    buffers: bool = False,
) -> list[str]:
    """`EXPLAIN EXECUTE` of `statement` (a SQLAlchemy Core statement) prepared on `conn` (a
    psycopg connection) under `plan_cache_mode = force_generic_plan`; `params` fills the
    bound values the statement has no default for. `analyze`: run it too, with timings;
    `buffers`: and the pages each node read."""
    # asyncpg's dialect writes numbered placeholders ($1, $2...), which PREPARE takes.
    expanded = statement.compile(dialect=asyncpg.dialect()).construct_expanded_state(params)
    args = [expanded.parameters[name] for name in expanded.positiontup or ()]
    raw = conn.connection.driver_connection
    assert isinstance(raw, PsycopgConnection)
    with ClientCursor(raw) as cur:  # binds EXECUTE's values client-side
        cur.execute("SET plan_cache_mode = force_generic_plan")
        cur.execute(f"PREPARE posegen_plan AS {expanded.statement}")
        try:
            options = "ANALYZE, COSTS OFF, SUMMARY OFF" if analyze or buffers else "COSTS OFF"
            options += ", BUFFERS" if buffers else ""
            placeholders = f"({', '.join(['%s'] * len(args))})" if args else ""
            cur.execute(f"EXPLAIN ({options}) EXECUTE posegen_plan{placeholders}", args)
            return [str(row[0]) for row in cur.fetchall()]
        finally:
            cur.execute("DEALLOCATE posegen_plan")
            cur.execute("RESET plan_cache_mode")


def pages_read(conn: Connection, statement: Any, params: dict[str, Any]) -> tuple[int, str]:
    """The pages (hit or read) the generic plan of `statement` read when run, and the plan;
    what it changed is rolled back. The top node's count, plus each data-modifying CTE's that
    nothing in the plan scans (Postgres runs those after the query, outside its count)."""
    plan = generic_plan(conn, statement, params, buffers=True)
    conn.rollback()
    text = "\n".join(plan)
    pages = _pages(next(line for line in plan if "Buffers:" in line))
    for n, line in enumerate(plan):
        name = re.fullmatch(r"\s*CTE (\w+)", line)
        if name and f"CTE Scan on {name[1]}" not in text:
            pages += _pages(next(rest for rest in plan[n:] if "Buffers:" in rest))
    return pages, text


def cte_plan(plan: str, name: str) -> str:
    """The part of an EXPLAIN's text that runs the CTE `name`."""
    part = re.search(rf"^(\s*)CTE {name}\n(.*?)(?=^\1\S|\Z)", plan, re.M | re.S)
    assert part is not None, f"no CTE {name} in the plan"
    return part[2]


def _pages(line: str) -> int:
    return sum(int(n) for n in re.findall(r"(?:hit|read)=(\d+)", line))
