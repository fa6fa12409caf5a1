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
    from attrib.analyzer.run import read_snapshot

    try:
        summary = read_snapshot(run, lambda opened: opened.info())
    except FormatError as e:
        _fail(str(e))
    click.echo(json.dumps(summary, indent=1, default=str) if as_json
               else render.printable(render.summary(summary)))


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def verify(run: str, as_json: bool) -> None:
    """Check RUN's integrity end to end (metadata, tables, arrays, checkpoints against the
    deltas, finiteness) and say what was checked; exit status 1 when a check fails."""
    from attrib.analyzer.verify import verify as check_run

    table = check_run(run)
    click.echo(json.dumps(table.to_pylist()) if as_json else render.aligned(table))
    if not all(table.column("ok").to_pylist()):
        sys.exit(1)


@main.command(name="sql")
@click.argument("args", nargs=-1)
@click.option("--query", "query_name", help="Run a named query (see --list) instead of SQL.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="A named query's parameter, e.g. --param neuron=mlp.fc1:17 (repeatable).")
@click.option("--list", "list_queries", is_flag=True, help="List the named queries and exit.")
@click.option("--format", "out_format", type=click.Choice(["table", "csv", "json", "parquet"]),
              default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write to this file instead of standard output (required for parquet).")
@click.option("--max-rows", default=50, show_default=True, help="Rows shown by --format table.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop a query that runs longer (Ctrl-C stops one too).")
def sql_command(args: tuple[str, ...], query_name: str | None, params: tuple[str, ...],
                list_queries: bool, out_format: str, output: str | None, max_rows: int,
                timeout: float | None) -> None:
    """Answer a DuckDB SQL query over the tables of one or more runs: RUNS... QUERY.

    Views: steps, examples, stages, params, checkpoints, shifts, rng, tokens, vocabulary, the
    neuron views neuron_shifts and neurons, and stored analyses (influence, completeness,
    similarity, stage_effects); with several runs each gains a `run` column. Examples:

      attrib sql runs/exp1 "SELECT stage, count(*) FROM steps GROUP BY 1"

      attrib sql runs/exp1 --query token_enrichment --param neuron=mlp.fc1:17 --param m=5
    """
    import duckdb

    from attrib.analyzer.queries import named_queries
    from attrib.analyzer.sql import named, sql, sql_head

    if list_queries:
        for query in named_queries().values():
            click.echo(f"{query.name}: {query.description}")
            for key, default in query.defaults.items():
                click.echo(f"    --param {key}={default!r}  {query.help[key]}")
        return
    runs, query = (list(args), None) if query_name else (list(args[:-1]), args[-1:] or None)
    if not runs or (not query_name and not query):
        _fail("name the run(s) and a query: attrib sql RUN... \"SELECT ...\", or "
              "attrib sql RUN --query NAME (attrib sql --list shows the named queries)")
    total = None
    try:
        if query_name:
            given = dict(_key_value(p) for p in params)
            table = named(runs, query_name, **given)
        elif out_format == "table" and not output:  # only what is shown is kept
            table, total = sql_head(runs, query[0], max_rows, timeout=timeout)
        else:
            table = sql(runs, query[0], timeout=timeout)
    except (FileNotFoundError, FormatError, ValueError) as e:
        _fail(str(e))
    except duckdb.Error as e:
        _fail(f"SQL error: {e}")
    if out_format == "parquet":
        if not output:
            _fail("--format parquet needs --output FILE")
        pq.write_table(table, output)
        return
    _emit(table, out_format, output, max_rows, total)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        _fail(f"--param {text!r}: write NAME=VALUE")
    return key, value


def _emit(table, out_format: str, output: str | None, max_rows: int,
          total: int | None = None) -> None:
    text = {
        "table": lambda: render.aligned(table, max_rows, total) + "\n",
        "json": lambda: json.dumps(table.to_pylist(), default=str) + "\n",
        "csv": lambda: render.csv_text(table),
    }[out_format]()
    if output:
        Path(output).write_text(text)  # a file gets the values as they are
    else:
        sys.stdout.write(render.printable(text))


def _projected(recorded, model_fn, test_set, target: str, scheduler: str | None):
    """Projected influence of θ_N's test gradients, in process or on a Dask scheduler."""
    from attrib.analyzer import analyze as api

    try:
        tests = api.test_gradients(recorded, model_fn, test_set, target)
    except KeyError as e:
        _fail(str(e.args[0]))
    if scheduler is None:
        return api.projected_influence(recorded, tests)
    if scheduler == "local":
        return api.projected_influence(recorded, tests, engine="dask")
    try:
        from distributed import Client
    except ImportError:
        _fail("--dask ADDRESS needs Dask's distributed package: pip install 'attrib[dask]'")
    with Client(scheduler) as client:
        return api.projected_influence(recorded, tests, engine="dask", client=client)


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--method", type=click.Choice(["path-kernel", "linear-response", "tracin",
                                            "grad-dot", "grad-cos", "trak", "influence",
                                            "projected"]),
              default="path-kernel", show_default=True)
