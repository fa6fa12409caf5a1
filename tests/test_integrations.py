"""Lightning and Hugging Face callbacks: one line records a trainer-owned loop, with example ids
from the dataset index. Skipped where the optional package is not installed."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import data, mlp, spawn, tiny_gpt2

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


def assert_recorded(path, model, steps: int, epochs: int, residuals: bool = True) -> None:
    """One row per optimizer step, each epoch's ids cover the dataset once, θ_N is the model's,
    and (in one process, where a rank sees every example) the rows sum to each gradient."""
    run = attrib.open_run(path)
    assert run.status == "complete" and run.n_steps == steps
    assert verify(path).column("ok").to_pylist() == [True] * 7
    ids = run.examples.sort_by("step").column("example_id").to_numpy()
    assert np.array_equal(np.sort(ids), np.repeat(np.arange(N), epochs))
    final = run.reconstruct(run.n_steps)
    for name, value in model.named_parameters():
        torch.testing.assert_close(final[name], value.detach(), rtol=0,
                                   atol=1e-6)
    if residuals:
        assert np.nanmax(run.residual_norms()) < 1e-4  # per-example rows sum to each gradient


def fit_with_callback(path, **trainer_kwargs):
    """Two epochs of the Classifier under Lightning, recorded by AttribCallback."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning_classifier import Classifier

    from attrib.recorder.lightning_callback import AttribCallback

    module = Classifier()
    loader = torch.utils.data.DataLoader(Indexed(Points()), batch_size=16, shuffle=True)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **trainer_kwargs,
                         callbacks=[AttribCallback(path, checkpoint_every=3,
                                                   capture=attrib.Full())])
    trainer.fit(module, loader)
    return module


def test_lightning_callback(tmp_path):
    module = fit_with_callback(tmp_path / "run", accumulate_grad_batches=2)
    assert_recorded(tmp_path / "run", module, steps=4, epochs=2)
    losses = attrib.open_run(tmp_path / "run").steps.column("loss").to_pylist()
    assert all(loss is not None for loss in losses)


def test_lightning_callback_under_ddp(tmp_path):
    """strategy="ddp_spawn" on 2 CPU processes: the callback hands the recorder Lightning's DDP
    wrapper, each rank records its DistributedSampler shard, and the rows of both ranks sum
    to each step's all-reduced gradient."""
    module = fit_with_callback(tmp_path / "run", devices=2, strategy="ddp_spawn")
    run = attrib.open_run(tmp_path / "run")
    assert run.meta["distributed"]["world_size"] == 2
    assert_recorded(tmp_path / "run", module, steps=4, epochs=2, residuals=False)
    assert_rows_sum_to_gradients(run, examples=32)


def assert_rows_sum_to_gradients(run, examples: int) -> None:
    """Every rank's rows of a step together sum to its all-reduced gradient G_s, which the
    clip factor α_s scales to the consumed gradient the run records."""
    alpha = run.clip_factors()
    for step in range(run.n_steps):
        ids, rows = run.contributions(step)
        assert len(ids) == examples
        for name, value in rows.items():
            torch.testing.assert_close(value.sum(0) * alpha[step],
                                       run.grads(name, step, step + 1)[0], rtol=1e-5,
                                       atol=1e-7)


class LossOutputModel(torch.nn.Module):
    """A model as the Hugging Face Trainer expects one: keyword inputs, a loss in the output."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x, y):
        return {"loss": F.cross_entropy(self.net(x), y)}


def hf_train(path, **arguments) -> torch.nn.Module:
    """Two epochs of LossOutputModel under the Hugging Face Trainer, recorded by its callback."""
    transformers = pytest.importorskip("transformers")
    from attrib.recorder.hf_callback import AttribTrainerCallback

    model = LossOutputModel()
    args = transformers.TrainingArguments(
        output_dir=f"{path}-hf", per_device_train_batch_size=16, num_train_epochs=2,
        learning_rate=0.01, report_to=[], save_strategy="no", logging_steps=2,
        remove_unused_columns=False, use_cpu=True, disable_tqdm=True, **arguments)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Indexed(Points()),
                                   callbacks=[AttribTrainerCallback(path, capture=attrib.Full())])
    trainer.train()
    return model


def test_huggingface_trainer_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    from attrib.recorder.hf_callback import AttribTrainerCallback

    model = hf_train(tmp_path / "run")
    assert_recorded(tmp_path / "run", model, steps=8, epochs=2)

    refused = transformers.TrainingArguments(output_dir=str(tmp_path / "hf2"), report_to=[],
                                             use_cpu=True, max_steps=1)
    trainer = transformers.Trainer(model=model, args=refused, train_dataset=Indexed(Points()),
                                   callbacks=[AttribTrainerCallback(tmp_path / "run2")])
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()


def hf_worker(rank: int, world: int, path: str, port: int) -> None:
    """One rank of a job that torchrun would start: the Trainer sets up DDP from these."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    model = hf_train(path, ddp_backend="gloo", max_grad_norm=0.2)
    if rank == 0:
        torch.save(model.state_dict(), f"{path}-final.pt")


def test_huggingface_trainer_callback_under_ddp(tmp_path):
    """2 CPU processes as torchrun starts them: each rank records its DistributedSampler
    shard, and both ranks' rows sum to each step's all-reduced gradient. The Trainer clips
    (max_grad_norm=0.2) and hands callbacks its module, not the DDP wrapper: the clip factor
    is still that of the all-reduced gradient."""
    pytest.importorskip("transformers")
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(hf_worker, args=(2, str(tmp_path / "run"), port), nprocs=2)
    model = LossOutputModel()
    model.load_state_dict(torch.load(tmp_path / "run-final.pt", weights_only=True))
    run = attrib.open_run(tmp_path / "run")
    assert run.meta["distributed"]["world_size"] == 2
    assert_recorded(tmp_path / "run", model, steps=4, epochs=2, residuals=False)
    assert (run.clip_factors() < 0.9).all()
    assert_rows_sum_to_gradients(run, examples=32)


class Sequences(torch.utils.data.Dataset):
    """Token sequences as a causal LM's Trainer items (input_ids, labels)."""

    def __init__(self) -> None:
        self.tokens = torch.randint(0, 40, (32, 8), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def test_huggingface_gpt2_through_the_trainer_callback(tmp_path):
    """GPT2LMHeadModel (tied lm_head, Conv1D, position_ids) recorded by the Trainer callback:
    every tensor's rows sum to its gradient, and the run verifies."""
    transformers = pytest.importorskip("transformers")
    from attrib.recorder.hf_callback import AttribTrainerCallback

    model = tiny_gpt2()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=1,
        learning_rate=0.01, report_to=[], save_strategy="no", remove_unused_columns=False,
        use_cpu=True, disable_tqdm=True)
    path = tmp_path / "run"
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Indexed(Sequences()),
                                   callbacks=[AttribTrainerCallback(path, capture=attrib.Full(),
                                                                    strict=True)])
    trainer.train()
    run = attrib.open_run(path)
    assert run.n_steps == 4 and run.status == "complete"
    assert verify(path).column("ok").to_pylist() == [True] * 7
    assert float(run.residual_norms().max()) < 1e-5  # float32 rows, every tensor captured
    assert "lm_head.weight" not in run.param_names  # tied: stored once, as the embedding
