"""Outlier parameter shifts (METHODS.md §5): which examples moved which neurons, which tokens
those examples share, and whether zeroing the neuron changes the predictions of those tokens.

The ranking and enrichment are the named SQL queries in analyzer/queries/ (so the SQL users
read is the SQL that runs); this module adds neuron names, stored tokens and ablation.
A neuron is named `MODULE:INDEX` (output neuron: row INDEX of the Linear layer's weight) or
`MODULE:in:INDEX` (input feature: column INDEX).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from attrib.analyzer import results
from attrib.analyzer.run import Run
from attrib.analyzer.sql import named
from attrib.recorder.tokens import token_batch, tokens_table, vocabulary_array, vocabulary_table

ABLATION = pa.schema([
    pa.field("token_id", pa.int64()), pa.field("token", pa.string()),
    pa.field("predicted", pa.int64()),  # positions where either model predicts the token
    pa.field("flips", pa.int64()),  # ... of which the two models disagree
    pa.field("flip_share", pa.float64()), pa.field("notable", pa.bool_()),
    pa.field("enrichment_rank", pa.int64()),
])


@dataclass(frozen=True)
class Neuron:
    module: str
    kind: str  # "output" (a weight row) or "input" (a weight column)
    index: int
    weight: str  # the weight tensor's parameter name
    bias: str | None

    def __str__(self) -> str:
        return f"{self.module}:{'in:' if self.kind == 'input' else ''}{self.index}"


def neuron(run: Run, spec: str) -> Neuron:
    """Parse `MODULE:INDEX` / `MODULE:in:INDEX` against the run's Linear layers."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[1] != "in") or \
            not parts[-1].isdigit():
        raise ValueError(f"neuron {spec!r}: write MODULE:INDEX for an output neuron or "
                         "MODULE:in:INDEX for an input feature, e.g. 'mlp.fc1:17'")
    module, kind, index = parts[0], "input" if len(parts) == 3 else "output", int(parts[-1])
    params = [p for p in run.params.to_pylist() if p["module"] == module]
    weights = [p for p in params if p["layer_type"] == "Linear" and len(p["shape"]) == 2]
    if not weights:
        linear = sorted({p["module"] for p in run.params.to_pylist()
                         if p["layer_type"] == "Linear"})
        raise ValueError(f"neuron {spec!r}: the run has no Linear layer {module!r}; its Linear "
                         f"layers: {', '.join(linear) or 'none'}")
    weight = weights[0]
    size = weight["shape"][0 if kind == "output" else 1]
    if index >= size:
        raise ValueError(f"neuron {spec!r}: {module} has {size} {kind} "
                         f"{'neurons' if kind == 'output' else 'features'} (0..{size - 1})")
    bias = next((p["name"] for p in params if len(p["shape"]) == 1), None)
    return Neuron(module, kind, index, weight["name"], bias)


def top_neurons(run: Run, param: str = "*", kind: str = "output", n: int = 20) -> pa.Table:
    """Neurons by outlier-shift count, then mass (Σ|shift|): named query `top_neurons`."""
    return named(run, "top_neurons", param=param, kind=kind, n=n)


def neuron_examples(run: Run, spec: str, n: int = 20) -> pa.Table:
    """The examples behind a neuron's outlier shifts: named query `neuron_examples`."""
    return named(run, "neuron_examples", neuron=str(neuron(run, spec)), n=n)


def token_enrichment(run: Run, spec: str, m: int = 20, r: int = 200, c: int = 5) -> pa.Table:
    """Univariate token selection for a neuron: named query `token_enrichment`."""
    return named(run, "token_enrichment", neuron=str(neuron(run, spec)), m=m, r=r, c=c)


def has_tokens(run: Run) -> bool:
    return bool(run.table_files("tokens") or results.result_files(run)["tokens"])


def save_tokens(run: Run, tokens: Any, vocabulary=None) -> None:
    """Join token sequences from a dataset at analysis time: `tokens[example_id]` is that
    example's token ids (a 2-D tensor/array indexed by id works too); `vocabulary` spells
    them. Stored as analysis `tokens` (the SQL view `tokens`, as if recorded)."""
    if run.table_files("tokens"):
        raise ValueError(f"{run.dir} recorded its tokens already (rec.examples(ids, tokens=...))")
    ids = np.unique(run.examples.column("example_id").to_numpy())
    rows = (tokens[torch.as_tensor(ids)] if isinstance(tokens, torch.Tensor) else tokens[ids]) \
        if isinstance(tokens, (torch.Tensor, np.ndarray)) and tokens.ndim == 2 \
        else [tokens[int(i)] for i in ids]
    batch = token_batch(ids, rows)  # the recorder's own validation and flattening
    vocab = vocabulary_array(vocabulary)
    tables = {"tokens": tokens_table(batch, vocab)}
    if vocab is not None:
        tables["vocabulary"] = vocabulary_table(vocab)
    results.save(run, "tokens", tables, {"method": "tokens", "examples": len(ids)})


