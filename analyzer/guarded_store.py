"""The Zarr store a run is read through: zarr's LocalStore with the checks an untrusted run
needs before any byte is decoded.

A run is data someone else may have written (a shared folder, a downloaded archive), so a read
may not follow a symlink out of the run or to another run's chunk, may not read a file larger
than the array's declared chunk could encode to (a device such as /dev/zero, a padded file), and
may not let a codec expand a few bytes into gigabytes (a Blosc header declaring more bytes than
the chunk holds). Each refusal is a FormatError naming the file, never its contents.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from attrib.schemas import format as fmt
from attrib.schemas.chunk_layout import PlainLayout

DOCUMENT_LIMIT = 1 << 20  # bytes of one array's zarr.json (attrib's are ~1 KB)
CHUNK_LIMIT = 1 << 30  # decoded bytes of one chunk (attrib writes blocks of ~64 MiB)
BLOSC_OVERHEAD = 16  # Blosc's header: a chunk encodes to at most its size plus this
BLOSC_MEMCPYED = 0x2  # the header's flag for a frame that holds the chunk uncompressed
CHECKSUM_BYTES = 4  # the CRC32C codec's trailer


@dataclass(frozen=True)
class ChunkLayout:
    """What an array's zarr.json declares about its chunks, as far as reading needs."""

    raw_bytes: int  # one decoded chunk
    blosc: bool
    checksum: bool

    @property
    def max_file_bytes(self) -> int:
        return self.raw_bytes + (BLOSC_OVERHEAD if self.blosc else 0) + (
            CHECKSUM_BYTES if self.checksum else 0)


