"""Zarr array metadata documents (each array's zarr.json), built by zarr, written here.

zarr's LocalStore creates or resizes an array through several awaited file operations each
(existence checks, folder creation, the write); for the ~110 arrays of a small transformer
that took ~200 ms when the run opened, ~80 ms at the first step and again at close (profiled
2026-11-30): a fixed cost that dominates the recording overhead of short runs and small models.
Here zarr still builds every document (in a MemoryStore, so the format stays exactly what zarr
writes and reads), and the recorder puts the documents on disk in one pass, each through a
temporary file and a rename so a reader never sees half a document.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import zarr
import zarr.api.asynchronous as zarr_async
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore, StorePath

from attrib.schemas import format as fmt

ROOT_DOC = "zarr.json"  # the root group's document: the store's own, never rewritten here


def create_arrays(store_path: StorePath, arrays: list[dict[str, Any]]) -> list[zarr.Array]:
    """Create arrays under the store of `store_path` (a local folder); each item holds
    zarr.create_array's keywords (name, shape, dtype, chunks, fill_value, compressors). The
    missing parent groups are created too; returns the arrays, bound to the local store."""
    documents: dict[str, Any] = {}
    memory = MemoryStore(store_dict=documents)

    async def run() -> list:
        return await asyncio.gather(*(zarr_async.create_array(store=memory, zarr_format=3,
                                                              **array) for array in arrays))

    created = sync(run())
    root = _folder(store_path)
    names = {a["name"] for a in arrays}
    for key, buffer in documents.items():
        node = key.rpartition("/")[0]
        # a parent group that exists keeps its document (and whatever attributes it holds)
        if key != ROOT_DOC and (node in names or not (root / key).exists()):
            _write(root / key, buffer.to_bytes())
    return [writable(zarr.Array(zarr.AsyncArray(metadata=a.metadata,
                                                store_path=StorePath(store_path.store, a.path))))
            for a in created]


def writable(array: zarr.Array) -> zarr.Array:
    """The array as the recorder writes it: with zarr's write_empty_chunks on, so a chunk
    whose values all equal the fill value is still stored and a missing chunk always means
    damage (the reader refuses one; recorder/chunks.py writes every chunk anyway)."""
    return zarr.Array(zarr.AsyncArray(metadata=array.metadata,
                                      store_path=array.async_array.store_path,
                                      config={"write_empty_chunks": True}))


def resize(arrays: list[tuple[zarr.Array, tuple[int, ...]]]) -> None:
    """Give each array its new shape: its zarr.json rewritten, its chunks left as they are
    (a caller that shrinks an array deletes the chunks past the cut itself)."""
    prototype = default_buffer_prototype()
    for array, shape in arrays:
        metadata = array.metadata.update_shape(shape)
        folder = _folder(array.async_array.store_path)
        for key, buffer in metadata.to_buffer_dict(prototype).items():
            _write(folder / key, buffer.to_bytes())
        # as zarr's own AsyncArray.resize does once the document is written
        object.__setattr__(array.async_array, "metadata", metadata)


def _folder(store_path: StorePath) -> Path:
    root = Path(store_path.store.root)
    return root / store_path.path if store_path.path else root


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt.write_bytes_atomic(path, data, durable=False)  # as zarr's own store: no fsync