def ablate(run: Run, model_fn: Callable[[], torch.nn.Module], data, spec: str,
           step: int | None = None, m: int = 20, r: int = 200, c: int = 5,
           batch_size: int = 256) -> pa.Table:
    """Zero-weight ablation of a neuron in θ at `step` (default: the final θ): per predicted
    token, how many predictions flip (the share among positions where either model predicts
    it), joined with the neuron's token enrichment (`notable`: among its top c tokens).

    `data`: the inputs (a tensor) or (inputs, labels); the model's last output dimension is
    the vocabulary (classes), every other position is one prediction. Output neuron: its
    weight row and bias entry are zeroed; input feature: its weight column.
    """
    target = neuron(run, spec)
    theta = run.reconstruct(run.n_steps if step is None else step)
    inputs = data[0] if isinstance(data, (tuple, list)) else data
    model = model_fn()
    model.load_state_dict(theta, strict=False)
    before = _predictions(model.eval(), inputs, batch_size)
    with torch.no_grad():
        weights = dict(model.named_parameters())
        if target.kind == "output":
            weights[target.weight][target.index].zero_()
            if target.bias is not None:
                weights[target.bias][target.index].zero_()
        else:
            weights[target.weight][:, target.index].zero_()
    after = _predictions(model, inputs, batch_size)
    return _flip_table(run, before, after, token_enrichment(run, spec, m, r, c)
                       if has_tokens(run) else None)


def _predictions(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(inputs[i: i + batch_size]).argmax(-1).reshape(-1).numpy()
                               for i in range(0, len(inputs), batch_size)])


def _flip_table(run: Run, before: np.ndarray, after: np.ndarray,
                enrichment: pa.Table | None) -> pa.Table:
    size = int(max(before.max(initial=0), after.max(initial=0))) + 1
    same = before == after
    predicted = (np.bincount(before, minlength=size) + np.bincount(after, minlength=size)
                 - np.bincount(before[same], minlength=size))
    flips = np.bincount(before[~same], minlength=size) + np.bincount(after[~same],
                                                                    minlength=size)
    token_ids = np.nonzero(predicted)[0]
    ranks = dict(zip(enrichment["token_id"].to_pylist(), enrichment["rank"].to_pylist())) \
        if enrichment is not None else {}
    vocabulary = _spelling(run)
    table = pa.table({
        "token_id": token_ids.astype(np.int64),
        "token": [vocabulary.get(int(t)) for t in token_ids],
        "predicted": predicted[token_ids].astype(np.int64),
        "flips": flips[token_ids].astype(np.int64),
        "flip_share": flips[token_ids] / predicted[token_ids],
        "notable": [int(t) in ranks for t in token_ids],
        "enrichment_rank": pa.array([ranks.get(int(t)) for t in token_ids], pa.int64()),
    }, schema=ABLATION)
    return table.sort_by([("flip_share", "descending"), ("flips", "descending"),
                          ("token_id", "ascending")])


def _spelling(run: Run) -> dict[int, str]:
    """token id → string from the recorded or stored vocabulary (or the tokens table)."""
    from attrib.analyzer.sql import sql

    table = sql(run, "SELECT token_id, any_value(token) AS token FROM "
                     "(SELECT token_id, token FROM vocabulary UNION ALL "
                     " SELECT token_id, token FROM tokens) WHERE token IS NOT NULL GROUP BY 1")
    return dict(zip(table["token_id"].to_pylist(), table["token"].to_pylist()))


def flips_summary(table: pa.Table) -> dict[str, float]:
    """Notable tokens vs the rest: their flip shares (the original study's comparison)."""
    notable = table.filter(pc.field("notable"))
    rest = table.filter(~pc.field("notable"))

    def share(t: pa.Table) -> float:
        total = pc.sum(t["predicted"]).as_py() or 0
        return (pc.sum(t["flips"]).as_py() or 0) / total if total else float("nan")

    return {"notable_tokens": notable.num_rows, "notable_flip_share": share(notable),
            "other_flip_share": share(rest)}
