"""DuckDB SQL over one or many recorded runs: every table of every run is a view."""

from __future__ import annotations

import glob
from pathlib import Path

import duckdb
import pyarrow as pa

from attrib.analyzer.run import Run
from attrib.schemas import format as fmt


def resolve_runs(patterns: str | Path | list[str | Path]) -> list[Run]:
    """Run directories named by paths or glob patterns (`runs/*`), in sorted order."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    found: list[Path] = []
    for pattern in map(str, patterns):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        runs = [Path(m) for m in matches if (Path(m) / fmt.META_FILE).is_file()]
        if not runs:
            raise FileNotFoundError(
                f"{pattern!r} names no attrib run (a directory holding {fmt.META_FILE}); "
                "pass run directories or a glob such as 'runs/*'"
            )
        found += [r for r in runs if r not in found]
    return [Run(p) for p in found]


def _run_names(runs: list[Run]) -> list[str]:
    names = [r.dir.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(r.dir) for r in runs]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _select(files: list[Path], run_name: str | None) -> str:
    """SELECT over Parquet files, with a leading `run` column when several runs are open."""
    label = f"{_quote(run_name)} AS run, " if run_name is not None else ""
    listing = ", ".join(_quote(str(f)) for f in files)
    return f"SELECT {label}* FROM read_parquet([{listing}], union_by_name = true)"


def connect(runs: list[Run]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table over the given runs.

    With several runs each view gains a leading `run` column (the run directory's name).
    """
    con = duckdb.connect()
    names = _run_names(runs)
    _result_views(con, runs, names)
    labels = names if len(runs) > 1 else [None] * len(runs)
    for table, schema in fmt.TABLES.items():
        selects = [_select(run.table_files(table), label) for label, run in zip(labels, runs)
                   if run.table_files(table)]
        if not selects:
            empty = schema.empty_table()
            if len(runs) > 1:
                empty = empty.add_column(0, "run", pa.array([], pa.string()))
            con.register(f"__empty_{table}", empty)
            selects.append(f"SELECT * FROM __empty_{table}")
        con.execute(f"CREATE VIEW {table} AS " + " UNION ALL BY NAME ".join(selects))
    return con


def _result_views(con: duckdb.DuckDBPyConnection, runs: list[Run], names: list[str]) -> None:
    """One view per analysis result table (influence, completeness) over all analyses."""
    from attrib.analyzer.results import result_files

    selects: dict[str, list[str]] = {}
    labels = names if len(runs) > 1 else [None] * len(runs)
    for label, run in zip(labels, runs):
        for table, files in result_files(run).items():
            if files:
                selects.setdefault(table, []).append(_select(files, label))
    for table, parts in selects.items():
        con.execute(f"CREATE VIEW {table} AS " + " UNION ALL BY NAME ".join(parts))


def sql(runs: str | Path | Run | list, query: str) -> pa.Table:
    """Answer a DuckDB SQL query over the runs' tables; returns an Arrow table."""
    if isinstance(runs, Run):
        runs = [runs]
    elif not (isinstance(runs, list) and all(isinstance(r, Run) for r in runs)):
        runs = resolve_runs(runs)
    con = connect(runs)
    try:
        return con.sql(query).to_arrow_table()
    finally:
        con.close()
