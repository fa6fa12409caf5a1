"""Aggregate trajectory recording: step time with the recorder on / off, side by side.

Records Δθ, the consumed gradient and Adam's second moment every step (no per-example
capture), with the default codec, without the gradient, and with lz4. Columns: ms/step off and
on and their ratio, raw bytes per step, compression, the writer's own ms per step, the floor
ratio (plain step + writer time) / plain step, and the extra peak RSS of recording.
Run: `python benchmarks/record_overhead.py [--quick]`.
"""

from harness import main

import attrib

SETTINGS = {
    "full (zstd)": {"capture": False},
    "no grads (zstd)": {"capture": False, "record_grads": False},
    "full (lz4)": {"capture": False,
                   "codec": attrib.Codec(cname="lz4", clevel=5, shuffle="shuffle")},
}

if __name__ == "__main__":
    main(__doc__, SETTINGS, ["mlp", "transformer"])
