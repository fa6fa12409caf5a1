"""Chunk files written past the page cache hold exactly the bytes given, whatever the source's
alignment and length, and fall back to buffered writes where O_DIRECT is refused."""

from __future__ import annotations

import errno
import fcntl
import os

import numpy as np
import pytest
import torch

from attrib.recorder import direct_io
from attrib.recorder.direct_io import ALIGN

pytestmark = pytest.mark.skipif(not getattr(os, "O_DIRECT", 0), reason="no O_DIRECT here")


@pytest.fixture
def opened(monkeypatch):
    """The flags of every file direct_io opens."""
    flags: list[int] = []
    real = os.open

    def spy(path, mode, *args):
        flags.append(mode)
        return real(path, mode, *args)

    monkeypatch.setattr(direct_io, "_refused", set())
    monkeypatch.setattr(os, "open", spy)
    return flags


def _source(nbytes: int, offset: int) -> np.ndarray:
    """`nbytes` random bytes starting `offset` bytes past an ALIGN boundary."""
    buffer = direct_io.aligned_zeros((nbytes + offset,), torch.uint8).numpy()
    buffer[:] = np.random.default_rng(nbytes + offset).integers(0, 256, buffer.size)
    return buffer[offset:]


@pytest.mark.parametrize("offset", [0, 8, 1000])
@pytest.mark.parametrize("extra", [0, 1, ALIGN - 1])
def test_large_files_go_direct_and_hold_their_bytes(tmp_path, opened, offset, extra):
    data = _source(direct_io.DIRECT_MIN_BYTES + 3 * ALIGN + extra, offset)
    direct_io.write_file(tmp_path / "c", data, b"\x01\x02\x03\x04")
    assert (tmp_path / "c").read_bytes() == data.tobytes() + b"\x01\x02\x03\x04"
    assert opened[-1] & os.O_DIRECT


def test_an_unaligned_source_longer_than_the_staging_buffer(tmp_path, opened, monkeypatch):
    monkeypatch.setattr(direct_io, "STAGE_BYTES", 2 * ALIGN)
    data = _source(direct_io.DIRECT_MIN_BYTES + 5 * ALIGN + 123, 24)
    direct_io.write_file(tmp_path / "c", data)
    assert (tmp_path / "c").read_bytes() == data.tobytes()
    assert opened[-1] & os.O_DIRECT


def test_small_files_are_written_buffered(tmp_path, opened):
    for n in (0, 5, direct_io.DIRECT_MIN_BYTES - 1):
        data = _source(n, 0)
        direct_io.write_file(tmp_path / f"c{n}", data, b"ab")
        assert (tmp_path / f"c{n}").read_bytes() == data.tobytes() + b"ab"
    assert not any(f & os.O_DIRECT for f in opened)


def test_a_file_system_refusing_o_direct_is_written_buffered(tmp_path, opened, monkeypatch):
    real = os.open

    def refusing(path, mode, *args):
        if mode & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, mode, *args)

    monkeypatch.setattr(os, "open", refusing)
    data = _source(direct_io.DIRECT_MIN_BYTES + 7, 0)
    direct_io.write_file(tmp_path / "a", data, b"xy")
    monkeypatch.setattr(os, "open", real)
    direct_io.write_file(tmp_path / "b", data, b"xy")  # remembered: no second attempt
    for name in ("a", "b"):
        assert (tmp_path / name).read_bytes() == data.tobytes() + b"xy"
    assert os.stat(tmp_path).st_dev in direct_io._refused


def test_a_direct_write_refused_midway_is_rewritten_buffered(tmp_path, opened, monkeypatch):
    """Stricter alignment than ALIGN shows as EINVAL from write(), not open()."""
    real = os.write

    def strict(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)

    monkeypatch.setattr(os, "write", strict)
    data = _source(direct_io.DIRECT_MIN_BYTES + ALIGN + 3, 0)
    direct_io.write_file(tmp_path / "c", data, b"t")
    assert (tmp_path / "c").read_bytes() == data.tobytes() + b"t"


def test_aligned_zeros():
    for dtype, shape in ((torch.float32, (9, 256, 256)), (torch.int16, (3, 5)),
                         (torch.float64, (0, 4))):
        t = direct_io.aligned_zeros(shape, dtype)
        assert t.data_ptr() % ALIGN == 0 and t.shape == shape and t.dtype == dtype
        assert t.is_contiguous() and not t.any()