@click.option("--model", "model_ref", required=True,
              help="PKG.MOD:FACTORY that builds the architecture (parameters come from RUN).")
@click.option("--data", "data_ref", required=True,
              help="PKG.MOD:NAME of the test set: (inputs, labels), a Dataset, or a function.")
@click.option("--train", "train_ref",
              help="PKG.MOD:NAME of the training set, indexed by example_id (all but "
                   "path-kernel).")
@click.option("--loss", "loss_ref", help="PKG.MOD:FN, the training loss fn(output, labels) of "
              "one micro-batch (linear-response; default mean cross-entropy / MSE).")
@click.option("--accumulation", type=click.Choice(["mean", "sum"]), default="mean",
              show_default=True, help="How micro-batch losses made a step's (linear-response).")
@click.option("--target", help="loss, margin or logit:K (the f whose change is attributed); "
              "default loss, margin for trak (which is defined for the margin only).")
@click.option("--by", default="example", show_default=True,
              help="Axes kept, comma-separated: example, step, stage, param, layer "
                   "(path-kernel, linear-response).")
@click.option("--quadrature", default="adaptive", show_default=True,
              help="adaptive (two Gauss-Legendre nodes, refined where a test point misses "
                   "its share of --tol), or a fixed rule: nodes per step, midpoint:K or left "
                   "(path-kernel).")
@click.option("--tol", type=float, default=1e-4, show_default=True,
              help="Adaptive quadrature: allowed |Σ terms − Δf| relative to |Δf| per test point "
                   "(plus 1e-6) (path-kernel).")
@click.option("--max-nodes", type=int,
              help="Adaptive quadrature: gradient evaluations per test point and segment "
                   "(path-kernel; default 256).")
@click.option("--stride", help="Steps per integration segment, or auto: merged while the "
              "quadrature error allows (path-kernel).")
@click.option("--similarity", is_flag=True,
              help="Also the per-layer similarity of test points (path-kernel).")
@click.option("--k", type=int, help="Project gradients to k per tensor (checkpoint methods; "
              "trak default 2048).")
@click.option("--checkpoints", help="tracin, trak: all or last:K (default: all for tracin, "
              "last:5 for trak).")
@click.option("--damping", type=float, help="λ added to the kernel (trak, default 0) or to the "
              "Gauss-Newton matrix (influence, default 1e-3).")
@click.option("--dask", "scheduler", help="projected: run on the Dask scheduler at this "
              "address (tcp://HOST:PORT), or 'local' for Dask's threads; default in process.")
