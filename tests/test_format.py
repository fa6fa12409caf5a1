"""Format v2 round trip: what the recorder writes is what schemas.format declares and the reader
returns; damaged or foreign run directories fail with errors that name the fix."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from conftest import OPTIMIZERS, mlp, train

import attrib
from attrib.schemas import format as fmt


@pytest.fixture
def recorded(run_dir):
    model = mlp()
    trained = train(run_dir, model, OPTIMIZERS["adamw"](model.parameters()), steps=21)
    return attrib.open_run(run_dir), trained


def test_tables_carry_declared_schemas(recorded):
    run, _ = recorded
    for name, schema in fmt.TABLES.items():
        assert run.table(name).schema.equals(schema), name
        for part in run.table_files(name):  # on disk too, not only after the reader's cast
            assert pq.read_schema(part).remove_metadata().equals(schema), part


def test_store_layout_and_metadata(recorded):
    run, trained = recorded
    meta = json.loads((run.dir / fmt.META_FILE).read_text())
    assert meta["format"] == fmt.FORMAT_NAME and meta["format_version"] == fmt.FORMAT_VERSION
    assert meta["optimizer"]["kind"] == "adamw" and meta["step_state"] == ["exp_avg_sq"]
    assert meta["checkpoint_state"] == ["exp_avg", "exp_avg_sq"]
    group = zarr.open_group(run.dir / fmt.STORE_DIR, mode="r")
    for name, value in trained.thetas[0].items():
        key = fmt.param_key(name)
        assert group[f"{fmt.GRADS}/{key}"].shape == (21, *value.shape)
        # the optimizer's whole state (exp_avg, exp_avg_sq), at checkpoints
        assert group[f"{fmt.CHECKPOINT_STATE}/{key}"].shape == (4, 2, *value.shape)
        codecs = group[f"{fmt.GRADS}/{key}"].metadata.to_dict()["codecs"]
        assert [c["name"] for c in codecs[1:]] == ["crc32c"]  # the trajectory: uncompressed
        if "factored" in run.capture[name]:  # the default on a weight: factors, uncompressed
            assert len(value.shape) == 2
            for group_name in (fmt.FACTOR_LEFT, fmt.FACTOR_RIGHT):
                codecs = group[f"{group_name}/{key}"].metadata.to_dict()["codecs"]
                assert [c["name"] for c in codecs[1:]] == ["crc32c"]
            continue
        codecs = group[f"{fmt.CONTRIB}/{key}"].metadata.to_dict()["codecs"]
        assert [c["name"] for c in codecs[1:]] == ["blosc", "crc32c"]  # full rows: lz4
        assert codecs[1]["configuration"]["cname"] == "lz4"
    assert fmt.DELTAS not in group and fmt.STATE not in group  # derived by replay, not stored
    assert group[f"{fmt.HPARAMS}/lr"].shape == (21, 1)
    assert group[fmt.FINGERPRINT].shape == (21, 2, len(trained.thetas[0]))
    assert group[fmt.CHECKPOINT_STATE_PRESENT][:].tolist() == [[False] * 4] + [[True] * 4] * 3
    # checkpoints at 0, 10, 20 and the final θ_21
    assert run.checkpoint_steps == [0, 10, 20, 21]
    assert run.table("checkpoints").column("step").to_pylist() == [0, 10, 20, 21]
    assert not any(p.suffix == ".pkl" for p in run.dir.rglob("*"))


def test_steps_table_content(recorded):
    run, trained = recorded
    steps = run.steps.to_pylist()
    assert [s["step"] for s in steps] == list(range(21))
    np.testing.assert_allclose([s["loss"] for s in steps], trained.losses, rtol=1e-6)
    assert steps[0]["lr"] == [0.01] and steps[7]["lr"] == [0.005]  # StepLR(7, 0.5)
    hp = run.hparams()
    np.testing.assert_array_equal(hp["lr"][:, 0], [s["lr"][0] for s in steps])
    assert np.isnan(hp["momentum"]).all() and (hp["beta2"] == 0.98).all()
    assert all(s["stage"] == "default" and s["n_examples"] == 32 for s in steps)
    assert all(s["bytes_written"] > 0 for s in steps)
    assert run.step_counts()[:, 0].tolist() == list(range(1, 22))
    assert run.active().all()


def test_param_keys_are_safe_path_segments():
    assert fmt.param_key("encoder.layers.0.linear1.weight") == "encoder.layers.0.linear1.weight"
    for hostile in ("../../etc", "a/b", "..", "__zarr", "x y"):
        key = fmt.param_key(hostile)
        assert "/" not in key and key not in {".", ".."} and key.startswith("p_")


def test_newer_format_version_is_refused(recorded):
    run, _ = recorded
    meta = json.loads((run.dir / fmt.META_FILE).read_text())
    meta["format_version"] = fmt.FORMAT_VERSION + 1
    (run.dir / fmt.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(fmt.FormatError, match=r"newer than this attrib.*upgrade attrib"):
        attrib.open_run(run.dir)


def test_damaged_manifest_is_a_clear_error(recorded):
    run, _ = recorded
    (run.dir / fmt.MANIFEST_FILE).write_text("{ truncated")
    with pytest.raises(fmt.FormatError, match=r"not valid JSON.*damaged"):
        attrib.open_run(run.dir)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(fmt.FormatError, match=r"is missing: is .* an attrib run directory"):
        attrib.open_run(tmp_path)


def test_table_paths_cannot_escape_the_run(recorded):
    run, _ = recorded
    manifest = json.loads((run.dir / fmt.MANIFEST_FILE).read_text())
    manifest["tables"]["steps"] = ["../../outside.parquet"]
    (run.dir / fmt.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(fmt.FormatError, match="outside the run directory"):
        _ = attrib.open_run(run.dir).steps


def test_reading_beyond_committed_steps_names_the_limit(recorded):
    run, _ = recorded
    with pytest.raises(IndexError, match="outside the 21 committed steps"):
        run.reconstruct(22)
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        run.deltas("nope")


def test_json_written_by_two_threads_at_once_is_always_whole(tmp_path):
    """A DDP rank's marker is written by its writer thread and its training thread: each write
    must be atomic on its own (CI once saw rank 0 read an empty marker when both shared one
    temporary file)."""
    import threading

    path = tmp_path / "marker.json"
    fmt.write_json_atomic(path, {"writer": -1})
    errors: list[Exception] = []

    def write(name: str) -> None:
        try:
            for i in range(300):
                fmt.write_json_atomic(path, {name: i, "padding": "x" * 4096})
        except Exception as e:  # the test reports whatever a writer hit
            errors.append(e)

    writers = [threading.Thread(target=write, args=(name,)) for name in ("a", "b")]
    for thread in writers:
        thread.start()
    reads = 0
    while any(thread.is_alive() for thread in writers):
        fmt.read_json(path)  # raises FormatError on a torn or empty document
        reads += 1
    for thread in writers:
        thread.join()
    assert not errors and reads > 0
    assert fmt.read_json(path)["padding"] == "x" * 4096
