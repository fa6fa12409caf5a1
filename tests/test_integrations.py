"""Lightning and Hugging Face callbacks: one line records a trainer-owned loop, with example ids
from the dataset index. Skipped where the optional package is not installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import data, mlp

import attrib
from attrib.analyzer.verify import verify
from attrib.recorder.indexed import Indexed

N = 64


class Points(torch.utils.data.Dataset):
    """The conftest data as dict items (features x, label y)."""

    def __init__(self) -> None:
        self.x, self.y = data()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


def assert_recorded(path, model, steps: int, epochs: int) -> None:
    """One row per optimizer step, each epoch's ids cover the dataset once, θ_N is the model's."""
    run = attrib.open_run(path)
    assert run.status == "complete" and run.n_steps == steps
    assert verify(path).column("ok").to_pylist() == [True] * 7
    ids = run.examples.sort_by("step").column("example_id").to_numpy()
    assert np.array_equal(np.sort(ids), np.repeat(np.arange(N), epochs))
    final = run.reconstruct(run.n_steps)
    for name, value in model.named_parameters():
        torch.testing.assert_close(final[name], value.detach(), rtol=0,
                                   atol=1e-6)
    assert np.nanmax(run.residual_norms()) < 1e-4  # per-example rows sum to each gradient


def test_lightning_callback(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from attrib.recorder.lightning_callback import AttribCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            assert "idx" not in batch  # the callback took the ids out
            return F.cross_entropy(self.net(batch["x"]), batch["y"])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01)

    module = Module()
    loader = torch.utils.data.DataLoader(Indexed(Points()), batch_size=16, shuffle=True)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accumulate_grad_batches=2,
                         callbacks=[AttribCallback(tmp_path / "run", checkpoint_every=3)])
    trainer.fit(module, loader)
    assert_recorded(tmp_path / "run", module, steps=4, epochs=2)
    losses = attrib.open_run(tmp_path / "run").steps.column("loss").to_pylist()
    assert all(loss is not None for loss in losses)


def test_huggingface_trainer_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    from attrib.recorder.hf_callback import AttribTrainerCallback

    class Model(torch.nn.Module):
        """A model as the Trainer expects one: keyword inputs, a loss in the output dict."""

        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, x, y):
            return {"loss": F.cross_entropy(self.net(x), y)}

    model = Model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=16, num_train_epochs=2,
        learning_rate=0.01, report_to=[], save_strategy="no", logging_steps=2,
        remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Indexed(Points()),
                                   callbacks=[AttribTrainerCallback(tmp_path / "run")])
    trainer.train()
    assert_recorded(tmp_path / "run", model, steps=8, epochs=2)

    refused = transformers.TrainingArguments(output_dir=str(tmp_path / "hf2"), report_to=[],
                                             use_cpu=True, max_steps=1)
    trainer = transformers.Trainer(model=model, args=refused, train_dataset=Indexed(Points()),
                                   callbacks=[AttribTrainerCallback(tmp_path / "run2")])
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()
