"""DuckDB SQL over one or many recorded runs: every table of every run is a view."""

from __future__ import annotations

import functools
import glob
import re
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from attrib.analyzer.results import RESULT_TABLES, result_files
from attrib.analyzer.run import SNAPSHOT_TRIES, Run
from attrib.schemas import format as fmt


def named(runs: str | Path | Run | list, name: str, **params: Any) -> pa.Table:
    """Run a named query (analyzer/queries/NAME.sql) with its defaults overridden by
    `params`; see `attrib.analyzer.queries`."""
    from attrib.analyzer.queries import named_query

    query = named_query(name)
    runs = _runs(runs)
    if len(runs) != 1:
        raise ValueError(f"named query {name!r} reads one run; pass a single run directory")
    answer = sql(runs, query.text, query.bind(params))
    if not answer.num_rows and not sql(runs, "SELECT count(*) FROM shifts").column(0)[0].as_py():
        raise ValueError(f"named query {name!r} ranks outlier shifts, and {runs[0].dir} "
                         "recorded none (its shifts table is empty): record with "
                         "capture=TopK(k) (or a policy that includes it) to get them")
    return answer


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
    runs each view gains a leading `run` column (the run directory's name). The sandbox: the
    only paths DuckDB may touch are the Parquet files the views list (no directory, so nothing
    can be created beside them; no temp folder, so nothing spills to disk), and the
    configuration is locked once the views exist; `sql` admits read-only statements only.
    """
    from attrib.analyzer.queries import NEURON_ROWS_MACRO, neuron_view_sql

    names = _run_names(runs)
    labels = names if len(runs) > 1 else [None] * len(runs)
    selects: dict[str, list[str]] = {}
    readable: list[Path] = []
    for label, run in zip(labels, runs):
        sources = {t: run.table_files(t) for t in fmt.TABLES}
        for table, files in result_files(run).items():
            sources[table] = sources.get(table, []) + files
        for table, files in sources.items():
            if files:
                selects.setdefault(table, []).append(_select(files, label))
                readable += files
    con = duckdb.connect()
    con.execute("SET temp_directory = ''")  # DuckDB's default, <cwd>/.tmp, is writable
    con.execute("SET allowed_directories = []")
    con.execute(f"SET allowed_paths = [{', '.join(_quote(str(f)) for f in readable)}]")
    con.execute("SET enable_external_access = false")
    for table, schema in fmt.TABLES.items():
        if table not in selects:  # an empty view with the declared columns
            empty = schema.empty_table()
            if len(runs) > 1:
                empty = empty.add_column(0, "run", pa.array([], pa.string()))
            con.register(f"__empty_{table}", empty)
            selects[table] = [f"SELECT * FROM __empty_{table}"]
    for table, parts in selects.items():
        body = " UNION ALL BY NAME ".join(parts)
        if table == "influence":
            body = f"SELECT *, {_orientation_sql()} AS orientation FROM ({body})"
        try:
            con.execute(f"CREATE VIEW {table} AS {body}")
        except duckdb.Error as e:  # DuckDB reads each part's footer here
            if any(run.moved_on(e) for run in runs):  # a later commit removed a part
                raise fmt.RunChanged(f"the {table} table changed while it was opened (the "
                                     "run is being recorded); open it again") from e
            raise fmt.FormatError(f"the {table} table can't be read ({e}); the run is "
                                  "damaged, `attrib verify` lists what else is") from e
    for view, body in neuron_view_sql(len(runs) > 1).items():
        con.execute(f"CREATE VIEW {view} AS {body}")
    con.execute(NEURON_ROWS_MACRO)
    con.execute("SET lock_configuration = true")  # no SET, enable_logging(...) or PRAGMA
    return con


def _orientation_sql() -> str:
    """CASE over `method`: 'contribution' where a value is the change of f that training on
    the example caused or is predicted to cause, 'gradient score' where it is ∇f·∇ℓ_i
    (positive: training on the example lowers f), from attrib.evaluate's table."""
    from attrib.analyzer.evaluate import ORIENTATION

    names = {sign: ", ".join(_quote(m) for m, s in ORIENTATION.items() if s == sign)
             for sign in (1, -1)}
    return (f"CASE WHEN method IN ({names[1]}) THEN 'contribution' "
            f"WHEN method IN ({names[-1]}) THEN 'gradient score' END")


READ_ONLY = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})


