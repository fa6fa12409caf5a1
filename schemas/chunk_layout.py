"""The plain chunk layout attrib writes and reads without zarr's pipeline.

Every array attrib records is a regular grid of chunks under zarr's default chunk key encoding,
encoded by one fixed chain: `bytes` (little-endian), optionally `blosc`, optionally `crc32c`.
For that chain the recorder encodes whole chunks itself (recorder/chunks.py) and the analyzer
decodes them itself (analyzer/chunk_reader.py): zarr's asynchronous pipeline costs ~1 ms of
thread hand-offs per read, more than decoding a chunk of a small model. Anything else (v1 runs
with zstd, a chain this module does not know) goes through zarr.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import Blosc

_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE,
            "bitshuffle": Blosc.BITSHUFFLE}
CHECKSUM_BYTES = 4  # the crc32c codec's trailer: CRC32C of the bytes before it, little-endian


@dataclass(frozen=True)
class PlainLayout:
    """Chunk shape, dtype, fill value and codec chain of one array in the plain layout (not
    its shape, which grows as steps are recorded)."""

    path: str  # the array's path inside the store
    chunks: tuple[int, ...]
    dtype: np.dtype  # little-endian
    fill: Any
    blosc: Blosc | None
    checksum: bool
    separator: str

    @classmethod
    def of(cls, array: Any) -> PlainLayout | None:
        """The layout of a zarr.Array, or None when its chunks are not in the plain layout."""
        meta = array.metadata.to_dict()
        codecs = meta.get("codecs", [])
        names = [c.get("name") for c in codecs]
        encoding = meta.get("chunk_key_encoding", {})
        if (not names or names[0] != "bytes" or meta.get("chunk_grid", {}).get("name") != "regular"
                or encoding.get("name") != "default" or array.ndim == 0
                or codecs[0].get("configuration", {}).get("endian", "little") != "little"):
            return None
        blosc, rest = None, names[1:]
        if rest and rest[0] == "blosc":
            config = codecs[1]["configuration"]
            blosc = Blosc(cname=config["cname"], clevel=config["clevel"],
                          shuffle=_SHUFFLE[config["shuffle"]], blocksize=config.get("blocksize", 0))
            rest = rest[1:]
        if rest not in ([], ["crc32c"]):
            return None
        return cls(array.path, tuple(array.chunks),
                   array.dtype.newbyteorder("<"), array.fill_value, blosc, bool(rest),
                   encoding.get("configuration", {}).get("separator", "/"))

    def key(self, index: tuple[int, ...]) -> str:
        """The chunk's key relative to the array's folder (zarr's default encoding)."""
        return self.separator.join(map(str, ("c", *index)))

    def inner_indices(self, inner: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Chunk indices along every axis but the first, for rows of shape `inner`."""
        counts = [math.ceil(n / c) for n, c in zip(inner, self.chunks[1:])]
        return list(itertools.product(*(range(c) for c in counts)))

    def region(self, index: tuple[int, ...], inner: tuple[int, ...]) -> tuple[slice, ...]:
        """The part of rows of shape `inner` that chunk `index` (axes after the first) covers."""
        return tuple(slice(i * c, min((i + 1) * c, n))
                     for i, c, n in zip(index, self.chunks[1:], inner))

    def encode(self, chunk: np.ndarray) -> tuple[np.ndarray, bytes]:
        """A whole chunk's encoded bytes and its checksum trailer (b"" without crc32c)."""
        data: Any = chunk.reshape(-1).view(np.uint8)
        if self.blosc is not None:
            data = np.frombuffer(self.blosc.encode(chunk), dtype=np.uint8)
        trailer = (int(google_crc32c.value(data)).to_bytes(CHECKSUM_BYTES, "little")
                   if self.checksum else b"")
        return data, trailer

    def decode(self, data: bytes) -> np.ndarray:
        """A stored chunk's values in the chunk's shape; ValueError when it fails its checksum
        or does not decode to exactly one chunk."""
        if self.checksum:
            if len(data) < CHECKSUM_BYTES:
                raise ValueError("the chunk is shorter than its checksum")
            data, stored = data[:-CHECKSUM_BYTES], data[-CHECKSUM_BYTES:]
            if int(google_crc32c.value(data)).to_bytes(CHECKSUM_BYTES, "little") != stored:
                raise ValueError("the chunk fails its CRC32C checksum")
        raw = self.blosc.decode(data) if self.blosc is not None else data
        expected = math.prod(self.chunks) * self.dtype.itemsize
        if len(raw) != expected:
            raise ValueError(f"the chunk decodes to {len(raw)} bytes, not {expected}")
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.chunks)
