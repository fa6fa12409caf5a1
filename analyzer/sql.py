"""DuckDB SQL over one or many recorded runs: every table of every run is a view."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from attrib.analyzer.run import Run
from attrib.schemas import format as fmt


def named(runs: str | Path | Run | list, name: str, **params: Any) -> pa.Table:
    """Run a named query (analyzer/queries/NAME.sql) with its defaults overridden by
    `params`; see `attrib.analyzer.queries`."""
    from attrib.analyzer.queries import named_query

    query = named_query(name)
    runs = [runs] if isinstance(runs, Run) else resolve_runs(runs)
    if len(runs) != 1:
        raise ValueError(f"named query {name!r} reads one run; pass a single run directory")
    return sql(runs, query.text, query.bind(params))


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

    Views: every recorded table, every stored analysis table (a name in both, such as
    `tokens`, unions the two), and the neuron views `neuron_shifts` and `neurons`. With several
    runs each view gains a leading `run` column (the run directory's name). External access is
    off: queries read only files inside the runs and write none.
    """
    from attrib.analyzer.queries import NEURON_ROWS_MACRO, neuron_view_sql
    from attrib.analyzer.results import result_files

    con = duckdb.connect()
    # the views read the runs' own files; the user's SQL may read nothing else and write
    # nowhere (no read_csv('/etc/...'), COPY ... TO, INSTALL), and can't switch that back on
    folders = ", ".join(_quote(str(run.dir.resolve())) for run in runs)
    con.execute(f"SET allowed_directories = [{folders}]")
    con.execute("SET enable_external_access = false")
    names = _run_names(runs)
    labels = names if len(runs) > 1 else [None] * len(runs)
    selects: dict[str, list[str]] = {}
    for label, run in zip(labels, runs):
        sources = {t: run.table_files(t) for t in fmt.TABLES}
        for table, files in result_files(run).items():
            sources[table] = sources.get(table, []) + files
        for table, files in sources.items():
            if files:
                selects.setdefault(table, []).append(_select(files, label))
    for table, schema in fmt.TABLES.items():
        if table not in selects:  # an empty view with the declared columns
            empty = schema.empty_table()
            if len(runs) > 1:
                empty = empty.add_column(0, "run", pa.array([], pa.string()))
            con.register(f"__empty_{table}", empty)
            selects[table] = [f"SELECT * FROM __empty_{table}"]
    for table, parts in selects.items():
        try:
            con.execute(f"CREATE VIEW {table} AS " + " UNION ALL BY NAME ".join(parts))
        except duckdb.Error as e:  # DuckDB reads each part's footer here
            raise fmt.FormatError(f"the {table} table can't be read ({e}); the run is "
                                  "damaged, `attrib verify` lists what else is") from e
    for view, body in neuron_view_sql(len(runs) > 1).items():
        con.execute(f"CREATE VIEW {view} AS {body}")
    con.execute(NEURON_ROWS_MACRO)
    return con


def sql(runs: str | Path | Run | list, query: str, params: dict[str, Any] | None = None
        ) -> pa.Table:
    """Answer a DuckDB SQL query over the runs' tables; returns an Arrow table. `params`
    binds the query's named parameters ($name)."""
    if isinstance(runs, Run):
        runs = [runs]
    elif not (isinstance(runs, list) and all(isinstance(r, Run) for r in runs)):
        runs = resolve_runs(runs)
    con = connect(runs)
    try:
        return con.sql(query, params=params or None).to_arrow_table()
    finally:
        con.close()