class GuardedStore(LocalStore):
    """A read-only LocalStore over a run's store.zarr that refuses symlinks, files larger than
    their array's chunks and Blosc headers that declare more than a chunk (see the module
    docstring). A missing chunk still reads as None here (zarr's fill value): whether it may
    be missing depends on the run's steps, which Run checks."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, read_only=True)
        self._layouts: dict[str, ChunkLayout] = {}  # array path → layout, from its zarr.json
        self._checked: set[Path] = set()  # folders known not to be symlinks

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        prototype = prototype or default_buffer_prototype()
        if byte_range is not None:  # only sharded arrays ask for ranges; attrib reads none
            raise fmt.FormatError(f"{self.root / key}: a partial read was asked for; attrib "
                                  "runs hold no sharded arrays")
        data = self.read(key)
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Any) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    def read(self, key: str) -> bytes | None:
        """The bytes of `key`, checked; None when there is no such file."""
        path = Path(self.root) / key
        self._refuse_links(path.parent)
        array = chunk_owner(key)
        layout = self._layout(key, array) if array is not None else None
        limit = DOCUMENT_LIMIT if layout is None else layout.max_file_bytes
        data = fmt.read_untrusted(path, limit)
        if data is None:
            return None
        if len(data) > limit:
            raise fmt.FormatError(
                f"{path} holds over {limit} bytes, more than its array's declared chunk "
                f"encodes to ({limit}); the run is damaged or was edited")
        if layout is None:
            if key.rsplit("/", 1)[-1] == "zarr.json":
                self._note_layout(key, data, path)
        elif not layout.blosc and len(data) != limit:
            raise fmt.FormatError(  # an uncompressed chunk is stored whole
                f"{path} holds {len(data)} bytes where its array's uncompressed chunk takes "
                f"{limit}; the file is truncated or was edited")
        elif layout.blosc:
            self._check_blosc(layout, data, path)
        return data

    def read_rows(self, layout: PlainLayout, inner: tuple[int, ...], start: int, stop: int
                  ) -> np.ndarray:
        """Rows [start, stop) of an array in the plain layout (rows of shape `inner`), decoded
        here from the checked bytes of each chunk: zarr's pipeline would hand every read to
        its event loop and back (~1 ms). A missing chunk reads as the fill value, as in zarr
        (Run decides which chunks may be missing); a damaged one raises ValueError."""
        out = np.empty((stop - start, *inner), dtype=layout.dtype)
        depth = layout.chunks[0]
        for along in range(start // depth, -(-stop // depth)):
            first = along * depth
            rows = slice(max(start, first) - first, min(stop, first + depth) - first)
            into = slice(first + rows.start - start, first + rows.stop - start)
            for index in layout.inner_indices(inner):
                region = layout.region(index, inner)
                data = self.read(f"{layout.path}/{layout.key((along, *index))}")
                if data is None:
                    out[(into, *region)] = layout.fill
                    continue
                chunk = layout.decode(data)
                out[(into, *region)] = chunk[(rows, *(slice(0, r.stop - r.start)
                                                      for r in region))]
        return out

    def _refuse_links(self, folder: Path) -> None:
        """No symlinked folder between the store's root and `folder`."""
        root = Path(self.root)
        todo = []
        while folder not in self._checked and folder != root and root in folder.parents:
            todo.append(folder)
            folder = folder.parent
        for each in todo:
            if each.is_symlink():
                raise fmt.FormatError(f"{each} is a symbolic link; attrib reads no links "
                                      "inside a run (copy the folder in instead)")
        self._checked.update(todo)

    def _note_layout(self, key: str, data: bytes, path: Path) -> None:
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            return  # zarr reports an unreadable document itself
        if not isinstance(document, dict) or document.get("node_type") != "array":
            return
        encoding = document.get("chunk_key_encoding")
        if not isinstance(encoding, dict) or encoding.get("name") != "default":
            raise fmt.FormatError(f"{path} names chunk key encoding {encoding!r}; attrib writes "
                                  "and reads only zarr's default one")
        try:
            chunks = [int(n) for n in document["chunk_grid"]["configuration"]["chunk_shape"]]
            itemsize = np.dtype(document["data_type"]).itemsize
            names = [c.get("name") for c in document.get("codecs", [])]
        except (KeyError, TypeError, ValueError, AttributeError):
            return  # zarr refuses the document when it parses it
        if any(n < 1 for n in chunks):
            raise fmt.FormatError(f"{path} declares chunks {chunks}; the run is damaged or was "
                                  "edited")
        raw = math.prod(chunks) * itemsize
        if raw > CHUNK_LIMIT:
            raise fmt.FormatError(f"{path} declares chunks of {raw} bytes, more than attrib "
                                  f"reads ({CHUNK_LIMIT}); the run is damaged or was edited")
        self._layouts[key.rsplit("/", 1)[0]] = ChunkLayout(raw, "blosc" in names,
                                                           "crc32c" in names)

    def _layout(self, key: str, array: str) -> ChunkLayout:
        layout = self._layouts.get(array)
        if layout is None:  # a chunk of an array whose zarr.json was not read through here
            self.read(f"{array}/zarr.json")
            layout = self._layouts.get(array)
        if layout is None:
            raise fmt.FormatError(f"{Path(self.root) / key} is not a chunk of an array the "
                                  "store declares; the run is damaged or was edited")
        return layout

    def _check_blosc(self, layout: ChunkLayout, data: bytes, path: Path) -> None:
        """A Blosc frame's header must describe exactly this frame and one chunk: c-blosc
        allocates what bytes 4-8 (the decoded size) declare and reads as far as bytes 12-16
        (the frame's size) say, or, for a frame stored uncompressed (flag 0x2), the decoded
        size past the 16-byte header, before it checks anything else. A truncated frame whose
        header was kept would otherwise decode from memory past the file's bytes."""
        frame = data[:-CHECKSUM_BYTES] if layout.checksum else data
        whole = len(frame) >= BLOSC_OVERHEAD
        if whole:
            declared = int.from_bytes(frame[4:8], "little")
            stored = int.from_bytes(frame[12:16], "little")
            whole = (declared == layout.raw_bytes and stored == len(frame)
                     and (not frame[2] & BLOSC_MEMCPYED or declared + BLOSC_OVERHEAD == stored))
        if not whole:
            raise fmt.FormatError(f"{path} is not a Blosc frame of one chunk ({layout.raw_bytes} "
                                  f"bytes) stored whole ({len(frame)} bytes here); the run is "
                                  "damaged or was edited")


def chunk_files(root: Path) -> list[Path]:
    """The chunk files under a store folder (either chunk key layout), documents left out."""
    return [f for f in Path(root).rglob("*")
            if f.is_file() and chunk_owner(f.relative_to(root).as_posix()) is not None]


def chunk_owner(key: str) -> str | None:
    """The array a chunk key belongs to ("grads/w/c/0/1" → "grads/w"; "x/c" is a 0-d array's
    one chunk; the "." separator too), None for any other key (documents)."""
    head, tail = key.rsplit("/", 1) if "/" in key else ("", key)
    if tail == "c":
        return head
    for separator in ("/", "."):
        array, marker, indices = key.rpartition(f"/c{separator}")
        if marker and indices and all(i.isdigit() for i in indices.split(separator)):
            return array
    return None
