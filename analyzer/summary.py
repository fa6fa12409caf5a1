"""The run summary behind `attrib info`: counts, optimizer, sizes and compression."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from attrib.analyzer.guarded_store import chunk_owner
from attrib.schemas import format as fmt

if TYPE_CHECKING:
    from attrib.analyzer.run import Run


def _stored_bytes(path) -> tuple[int, int]:
    """(chunk bytes, metadata bytes) on disk: chunks are the files whose key zarr's default
    chunk key encoding gives (c.<i>… or c/<i>/…), the rest documents."""
    chunks = metadata = 0
    for f in path.rglob("*"):
        if f.is_file():
            if chunk_owner(f.relative_to(path).as_posix()) is not None:
                chunks += f.stat().st_size
            else:
                metadata += f.stat().st_size
    return chunks, metadata


def _raw_dense_bytes(run: Run) -> int:
    """Uncompressed bytes of the committed part of every array in the store."""
    total = 0
    for path, node in run.arrays():
        shape, rows = node.shape, run.committed_rows(path)
        if shape and rows is not None:
            shape = (min(shape[0], rows), *shape[1:])
        total += math.prod(shape) * np.dtype(node.dtype).itemsize
    return total


def _capture_summary(run: Run) -> dict[str, Any]:
    """How many tensors each capture policy covers, and the largest residual seen."""
    counts: dict[str, int] = {}
    for policies in run.capture.values():
        for kind, settings in policies.items():
            label = {"full": f"Full({settings.get('dtype')})",
                     "factored": f"Factored({settings.get('dtype')}, tokens="
                                 f"{settings.get('tokens')}"
                                 + (f", rank={settings['rank']})" if settings.get("rank")
                                    else ")"),
                     "project": f"Project({settings.get('kind')}, k={settings.get('k')})",
                     "topk": f"TopK({settings.get('k')}, {settings.get('scope')})"}[kind]
            counts[label] = counts.get(label, 0) + 1
    residual = None
    if counts and run.n_steps:
        norms = run.residual_norms()
        residual = float(np.nanmax(norms)) if not np.isnan(norms).all() else None
    return {"policies": counts, "residual_max": residual,
            "residual_params": run.meta.get("residual_params", []),
            "shift_rows": sum(pq.read_metadata(f).num_rows for f in run.table_files("shifts"))}


def run_summary(run: Run) -> dict[str, Any]:
    params = run.params
    steps = run.steps
    examples = run.examples
    distinct = pc.count_distinct(examples.column("example_id")).as_py()
    numel = int(sum(params.column("numel").to_pylist()))
    dense_raw = _raw_dense_bytes(run)
    with run.reading("the sizes of the run's files", (OSError,)):  # a live run: RunChanged
        dense_stored, dense_metadata = _stored_bytes(run.dir / fmt.STORE_DIR)
        table_bytes = sum(f.stat().st_size for t in fmt.TABLES for f in run.table_files(t))
    hparams = run.hparams(0, min(1, run.n_steps)) if run.n_steps else {}
    first = {h: [None if np.isnan(v) else float(v) for v in values[0]]
             for h, values in hparams.items() if len(values)}
    return {
        "path": str(run.dir),
        "status": run.status,
        "format_version": run.meta["format_version"],
        "created": run.meta["created"],
        "attrib_version": run.meta["attrib_version"],
        "torch_version": run.meta["torch_version"],
        "steps": run.n_steps,
        "examples_seen": examples.num_rows,
        "distinct_examples": distinct,
        "stages": [{"stage": s["stage"], "start": s["start_step"], "end": s["end_step"],
                    "steps": s["n_steps"]} for s in run.stages.to_pylist()],
        "params": params.num_rows,
        "numel": numel,
        "optimizer": run.optimizer,
        "hparams_at_step_0": {k: v for k, v in first.items() if any(x is not None for x in v)},
        "per_example": _capture_summary(run),
        "checkpoints": len(run.checkpoint_steps),
        "checkpoint_every": run.meta["checkpoint_every"],
        "trajectory_params": len(run.trajectory_params),
        "last_loss": steps.column("loss")[-1].as_py() if steps.num_rows else None,
        "dense_bytes_raw": dense_raw,
        "dense_bytes_stored": dense_stored,
        "dense_metadata_bytes": dense_metadata,
        "table_bytes": table_bytes,
        "compression_ratio": dense_raw / dense_stored if dense_stored else None,
        # what recording cost on disk: every stored byte over parameters × steps
        "bytes_per_param_step": ((dense_stored + dense_metadata + table_bytes)
                                 / (numel * run.n_steps) if numel and run.n_steps else None),
        "error": run.manifest.get("error"),
    }
