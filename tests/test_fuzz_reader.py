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
