"""Aggregate trajectory recording: step time with the recorder on / off, side by side.

Records the trajectory (format v2: the consumed gradient every step, θ and the optimizer's
state at checkpoints; no per-example capture) with the default codecs (uncompressed +
CRC32C), with zstd for everything, with bfloat16 gradients, and with checkpoints only (no
gradients: no trajectory between checkpoints). Columns: ms/step off and on and their ratio,
raw bytes per step, compression, bytes per parameter per step on disk (everything in the run
directory, checkpoints and tables included), the writer's own ms per step, the floor ratio
(plain step + writer time) / plain step, and the extra peak RSS of recording.
A second table records a longer run of each workload with every default (checkpoints every 100
steps) and prints what its directory holds per parameter and step, as `attrib info` does: the
timed runs above are too short for their first and last checkpoints to amortise.
Run: `python benchmarks/record_overhead.py [--quick]`.
"""

import sys
import tempfile

import torch
from harness import WORKLOADS, main, print_table

import attrib

SETTINGS = {
    "gradients (default)": {"capture": False},
    "gradients (zstd)": {"capture": False, "codec": attrib.Codec()},
    "gradients (bfloat16)": {"capture": False, "grad_dtype": "bfloat16"},
    "checkpoints only": {"capture": False, "record_grads": False},
}
LM_STEPS = {"transformer": 128, "gpt": 128}  # timed steps per block: see harness.main

LONG_RUN_STEPS = 300


def disk_per_step(name: str, steps: int) -> dict:
    """Bytes per parameter per step of a `steps`-step run recorded with every default."""
    work = WORKLOADS[name]
    model = work.model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        with attrib.Recorder(f"{tmp}/run", model, opt, capture=False) as rec:
            for i in range(steps):
                x, y = work.batch(g)
                rec.examples(torch.arange(i * len(x), (i + 1) * len(x)))
                torch.nn.functional.cross_entropy(model(x), y).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
        info = attrib.open_run(f"{tmp}/run").info()
    return {"workload": work.name, "steps": steps, "checkpoints": info["checkpoints"],
            "bytes_per_param_step": round(info["bytes_per_param_step"], 2)}


if __name__ == "__main__":
    main(__doc__, SETTINGS, ["mlp", "transformer", "gpt"], LM_STEPS)
    if "--one" not in sys.argv:
        steps = 20 if "--quick" in sys.argv else LONG_RUN_STEPS
        print()
        print_table("what a run directory holds, every default (capture=False)",
                    [disk_per_step(name, steps) for name in ("mlp", "transformer", "gpt")])
