"""The recorder writes whole Zarr chunks itself and the analyzer decodes them itself: plain
zarr must read them back exactly, and the analyzer's reader must equal zarr's on any rows, for
every codec attrib writes, uneven edge chunks and a short last block; blocks of steps are sized
so that large arrays get chunks deeper than one step."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from attrib.analyzer.guarded_store import GuardedStore, chunk_files
from attrib.recorder import store as store_module
from attrib.recorder.store import (
    BLOCK_TARGET_BYTES,
    MAX_STEPS_PER_CHUNK,
    ArraySpec,
    Codec,
    Codecs,
    RunStore,
    block_steps,
    chunk_shape,
)
from attrib.schemas.chunk_layout import PlainLayout

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
    guarded = GuardedStore(tmp_path / "store.zarr")
    for path in written:  # the analyzer's reader, against zarr's
        array = group[path]
        layout = PlainLayout.of(array)
        assert layout is not None and layout.checksum == codec.checksum
        for first, stop in [(0, 8), (1, 2), (2, 7), (5, 8), (3, 3), (7, 8)]:
            direct = guarded.read_rows(layout, tuple(array.shape[1:]), first, stop)
            np.testing.assert_array_equal(direct, array[first:stop])
            assert direct.dtype == array.dtype
    written = chunk_files(tmp_path / "store.zarr")
    assert written and not [f for f in written if f.name.endswith(".partial")]


@pytest.mark.parametrize("codec", [Codec(), Codec("lz4", 1, "bitshuffle")],
                         ids=["none", "lz4"])
def test_the_direct_reader_refuses_a_damaged_chunk(tmp_path, codec):
    """A flipped byte fails the CRC32C; a chunk that decodes to the wrong size is refused."""
    store = RunStore(tmp_path, {}, [], Codecs.of(codec))
    store.create_step_arrays([ArraySpec("grads/w", (4, 2), "float32")], 4, {})
    store.append_steps(0, {"grads/w": np.ones((4, 4, 2), "f4")})
    array = zarr.open_array(tmp_path / "store.zarr/grads/w", mode="r")
    layout = PlainLayout.of(array)
    chunk = next(f for f in chunk_files(tmp_path / "store.zarr"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(ValueError, match="checksum"):
        layout.decode(bytes(data))
    unchecked = PlainLayout(layout.path, layout.chunks, layout.dtype, layout.fill,
                            None, False, layout.separator)
    with pytest.raises(ValueError, match="decodes to"):
        unchecked.decode(b"\0" * 12)


def test_a_block_starting_mid_chunk_goes_through_zarr(tmp_path):
    store = RunStore(tmp_path, {}, [], Codecs())
    store.create_step_arrays([ArraySpec("grads/w", (4, 2), "float32")], 4, {})
    first = np.ones((4, 4, 2), "f4")
    store.append_steps(0, {"grads/w": first})
    store.append_steps(2, {"grads/w": 2 * first[:2]})  # a resume cut the run at step 2
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "store.zarr/grads/w")[:4],
                                  np.concatenate([first[:2], 2 * first[:2]]))


def _chunk_sizes(store_dir) -> int:
    return sum(f.stat().st_size for f in chunk_files(store_dir))


def test_append_steps_returns_the_bytes_its_chunks_take(tmp_path):
    """bytes_written per step comes from what the writes returned, not from walking the
    store: the fast path's and zarr's (a block starting mid-chunk) both match the disk."""
    store = RunStore(tmp_path, {}, [], Codecs(per_example=Codec()))
    store.create_step_arrays([ArraySpec("grads/w", (4, 2), "float32"),
                              ArraySpec("contrib/w", (3, 4, 2), "float32")], 4, {})
    rng = np.random.default_rng(0)
    values = {"grads/w": rng.standard_normal((4, 4, 2)).astype("f4"),
              "contrib/w": rng.standard_normal((4, 3, 4, 2)).astype("f4")}
    assert store.append_steps(0, values) == _chunk_sizes(tmp_path / "store.zarr")
    before = {f: f.stat().st_size for f in (tmp_path / "store.zarr").rglob("c.*")}
    rewritten = store.append_steps(2, {p: v[:2] for p, v in values.items()})  # through zarr
    assert rewritten == _chunk_sizes(tmp_path / "store.zarr") and rewritten > 0
    assert set(before) == set((tmp_path / "store.zarr").rglob("c.*"))  # same chunk files


@pytest.mark.parametrize("separator", [".", "/"])
def test_a_cut_deletes_the_chunks_past_it_in_either_key_layout(tmp_path, separator,
                                                              monkeypatch):
    """Runs before 2026-12-01 keep chunks in c/<i>/… folders, later ones as c.<i>.… files: a
    resume or the close's trim removes the chunks wholly past the cut in both."""
    monkeypatch.setattr(store_module, "CHUNK_KEYS", {"name": "default", "separator": separator})
    store = RunStore(tmp_path, {}, [], Codecs())
    store.create_step_arrays([ArraySpec("grads/w", (4, 2), "float32")], 2, {})
    store.append_steps(0, {"grads/w": np.ones((6, 4, 2), "f4")})
    store.manifest["committed_steps"] = 3
    store.trim()
    array = zarr.open_array(tmp_path / "store.zarr/grads/w")
    assert array.shape == (3, 4, 2) and array.metadata.chunk_key_encoding.separator == separator
    keys = sorted(f.relative_to(tmp_path / "store.zarr/grads/w").as_posix()
                  for f in (tmp_path / "store.zarr/grads/w").rglob("*")
                  if f.is_file() and f.name != "zarr.json")
    assert keys == ([f"c{separator}{i}{separator}0{separator}0" for i in (0, 1)])
    np.testing.assert_array_equal(array[:], np.ones((3, 4, 2), "f4"))


