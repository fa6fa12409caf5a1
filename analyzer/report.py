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
from attrib.analyzer.sql import NoAnalysis, sql

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
    """Per stored influence analysis (at most MAX_ANALYSES), its most influential examples
    with what they did to f, named by the view's orientation; and the per-layer split of the
    first analysis that kept layers."""
    analyses = _query(run, "SELECT analysis, any_value(method) AS method, any_value("
                           "orientation) AS orientation FROM influence GROUP BY analysis "
                           "ORDER BY analysis")
    if analyses is None or not analyses.num_rows:
        return []
    out = ["<h2>Most influential training examples</h2>",
           "<p>Summed over test points (and steps, layers). A <b>contribution</b> (path "
           "kernel, linear response, TRAK) is the change of f that training on the example "
           "caused or is predicted to cause; a <b>gradient score</b> (TracIn, Grad-Dot, "
           "Grad-Cos, influence function) is ∇f·∇ℓ, positive where training on the example "
           "lowers f. For f = the loss, lowering f helps.</p>"]
    for row in analyses.to_pylist()[:MAX_ANALYSES]:
        top = _query(run, "SELECT example_id, sum(value) AS total, CASE WHEN (sum(value) < 0) "
                          "= ($orientation = 'contribution') THEN 'lowers f' ELSE 'raises f' "
                          "END AS effect_on_f, sum(abs(value)) AS magnitude FROM influence "
                          "WHERE analysis = $analysis AND example_id IS NOT NULL GROUP BY 1 "
                          "ORDER BY magnitude DESC, example_id LIMIT 10",
                     {"analysis": row["analysis"], "orientation": row["orientation"]})
        if top is not None and top.num_rows:
            out += [f"<h3>{html.escape(row['analysis'])} ({html.escape(row['method'])}, "
                    f"{html.escape(str(row['orientation']))})</h3>", _html_table(top)]
    for row in analyses.to_pylist():
        layers = _query(run, "SELECT layer, sum(value) AS influence FROM influence WHERE "
                             "analysis = $analysis AND layer IS NOT NULL AND term = 'data' "
                             "GROUP BY 1 ORDER BY 1", {"analysis": row["analysis"]})
        if layers is not None and layers.num_rows:
            name = row["analysis"]
            out += [f"<h2>Influence per layer ({html.escape(name)})</h2>",
                    _image(plots.bar_chart(layers["layer"].to_pylist(),
                                           layers["influence"].to_pylist(), tmp / "layers.png",
                                           f"training data's influence per layer ({name})",
                                           f"Σ {row['orientation']} on f"))]
            break
    return out


MAX_ANALYSES = 4  # influence analyses the report shows examples of


def _summary(run: Run) -> str:
    from attrib.cli.render import summary

    return summary(run.info())


def _query(run: Run, query: str, params: dict | None = None) -> pa.Table | None:
    """The answer, or None when the run has no such analysis view (or column)."""
    try:
        return sql(run, query, params)
    except (NoAnalysis, duckdb.BinderException):
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
