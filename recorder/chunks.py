"""Whole Zarr v3 chunks written directly: the recorder's hot write path.

zarr's asynchronous pipeline costs a few tasks, buffers and copies per chunk, which capped the
writer near 250 MiB/s whatever the codec (benchmarks/writer_throughput.py). A block of steps
fills whole chunks along the step axis, and attrib's arrays use one fixed codec chain (bytes,
optionally Blosc, optionally CRC32C), so the writer encodes each chunk itself (numcodecs' Blosc,
google-crc32c: the libraries zarr itself calls) and writes it where zarr's default chunk key
encoding puts it, past the page cache where it can (recorder/direct_io.py). The result is a
chunk plain zarr reads; anything else (a block that starts mid-chunk after a resume, another
codec) goes through zarr. A chunk is written in place, not via a temporary file and a rename:
a fast-path chunk holds only steps past the committed ones, which no reader looks at until the
manifest commits them, and a resume deletes such chunks first.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from attrib.recorder import direct_io
from attrib.schemas.chunk_layout import PlainLayout


class ChunkWriter:
    """Encodes and writes whole chunks of one array (None from `for_array` when its layout is
    not the plain one, schemas/chunk_layout.py)."""

    def __init__(self, directory: Path, layout: PlainLayout) -> None:
        self.directory = directory
        self.layout = layout
        self._made: set[Path] = set()  # chunk folders known to exist

    @classmethod
    def for_array(cls, array: zarr.Array, store_dir: Path) -> ChunkWriter | None:
        layout = PlainLayout.of(array)
        return cls(store_dir / array.path, layout) if layout is not None else None

    def encode(self, first: int, values: np.ndarray) -> list[tuple[Path, np.ndarray]] | None:
        """(file, chunk) pairs for steps [first, first + len(values)) if they start at a chunk
        boundary (a last chunk they don't fill is padded with the fill value); None when zarr
        has to write them (a block that starts mid-chunk, after a resume)."""
        layout = self.layout
        depth = layout.chunks[0]
        if first % depth:
            return None
        inner = values.shape[1:]
        jobs = []
        for along in range(math.ceil(len(values) / depth)):
            steps = slice(along * depth, (along + 1) * depth)
            for index in layout.inner_indices(inner):
                part = values[(steps, *layout.region(index, inner))]
                if part.shape != layout.chunks or not part.flags.c_contiguous:
                    whole = np.full(layout.chunks, layout.fill, dtype=layout.dtype)
                    whole[tuple(slice(0, n) for n in part.shape)] = part
                    part = whole
                key = layout.key((first // depth + along, *index))
                jobs.append((self.directory.joinpath(*key.split("/")),
                             np.asarray(part, dtype=layout.dtype), self))
        return jobs

    def put(self, path: Path, chunk: np.ndarray) -> int:
        """Encode one chunk and write it (see the module docstring for why in place); returns
        the bytes written."""
        data, trailer = self.layout.encode(chunk)
        if path.parent not in self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent)
        direct_io.write_file(path, data, trailer)
        return data.nbytes + len(trailer)


def put_all(jobs: list[tuple[Path, np.ndarray, ChunkWriter]], pool: ThreadPoolExecutor) -> int:
    """Write chunks on the pool's threads: writes (and Blosc) run without the GIL, so two
    threads keep two writes in flight and encode while the other waits for the device.
    Returns the bytes written."""
    return sum(future.result() for future in
               [pool.submit(writer.put, path, chunk) for path, chunk, writer in jobs])
