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

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import Blosc

from attrib.recorder import direct_io

_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE,
            "bitshuffle": Blosc.BITSHUFFLE}


class ChunkWriter:
    """Encodes and writes whole chunks of one array (None from `for_array` when its layout is
    not the plain one this writer knows)."""

    def __init__(self, directory: Path, chunks: tuple[int, ...], dtype: np.dtype, fill: Any,
                 blosc: Blosc | None, checksum: bool, separator: str) -> None:
        self.directory = directory
        self.chunks = chunks
        self.dtype = dtype
        self.fill = fill
        self.blosc = blosc
        self.checksum = checksum
        self.separator = separator
        self._made: set[Path] = set()  # chunk folders known to exist

    @classmethod
    def for_array(cls, array: zarr.Array, store_dir: Path) -> ChunkWriter | None:
        meta = array.metadata.to_dict()
        codecs = meta.get("codecs", [])
        names = [c.get("name") for c in codecs]
        encoding = meta.get("chunk_key_encoding", {})
        grid = meta.get("chunk_grid", {})
        if (not names or names[0] != "bytes" or grid.get("name") != "regular"
                or encoding.get("name") != "default"
                or codecs[0].get("configuration", {}).get("endian", "little") != "little"):
            return None
        blosc = None
        rest = names[1:]
        if rest and rest[0] == "blosc":
            config = codecs[1]["configuration"]
            blosc = Blosc(cname=config["cname"], clevel=config["clevel"],
                          shuffle=_SHUFFLE[config["shuffle"]], blocksize=config.get("blocksize", 0))
            rest = rest[1:]
        checksum = rest == ["crc32c"]
        if rest and not checksum:
            return None
        separator = encoding.get("configuration", {}).get("separator", "/")
        return cls(store_dir / array.path, tuple(array.chunks), array.dtype.newbyteorder("<"),
                   array.fill_value, blosc, checksum, separator)

    def encode(self, first: int, values: np.ndarray) -> list[tuple[Path, np.ndarray]] | None:
        """(file, chunk) pairs for steps [first, first + len(values)) if they start at a chunk
        boundary (a last chunk they don't fill is padded with the fill value); None when zarr
        has to write them (a block that starts mid-chunk, after a resume)."""
        depth = self.chunks[0]
        if first % depth:
            return None
        inner = values.shape[1:]
        counts = [math.ceil(n / c) for n, c in zip(inner, self.chunks[1:])]
        jobs = []
        for along in range(math.ceil(len(values) / depth)):
            steps = slice(along * depth, (along + 1) * depth)
            for index in itertools.product(*(range(c) for c in counts)):
                where = tuple(slice(i * c, min((i + 1) * c, n))
                              for i, c, n in zip(index, self.chunks[1:], inner))
                part = values[(steps, *where)]
                if part.shape != self.chunks or not part.flags.c_contiguous:
                    whole = np.full(self.chunks, self.fill, dtype=self.dtype)
                    whole[tuple(slice(0, n) for n in part.shape)] = part
                    part = whole
                key = self.separator.join(map(str, ("c", first // depth + along, *index)))
                jobs.append((self.directory.joinpath(*key.split("/")),
                             np.asarray(part, dtype=self.dtype), self))
        return jobs

    def put(self, path: Path, chunk: np.ndarray) -> int:
        """Encode one chunk and write it (see the module docstring for why in place); returns
        the bytes written."""
        data: Any = chunk.reshape(-1).view(np.uint8)
        if self.blosc is not None:
            data = np.frombuffer(self.blosc.encode(chunk), dtype=np.uint8)
        if path.parent not in self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent)
        trailer = (int(google_crc32c.value(data)).to_bytes(4, "little") if self.checksum
                   else b"")
        direct_io.write_file(path, data, trailer)
        return data.nbytes + len(trailer)


def put_all(jobs: list[tuple[Path, np.ndarray, ChunkWriter]], pool: ThreadPoolExecutor) -> int:
    """Write chunks on the pool's threads: writes (and Blosc) run without the GIL, so two
    threads keep two writes in flight and encode while the other waits for the device.
    Returns the bytes written."""
    return sum(future.result() for future in
               [pool.submit(writer.put, path, chunk) for path, chunk, writer in jobs])
