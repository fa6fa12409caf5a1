"""Chunk files written past the page cache (O_DIRECT), where the file system allows it.

Copying into the page cache was the trajectory writer's main CPU cost, paid on the cores that
train: on the 2-core development VM a buffered write of 31 MB took 100–160 ms of CPU
(0.2–0.3 GB/s), the same bytes with O_DIRECT 8–12 ms of CPU and 34 ms of wall time, the device
doing the copy (2026-12-01). O_DIRECT wants the memory address, length and file offset aligned
to the device's block size, so a file is written as its aligned prefix straight from the
caller's buffer (when that starts aligned, as the recorder's block buffers do: `aligned_zeros`)
or through a small aligned staging buffer, and the last partial block (plus a checksum
trailer) is written buffered on the same file descriptor. A file system that refuses O_DIRECT
(EINVAL) is written buffered from then on; small files always are.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from pathlib import Path

import numpy as np
import torch

ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks
DIRECT_MIN_BYTES = 1 << 16  # below this a buffered write costs less than the extra syscalls
STAGE_BYTES = 8 << 20  # per writing thread, for sources that don't start aligned
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # absent on macOS and Windows: buffered writes

_refused: set[int] = set()  # st_dev of file systems that refused O_DIRECT
_local = threading.local()


def aligned_zeros(shape: tuple[int, ...], dtype: torch.dtype, pin_memory: bool = False
                  ) -> torch.Tensor:
    """A zeroed tensor whose first byte is ALIGN-aligned, so whole chunks cut from its start
    can go to the device without a copy (torch itself aligns to 64 bytes)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin_memory)
    start = -raw.data_ptr() % ALIGN
    return raw[start:start + nbytes].view(dtype).view(shape)


def write_file(path: Path, data: np.ndarray, trailer: bytes = b"") -> None:
    """Create (or replace) `path` holding `data`'s bytes (1-D, C-contiguous uint8) then
    `trailer`."""
    if not _O_DIRECT or data.nbytes < DIRECT_MIN_BYTES or (_refused
                                                            and _device(path) in _refused):
        _write_buffered(path, data, trailer)
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o644)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        _refused.add(_device(path))
        _write_buffered(path, data, trailer)
        return
    try:
        try:
            done = _write_aligned(fd, data)
        except OSError as e:  # alignment stricter than ALIGN: start over, buffered
            if e.errno != errno.EINVAL:
                raise
            _refused.add(_device(path))
            done = 0
            os.lseek(fd, 0, os.SEEK_SET)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
        _write_all(fd, memoryview(data[done:]))
        _write_all(fd, memoryview(trailer))
    finally:
        os.close(fd)


def _write_aligned(fd: int, data: np.ndarray) -> int:
    """Write the longest ALIGN-multiple prefix of `data` with O_DIRECT; returns its length."""
    whole = data.nbytes - data.nbytes % ALIGN
    if data.ctypes.data % ALIGN == 0:
        _write_all(fd, memoryview(data[:whole]))
        return whole
    stage = _stage()
    done = 0
    while done < whole:
        piece = min(stage.nbytes, whole - done)
        stage[:piece] = data[done:done + piece]
        _write_all(fd, memoryview(stage[:piece]))
        done += piece
    return whole


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:
        data = data[os.write(fd, data):]


def _write_buffered(path: Path, data: np.ndarray, trailer: bytes) -> None:
    with open(path, "wb", buffering=0) as f:
        _write_all(f.fileno(), memoryview(data))
        _write_all(f.fileno(), memoryview(trailer))


def _stage() -> np.ndarray:
    """This thread's page-aligned staging buffer (anonymous mmap)."""
    if getattr(_local, "stage", None) is None or _local.stage.nbytes != STAGE_BYTES:
        _local.stage = np.frombuffer(mmap.mmap(-1, STAGE_BYTES), dtype=np.uint8)
    return _local.stage


def _device(path: Path) -> int:
    return os.stat(path.parent).st_dev
