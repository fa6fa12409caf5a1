"""`attrib report`: one self-contained HTML page about a run and its stored analyses.

Every image is a PNG inlined as base64 and there is no script, font or style sheet from
elsewhere, so the page opens from disk with no network. Sections appear for what the run holds:
curves (always), stage accountability (stage_effects), influential examples and influence per
layer (influence), similarity per layer (similarity), outlier shifts (shifts).
"""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa

from attrib.analyzer import plots
from attrib.analyzer.run import Run
from attrib.analyzer.sql import sql

STYLE = """body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f0f0f0}pre{background:#f7f7f7;padding:1em;overflow:auto}img{max-width:100%}"""


def report(run: Run, out: str | Path, title: str | None = None) -> Path:
    """Write the report of `run` to `out` (HTML); returns the path."""
    title = title or f"attrib report: {run.dir.name}"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<pre>{html.escape(_summary(run))}</pre>"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stages = stage_spans(run)
        parts += ["<h2>Training</h2>",
                  _image(plots.training_curves(run.steps, stages, tmp / "curves.png"))]
        effects = _query(run, "SELECT * FROM stage_effects")
        if effects is not None and effects.num_rows:
            parts += ["<h2>Stage accountability</h2>",
                      "<p>Δf = f(θ<sub>N</sub> without the stage) − f(θ<sub>N</sub>), mean "
                      "over test points: positive means the stage lowered f.</p>",
                      _image(plots.stage_effects_chart(effects, tmp / "stages.png"))]
        parts += _influence_section(run, tmp)
        similarity = _query(run, "SELECT * FROM similarity")
        if similarity is not None and similarity.num_rows:
            parts += ["<h2>Similarity from the model's perspective</h2>",
                      "<p>Per layer (and stage), Σ<sub>s</sub> of the path kernel between test "
                      "points (normalised), in test-point order.</p>",
                      _image(plots.similarity_heatmaps(similarity, tmp / "similarity.png",
                                                       "similarity per layer and stage"))]
        if run.table_files("shifts"):
            from attrib.analyzer.shifts import top_neurons

            parts += ["<h2>Top shifted neurons</h2>", _html_table(top_neurons(run, n=10))]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    out = Path(out)
    out.write_text(page, encoding="utf-8")
    return out


def stage_spans(run: Run) -> list[tuple[str, int, int]]:
    """(name, first, last) of the stages to shade: the analysed ones if any, else recorded."""
    effects = _query(run, "SELECT DISTINCT stage, start, \"end\" FROM stage_effects "
                          "ORDER BY start")
    if effects is not None and effects.num_rows:
        return [(r["stage"], r["start"], r["end"]) for r in effects.to_pylist()]
    return [(r["stage"], r["start_step"], r["end_step"]) for r in run.stages.to_pylist()
            if r["end_step"] is not None]


def _influence_section(run: Run, tmp: Path) -> list[str]:
    top = _query(run, "SELECT analysis, example_id, sum(value) AS total_influence, "
                      "sum(abs(value)) AS magnitude FROM influence WHERE example_id IS NOT NULL "
                      "GROUP BY ALL ORDER BY magnitude DESC LIMIT 10")
    if top is None or not top.num_rows:
        return []
    out = ["<h2>Most influential training examples</h2>",
           "<p>Summed over test points (and steps, layers): influence on f.</p>",
           _html_table(top)]
    layers = _query(run, "SELECT layer, sum(value) AS influence FROM influence "
                         "WHERE layer IS NOT NULL AND term = 'data' GROUP BY 1 ORDER BY 1")
    if layers is not None and layers.num_rows:
        out += ["<h2>Influence per layer</h2>", _image(plots.bar_chart(
            layers["layer"].to_pylist(), layers["influence"].to_pylist(), tmp / "layers.png",
            "training data's influence per layer", "Σ influence on f"))]
    return out


def _summary(run: Run) -> str:
    from attrib.cli.render import summary

    return summary(run.info())


def _query(run: Run, query: str) -> pa.Table | None:
    """The answer, or None when the run has no such analysis view (or column)."""
    try:
        return sql(run, query)
    except (duckdb.CatalogException, duckdb.BinderException):
        return None


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<p><img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'></p>"


def _html_table(table: pa.Table) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in table.column_names)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in r.values())
                   + "</tr>" for r in table.to_pylist())
    return f"<table><tr>{head}</tr>{rows}</table>"


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