def check_read_only(query: str) -> None:
    """Refuse anything but one read-only statement (SELECT, WITH, FROM, VALUES, EXPLAIN,
    DESCRIBE, SUMMARIZE, SHOW), before it runs: COPY, ATTACH, CALL, PRAGMA, SET, INSTALL,
    CREATE and the rest could write beside the runs or change the sandbox."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise ValueError(f"SQL error: {e}") from e
    if len(statements) != 1:
        raise ValueError(f"attrib sql runs one statement at a time; this query has "
                         f"{len(statements)}: split it")
    kind = statements[0].type
    if kind not in READ_ONLY:
        raise ValueError(f"attrib sql answers read-only queries (SELECT, WITH, FROM, EXPLAIN, "
                         f"DESCRIBE, SUMMARIZE, SHOW); this is a {kind.name} statement, which "
                         "is refused: the runs are never written through SQL. Read the result "
                         "with --format csv/json/parquet --output FILE instead of COPY")


RESULT_VIEWS = frozenset(RESULT_TABLES) - set(fmt.TABLES)  # views only analyses provide


class NoAnalysis(ValueError):
    """A query reads an analysis view (influence, completeness, ...) no stored analysis of
    the runs provides."""


class QueryInterrupted(ValueError):
    """A query stopped by its timeout or by Ctrl-C."""


def sql(runs: str | Path | Run | list, query: str, params: dict[str, Any] | None = None,
        timeout: float | None = None) -> pa.Table:
    """Answer a DuckDB SQL query over the runs' tables; returns an Arrow table. `params`
    binds the query's named parameters ($name); `timeout` (seconds) stops a query that runs
    longer with QueryInterrupted, as Ctrl-C does."""
    def answer(con: duckdb.DuckDBPyConnection) -> pa.Table:
        return con.sql(query, params=params or None).to_arrow_table()

    return _on_a_snapshot(runs, query, timeout, answer)


def sql_head(runs: str | Path | Run | list, query: str, rows: int,
             params: dict[str, Any] | None = None, timeout: float | None = None
             ) -> tuple[pa.Table, int]:
    """The first `rows` rows of a query's answer and how many rows it has, read in batches:
    showing 50 rows of 10^8 never holds the whole answer in memory."""
    def head(con: duckdb.DuckDBPyConnection) -> tuple[pa.Table, int]:
        reader = con.sql(query, params=params or None).to_arrow_reader(PREVIEW_BATCH)
        kept, total = [], 0
        for batch in reader:
            if total < rows:
                kept.append(batch.slice(0, rows - total))
            total += batch.num_rows
        return pa.Table.from_batches(kept, schema=reader.schema), total
    return _on_a_snapshot(runs, query, timeout, head)


def _on_a_snapshot(runs: str | Path | Run | list, query: str, timeout: float | None,
                   answer: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
    """answer(con) over the runs as of one commit each. A run being recorded may remove a
    part its manifest listed when a later commit compacts or rewrites tables; the query then
    starts over on runs opened again (a few times), instead of failing on a file that was
    there when the views were made."""
    for attempt in range(SNAPSHOT_TRIES):
        opened: list[Run] = []
        try:
            opened = _runs(runs)  # opening reads the parts' footers: a commit may remove one
            con = _open(opened, query)
            return _interruptible(con, timeout, functools.partial(answer, con))
        except duckdb.CatalogException as e:
            missing = re.search(r"Table with name (\w+) does not exist", str(e))
            if missing and missing.group(1).lower() in RESULT_VIEWS:
                raise NoAnalysis(
                    f"no stored analysis of {', '.join(str(r.dir) for r in opened)} has a "
                    f"{missing.group(1)!r} table yet: store one first (attrib analyze RUN "
                    "--method ..., attrib stages RUN ..., or attrib.analyze.save)") from e
            raise
        except (duckdb.Error, fmt.RunChanged) as e:
            moved = isinstance(e, fmt.RunChanged) or any(run.moved_on(e) for run in opened)
            if attempt == SNAPSHOT_TRIES - 1 or not moved:
                raise
            named = runs if isinstance(runs, list) else [runs]
            runs = [r.dir if isinstance(r, Run) else r for r in named]  # opened again
    raise AssertionError("unreachable")


def _interruptible(con: duckdb.DuckDBPyConnection, timeout: float | None, run):
    """Run `run()` on `con`, interrupting DuckDB itself at the timeout or on Ctrl-C (a long
    recursive query would otherwise not see Ctrl-C until it ends); closes `con`."""
    timer = threading.Timer(timeout, con.interrupt) if timeout is not None else None
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    interrupted: list[bool] = []

    def on_ctrl_c(signum, frame) -> None:
        interrupted.append(True)
        con.interrupt()

    try:
        if main:
            signal.signal(signal.SIGINT, on_ctrl_c)
        if timer is not None:
            timer.start()
        return run()
    except duckdb.InterruptException:
        raise QueryInterrupted("the query was interrupted (Ctrl-C)" if interrupted else
                               f"the query ran longer than its timeout of {timeout:g} s and "
                               "was stopped; narrow it or raise --timeout") from None
    finally:
        if timer is not None:
            timer.cancel()
        if main:
            signal.signal(signal.SIGINT, previous)
        con.close()


PREVIEW_BATCH = 1 << 16  # rows per batch sql_head reads


def _runs(runs: str | Path | Run | list) -> list[Run]:
    if isinstance(runs, Run):
        return [runs]
    if isinstance(runs, list) and all(isinstance(r, Run) for r in runs):
        return runs
    return resolve_runs(runs)


def _open(runs: list[Run], query: str) -> duckdb.DuckDBPyConnection:
    """A sandboxed connection over the runs, once the query is known to be read-only."""
    check_read_only(query)
    return connect(runs)
