"""`attrib demo --quick` end to end (a grokking run recorded, analysed, plotted, reported),
stage detection on a run that groks, and `attrib report` rendered by headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

import attrib
from attrib.analyzer.path_kernel import MAX_NODES
from attrib.cli.main import main
from attrib.demo import detect_stages, record
from attrib.grokking import GrokConfig, modular_addition


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_demo_records_analyses_and_reports(demo_dir):
    out, printed = demo_dir
    run = attrib.open_run(out / "run")
    assert run.status == "complete" and run.n_steps == GrokConfig.quick().steps
    assert "stage accountability" in printed and "mlp_in:" in printed
    for png in ("training.png", "stage_effects.png", "similarity.png"):
        assert (out / png).stat().st_size > 10_000
    effects = attrib.sql(run, "SELECT DISTINCT method FROM stage_effects ORDER BY 1")
    assert effects["method"].to_pylist() == ["path", "replay"]
    # the per-layer path-kernel changes add up to the test loss change (completeness)
    per_layer = attrib.sql(run, "SELECT sum(value) AS total FROM influence")["total"][0]
    completeness = attrib.sql(run, "SELECT sum(delta_f) AS d, max(quadrature_error) AS q "
                                   "FROM completeness").to_pylist()[0]
    assert abs(per_layer.as_py() - completeness["d"]) < 1e-3 * abs(completeness["d"]) + \
        32 * completeness["q"]
    # the demo prints how complete each pair is; every gap lies within its quadrature error
    pairs = attrib.sql(run, "SELECT count(*) AS n, count(*) FILTER (abs(gap) <= "
                            "quadrature_error * (1 + 1e-9) + 1e-12) AS bounded "
                            "FROM completeness").to_pylist()[0]
    assert pairs["bounded"] == pairs["n"] == 8
    # its adaptive rule cuts at ReLU kinks: complete to its tolerance, 1e-4·|Δf| + 1e-6
    worst = attrib.sql(run, "SELECT max(abs(gap) / (1e-4 * abs(delta_f) + 1e-6)) AS w "
                            "FROM completeness")["w"][0].as_py()
    assert worst <= 1, worst
    assert "completeness: per test pair" in printed and "gap_within_its_bound" in printed
    used = json.loads((out / "run" / "analysis" / "path-kernel" / "analysis.json").read_text())
    assert (used["quadrature"], used["max_nodes"], used["stride"]) == ("adaptive", MAX_NODES, 5)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and "http" not in page.split("<body>")[1]
    # each analysis under its own name and orientation, each example with what it did to f
    assert "<h3>path-kernel (path-kernel, contribution)</h3>" in page
    assert "effect_on_f" in page and "Influence per layer (path-kernel)" in page


def test_stages_are_found_where_train_then_test_accuracy_rise(tmp_path):
    config = GrokConfig(steps=100)
    run = record(config, modular_addition(config), tmp_path / "run", progress=False)
    stages = detect_stages(run)
    accuracy = {r["step"]: dict(r["metrics"]) for r in run.steps.to_pylist()}
    memorised = stages["memorisation"].stop - 1
    assert accuracy[memorised]["train_accuracy"] >= 0.95
    assert all(accuracy[s]["train_accuracy"] < 0.95 for s in range(memorised))
    assert stages["circuit formation"].start == memorised + 1


def test_report_renders_in_headless_chromium(demo_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs it)")
    out, _ = demo_dir
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1000,1400", (out / "report.html").as_uri()],
                   check=True, timeout=120, capture_output=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] > 500 and np.std(pixels[..., :3]) > 0.05  # not a blank page


def test_training_curves_draw_no_empty_accuracy_panel(tmp_path):
    """A run that logs only its loss gets one panel, not an empty 'accuracy' one below it
    (which also made matplotlib warn about a legend without artists)."""
    import warnings

    import matplotlib.image
    from conftest import OPTIMIZERS, mlp, train

    from attrib.analyzer import plots

    model = mlp()
    train(tmp_path / "run", model, OPTIMIZERS["sgd"](model.parameters()), steps=12)
    run = attrib.open_run(tmp_path / "run")
    assert not any(r["metrics"] for r in run.steps.to_pylist())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = plots.training_curves(run.steps, [("early", 0, 5), ("late", 6, 11)],
                                     tmp_path / "curves.png")
    height, width = matplotlib.image.imread(path).shape[:2]
    assert (width, height) == (840, 360)  # 7 × 3 inches at 120 dpi: one panel


def test_the_readme_refresh_script_finds_every_table_the_demo_prints(demo_dir):
    """docs/refresh_demo.py rewrites the README's demo blocks from the demo's output: every
    block it fills must be printed by the demo, and every block must exist in the README."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("refresh_demo", root / "docs" / "refresh_demo.py")
    refresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refresh)
    tables = refresh.printed_tables(demo_dir[1])
    assert set(tables) == set(refresh.SECTIONS)
    assert tables["completeness"].splitlines()[0].split()[:2] == ["test_pairs", "within_1e-4"]
    readme = (root / "README.md").read_text()
    for key, table in tables.items():
        assert table in refresh.replace_block(readme, key, table)
