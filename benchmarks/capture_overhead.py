"""Per-example capture policies: step time with the recorder on / off, side by side.

Each row records the aggregate trajectory plus one capture policy: none, Full (exact
contributions), Factored (exact, weights as factors), Project(1024) dense and kron, TopK(64),
on every workload of harness.py (the GRU LM's rows are recorder/recurrent.py's closed form).
Columns as in record_overhead.py.
Dense projection needs a k × numel matrix per tensor; where that exceeds the recorder's budget
the row says so instead of a time. The peer rows compute per-example gradients without
attrib, the way other tools do: torch.func (vmap of each example's gradient) and Opacus
(`pip install opacus` in the benchmark environment only; not a dependency). They keep the
gradients in memory and store nothing, so they bound the compute part of a recorded step.
Run: `python benchmarks/capture_overhead.py [--quick]`.
"""

from harness import main

import attrib

SETTINGS = {
    "aggregate only": {"capture": False},
    "Full": {"capture": attrib.Full()},
    "Factored()": {"capture": attrib.Factored()},
    "Project(1024, dense)": {"capture": attrib.Project(1024, kind="dense")},
    "Project(1024, kron)": {"capture": attrib.Project(1024, kind="kron")},
    "TopK(64)": {"capture": attrib.TopK(64)},
    # peers: per-example gradients the fastest other ways, kept in memory, nothing stored
    "peer: torch.func vmap": {"peer": "torch.func"},
    "peer: Opacus": {"peer": "opacus"},
}

if __name__ == "__main__":
    main(__doc__, SETTINGS, steps={"gpt": 48})
