"""Text rendering for the CLI: aligned tables and the run summary."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

# control characters (terminal escape sequences, OSC titles, bells, bidi overrides): a name a run
# stores must not drive the terminal that prints it
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with control characters shown as escapes (\\x1b, \\u202e); newlines kept."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], text)


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, default=str)
    return printable(str(value)).replace("\n", "\\n")


def aligned(table: pa.Table, max_rows: int = 50, total: int | None = None) -> str:
    """An aligned plain-text table; numbers right-aligned, at most `max_rows` rows; `total`:
    the answer's row count when `table` holds only its first rows."""
    total = table.num_rows if total is None else total
    names = table.column_names
    rows = [[_cell(v) for v in row.values()] for row in table.slice(0, max_rows).to_pylist()]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in table.schema]
    widths = [max([len(n), *(len(r[i]) for r in rows)]) for i, n in enumerate(names)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(names), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    if total > max_rows:
        out.append(f"... {total - max_rows} more rows (use --format csv for all)")
    out.append(f"({total} row{'s' if total != 1 else ''})")
    return "\n".join(out)


def csv_text(table: pa.Table) -> str:
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    return buffer.getvalue().decode()


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _per_example(capture: dict[str, Any]) -> str:
    if not capture["policies"]:
        return "not captured"
    text = "; ".join(f"{label} on {n} tensor{'s' if n > 1 else ''}"
                     for label, n in capture["policies"].items())
    if capture["residual_max"] is not None:
        text += f"; max residual ‖G − Σc‖/‖G‖ {capture['residual_max']:.1e} (checked steps)"
    if capture["residual_params"]:
        text += f"; not separable (residual): {', '.join(capture['residual_params'])}"
    if capture["shift_rows"]:
        text += f"; {capture['shift_rows']:,} shift rows"
    return text


def _trajectory(kept: int, params: int) -> str:
    """Whose gradients each step stores (the rest is read at checkpoints only)."""
    if kept == params:
        return "every tensor's gradient per step"
    if not kept:
        return "none per step (record_grads=False): θ at checkpoints only"
    return (f"the gradients of {kept} of {params} tensors per step (Recorder(trajectory=...)); "
            "the others at checkpoints only")


def summary(info: dict[str, Any]) -> str:
    """The `attrib info` text."""
    opt = info["optimizer"]
    hp = ", ".join(f"{k}={'/'.join(_cell(x) for x in v)}"
                   for k, v in info["hparams_at_step_0"].items())
    stages = "; ".join(f"{s['stage']} [{s['start']}–{s['end']}] ({s['steps']} steps)"
                       for s in info["stages"]) or "none"
    ratio = info["compression_ratio"]
    lines = [
        f"run          {info['path']}",
        f"status       {info['status']}",
        f"format       attrib v{info['format_version']} (written by attrib "
        f"{info['attrib_version']}, torch {info['torch_version']}, {info['created']})",
        f"steps        {info['steps']} committed",
        f"examples     {info['examples_seen']} seen, {info['distinct_examples']} distinct",
        f"stages       {stages}",
        f"params       {info['params']} tensors, {info['numel']:,} scalars",
        f"optimizer    {opt['class']} ({opt['kind']}{', amsgrad' if opt['amsgrad'] else ''})"
        + (f", at step 0: {hp}" if hp else ""),
        f"trajectory   {_trajectory(info['trajectory_params'], info['params'])}",
        f"per example  {_per_example(info['per_example'])}",
        f"checkpoints  {info['checkpoints']} (every {info['checkpoint_every']} steps)",
        f"last loss    {_cell(info['last_loss'])}",
        f"dense data   {human_bytes(info['dense_bytes_stored'])} in chunks for "
        f"{human_bytes(info['dense_bytes_raw'])} raw"
        + (f" (compression {ratio:.2f}x)" if ratio else "")
        + f", {human_bytes(info['dense_metadata_bytes'])} Zarr metadata",
        f"tables       {human_bytes(info['table_bytes'])} Parquet",
    ]
    if info["bytes_per_param_step"] is not None:
        lines.append(f"on disk      {info['bytes_per_param_step']:.2f} bytes per parameter per "
                     "step, everything included")
    if info["error"]:
        lines.append(f"error        {info['error']}")
    return "\n".join(lines)


def stage_summary(effects: pa.Table, agreement: pa.Table | None = None) -> str:
    """Per stage: its steps and each method's mean effect over test points; with an agreement
    table, each method's Pearson r and sign agreement with replay (pooled row last)."""
    rows = effects.to_pylist()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    stages = list(dict.fromkeys((r["stage"], r["start"], r["end"]) for r in rows))
    fit = {(a["method"], a["stage"]): a for a in agreement.to_pylist()} if agreement else {}
    compared = [m for m in methods if any(k[0] == m for k in fit)]
    columns: dict[str, list] = {"stage": [], "steps": []}
    for method in methods:
        columns[f"mean {method}"] = []
    for method in compared:
        columns[f"r {method}"], columns[f"signs {method}"] = [], []
    for stage, start, end in [*stages, ("(all)", None, None)]:
        if stage == "(all)" and not compared:
            continue
        columns["stage"].append(stage)
        columns["steps"].append(f"{start}-{end}" if start is not None else "")
        for method in methods:
            values = [r["effect"] for r in rows if r["method"] == method
                      and (stage == "(all)" or r["stage"] == stage)]
            columns[f"mean {method}"].append(sum(values) / len(values))
        for method in compared:
            row = fit.get((method, stage), {})
            columns[f"r {method}"].append(row.get("pearson"))
            columns[f"signs {method}"].append(row.get("sign_agreement"))
    text = aligned(pa.table(columns), max_rows=1000)
    return text.rsplit("\n", 1)[0]  # the row count adds nothing here
