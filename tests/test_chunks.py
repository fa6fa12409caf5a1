"""The recorder writes whole Zarr chunks itself: plain zarr must read them back exactly, for
every codec attrib writes, uneven edge chunks and a short last block."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from attrib.recorder.store import ArraySpec, Codec, Codecs, RunStore

CODECS = [Codec(), Codec(checksum=False), Codec("lz4", 1, "noshuffle"), Codec("none"),
          Codec("none", checksum=False)]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.cname}-{c.checksum}")
def test_directly_written_chunks_read_back_with_plain_zarr(tmp_path, codec, monkeypatch):
    monkeypatch.setattr("attrib.recorder.store.CHUNK_TARGET_BYTES", 4 * 7 * 4)  # 4 rows of w
    specs = [ArraySpec("grads/w", (10, 7), "float32"), ArraySpec("grads/b", (10,), "float64"),
             ArraySpec("active", (3,), "bool", False), ArraySpec("contrib/w", (5, 10, 7),
                                                                 "float32")]
    store = RunStore(tmp_path, {}, [], Codecs.of(codec))
    store.create_step_arrays(specs, 3, {})
    rng = np.random.default_rng(0)
    written = {s.path: rng.standard_normal((8, *s.step_shape)).astype(s.dtype) for s in specs}
    for first in (0, 3, 6):  # blocks of 3, 3 and a short last one of 2
        store.append_steps(first, {p: v[first:first + 3] for p, v in written.items()})
    store.manifest["committed_steps"] = 8
    store.trim()
    group = zarr.open_group(tmp_path / "store.zarr", mode="r")
    assert group["grads/w"].chunks == (1, 4, 7)  # a step's 10 rows in 3 chunks, the last padded
    assert group["active"].chunks == (3, 3)  # small: whole blocks, the short last one padded
    for path, value in written.items():
        np.testing.assert_array_equal(group[path][:], value)
    chunk_files = [f for f in (tmp_path / "store.zarr").rglob("*") if f.is_file()
                   and "c" in f.relative_to(tmp_path / "store.zarr").parts]
    assert chunk_files and not [f for f in chunk_files if f.name.endswith(".partial")]


def test_a_block_starting_mid_chunk_goes_through_zarr(tmp_path):
    store = RunStore(tmp_path, {}, [], Codecs())
    store.create_step_arrays([ArraySpec("grads/w", (4, 2), "float32")], 4, {})
    first = np.ones((4, 4, 2), "f4")
    store.append_steps(0, {"grads/w": first})
    store.append_steps(2, {"grads/w": 2 * first[:2]})  # a resume cut the run at step 2
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "store.zarr/grads/w")[:4],
                                  np.concatenate([first[:2], 2 * first[:2]]))