def test_bytes_of_a_ranks_rows_leave_out_other_ranks_chunks(tmp_path):
    """A distributed rank writes its example rows through zarr; the bytes it reports are of
    its own chunks along the example axis, whether or not another rank wrote first."""
    store = RunStore(tmp_path, {}, [], Codecs())
    store.create_step_arrays([ArraySpec("contrib/w", (6, 5), "float32")], 2, {}, rank_rows=3)
    rows = np.ones((2, 3, 5), "f4")
    store.example_rows = slice(3, 6)
    other = store.append_steps(0, {"contrib/w": rows})  # rank 1 first
    store.example_rows = slice(0, 3)
    own = store.append_steps(0, {"contrib/w": rows})
    assert own == other == _chunk_sizes(tmp_path / "store.zarr") // 2


def test_a_cut_removes_what_a_killed_zarr_write_left(tmp_path):
    """zarr writes through c.<uuid>.partial beside a 1-d array's chunks; one left by a kill
    is debris that the next cut removes, with the chunks past it."""
    store = RunStore(tmp_path, {}, [], Codecs())
    store.create_step_arrays([ArraySpec("loss", (), "float32")], 2, {})
    store.append_steps(0, {"loss": np.ones(4, "f4")})
    folder = tmp_path / "store.zarr" / "loss"
    (folder / "c.1f0e2d.partial").write_bytes(b"half")
    store.manifest["committed_steps"] = 2
    store.trim()
    assert sorted(f.name for f in folder.iterdir()) == ["c.0", "zarr.json"]


@pytest.mark.parametrize("step_bytes", [1, 1000, 700_000, 1 << 20, 2_350_000, 8_700_000,
                                        30 << 20, 100 << 20])
def test_blocks_have_a_count_of_steps_whose_divisors_fit_large_arrays(step_bytes):
    depth = block_steps(step_bytes)
    limit = max(1, min(MAX_STEPS_PER_CHUNK, BLOCK_TARGET_BYTES // step_bytes))
    assert 1 <= depth <= limit and depth > limit // 2  # at most half the budget given up
    odd = depth
    while odd % 2 == 0:
        odd //= 2
    assert odd in (1, 3)  # 2^k or 3·2^k: never a prime like 29
    # the MLP's 784 × 256 weight gradient (784 KiB a step) then takes chunks ≥ 2 steps deep
    # whenever the block has more than 4 steps (a prime block of 29 had given it 1-step chunks)
    if depth > 4:
        assert chunk_shape((784, 256), 4, depth)[0] >= 2
