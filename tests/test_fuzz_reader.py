"""Fuzzing the reader (hypothesis): hand-edited metadata and damaged chunks or table parts give
a clear error or a failed `verify` check, never a crash deep inside a read or a silent
wrong number."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import mlp, train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attrib
from attrib.analyzer.guarded_store import chunk_owner
from attrib.analyzer.verify import verify
from attrib.schemas import format as fmt

# Errors that name the problem; anything else escaping a read is a defect.
CLEAR = (fmt.FormatError, KeyError, IndexError)
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3),
    max_leaves=6)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "run"
    model = mlp()
    train(path, model, torch.optim.AdamW(model.parameters(), lr=0.01), steps=8,
          checkpoint_every=4, steps_per_chunk=4, batch=8)
    return path


def damaged_copy(recorded: Path, where: Path) -> Path:
    path = where / "run"
    shutil.copytree(recorded, path)
    return path


def read_or_explain(path: Path) -> bool:
    """Open and read the run the way users do; returns whether every verify check passed.
    Reads may refuse with a clear error but must never raise anything else."""
    checks = verify(path)  # never raises: a damaged run is what it looks for
    sound = all(checks.column("ok").to_pylist())
    try:
        run = attrib.open_run(path)
    except fmt.FormatError as e:
        assert not sound and str(e)
        return sound
    for read in (run.info, lambda: run.reconstruct(run.n_steps), lambda: run.steps,
                 lambda: run.contributions(0),
                 lambda: attrib.sql(path, "SELECT count(*) FROM examples")):
        try:
            read()
        except CLEAR as e:
            assert str(e)
    return sound


@FUZZ
@given(document=st.sampled_from([fmt.META_FILE, fmt.MANIFEST_FILE]), data=st.data())
def test_hand_edited_metadata(recorded, document, data):
    with tempfile.TemporaryDirectory() as where:
        path = damaged_copy(recorded, Path(where))
        file = path / document
        text = file.read_text()
        content = json.loads(text)
        action = data.draw(st.sampled_from(["delete", "replace", "truncate"]))
        if action == "truncate":
            file.write_text(text[: data.draw(st.integers(0, len(text) - 1))])
        else:
            key = data.draw(st.sampled_from(sorted(content)))
            if action == "delete":
                del content[key]
            else:
                content[key] = data.draw(JSON)
            file.write_text(json.dumps(content))
        read_or_explain(path)


def stored_files(recorded: Path) -> list[str]:
    chunks = [f for f in (recorded / fmt.STORE_DIR).rglob("*")
              if f.is_file() and f.name != "zarr.json"]
    parts = list((recorded / fmt.TABLES_DIR).rglob("*.parquet"))
    return sorted(f.relative_to(recorded).as_posix() for f in chunks + parts)


@FUZZ
@given(data=st.data())
def test_damaged_chunks_and_table_parts(recorded, data):
    """Every chunk carries a CRC32C, so any change to one fails `verify`; a truncated or
    overwritten Parquet part does too."""
    with tempfile.TemporaryDirectory() as where:
        path = damaged_copy(recorded, Path(where))
        target = data.draw(st.sampled_from(stored_files(recorded)))
        file = path / target
        raw = bytearray(file.read_bytes())
        action = data.draw(st.sampled_from(["truncate", "flip", "garbage"]))
        if action == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        elif action == "flip":
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        else:
            raw = bytearray(data.draw(st.binary(min_size=1, max_size=64)))
        file.write_bytes(bytes(raw))
        sound = read_or_explain(path)
        if target.startswith(fmt.STORE_DIR) or action != "flip":
            assert not sound, (target, action)


@pytest.mark.parametrize("codec", [
    {"name": "numcodecs.pickle", "configuration": {}},  # not registered: zarr can't open it
    {"name": "sharding_indexed", "configuration": {}},  # registered, but not one attrib reads
])
def test_arrays_with_codecs_attrib_does_not_decode_are_refused(recorded, tmp_path, codec):
    """A run is data, never code: an array naming any codec outside the few attrib writes
    (pickle, were it ever registered) is refused before a chunk is decoded."""
    path = damaged_copy(recorded, tmp_path)
    key = attrib.open_run(path).params.column("key")[0].as_py()
    meta = path / fmt.STORE_DIR / fmt.GRADS / key / "zarr.json"
    document = json.loads(meta.read_text())
    document["codecs"].append(codec)
    meta.write_text(json.dumps(document))
    run = attrib.open_run(path)
    with pytest.raises(fmt.FormatError, match=r"can't be opened|does not decode"):
        run.grads(run.param_names[0])
    with pytest.raises(fmt.FormatError, match=r"can't be opened|does not decode"):
        run.deltas(run.param_names[0])  # the replay reads the gradients
    assert not read_or_explain(path)


def grad_chunk(path: Path) -> tuple[str, Path]:
    """The first parameter's name and its gradients' first chunk file."""
    run = attrib.open_run(path)
    key = run.params.column("key")[0].as_py()
    grads = path / fmt.STORE_DIR / fmt.GRADS
    return run.param_names[0], min(f for f in (grads / key).rglob("*") if f.is_file()
                                    and chunk_owner(f.relative_to(grads).as_posix()) == key)


def refuses(read, match: str) -> str:
    with pytest.raises(fmt.FormatError, match=match) as caught:
        read()
    return str(caught.value)


def test_a_deleted_chunk_is_damage_not_zeros(recorded, tmp_path):
    path = damaged_copy(recorded, tmp_path)
    name, chunk = grad_chunk(path)
    chunk.unlink()
    run = attrib.open_run(path)
    refuses(lambda: run.grads(name), "is missing")
    refuses(lambda: run.reconstruct(2), "is missing")  # replays steps 0 and 1
    checks = {r["check"]: r for r in verify(path).to_pylist()}
    assert not checks["chunks"]["ok"] and "missing" in checks["chunks"]["detail"]
    assert not read_or_explain(path)


@pytest.mark.parametrize("where", ["chunk", "folder", "manifest", "part"])
def test_symbolic_links_inside_a_run_are_refused_without_echoing_their_target(
        recorded, tmp_path, where):
    """A link to another run's chunk would verify and be read; a link to a secret would leak
    its last bytes through the checksum error. Links are refused, and no message quotes the
    bytes of the file they point to."""
    path = damaged_copy(recorded, tmp_path / "a")
    other = damaged_copy(recorded, tmp_path / "b")
    secret = tmp_path / "secret"
    secret.write_bytes(b"TOP-SECRET-VALUE" * 4)
    name, chunk = grad_chunk(path)
    if where == "chunk":
        chunk.unlink()
        chunk.symlink_to(secret)
    elif where == "folder":  # a chunk folder borrowed from another run
        folder = chunk.parent
        shutil.rmtree(folder)
        folder.symlink_to(other / folder.relative_to(path), target_is_directory=True)
    elif where == "manifest":
        (path / fmt.MANIFEST_FILE).unlink()
        (path / fmt.MANIFEST_FILE).symlink_to("/dev/zero")
    else:
        part = sorted((path / fmt.TABLES_DIR / "steps").glob("*.parquet"))[0]
        part.unlink()
        part.symlink_to(sorted((other / fmt.TABLES_DIR / "steps").glob("*.parquet"))[0])
    messages = [r["detail"] for r in verify(path).to_pylist()]
    assert not read_or_explain(path)
    if where in ("manifest", "part"):  # opening reads the steps table's row counts
        messages.append(refuses(lambda: attrib.open_run(path), "symbolic link"))
    else:
        run = attrib.open_run(path)
        messages.append(refuses(lambda: run.grads(name), "symbolic link"))
    assert not any("SECRET" in m or "\\x" in m for m in messages), messages


def test_bombs_are_refused_before_they_are_decoded(recorded, tmp_path):
    """A Blosc frame that declares more bytes than its chunk, a chunk file larger than its
    chunk can encode to, a gzip codec, JSON nested 10^5 deep, a Parquet part of more rows than
    the run could write, a zarr.json declaring 10^12 entries: each a FormatError naming the
    file, nothing decoded first."""
    import google_crc32c
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from numcodecs import Blosc

    def fresh(tag: str) -> tuple[Path, str, Path]:
        path = damaged_copy(recorded, tmp_path / tag)
        return (path, *grad_chunk(path))

    path, name, chunk = fresh("blosc")  # 16 MiB of zeros in under 2 KB, with a valid CRC
    meta = path / fmt.STORE_DIR / fmt.GRADS / chunk.relative_to(path).parts[2] / "zarr.json"
    document = json.loads(meta.read_text())  # a chain attrib writes: bytes, blosc, crc32c
    document["codecs"].insert(1, {"name": "blosc", "configuration": {
        "typesize": 4, "cname": "zstd", "clevel": 9, "shuffle": "noshuffle", "blocksize": 0}})
    meta.write_text(json.dumps(document))
    frame = Blosc(cname="zstd", clevel=9).encode(np.zeros(1 << 22, np.float32))
    assert len(frame) < chunk.stat().st_size
    chunk.write_bytes(frame + int(google_crc32c.value(frame)).to_bytes(4, "little"))
    refuses(lambda: attrib.open_run(path).grads(name), "not a Blosc frame of one chunk")
    assert not read_or_explain(path)

    path, name, chunk = fresh("truncated")  # no checksum, a frame that lost its tail: c-blosc
    meta = path / fmt.STORE_DIR / fmt.GRADS / chunk.relative_to(path).parts[2] / "zarr.json"
    document = json.loads(meta.read_text())  # would decode it from the memory past the bytes
    document["codecs"] = [document["codecs"][0], {"name": "blosc", "configuration": {
        "typesize": 4, "cname": "lz4", "clevel": 5, "shuffle": "noshuffle", "blocksize": 0}}]
    meta.write_text(json.dumps(document))
    values = np.frombuffer(chunk.read_bytes()[:-4], np.float32)  # the chunk, its CRC cut
    chunk.write_bytes(Blosc(cname="lz4", clevel=5).encode(values)[:-5])
    refuses(lambda: attrib.open_run(path).grads(name), "stored whole")
    chunk.write_bytes(Blosc(cname="lz4", clevel=5).encode(values)[:16])  # a header alone
    refuses(lambda: attrib.open_run(path).grads(name), "stored whole")
    assert not read_or_explain(path)

    path, name, chunk = fresh("large")
    chunk.write_bytes(chunk.read_bytes() * 100)
    refuses(lambda: attrib.open_run(path).grads(name), "more than its array's declared chunk")

    path, name, chunk = fresh("gzip")
    meta = path / fmt.STORE_DIR / fmt.GRADS / chunk.relative_to(path).parts[2] / "zarr.json"
    document = json.loads(meta.read_text())
    document["codecs"] = [document["codecs"][0], {"name": "gzip", "configuration": {"level": 1}}]
    meta.write_text(json.dumps(document))
    refuses(lambda: attrib.open_run(path).grads(name), "does not decode")

    path, name, chunk = fresh("shape")
    meta = path / fmt.STORE_DIR / fmt.GRADS / chunk.relative_to(path).parts[2] / "zarr.json"
    document = json.loads(meta.read_text())
    document["shape"] = [document["shape"][0], 10**6, 10**6]
    document["chunk_grid"]["configuration"]["chunk_shape"] = [1, 1000, 1000]
    meta.write_text(json.dumps(document))
    refuses(lambda: attrib.open_run(path).grads(name), "entries per row")
    assert not read_or_explain(path)

    path, _, _ = fresh("nested")
    (path / fmt.MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)
    refuses(lambda: attrib.open_run(path), "nests too deeply")
    assert not read_or_explain(path)

    path, _, _ = fresh("parquet")  # 8 steps of 8 examples; 10^7 rows in ~100 KB
    part = sorted((path / fmt.TABLES_DIR / "examples").glob("*.parquet"))[0]
    pq.write_table(pa.table({"step": pa.nulls(10**7, pa.int64())}), part)
    assert part.stat().st_size < 1 << 20
    refuses(lambda: attrib.open_run(path).examples, "more than a run of 8 steps can write")
    assert not read_or_explain(path)


@pytest.mark.parametrize("where", ["manifest", "chunk", "part"])
def test_a_named_pipe_in_a_run_is_refused_not_waited_on(recorded, tmp_path, where):
    """Opening a FIFO blocks until something writes to it: every reader would hang."""
    import os

    path = damaged_copy(recorded, tmp_path)
    target = {"manifest": path / fmt.MANIFEST_FILE, "chunk": grad_chunk(path)[1],
              "part": sorted((path / fmt.TABLES_DIR / "steps").glob("*.parquet"))[0]}[where]
    target.unlink()
    os.mkfifo(target)
    assert not read_or_explain(path)
    assert any("not a regular file" in r["detail"] for r in verify(path).to_pylist())


@pytest.mark.parametrize("edit", ["v2 chunk keys", "zero chunks", "10^12 steps"])
def test_layouts_and_counts_attrib_does_not_write_are_refused(recorded, tmp_path, edit):
    """A chunk key encoding other than zarr's default would hide chunks from the size and
    Blosc checks; a zero chunk length divided by zero; a manifest committing 10^12 steps made
    verify build 10^11 slices before reading anything."""
    path = damaged_copy(recorded, tmp_path)
    name, chunk = grad_chunk(path)
    meta = path / fmt.STORE_DIR / fmt.GRADS / chunk.relative_to(path).parts[2] / "zarr.json"
    document = json.loads(meta.read_text())
    if edit == "v2 chunk keys":
        document["chunk_key_encoding"] = {"name": "v2", "configuration": {"separator": "."}}
    elif edit == "zero chunks":
        document["chunk_grid"]["configuration"]["chunk_shape"][0] = 0
    meta.write_text(json.dumps(document))
    if edit == "10^12 steps":
        manifest = json.loads((path / fmt.MANIFEST_FILE).read_text())
        manifest["committed_steps"] = 10**12
        (path / fmt.MANIFEST_FILE).write_text(json.dumps(manifest))
        refuses(lambda: attrib.open_run(path), "commits 1000000000000 steps, the steps table "
                                               "holds 8 rows")
    else:
        refuses(lambda: attrib.open_run(path).grads(name),
                "chunk key encoding" if edit == "v2 chunk keys" else "declares chunks")
    assert not read_or_explain(path)
