"""Result tables own their values: updating or moving the tensors they came from afterwards
leaves them unchanged (zero-copy Arrow over torch memory did not)."""

from __future__ import annotations

import numpy as np
import torch

from attrib.analyzer.aggregate import InfluenceRows
from attrib.analyzer.checkpoint_methods import score_table


def test_influence_rows_copy_the_values_they_are_given():
    rows = InfluenceRows(("example", "step"), n_test=2, example_ids=np.array([5, 9]),
                         stages=["default"], layers={})
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    rows.add("data", values, 0, None, np.array([5, 9]))
    values.mul_(100)  # a buffer the caller reuses for the next step
    table = rows.table().sort_by([("example_id", "ascending"), ("test_id", "ascending")])
    assert table.column("value").to_pylist() == [1.0, 2.0, 3.0, 4.0]


def test_score_table_survives_moving_the_tensor_to_shared_memory():
    scores = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    table = score_table(scores, "loss")
    scores.share_memory_()  # what sending it to a worker process does to its storage
    scores.zero_()
    assert table.column("value").to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
