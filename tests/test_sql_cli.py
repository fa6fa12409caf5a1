"""`attrib sql` / `attrib.sql` over one or many runs, and `attrib info`."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import OPTIMIZERS, data, mlp, train

import attrib
from attrib.analyzer.sql import NoAnalysis
from attrib.cli.main import main


@pytest.fixture
def two_runs(tmp_path):
    for name, steps, opt in (("exp1", 12, "sgd_nesterov"), ("exp2", 9, "adamw")):
        model = mlp()
        train(tmp_path / "runs" / name, model, OPTIMIZERS[opt](model.parameters()), steps=steps)
    return tmp_path / "runs"


def test_sql_over_two_runs_adds_run_column(two_runs):
    table = attrib.sql(str(two_runs / "*"), "SELECT run, count(*) AS n FROM steps GROUP BY run "
                                            "ORDER BY run")
    assert table.to_pylist() == [{"run": "exp1", "n": 12}, {"run": "exp2", "n": 9}]
    joined = attrib.sql([two_runs / "exp1", two_runs / "exp2"],
                        "SELECT p.run, count(*) FROM params p JOIN steps s USING (run) "
                        "GROUP BY 1 ORDER BY 1")
    assert joined.column(1).to_pylist() == [12 * 4, 9 * 4]


def test_sql_single_run_has_no_run_column(two_runs):
    table = attrib.sql(two_runs / "exp1", "SELECT * FROM steps LIMIT 1")
    assert "run" not in table.column_names and "loss" in table.column_names


def test_cli_sql_table_and_formats(two_runs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["sql", str(two_runs / "exp1"),
                                  "SELECT stage, count(*) AS n FROM steps GROUP BY 1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split() == ["stage", "n"]
    assert "default" in result.output and "12" in result.output
    result = runner.invoke(main, ["sql", str(two_runs / "*"), "SELECT run, max(step) AS m "
                                  "FROM steps GROUP BY 1 ORDER BY 1", "--format", "json"])
    assert json.loads(result.output) == [{"run": "exp1", "m": 11}, {"run": "exp2", "m": 8}]
    result = runner.invoke(main, ["sql", str(two_runs / "exp2"), "SELECT step FROM steps",
                                  "--format", "csv"])
    assert result.output.split() == ['"step"', *map(str, range(9))]
    out = tmp_path / "steps.parquet"
    result = runner.invoke(main, ["sql", str(two_runs / "exp2"), "SELECT * FROM examples",
                                  "--format", "parquet", "-o", str(out)])
    assert result.exit_code == 0 and pq.read_table(out).num_rows == 9 * 32


def test_cli_sql_errors_are_clear(two_runs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["sql", str(tmp_path / "nothing*"), "SELECT 1"])
    assert result.exit_code != 0 and "names no attrib run" in result.output
    result = runner.invoke(main, ["sql", str(two_runs / "exp1"), "SELECT nope FROM steps"])
    assert result.exit_code != 0 and "SQL error" in result.output


def test_cli_info(two_runs):
    result = CliRunner().invoke(main, ["info", str(two_runs / "exp2")])
    assert result.exit_code == 0, result.output
    for expected in ("status       complete", "steps        9 committed", "AdamW (adamw)",
                     "4 tensors, 227 scalars", "compression", "checkpoints  2",
                     "trajectory   every tensor's gradient per step"):
        assert expected in result.output
    info = json.loads(CliRunner().invoke(main, ["info", "--json", str(two_runs / "exp2")]).output)
    # 9 steps × 227 float32 gradients + checkpoints θ_0, θ_9 with AdamW's exp_avg and
    # exp_avg_sq (and a bool per tensor: state present) + per step: 7 float64 hparams, float64
    # clip factor, int64 step count and bool active per tensor, 2 float64 fingerprints per
    # tensor + the default Factored capture of a small model: per example and step the two
    # weights' factors (16 + 10, 3 + 16 float32) and the biases in full (16, 3), and a float64
    # residual norm per tensor
    assert info["dense_bytes_raw"] == (9 * 227 * 4 + 2 * (227 * 4 * 3 + 4)
                                       + 9 * (7 * 8 + 8 + 4 * 9 + 2 * 4 * 8)
                                       + 9 * 32 * (16 + 10 + 3 + 16 + 16 + 3) * 4 + 9 * 4 * 8)
    assert "bytes per parameter per step" in result.output
    assert info["dense_bytes_stored"] > 0 and info["dense_metadata_bytes"] > 0


def test_sql_reads_only_the_runs_files_and_writes_nothing(tmp_path, monkeypatch):
    """The sandbox against the attacks that once worked: writes into the run (COPY over the
    manifest or a steps part, ATTACH, logging to files), reads outside it, several
    statements, a temp folder in the working directory. Each is refused before or while it
    runs, and the run's files are byte for byte as before."""
    import duckdb

    model = mlp()
    run = tmp_path / "run"
    train(run, model, OPTIMIZERS["sgd"](model.parameters()), steps=3)
    (tmp_path / "secret.csv").write_text("a\n1\n")
    monkeypatch.chdir(tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    part = next(p for p in before if p.parent.name == "steps" and p.suffix == ".parquet")
    assert attrib.sql(run, "SELECT count(*) AS n FROM steps")["n"][0].as_py() == 3
    assert attrib.sql(run, "SELECT current_setting('temp_directory') AS t")["t"][0].as_py() == ""
    refused = {  # statement kinds refused before anything runs
        f"COPY (SELECT 'x') TO '{run / 'manifest.json'}' (FORMAT csv)": "COPY",
        f"COPY (SELECT * FROM steps) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)": "COPY",
        f"ATTACH '{run / 'x.db'}'": "ATTACH",
        f"CALL enable_logging(storage='file', storage_path='{run / 'logs'}')": "CALL",
        "SET enable_external_access = true": "SET",
        "PRAGMA version": "PRAGMA",
        "INSTALL httpfs": "LOAD",
        "CREATE TABLE t AS SELECT 1": "CREATE",
    }
    for query, kind in refused.items():
        with pytest.raises(ValueError, match=f"this is a {kind} statement, which is refused"):
            attrib.sql(run, query)
    with pytest.raises(ValueError, match="one statement at a time; this query has 2"):
        attrib.sql(run, "SELECT 1; DROP VIEW steps")
    for query in (f"SELECT * FROM read_csv('{tmp_path / 'secret.csv'}')",  # outside the run
                  f"SELECT * FROM glob('{run}/*')",
                  f"SELECT * FROM enable_logging(storage='file', storage_path='{run / 'logs'}')"):
        with pytest.raises((duckdb.PermissionException, duckdb.InvalidInputException)):
            attrib.sql(run, query)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before and not any(p.is_dir() for p in run.rglob("logs"))
    assert not (tmp_path / ".tmp").exists() and not (tmp_path / "x.db").exists()


def test_names_from_a_run_cannot_drive_the_terminal(tmp_path):
    """A stage named with an OSC title sequence and a clear-screen escape: `attrib info` and
    `attrib sql` print the escapes visibly, never the raw control characters; JSON and files
    keep the value as it is."""
    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    x, y = data()
    evil = "\x1b]0;pwned\x07stage\x1b[2J\u202e"
    with attrib.Recorder(tmp_path / "run", model, opt) as rec:
        rec.stage(evil)
        rec.examples(torch.arange(8))
        torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.step()
    runner = CliRunner()
    for args in (["info", str(tmp_path / "run")],
                 ["sql", str(tmp_path / "run"), "SELECT stage FROM steps"],
                 ["sql", str(tmp_path / "run"), "SELECT stage FROM steps", "--format", "csv"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        assert not any(c in result.output for c in "\x1b\x07\u202e"), (args, result.output)
        assert "\\x1b]0;pwned\\x07stage\\x1b[2J\\u202e" in result.output, (args, result.output)
    out = tmp_path / "stages.csv"
    runner.invoke(main, ["sql", str(tmp_path / "run"), "SELECT stage FROM steps", "--format",
                         "csv", "-o", str(out)])
    assert evil in out.read_text()


def test_sql_table_output_reads_only_the_rows_it_shows(tmp_path):
    """10^8 result rows shown as a 50-row table: the rows beyond those shown are counted
    batch by batch, never gathered into one Arrow table (1.6 GB). The process's peak memory
    is printed, not asserted: DuckDB's own buffering of the answer varies with load (337 MiB
    alone, 2,456 MiB once inside the full suite)."""
    import subprocess
    import sys
    import textwrap

    model = mlp()
    train(tmp_path / "run", model, OPTIMIZERS["sgd"](model.parameters()), steps=2)
    script = textwrap.dedent(f"""
        import resource
        from click.testing import CliRunner
        from attrib.cli.main import main
        result = CliRunner().invoke(main, ["sql", {str(tmp_path / "run")!r},
            "SELECT range AS i, range * 2.0 AS x FROM range(100000000)"])
        assert result.exit_code == 0, result.output
        print(result.output.splitlines()[-2:])
        print("PEAK_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "... 99999950 more rows" in out.stdout and "(100000000 rows)" in out.stdout
    print(out.stdout.splitlines()[-1])  # the peak, for the record


def test_a_query_past_its_timeout_is_stopped_with_one_line(tmp_path):
    """A recursive CTE of 10^8 steps with --timeout 0.5: DuckDB itself is interrupted, the CLI
    says so in one line (no traceback), and attrib.sql raises QueryInterrupted."""
    from attrib.analyzer.sql import QueryInterrupted

    model = mlp()
    train(tmp_path / "run", model, OPTIMIZERS["sgd"](model.parameters()), steps=2)
    slow = ("WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE "
            "i < 100000000) SELECT count(*) FROM r")
    result = CliRunner().invoke(main, ["sql", str(tmp_path / "run"), slow, "--timeout", "0.5"])
    assert result.exit_code != 0
    assert "ran longer than its timeout of 0.5 s" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(QueryInterrupted, match=r"timeout of 0\.5 s"):
        attrib.sql(tmp_path / "run", slow, timeout=0.5)
    assert attrib.sql(tmp_path / "run", "SELECT 1 AS one", timeout=30)["one"][0].as_py() == 1


def test_missing_analyses_and_shifts_get_a_hint_not_an_empty_answer(two_runs):
    """A run without stored analyses answered 'Table with name influence does not exist! Did
    you mean "pg_indexes"?', and the shift queries answered 0 rows on a run without TopK."""
    runner = CliRunner()
    result = runner.invoke(main, ["sql", str(two_runs / "exp1"), "SELECT * FROM influence"])
    assert result.exit_code != 0 and "pg_indexes" not in result.output
    assert "has a 'influence' table yet: store one first (attrib analyze RUN" in result.output
    with pytest.raises(NoAnalysis, match="'completeness' table"):
        attrib.sql(two_runs / "exp1", "SELECT * FROM completeness")
    result = runner.invoke(main, ["sql", str(two_runs / "exp1"), "--query", "top_neurons"])
    assert result.exit_code != 0
    assert "recorded none (its shifts table is empty): record with capture=TopK(k)" in \
        result.output
    assert attrib.sql(two_runs / "exp1", "SELECT count(*) FROM shifts").column(0)[0].as_py() == 0


def test_the_influence_view_names_each_rows_orientation(two_runs):
    """Path-kernel values are contributions (the change of f training on the example caused),
    TracIn values gradient scores (∇f·∇ℓ, the opposite sign): the view says which, and
    oriented alike the two methods agree on the same run."""
    run = attrib.open_run(two_runs / "exp1")
    x, y = data()
    test_set = (x[200:204] + 0.1, y[200:204])
    kernel = attrib.analyze.path_kernel(run, mlp, test_set, progress=False)
    attrib.analyze.save(run, "pk", {"influence": kernel.table}, {"method": "path-kernel"})
    scores = attrib.analyze.tracin(run, mlp, (x, y), test_set, checkpoints="all",
                                   progress=False)
    attrib.analyze.save(run, "tr", {"influence": scores}, {"method": "tracin"})
    rows = attrib.sql(run, "SELECT DISTINCT analysis, method, orientation FROM influence "
                           "ORDER BY 1").to_pylist()
    assert rows == [{"analysis": "pk", "method": "path-kernel", "orientation": "contribution"},
                    {"analysis": "tr", "method": "tracin", "orientation": "gradient score"}]
    agreement = attrib.sql(run, """
        WITH oriented AS (
            SELECT analysis, test_id, example_id,
                   sum(value * CASE orientation WHEN 'contribution' THEN 1 ELSE -1 END) AS v
            FROM influence WHERE term IS NULL OR term = 'data' GROUP BY ALL)
        SELECT corr(a.v, b.v) AS r, corr(a.v, -b.v) AS flipped FROM oriented a JOIN oriented b
        USING (test_id, example_id) WHERE a.analysis = 'pk' AND b.analysis = 'tr'
    """).to_pylist()[0]
    assert agreement["r"] > 0.5 and agreement["flipped"] < -0.5
