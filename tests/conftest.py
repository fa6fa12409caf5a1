"""Shared models, data and a recorded training loop for the tests (seeded, CPU, seconds)."""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import attrib

N_TRAIN, N_FEATURES, N_CLASSES = 256, 10, 3

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core
    torch.set_num_threads(1)

# Multi-process tests start their ranks from a fork server that imported these once (a fresh
# interpreter per rank paid ~3 s of imports each time, most of those tests' run time). It never
# runs a torch op, so forking it is safe where forking a test process (its OpenMP pool, zarr's
# event loop thread) would not be.
multiprocessing.set_forkserver_preload(["torch", "attrib", "conftest"])


def spawn(fn, args: tuple, nprocs: int) -> None:
    """torch.multiprocessing.spawn's contract (fn(rank, *args); a rank's failure raises
    here), its processes forked from the fork server."""
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver")


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True,
                                              weight_decay=0.01),
    "sgd_dampening": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.3,
                                               weight_decay=0.01),
    "adam_l2": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, betas=(0.9, 0.98)),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, amsgrad=True),
}


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_TRAIN, N_FEATURES, generator=g), torch.randint(0, N_CLASSES, (N_TRAIN,),
                                                                          generator=g)


def mlp(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, N_CLASSES)).to(dtype)


class TinyTransformer(torch.nn.Module):
    """Embedding + one encoder layer (attention, LayerNorm) + linear head over token sequences."""

    def __init__(self, vocab: int = 12, d: int = 16, seq: int = 6,
                 activation: str = "relu") -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed = torch.nn.Embedding(vocab, d)
        self.encoder = torch.nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32,
                                                        dropout=0.0, batch_first=True,
                                                        activation=activation)
        self.head = torch.nn.Linear(d * seq, N_CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).flatten(1))


@dataclass
class Trained:
    """What the live training loop saw, to compare with what the run recorded."""

    path: Path
    thetas: list[dict[str, torch.Tensor]] = field(default_factory=list)  # θ_0 … θ_N
    pre_clip_norms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def train(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 37,
          inputs: torch.Tensor | None = None, labels: torch.Tensor | None = None,
          clip: float | None = 0.5, schedule: bool = True, micro_batches: int = 1,
          batch: int = 32, **recorder_kwargs) -> Trained:
    """A standard loop with the recorder attached; keeps the live θ after every step."""
    if inputs is None:
        inputs, labels = data()
    out = Trained(path)
    sched = torch.optim.lr_scheduler.StepLR(opt, 7, 0.5) if schedule else None
    g = torch.Generator().manual_seed(3)
    recorder_kwargs.setdefault("checkpoint_every", 10)
    recorder_kwargs.setdefault("steps_per_chunk", 8)
    with attrib.Recorder(path, model, opt, **recorder_kwargs) as rec:
        out.thetas.append({k: v.detach().clone() for k, v in model.named_parameters()})
        for _ in range(steps):
            for _ in range(micro_batches):
                ids = torch.randint(0, len(inputs), (batch,), generator=g)
                rec.examples(ids)
                loss = torch.nn.functional.cross_entropy(model(inputs[ids]), labels[ids])
                (loss / micro_batches).backward()
            if clip is not None:
                out.pre_clip_norms.append(
                    float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            opt.step()
            opt.zero_grad()
            if sched is not None:
                sched.step()
            rec.log(loss=loss)
            out.losses.append(loss.item())
            out.thetas.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def tiny_gpt2(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Hugging Face's GPT2LMHeadModel at a tiny size (Conv1D layers, lm_head tied to wte,
    position_ids); the test is skipped where transformers is not installed."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(dtype)


def assert_rows_equal_autograd(run: attrib.Run, make, share, rel: float) -> None:
    """Every recorded row against plain autograd, one example at a time, at the θ_s the run
    reconstructs: `share(model, ids, row)` is that example's share of the step's loss."""
    reference = make()
    params = dict(reference.named_parameters())
    for step in range(run.n_steps):
        with torch.no_grad():
            for name, value in run.reconstruct(step).items():
                params[name].copy_(value)
        ids, got = run.contributions(step)
        for row in range(len(ids)):
            expected = torch.autograd.grad(share(reference, ids, row), list(params.values()))
            for (name, _), value in zip(params.items(), expected):
                torch.testing.assert_close(got[name][row], value, rtol=0,
                                           atol=rel * float(value.abs().max()) + 1e-15,
                                           msg=f"{name} step {step} row {row}")