@click.option("--name", help="Where to store it: RUN/analysis/NAME (default: the method).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def analyze(run: str, method: str, model_ref: str, data_ref: str, train_ref: str | None,
            loss_ref: str | None, accumulation: str, target: str, by: str, quadrature: str,
            tol: float, max_nodes: int | None, stride: str | None, similarity: bool,
            k: int | None, checkpoints: str | None, damping: float | None,
            scheduler: str | None, name: str | None, quiet: bool) -> None:
    """Attribute f on a test set to RUN's training data; store the result in RUN/analysis/.

    Afterwards every result is a SQL view: attrib sql RUN "SELECT * FROM influence ..."
    """
    from attrib.analyzer import analyze as api
    from attrib.analyzer.run import open_run
    from attrib.cli.loading import load_data, load_object
    from attrib.recorder.store import now_iso

    try:
        recorded = open_run(run)
    except FormatError as e:
        _fail(str(e))
    model_fn, test_set = load_object(model_ref), load_data(data_ref)
    target = target or ("margin" if method == "trak" else "loss")
    parameters = {"method": method, "target": target, "model": model_ref, "data": data_ref,
                  "created": now_iso()}
    if method not in ("path-kernel", "projected") and not train_ref:
        _fail(f"--method {method} needs --train PKG.MOD:TRAIN_SET (indexed by example_id)")
    if method == "linear-response":
        axes = tuple(a for a in by.split(",") if a)
        result = _stage_errors(lambda: api.linear_response(
            recorded, model_fn, load_data(train_ref), test_set, target=target, by=axes,
            loss_fn=load_object(loss_ref) if loss_ref else None, accumulation=accumulation,
            progress=not quiet))
        if result.influence is None:
            _fail("linear-response per-example influences need stored per-example "
                  "contributions: record with capture=Full() or Project(k)")
        tables = {"influence": result.influence, "stage_effects": result.stages}
        parameters.update(by=list(axes), train=train_ref, loss=loss_ref,
                          accumulation=accumulation)
    elif method == "path-kernel":
        from attrib.analyzer.path_kernel import MAX_NODES

        axes, max_nodes = tuple(a for a in by.split(",") if a), max_nodes or MAX_NODES
        segment = (int(stride) if stride.isdigit() else stride) if stride else 1
        result = api.path_kernel(recorded, model_fn, test_set, target=target, by=axes,
                                 quadrature=int(quadrature) if quadrature.isdigit() else quadrature,
                                 tol=(tol, 1e-6), max_nodes=max_nodes,
                                 stride=segment,
                                 similarity=similarity, progress=not quiet)
        tables = {"influence": result.table, "completeness": result.completeness()}
        if similarity:
            tables["similarity"] = result.similarity
        parameters.update(by=list(axes), quadrature=quadrature, tol=tol, max_nodes=max_nodes,
                          stride=segment, similarity=similarity)
    elif method == "projected":
        tables = {"influence": _projected(recorded, model_fn, test_set, target, scheduler)}
        parameters.update(engine="dask" if scheduler else "torch", scheduler=scheduler)
    elif method == "trak":
        options = {"checkpoints": checkpoints or "last:5", "damping": damping or 0.0}
        if k is not None:
            options["k"] = k
        try:
            tables = {"influence": api.trak(recorded, model_fn, load_data(train_ref), test_set,
                                            target=target, progress=not quiet, **options)}
        except ValueError as e:
            _fail(str(e))
        parameters.update(train=train_ref, **options)
    elif method == "influence":
        damping = 1e-3 if damping is None else damping
        result = api.influence(recorded, model_fn, load_data(train_ref), test_set,
                               target=target, damping=damping, progress=not quiet)
        tables = {"influence": result.scores}
        parameters.update(train=train_ref, damping=damping,
                          cg_iterations=len(result.residuals),
                          cg_residual=result.residuals[-1] if result.residuals else None)
    else:
        if method != "tracin" and checkpoints:
            _fail(f"--checkpoints is for tracin and trak; {method} uses the final checkpoint")
        options = {"k": k, "checkpoints": checkpoints or "all"} if method == "tracin" else \
            {"k": k}
        function = {"tracin": api.tracin, "grad-dot": api.grad_dot, "grad-cos": api.grad_cos}
        tables = {"influence": function[method](recorded, model_fn, load_data(train_ref),
                                                test_set, target=target, progress=not quiet,
                                                **options)}
        parameters.update(train=train_ref, k=k, checkpoints=options.get("checkpoints", "last:1"),
                          gradients="exact" if k is None else f"projected, k={k}")
    folder = api.save(recorded, name or method, tables, parameters)
    click.echo(f"{method}: {tables['influence'].num_rows:,} influence rows -> {folder}")
    if "completeness" in tables:
        click.echo("\ncompleteness (sum of terms vs f(θ_N) − f(θ_0)):")
        click.echo(render.aligned(tables["completeness"], max_rows=20))
    click.echo(f'\nquery it: attrib sql {run} "SELECT * FROM influence WHERE analysis = '
               f"'{name or method}' LIMIT 10\"")


