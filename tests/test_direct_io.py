"""Chunk files written past the page cache hold exactly the bytes given, whatever the source's
alignment, length and dtype; only sources that start aligned go direct, and O_DIRECT falls back
to buffered writes where it is refused or turned off."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import OPTIMIZERS, mlp, train

import attrib
from attrib.analyzer.guarded_store import chunk_files
from attrib.analyzer.verify import verify
from attrib.recorder import direct_io
from attrib.recorder.direct_io import ALIGN

pytestmark = pytest.mark.skipif(not getattr(os, "O_DIRECT", 0), reason="no O_DIRECT here")


@pytest.fixture
def opened(monkeypatch):
    """The flags of every file direct_io opens."""
    flags: list[int] = []
    real = os.open

    def spy(path, mode, *args, **kwargs):
        flags.append(mode)
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(direct_io, "_refused", set())
    monkeypatch.setattr(os, "open", spy)
    return flags


def _source(nbytes: int, offset: int) -> np.ndarray:
    """`nbytes` random bytes starting `offset` bytes past an ALIGN boundary."""
    buffer = direct_io.aligned_zeros((nbytes + offset,), torch.uint8).numpy()
    buffer[:] = np.random.default_rng(nbytes + offset).integers(0, 256, buffer.size)
    return buffer[offset:]


@pytest.mark.parametrize("extra", [0, 1, ALIGN - 1])
def test_large_aligned_files_go_direct_and_hold_their_bytes(tmp_path, opened, extra):
    data = _source(direct_io.DIRECT_MIN_BYTES + 3 * ALIGN + extra, 0)
    direct_io.write_file(tmp_path / "c", data, b"\x01\x02\x03\x04")
    assert (tmp_path / "c").read_bytes() == data.tobytes() + b"\x01\x02\x03\x04"
    assert opened[-1] & os.O_DIRECT


@pytest.mark.parametrize("offset", [8, 1000])
def test_an_unaligned_source_is_written_buffered(tmp_path, opened, offset):
    data = _source(direct_io.DIRECT_MIN_BYTES + 5 * ALIGN + 123, offset)
    direct_io.write_file(tmp_path / "c", data, b"t")
    assert (tmp_path / "c").read_bytes() == data.tobytes() + b"t"
    assert not any(f & os.O_DIRECT for f in opened)


def test_any_dtype_is_written_as_its_bytes(tmp_path, opened):
    values = direct_io.aligned_zeros((3, direct_io.DIRECT_MIN_BYTES // 4 + 5), torch.float32)
    values[:] = torch.randn(values.shape, generator=torch.Generator().manual_seed(0))
    direct_io.write_file(tmp_path / "c", values.numpy())
    assert (tmp_path / "c").read_bytes() == values.numpy().tobytes()
    assert opened[-1] & os.O_DIRECT


def test_small_files_are_written_buffered(tmp_path, opened):
    for n in (0, 5, direct_io.DIRECT_MIN_BYTES - 1):
        data = _source(n, 0)
        direct_io.write_file(tmp_path / f"c{n}", data, b"ab")
        assert (tmp_path / f"c{n}").read_bytes() == data.tobytes() + b"ab"
    assert not any(f & os.O_DIRECT for f in opened)


@pytest.mark.parametrize("refusal", [errno.EINVAL, errno.EOPNOTSUPP])
def test_a_file_system_refusing_o_direct_is_written_buffered(tmp_path, opened, monkeypatch,
                                                             refusal):
    real = os.open

    def refusing(path, mode, *args, **kwargs):
        if mode & os.O_DIRECT:
            raise OSError(refusal, os.strerror(refusal))
        return real(path, mode, *args, **kwargs)

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


def test_a_recording_written_direct_equals_one_written_buffered(tmp_path, monkeypatch):
    """Every chunk that starts aligned (each array's first of a block) goes direct, however
    small: the run's chunk files equal those of the same training written buffered, and the
    run verifies."""
    directs = []
    real = os.open

    def spy(path, mode, *args, **kwargs):
        directs.append(bool(mode & os.O_DIRECT))
        return real(path, mode, *args, **kwargs)

    def record(path, direct: bool) -> dict[str, bytes]:
        with monkeypatch.context() as m:
            m.setattr(direct_io, "DIRECT_MIN_BYTES", 0)
            m.setattr(direct_io, "_refused", set())
            m.setattr(os, "open", spy)
            if not direct:
                m.setattr(direct_io, "_O_DIRECT", 0)
            model = mlp()
            train(path, model, OPTIMIZERS["adamw"](model.parameters()), steps=11,
                  capture=attrib.Full())
        store = path / "store.zarr"
        return {str(f.relative_to(store)): f.read_bytes() for f in chunk_files(store)}

    direct = record(tmp_path / "direct", True)
    assert any(directs)
    directs.clear()
    assert direct == record(tmp_path / "buffered", False) and not any(directs)
    assert not [r for r in verify(tmp_path / "direct").to_pylist() if not r["ok"]]


def test_the_environment_can_turn_o_direct_off():
    code = "from attrib.recorder import direct_io; print(direct_io._O_DIRECT)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "ATTRIB_DIRECT_IO": "0"}, check=True).stdout
    assert out.strip() == "0"


def test_aligned_zeros():
    for dtype, shape in ((torch.float32, (9, 256, 256)), (torch.int16, (3, 5)),
                         (torch.float64, (0, 4))):
        t = direct_io.aligned_zeros(shape, dtype)
        assert t.data_ptr() % ALIGN == 0 and t.shape == shape and t.dtype == dtype
        assert t.is_contiguous() and not t.any()
