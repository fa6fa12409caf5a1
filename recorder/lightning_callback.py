"""PyTorch Lightning: record a `Trainer.fit` with one callback (`pip install lightning`).

    trainer = lightning.Trainer(callbacks=[AttribCallback("runs/exp1")])

Example ids come from each training batch: the `idx` field that `Indexed(dataset)` adds (popped
before `training_step` sees the batch), or `ids=<function of the batch>`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from attrib.recorder.indexed import IDS_KEY, take_ids
from attrib.recorder.recorder import Recorder
from attrib.schemas.format import Status


class AttribCallback(pl.Callback):
    """Attach a Recorder when training starts and close it when fitting ends (`crashed` if
    fitting raised). `recorder_kwargs` go to `attrib.Recorder` (capture=, checkpoint_every=…)."""

    def __init__(self, path: str | Path, ids: str | Callable[[Any], Any] = IDS_KEY,
                 **recorder_kwargs: Any) -> None:
        self.path, self.ids, self.kwargs = path, ids, recorder_kwargs
        self.recorder: Recorder | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"AttribCallback records one optimizer; this module configures "
                             f"{len(trainer.optimizers)}")
        # the strategy's model is the DDP wrapper under DDP: the recorder unwraps it itself
        self.recorder = Recorder(self.path, trainer.strategy.model, trainer.optimizers[0],
                                 **self.kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None:
            self.recorder.epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.recorder is not None:
            self.recorder.examples(take_ids(batch, self.ids))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.recorder is not None and loss is not None:
            self.recorder.log(loss=loss.detach())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None:
            self.recorder.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self.recorder is not None:
            self.recorder.close(Status.CRASHED)
