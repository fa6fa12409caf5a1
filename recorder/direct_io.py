"""Chunk files written past the page cache (O_DIRECT), where that costs no copy.

Copying into the page cache was the trajectory writer's main CPU cost, paid on the cores that
train: on the 2-core development VM a buffered write of 31 MB took 100–160 ms of CPU
(0.2–0.3 GB/s), the same bytes with O_DIRECT 8–12 ms of CPU and 34 ms of wall time, the device
doing the copy (2026-12-01). O_DIRECT wants the memory address, length and file offset aligned
to the device's block size, so a file is written as its aligned prefix straight from the
caller's buffer, when that starts aligned (the recorder's block buffers do: `aligned_zeros`),
and its last partial block (plus a checksum trailer) buffered on the same file descriptor.
Everything else is written buffered: small files, sources that don't start aligned (a Blosc
frame; copying them into an aligned buffer first saved little CPU and cost wall time), file
systems that refuse O_DIRECT (remembered per device), and every file when the environment sets
ATTRIB_DIRECT_IO=0 (a network file system, where each direct write is a round trip).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: no O_DIRECT either
    fcntl = None

ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks
DIRECT_MIN_BYTES = 1 << 16  # below this a buffered write costs less than the extra syscalls
REFUSALS = (errno.EINVAL, errno.EOPNOTSUPP)  # how a file system says it has no O_DIRECT
_O_DIRECT = (getattr(os, "O_DIRECT", 0) if fcntl is not None
             and os.environ.get("ATTRIB_DIRECT_IO", "1") != "0" else 0)

_refused: set[int] = set()  # st_dev of file systems that refused O_DIRECT


def aligned_zeros(shape: tuple[int, ...], dtype: torch.dtype, pin_memory: bool = False
                  ) -> torch.Tensor:
    """A zeroed tensor whose first byte is ALIGN-aligned, so whole chunks cut from its start
    can go to the device without a copy. torch aligns CPU memory to 64 bytes only; pinned
    memory starts page-aligned and is taken as is (its allocator rounds requests up to a power
    of two, so padding it could double it)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin_memory) if pin_memory else None
    if raw is None or raw.data_ptr() % ALIGN:
        raw = torch.zeros(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin_memory)
    start = -raw.data_ptr() % ALIGN
    return raw[start:start + nbytes].view(dtype).view(shape)


def write_file(path: Path, data: np.ndarray, trailer: bytes = b"") -> None:
    """Create (or replace) `path` holding the bytes of `data` (C-contiguous), then `trailer`."""
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    whole = data.nbytes - data.nbytes % ALIGN
    if (not _O_DIRECT or data.nbytes < DIRECT_MIN_BYTES or data.ctypes.data % ALIGN
            or (_refused and _device(path) in _refused)):
        _write_buffered(path, data, trailer)
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o666)
    except OSError as e:
        if e.errno not in REFUSALS:
            raise
        _refused.add(_device(path))
        _write_buffered(path, data, trailer)
        return
    try:
        try:
            _write_all(fd, memoryview(data[:whole]))
        except OSError as e:  # alignment stricter than ALIGN: start over, buffered
            if e.errno not in REFUSALS:
                raise
            _refused.add(_device(path))
            whole = 0
            os.lseek(fd, 0, os.SEEK_SET)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
        _write_all(fd, memoryview(data[whole:]))
        _write_all(fd, memoryview(trailer))
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:
        data = data[os.write(fd, data):]


def _write_buffered(path: Path, data: np.ndarray, trailer: bytes) -> None:
    with open(path, "wb", buffering=0) as f:
        _write_all(f.fileno(), memoryview(data))
        _write_all(f.fileno(), memoryview(trailer))


def _device(path: Path) -> int:
    return os.stat(path.parent).st_dev
