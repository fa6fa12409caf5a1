"""Analysis results stored inside a run: `analysis/<name>/<table>.parquet` + `analysis.json`.

Each result table is written to a temporary file and renamed, so a reader never sees half of
one; `attrib sql` exposes every table name as a view over all analyses of the run(s).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from attrib.analyzer.run import Run
from attrib.schemas import format as fmt

ANALYSIS_DIR = "analysis"
RESULT_TABLES = ("influence", "completeness", "similarity", "stage_effects", "tokens",
                 "vocabulary")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def save(run: Run, name: str, tables: dict[str, pa.Table], parameters: dict[str, Any]) -> Path:
    """Store an analysis's tables (each gains `analysis` and `method` columns)."""
    if not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"analysis name {name!r}: use letters, digits, '_', '.', '-'")
    unknown = set(tables) - set(RESULT_TABLES)
    if unknown:
        raise ValueError(f"unknown result tables {sorted(unknown)}; use {RESULT_TABLES}")
    folder = fmt.inside(run.dir, f"{ANALYSIS_DIR}/{name}")
    folder.mkdir(parents=True, exist_ok=True)
    for table_name, table in tables.items():
        labelled = table.append_column("analysis", pa.array([name] * table.num_rows,
                                                            pa.string()))
        if "method" not in labelled.column_names:  # stage_effects name theirs per row
            labelled = labelled.append_column(
                "method", pa.array([parameters["method"]] * table.num_rows, pa.string()))
        tmp = folder / f".{table_name}.parquet.tmp"
        pq.write_table(labelled, tmp, compression="zstd")
        os.replace(tmp, folder / f"{table_name}.parquet")
    fmt.write_json_atomic(folder / "analysis.json", parameters)
    return folder


def result_files(run: Run) -> dict[str, list[Path]]:
    """table name → the Parquet files of every stored analysis (inside the run only)."""
    root = run.dir / ANALYSIS_DIR
    found: dict[str, list[Path]] = {t: [] for t in RESULT_TABLES}
    if not root.is_dir():
        return found
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)):
        for table in RESULT_TABLES:
            path = folder / f"{table}.parquet"
            if path.is_file():
                found[table].append(fmt.inside(run.dir, str(path.relative_to(run.dir))))
    return found

