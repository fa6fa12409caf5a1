"""The projected-influence kernel on Dask (`pip install attrib[dask]`): one task per chunk of
steps reads its rows straight from the run's Zarr array (`dask.array.from_zarr`) on a worker,
so machines that share the run's filesystem split the product; the driver only sums the
(test, examples) partial results. Same block function, same numbers as the in-process path.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from attrib.analyzer.projected import array_path, block_scores
from attrib.analyzer.run import Run
from attrib.schemas import format as fmt


def dask_scores(run: Run, tests: dict[str, np.ndarray], grid: np.ndarray, universe: np.ndarray,
                w: np.ndarray, start: int, stop: int, client=None) -> np.ndarray:
    """(n_test, len(universe)) summed over parameters and steps; `client`: a
    distributed.Client to run on (default: Dask's current scheduler)."""
    depth = int(run.meta["steps_per_chunk"])
    store = str(run.dir.resolve() / fmt.STORE_DIR)
    parts = []
    for name, q in tests.items():
        run._array(array_path(run, name))  # its codecs are ones attrib decodes
        array = da.from_zarr(store, component=array_path(run, name))[start:stop]
        # one block per stored chunk of steps, whole along the other axes (a distributed
        # run's rank-split chunks merge here)
        first = min(stop - start, depth - start % depth)
        rest, last = divmod(stop - start - first, depth)
        steps = (first, *[depth] * rest, *([last] if last else []))
        array = array.rechunk({0: steps, **{axis: -1 for axis in range(1, array.ndim)}})
        array = array.reshape(array.shape[0], array.shape[1], -1)
        bounds = np.cumsum((0, *array.chunks[0]))
        for index, block in enumerate(array.to_delayed().ravel()):
            lo, hi = bounds[index], bounds[index + 1]
            parts.append(dask.delayed(block_scores)(block, grid[lo:hi], q, w[lo:hi], universe))
    total = dask.delayed(sum)(parts)
    return (client.compute(total).result() if client is not None else total.compute())
