"""`attrib` console script (click). Each command calls one Python API function."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import pyarrow.parquet as pq

from attrib.cli import render
from attrib.schemas.format import FormatError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attrib")
def main() -> None:
    """Record PyTorch training trajectories and attribute model behaviour to training data."""


def _fail(message: str) -> None:
    raise click.ClickException(message)


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(run: str, as_json: bool) -> None:
    """Summarise a recorded RUN: steps, examples, stages, params, optimizer, sizes, status."""
    from attrib.analyzer.run import open_run

    try:
        summary = open_run(run).info()
    except FormatError as e:
        _fail(str(e))
    click.echo(json.dumps(summary, indent=1, default=str) if as_json else render.summary(summary))


@main.command(name="sql")
@click.argument("runs", nargs=-1, required=True)
@click.argument("query")
@click.option("--format", "out_format", type=click.Choice(["table", "csv", "json", "parquet"]),
              default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write to this file instead of standard output (required for parquet).")
@click.option("--max-rows", default=50, show_default=True, help="Rows shown by --format table.")
def sql_command(runs: tuple[str, ...], query: str, out_format: str, output: str | None,
                max_rows: int) -> None:
    """Answer a DuckDB SQL QUERY over the tables of one or more RUNS (paths or globs).

    Views: steps, examples, stages, params, checkpoints; with several runs each gains a `run`
    column. Example: attrib sql runs/exp1 "SELECT stage, count(*) FROM steps GROUP BY 1"
    """
    import duckdb

    from attrib.analyzer.sql import sql

    try:
        table = sql(list(runs), query)
    except (FileNotFoundError, FormatError) as e:
        _fail(str(e))
    except duckdb.Error as e:
        _fail(f"SQL error: {e}")
    if out_format == "parquet":
        if not output:
            _fail("--format parquet needs --output FILE")
        pq.write_table(table, output)
        return
    text = {
        "table": lambda: render.aligned(table, max_rows) + "\n",
        "json": lambda: json.dumps(table.to_pylist(), default=str) + "\n",
        "csv": lambda: render.csv_text(table),
    }[out_format]()
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)


@main.command()
@click.option("--out", default="attrib-demo", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the recorded run.")
@click.option("--quick", is_flag=True, help="A smaller run (for tests), seconds long.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out: str, quick: bool, quiet: bool) -> None:
    """Record a real small training run, then summarise and query it."""
    from attrib.demo import run_demo

    run_demo(Path(out), quick=quick, progress=not quiet, echo=click.echo)


if __name__ == "__main__":
    main()
