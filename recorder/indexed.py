"""Example ids from the dataset index, for trainers that own the training loop.

`Indexed(dataset)` adds each item's index under `key` (dict items); the Lightning and Hugging
Face callbacks take the ids from there and remove the key before the model sees the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

IDS_KEY = "idx"


class Indexed(torch.utils.data.Dataset):
    """A map-style dataset whose dict items carry their own index under `key`."""

    def __init__(self, dataset: Any, key: str = IDS_KEY) -> None:
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise TypeError(f"Indexed needs dict items to add {self.key!r} to, got "
                            f"{type(item).__name__}; return a dict from the dataset, or pass "
                            "ids=<function of the batch> to the callback")
        if self.key in item:
            raise ValueError(f"the dataset's items already have a {self.key!r} field; pass "
                             "another key= to Indexed and the callback")
        return {**item, self.key: index}


def take_ids(batch: Any, ids: str | Callable[[Any], Any]) -> Any:
    """The batch's example ids: `ids(batch)`, or `batch.pop(ids)` for a dict-like batch (the
    model then never sees the key)."""
    if callable(ids):
        return ids(batch)
    if not isinstance(batch, (dict, Mapping)) or ids not in batch:
        raise KeyError(f"the training batch has no {ids!r} field for attrib's example ids; wrap "
                       f"the dataset in attrib.recorder.indexed.Indexed(dataset), or pass "
                       f"ids=<function of the batch>")
    return batch.pop(ids)
