"""Hugging Face transformers: record a `Trainer.train` with one callback
(`pip install transformers`).

    Trainer(model, args, train_dataset=Indexed(dataset), callbacks=[AttribTrainerCallback(path)])

The Trainer passes batches straight to `model(**batch)`, so the example ids ride in the batch
as the `idx` field `Indexed(dataset)` adds; a forward pre-hook takes them out before the model
sees them. `TrainingArguments(remove_unused_columns=False)` keeps that field in the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers

from attrib.recorder.indexed import IDS_KEY
from attrib.recorder.recorder import Recorder


class AttribTrainerCallback(transformers.TrainerCallback):
    """Attach a Recorder when training begins and close it when training ends.
    `recorder_kwargs` go to `attrib.Recorder` (capture=, checkpoint_every=…)."""

    def __init__(self, path: str | Path, ids_key: str = IDS_KEY, **recorder_kwargs: Any) -> None:
        self.path, self.key, self.kwargs = path, ids_key, recorder_kwargs
        self.recorder: Recorder | None = None
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.remove_unused_columns:
            raise ValueError(
                f"AttribTrainerCallback reads example ids from the batch's {self.key!r} field, "
                "which the Trainer drops as an unused column; pass "
                "TrainingArguments(remove_unused_columns=False) (and keep only the model's "
                "inputs and the ids in the dataset)")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        self.recorder = Recorder(self.path, model, optimizer, **self.kwargs)
        self._hook = model.register_forward_pre_hook(self._take_ids, with_kwargs=True)

    def _take_ids(self, module, args, kwargs):
        ids = kwargs.pop(self.key, None)
        if ids is not None and module.training and self.recorder is not None:
            self.recorder.examples(ids)
        return args, kwargs

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.recorder is not None and logs and "loss" in logs:
            self.recorder.log(hf_loss=float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
        if self.recorder is not None:
            self.recorder.close()
