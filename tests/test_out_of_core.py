"""Projected influence over the stored rows: against a brute-force sum, on a Dask cluster, and
streamed under an address-space limit smaller than the store."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import mlp, train

import attrib
from attrib.analyzer.projected import projected_influence
from attrib.schemas import format as fmt
from attrib.schemas.projection import project

CAPTURE = [attrib.Project(32, params=("0.weight",)), attrib.Full(params=("2.*",))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("projected") / "run"
    model = mlp()
    train(path, model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), steps=21,
          capture=CAPTURE, clip=0.5)
    return attrib.open_run(path)


def gradients_for(run, n_test: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return {name: torch.randn(n_test, *run.param_shapes[name], generator=g, dtype=torch.float64)
            for name in ("0.weight", "2.weight", "2.bias")}


def brute_force(run, tests, start, stop) -> dict[tuple[int, int], float]:
    """Step by step, example by example, in float64: Σ_s η_s α_s Σ_p ⟨R q_t, R c_{s,i}⟩."""
    lr, alpha = run.hparams()["lr"][:, 0], run.clip_factors()
    scores: dict[tuple[int, int], float] = {}
    for step in range(start, stop):
        ids, rows = run.contributions(step)
        for name, q in tests.items():
            p = run.capture[name].get("project")
            q = project(q, q.shape[1:], p["kind"], p["k"], p["seed"], name) if p else q
            values = rows[name].double().reshape(len(ids), -1) @ q.reshape(len(q), -1).T
            for slot, example in enumerate(ids.tolist()):
                for t in range(len(q)):
                    key = (t, example)
                    scores[key] = scores.get(key, 0.0) + \
                        lr[step] * alpha[step] * float(values[slot, t])
    return scores


def as_dict(table) -> dict[tuple[int, int], float]:
    return {(r["test_id"], r["example_id"]): r["value"] for r in table.to_pylist()}


def test_projected_influence_is_the_brute_force_sum(run):
    tests = gradients_for(run)
    expected = brute_force(run, tests, 3, 19)  # not aligned with the 8-step chunks
    got = as_dict(projected_influence(run, tests, start=3, stop=19))
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-12,
                               atol=1e-15)


def test_dask_cluster_gives_the_same_numbers(run):
    distributed = pytest.importorskip("distributed")
    tests = gradients_for(run)
    local = projected_influence(run, tests, start=3, stop=19)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        remote = projected_influence(run, tests, start=3, stop=19, engine="dask", client=client)
    assert remote.select(["test_id", "example_id"]).equals(
        local.select(["test_id", "example_id"]))
    np.testing.assert_allclose(remote["value"].to_numpy(), local["value"].to_numpy(),
                               rtol=1e-12, atol=1e-15)


def big_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(),
                               torch.nn.Linear(256, 4))


BIG = textwrap.dedent("""
    import sys, torch
    import attrib
    sys.path.insert(0, sys.argv[2])
    from test_out_of_core import big_model
    model = big_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(512, 256), torch.randint(0, 4, (512,))
    with attrib.Recorder(sys.argv[1], model, opt, steps_per_chunk=8,
                         capture=attrib.Project(2048, params=("0.weight",))) as rec:
        for step in range(80):
            ids = torch.arange(256) + (step % 2) * 256
            rec.examples(ids)
            torch.nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step(); opt.zero_grad()
""")

LIMITED = textwrap.dedent("""
    import resource, sys, numpy as np, torch, zarr
    import attrib
    from attrib.analyzer.projected import projected_influence
    sys.path.insert(0, sys.argv[4])
    from test_out_of_core import big_model
    run = attrib.open_run(sys.argv[1])
    probe = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)), torch.arange(4)
    tests = {"0.weight": torch.randn(4, 256, 256, generator=torch.Generator().manual_seed(0),
                                     dtype=torch.float64)}
    projected_influence(run, tests, stop=8)  # warm up: thread pools and allocator arenas
    attrib.analyze.path_kernel(run, big_model, probe, progress=False, stride=64)
    # reserve address space once; the limit then counts what the analysis itself adds
    size = [int(line.split()[1]) * 1024 for line in open("/proc/self/status")
            if line.startswith("VmSize")][0]
    budget = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (size + budget, size + budget))
    table = projected_influence(run, tests)
    np.save(sys.argv[3], table["value"].to_numpy())
    result = attrib.analyze.path_kernel(run, big_model, probe, progress=False)
    gaps = [abs(r["gap"]) / abs(r["delta_f"]) for r in result.completeness().to_pylist()]
    print("path kernel gap", max(gaps))
    try:  # the limit bites: the whole array does not fit
        np.asarray(run.contribution_rows("0.weight"), dtype=np.float64)
    except MemoryError:
        print("whole array refused")
""")


def test_streams_a_store_larger_than_the_memory_limit(tmp_path):
    path, budget = tmp_path / "big", 96 << 20
    tests_dir = os.path.dirname(__file__)
    subprocess.run([sys.executable, "-c", BIG, str(path), tests_dir], check=True, timeout=300)
    stored = attrib.open_run(path).meta["examples_per_step"] * 80 * 2048 * 4
    assert stored > 1.5 * budget  # 160 MiB of projections against a 96 MiB allowance
    # (the analyses need 64-80 MiB here: they hold 8 steps of rows in float64, 32 MiB)
    out = tmp_path / "values.npy"
    # glibc set up so the limit measures what the analysis holds, not address space the
    # allocator reserves: one arena (not 64 MiB per thread), freed blocks returned at once
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
    result = subprocess.run([sys.executable, "-c", LIMITED, str(path), str(budget), str(out),
                             tests_dir],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "whole array refused" in result.stdout
    gap = float(result.stdout.split("path kernel gap")[1].split()[0])
    assert gap < 1e-4  # the path kernel ran under the limit too, and its total is complete
    run = attrib.open_run(path)
    tests = {"0.weight": torch.randn(4, 256, 256, generator=torch.Generator().manual_seed(0),
                                     dtype=torch.float64)}
    expected = projected_influence(run, tests)["value"].to_numpy()
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-12, atol=0)
    assert (path / fmt.STORE_DIR / fmt.PROJ).is_dir()


def test_cli_projected_with_test_gradients_at_the_final_step(run, tmp_path, monkeypatch):
    """`attrib analyze --method projected` stores what the API computes from θ_N's test
    gradients (here through Dask's threads), queryable by SQL."""
    from click.testing import CliRunner

    from attrib.cli.main import main

    (tmp_path / "projected_userdefs.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from conftest import data, mlp
        def test_set():
            x, y = data()
            return x[:3] + 0.1, y[:3]
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(main, ["analyze", str(run.dir), "--method", "projected",
                                       "--model", "projected_userdefs:mlp", "--data",
                                       "projected_userdefs:test_set", "--dask", "local"])
    assert result.exit_code == 0, result.output
    import projected_userdefs

    tests = attrib.analyze.test_gradients(run, mlp, projected_userdefs.test_set())
    assert set(tests) == {"0.weight", "2.weight", "2.bias"}  # the parameters with stored rows
    expected = as_dict(projected_influence(run, tests))
    stored = attrib.sql(run, "SELECT test_id, example_id, value FROM influence "
                             "WHERE analysis = 'projected'")
    got = as_dict(stored)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-12)