def _stage_errors(work):
    """Run a stage analysis, turning its refusals (what the run or inputs lack) into CLI
    errors that keep their message."""
    from attrib.analyzer.training import ReplayError

    try:
        return work()
    except (ReplayError, NotImplementedError, FormatError) as e:
        _fail(str(e))


@main.command(name="stages")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--model", "model_ref", required=True,
              help="PKG.MOD:FACTORY that builds the architecture (parameters come from RUN).")
@click.option("--data", "data_ref", required=True,
              help="PKG.MOD:NAME of the test set: (inputs, labels), a Dataset, or a function.")
@click.option("--train", "train_ref", required=True,
              help="PKG.MOD:NAME of the training set, indexed by example_id.")
@click.option("--method", "methods", multiple=True,
              type=click.Choice(["linear-response", "frozen", "replay", "path", "hybrid"]),
              help="Estimator(s), repeatable [default: linear-response].")
@click.option("--window", default="auto", show_default=True, metavar="STEPS|auto",
              help="hybrid: steps replayed after each stage before the adjoint takes over "
                   "('auto': doubled until the estimate settles).")
@click.option("--replay", is_flag=True, help="Also replay training (the ground truth) and "
              "report each method's agreement with it.")
@click.option("--stage", "stage_specs", multiple=True, metavar="NAME=FIRST:LAST",
              help="A stage as a step range, last step included; repeatable "
                   "[default: the recorded rec.stage() names].")
@click.option("--target", default="loss", show_default=True,
              help="loss, margin or logit:K (the f whose change is attributed).")
@click.option("--loss", "loss_ref", help="PKG.MOD:FN, the training loss fn(output, labels) of "
              "one micro-batch (default mean cross-entropy / MSE).")
@click.option("--accumulation", type=click.Choice(["mean", "sum"]), default="mean",
              show_default=True, help="How micro-batch losses made a step's loss.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a bar chart PNG here.")
@click.option("--name", default="stages", show_default=True,
              help="Store the effects as RUN/analysis/NAME (SQL view stage_effects).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def stages_command(run: str, model_ref: str, data_ref: str, train_ref: str,
                   methods: tuple[str, ...], replay: bool, stage_specs: tuple[str, ...],
                   target: str, loss_ref: str | None, accumulation: str, plot: str | None,
                   name: str, quiet: bool, window: str) -> None:
    """What if a training stage had not run? Δf = f(θ_N without the stage) − f(θ_N) per stage
    and test point, by linear response (default), frozen gradients, replay, the hybrid (a
    replay window, then linear response) or along the path."""
    from attrib.analyzer import analyze as api
    from attrib.analyzer.plots import stage_effects_chart
    from attrib.analyzer.run import open_run
    from attrib.cli.loading import load_data, load_object
    from attrib.recorder.store import now_iso

    try:
        recorded = open_run(run)
    except FormatError as e:
        _fail(str(e))
    chosen = list(dict.fromkeys(methods or ("linear-response",)))
    if replay and "replay" not in chosen:
        chosen.append("replay")
    if window != "auto" and not window.isdigit():
        _fail(f"--window {window!r}: a number of steps, or auto")
    try:
        ranges = dict(_stage_range(spec) for spec in stage_specs) or None
        report = _stage_errors(lambda: api.stage_report(
            recorded, load_object(model_ref), load_data(train_ref), load_data(data_ref),
            target=target, stages=ranges, method=chosen,
            loss_fn=load_object(loss_ref) if loss_ref else None, accumulation=accumulation,
            progress=not quiet, window=int(window) if window.isdigit() else window))
    except ValueError as e:
        _fail(str(e))
    folder = api.save(recorded, name, {"stage_effects": report.table},
                      {"method": "stages", "methods": chosen, "target": target,
                       **({"window": window} if "hybrid" in chosen else {}),
                       "model": model_ref, "data": data_ref, "train": train_ref,
                       "notes": report.notes, "created": now_iso()})
    agreement = api.agreement(report.table) if "replay" in chosen and len(chosen) > 1 else None
    click.echo(render.stage_summary(report.table, agreement))
    if "replay_drift" in report.notes:
        stood_in = report.notes.get("baseline") == "recorded"
        click.echo(f"\nreplay retraces the recording to {report.notes['replay_drift']:.1e} "
                   "(‖θ_N replayed − θ_N recorded‖ / ‖θ_N − θ_start‖)"
                   + ("; bit for bit over its first steps, so the recording stood in for the "
                      "rest of the baseline" if stood_in else ""))
    if plot:
        click.echo(f"chart: {stage_effects_chart(report.table, plot)}")
    click.echo(f"stored in {folder}; query it: attrib sql {run} "
               f'"SELECT stage, method, avg(effect) FROM stage_effects GROUP BY ALL"')


