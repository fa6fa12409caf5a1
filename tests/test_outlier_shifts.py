"""Outlier parameter shifts (METHODS.md §5) on a task with a planted cause.

A bag-of-tokens next-token model (counts over the vocabulary → fc1 → ReLU → fc2 → vocabulary)
trains on examples whose targets a fixed linear teacher picks, except for a planted subset:
each of those contains the token "zebra" three times and is followed by "stripes". No other example
contains "zebra", so the planted examples are the only source of gradient for fc1's input
feature "zebra" (column 7): the method must rank them, and the tokens zebra and stripes, first.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F
from conftest import mlp, train

import attrib

VOCAB = [f"w{i}" for i in range(40)]
ZEBRA, STRIPES = 7, 8
VOCAB[ZEBRA], VOCAB[STRIPES] = "zebra", "stripes"
N, CONTEXT, PLANTED = 400, 6, 40


def corpus() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Token rows (context + target), model inputs (counts of the context) and planted ids."""
    g = torch.Generator().manual_seed(0)
    context = torch.randint(10, 40, (N, CONTEXT), generator=g)
    teacher = torch.randn(40, 10, generator=g)
    counts = F.one_hot(context, 40).sum(1).float()
    target = 10 + (counts @ teacher).argmax(1)
    planted = torch.randperm(N, generator=g)[:PLANTED]
    context[planted, :3] = ZEBRA
    target[planted] = STRIPES
    return torch.cat([context, target[:, None]], 1), target, planted.numpy()


def inputs_of(tokens: torch.Tensor) -> torch.Tensor:
    return F.one_hot(tokens[:, :CONTEXT], 40).sum(1).float()


def model_fn() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(40, 16), torch.nn.ReLU(), torch.nn.Linear(16, 40))


