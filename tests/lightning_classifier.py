"""A LightningModule for the callback tests, importable by name so that Lightning's ddp_spawn
can send it to its worker processes (a class defined inside a test can't be pickled)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from conftest import mlp


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def training_step(self, batch, batch_idx):
        assert "idx" not in batch  # the callback took the ids out
        return F.cross_entropy(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)