def _stage_range(spec: str) -> tuple[str, range]:
    name, _, steps = spec.partition("=")
    first, _, last = steps.partition(":")
    if not name or not first.isdigit() or not last.isdigit():
        raise ValueError(f"--stage {spec!r}: write NAME=FIRST:LAST, e.g. warmup=0:99")
    return name, range(int(first), int(last) + 1)


def _enrichment_options(command):
    """The univariate token selection knobs (METHODS.md §5), shared by shifts and ablate."""
    for option in reversed([
        click.option("--m", "min_count", default=20, show_default=True,
                     help="Token enrichment: minimum attributed count."),
        click.option("--r", "by_frequency", default=200, show_default=True,
                     help="Token enrichment: tokens kept by relative frequency."),
        click.option("--c", "by_count", default=5, show_default=True,
                     help="Token enrichment: tokens returned, by attributed count."),
    ]):
        command = option(command)
    return command


@main.command(name="shifts")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--param", "param_glob", default="*", show_default=True,
              help="GLOB over weight tensor names, e.g. '*mlp*'.")
@click.option("--kind", type=click.Choice(["output", "input"]), default="output",
              show_default=True, help="Rank output neurons (weight rows) or input features.")
@click.option("--neuron", "neuron_spec", metavar="MODULE:IDX",
              help="Show one neuron (MODULE:in:IDX for an input feature): its examples and "
                   "enriched tokens.")
@click.option("--top", default=20, show_default=True, help="Rows to show.")
@_enrichment_options
@click.option("--tokens", "tokens_ref", help="PKG.MOD:NAME of the token ids per example_id, "
              "when the run did not record them (stored as the run's tokens).")
@click.option("--vocabulary", "vocabulary_ref", help="PKG.MOD:NAME, token id → string "
              "(with --tokens).")
def shifts_command(run: str, param_glob: str, kind: str, neuron_spec: str | None, top: int,
                   min_count: int, by_frequency: int, by_count: int, tokens_ref: str | None,
                   vocabulary_ref: str | None) -> None:
    """Which examples moved which neurons (TopK capture): top neurons by outlier-shift count
    and mass, or for one --neuron its examples and the tokens they share."""
    from attrib.analyzer import shifts as api
    from attrib.analyzer.run import open_run
    from attrib.cli.loading import load_data, load_object

    try:
        recorded = open_run(run)
        if not recorded.table_files("shifts"):
            _fail(f"{run} has no outlier shifts: record with capture=attrib.TopK(k)")
        if tokens_ref:
            api.save_tokens(recorded, load_data(tokens_ref),
                            load_object(vocabulary_ref) if vocabulary_ref else None)
        if neuron_spec is None:
            click.echo(render.aligned(api.top_neurons(recorded, param_glob, kind, top), top))
            return
        click.echo(f"examples behind the outlier shifts of {neuron_spec}:")
        click.echo(render.aligned(api.neuron_examples(recorded, neuron_spec, top), top))
        if api.has_tokens(recorded):
            click.echo(f"\ntokens enriched in those examples (m={min_count}, r={by_frequency}, "
                       f"c={by_count}):")
            click.echo(render.aligned(api.token_enrichment(
                recorded, neuron_spec, min_count, by_frequency, by_count)))
        else:
            click.echo("\n(no tokens: record rec.examples(ids, tokens=...) or pass --tokens)")
    except (FormatError, ValueError) as e:
        _fail(str(e))


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--neuron", "neuron_spec", required=True, metavar="MODULE:IDX",
              help="The neuron to zero (MODULE:in:IDX for an input feature).")