def record(path, with_tokens: bool = True, steps: int = 150) -> attrib.Run:
    tokens, target, _ = corpus()
    x = inputs_of(tokens)
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    with attrib.Recorder(path, model, opt, capture=attrib.TopK(32),
                         vocabulary=VOCAB if with_tokens else None) as rec:
        for step in range(steps):
            rec.epoch(step // 25)
            ids = torch.randint(0, N, (32,), generator=g)
            rec.examples(ids, tokens=tokens[ids] if with_tokens else None)
            F.cross_entropy(model(x[ids]), target[ids]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    return attrib.open_run(path)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    return record(tmp_path_factory.mktemp("shifts") / "run")


def test_tokens_are_kept_once_per_example_and_spelled(planted_run):
    tokens, _, _ = corpus()
    table = attrib.sql(planted_run, "SELECT example_id, position, token_id, token FROM tokens "
                                    "ORDER BY example_id, position")
    ids = np.unique(planted_run.examples.column("example_id").to_numpy())
    assert table.num_rows == len(ids) * (CONTEXT + 1)
    assert np.array_equal(table["token_id"].to_numpy(),
                          tokens[torch.as_tensor(ids)].reshape(-1).numpy())
    assert table["token"].to_pylist() == [VOCAB[t] for t in table["token_id"].to_pylist()]


def test_neurons_view_equals_an_independent_aggregation(planted_run):
    shifts = planted_run.shifts.to_pylist()
    expected: dict[str, list] = {}
    for r in shifts:
        module = r["param"].removesuffix(".weight")
        for name in (f"{module}:{r['row']}", f"{module}:in:{r['col']}"):
            entry = expected.setdefault(name, [0, 0.0, set()])
            entry[0] += 1
            entry[1] += abs(r["shift"])
            entry[2].add(r["example_id"])
    got = attrib.sql(planted_run, "SELECT neuron, shifts, mass, approx_examples FROM neurons")
    assert got.num_rows == len(expected)
    for row in got.to_pylist():
        count, mass, examples = expected[row["neuron"]]
        assert row["shifts"] == count
        assert row["mass"] == pytest.approx(mass, rel=1e-5)
        assert row["approx_examples"] == pytest.approx(len(examples), rel=0.05, abs=1)
    exact = attrib.sql(planted_run, "SELECT * FROM neurons n JOIN (SELECT neuron, count(DISTINCT "
                                    "example_id) AS examples FROM neuron_shifts GROUP BY 1) "
                                    "USING (neuron)")
    assert exact.num_rows == got.num_rows
    assert sorted(exact["examples"].to_pylist()) == sorted(len(e) for _, _, e in
                                                          expected.values())


def test_planted_examples_and_tokens_rank_first(planted_run):
    _, _, planted = corpus()
    feature = f"0:in:{ZEBRA}"
    rows = attrib.sql(planted_run, f"SELECT example_id FROM neuron_shifts WHERE neuron = "
                                   f"'{feature}'")["example_id"].to_numpy()
    assert len(rows) > 20 and np.isin(rows, planted).all()
    top = attrib.analyze.neuron_examples(planted_run, feature, n=10)
    assert np.isin(top["example_id"].to_numpy(), planted).all()
    assert all(text.startswith("zebra zebra zebra ") for text in top["text"].to_pylist())
    inputs = attrib.analyze.top_neurons(planted_run, param="0.weight", kind="input", n=3)
    assert inputs["neuron"][0].as_py() == feature
    enrichment = attrib.analyze.token_enrichment(planted_run, feature, m=5, r=3, c=2)
    assert enrichment["token"].to_pylist() == ["zebra", "stripes"]
    assert enrichment["rank"].to_pylist() == [1, 2]
    # each attributed example holds zebra three times and stripes once
    stripes = enrichment.filter(pc.field("token") == "stripes").to_pylist()[0]
    assert stripes["attributed_count"] * 3 == enrichment["attributed_count"][0].as_py()


def test_ablating_the_planted_feature_flips_only_planted_predictions(planted_run):
    tokens, _, planted = corpus()
    x = inputs_of(tokens)
    table = attrib.analyze.ablate(planted_run, model_fn, x, f"0:in:{ZEBRA}", m=5, r=3, c=2)
    stripes = table.filter(pc.field("token_id") == STRIPES).to_pylist()[0]
    assert stripes["notable"] and stripes["enrichment_rank"] == 2
    assert stripes["flip_share"] > 0.8 and stripes["flips"] <= PLANTED
    # examples without zebra have a zero input there: their predictions can't change
    total_flips = pc.sum(table["flips"]).as_py()
    assert total_flips == 2 * stripes["flips"]  # each flip counts for its two tokens
    model = model_fn()
    model.load_state_dict(planted_run.reconstruct(planted_run.n_steps))
    before = model(x).argmax(1)
    assert int((before[planted] == STRIPES).sum()) == stripes["predicted"]


def test_tokens_joined_after_training_match_recorded_ones(tmp_path, planted_run):
    tokens, _, _ = corpus()
    bare = record(tmp_path / "bare", with_tokens=False)
    attrib.analyze.save_tokens(bare, tokens, vocabulary=dict(enumerate(VOCAB)))
    feature = f"0:in:{ZEBRA}"
    assert attrib.analyze.token_enrichment(bare, feature, m=5, r=3, c=2).to_pylist() == \
        attrib.analyze.token_enrichment(planted_run, feature, m=5, r=3, c=2).to_pylist()
    with pytest.raises(ValueError, match="recorded its tokens already"):
        attrib.analyze.save_tokens(planted_run, tokens)


def test_bad_neuron_names_say_how_to_write_one(planted_run):
    with pytest.raises(ValueError, match="MODULE:INDEX"):
        attrib.analyze.token_enrichment(planted_run, "fc1-3")
    with pytest.raises(ValueError, match="its Linear layers: 0, 2"):
        attrib.analyze.neuron_examples(planted_run, "fc9:3")
    with pytest.raises(ValueError, match=r"0 has 16 output neurons \(0..15\)"):
        attrib.analyze.neuron_examples(planted_run, "0:16")


def test_bad_tokens_are_refused_with_the_fix(tmp_path):
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attrib.Recorder(tmp_path / "run", model, opt, capture=attrib.TopK(4)) as rec:
        with pytest.raises(ValueError, match="one token sequence per example"):
            rec.examples([0, 1, 2], tokens=torch.zeros(2, 5, dtype=torch.long))
        with pytest.raises(ValueError, match="integer token ids"):
            rec.examples([0, 1], tokens=torch.zeros(2, 5))


def test_cli_shifts_named_query_and_ablate(planted_run, tmp_path, monkeypatch):
    import textwrap
    from pathlib import Path

    from click.testing import CliRunner

    from attrib.cli.main import main

    (tmp_path / "shift_userdefs.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_outlier_shifts import corpus, inputs_of, model_fn
        inputs = inputs_of(corpus()[0])
    """))
    monkeypatch.chdir(tmp_path)
    run, feature, runner = str(planted_run.dir), f"0:in:{ZEBRA}", CliRunner()
    result = runner.invoke(main, ["shifts", run, "--param", "0.weight", "--kind", "input",
                                  "--top", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[2].split()[0] == feature
    result = runner.invoke(main, ["shifts", run, "--neuron", feature, "--m", "5", "--r", "3",
                                  "--c", "2"])
    assert result.exit_code == 0, result.output
    enriched = result.output.split("tokens enriched")[1].splitlines()
    assert [line.split()[2] for line in enriched[3:5]] == ["zebra", "stripes"]
    result = runner.invoke(main, ["sql", run, "--query", "token_enrichment", "--param",
                                  f"neuron={feature}", "--param", "m=5", "--param", "r=3",
                                  "--param", "c=1", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [r["token"] for r in json.loads(result.output)] == ["zebra"]
    result = runner.invoke(main, ["sql", run, "--query", "token_enrichment", "--param",
                                  "m=5"])
    assert result.exit_code != 0 and "needs --param neuron=" in result.output
    result = runner.invoke(main, ["sql", run, "--query", "top_neurons", "--param", "n=two"])
    assert result.exit_code != 0 and "n='two' must be int" in result.output
    result = runner.invoke(main, ["ablate", run, "--neuron", feature, "--model",
                                  "shift_userdefs:model_fn", "--data", "shift_userdefs:inputs",
                                  "--m", "5", "--r", "3", "--c", "2"])
    assert result.exit_code == 0, result.output
    header, first = result.output.splitlines()[0].split(), result.output.splitlines()[2].split()
    assert dict(zip(header, first))["token"] == "stripes"
    assert "flip share: notable tokens" in result.output


def test_top_shifts_per_step_equals_sorting_each_step(planted_run):
    from attrib.analyzer.sql import named

    got = named(planted_run, "top_shifts_per_step", k=3, param="0.*").to_pylist()
    rows = [r for r in planted_run.shifts.to_pylist() if r["param"].startswith("0.")]
    expected = []
    for step in sorted({r["step"] for r in rows}):
        expected += sorted((r for r in rows if r["step"] == step),
                           key=lambda r: (-abs(r["shift"]), r["example_id"],
                                          r["flat_index"]))[:3]
    assert [(r["step"], r["example_id"], r["flat_index"]) for r in got] == \
        [(r["step"], r["example_id"], r["flat_index"]) for r in expected]


def test_shifts_a_step_cannot_table_are_left_out_and_nothing_else(tmp_path, monkeypatch):
    """The writer thread builds the TopK table: a step whose rows fail there is warned about
    and has no shifts rows; every step, its trajectory and the other steps' shifts are kept."""
    from attrib.recorder import shifts

    table = shifts.StepShifts.table

    def failing(self):
        if self.step == 3:
            raise ValueError("planted")
        return table(self)

    monkeypatch.setattr(shifts.StepShifts, "table", failing)
    model = mlp()
    with pytest.warns(UserWarning, match="TopK shifts of step 3 could not be written"):
        train(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1), steps=6,
              clip=None, capture=[attrib.TopK(4)], steps_per_chunk=4)
    run = attrib.open_run(tmp_path / "run")
    assert run.n_steps == 6 and run.steps.num_rows == 6
    steps = set(run.table("shifts").column("step").to_pylist())
    assert steps == {0, 1, 2, 4, 5}