@click.option("--model", "model_ref", required=True,
              help="PKG.MOD:FACTORY that builds the architecture (parameters come from RUN).")
@click.option("--data", "data_ref", required=True,
              help="PKG.MOD:NAME of the inputs (a tensor, or (inputs, labels)).")
@click.option("--step", type=int, help="Ablate θ at this step (default: the final θ).")
@_enrichment_options
@click.option("--top", default=30, show_default=True, help="Rows to show.")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Also write the whole table as Parquet.")
def ablate(run: str, neuron_spec: str, model_ref: str, data_ref: str, step: int | None,
           min_count: int, by_frequency: int, by_count: int, top: int,
           output: str | None) -> None:
    """Zero a neuron's weights and count, per predicted token, the predictions that flip;
    `notable` marks the neuron's enriched tokens (the original study's check)."""
    from attrib.analyzer import shifts as api
    from attrib.analyzer.run import open_run
    from attrib.cli.loading import load_data, load_object

    try:
        table = api.ablate(open_run(run), load_object(model_ref), load_data(data_ref),
                           neuron_spec, step, min_count, by_frequency, by_count)
    except (FormatError, ValueError) as e:
        _fail(str(e))
    click.echo(render.aligned(table, top))
    summary = api.flips_summary(table)
    click.echo(f"flip share: notable tokens {summary['notable_flip_share']:.3f} "
               f"({summary['notable_tokens']} tokens), others {summary['other_flip_share']:.3f}")
    if output:
        pq.write_table(table, output)


@main.command()
@click.option("--out", default="attrib-demo", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the recorded run, plots and report.html.")
@click.option("--quick", is_flag=True, help="A tiny run (for tests), seconds long.")
@click.option("--p", "modulus", type=int, help="The modulus (default 23; 113 is the published "
              "ExPLAIND setup, long).")
@click.option("--stage", "stage_specs", multiple=True, metavar="NAME=FIRST:LAST",
              help="Stages to analyse instead of the detected ones (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out: str, quick: bool, modulus: int | None, stage_specs: tuple[str, ...],
         quiet: bool) -> None:
    """Grokking a + b mod p: record the training, find its stages, explain them (stage
    accountability, path-kernel influences per layer, similarity, outlier shifts), plot and
    write report.html."""
    from attrib.demo import run_demo

    try:
        stages = dict(_stage_range(s) for s in stage_specs) or None
    except ValueError as e:
        _fail(str(e))
    run_demo(Path(out), quick=quick, p=modulus, stages=stages, progress=not quiet,
             echo=click.echo)


@main.command(name="report")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--out", default="report.html", show_default=True, type=click.Path(dir_okay=False),
              help="The HTML file to write (self-contained: images inline).")
@click.option("--title", help="Page title (default: the run's name).")
def report_command(run: str, out: str, title: str | None) -> None:
    """One self-contained HTML page: run summary, curves with stages shaded, stage
    accountability, influential examples, similarity per layer, top shifted neurons."""
    from attrib.analyzer.report import report
    from attrib.analyzer.run import open_run

    try:
        click.echo(f"report: {report(open_run(run), out, title)}")
    except FormatError as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
