"""Small reference setups (METHODS.md §6) shared by tests, benchmarks and the demo: seeded,
CPU, seconds long."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from attrib.analyzer.run import Run, open_run
from attrib.recorder.recorder import Recorder

STAGE_LENGTHS = (5, 10, 20)
SGD_LR, ADAMW_LR = 0.05, 0.01


@dataclass
class StageScenario:
    """A recorded run with what stage accountability needs to analyse it."""

    run: Run
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    stages: dict[str, range]

    @staticmethod
    def model() -> torch.nn.Module:
        torch.manual_seed(11)
        return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(),
                                   torch.nn.Linear(32, 4))


def teacher_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs labelled by a fixed random tanh network (with 10% label noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    teacher = torch.Generator().manual_seed(123)
    w1, w2 = torch.randn(12, 16, generator=teacher), torch.randn(16, 4, generator=teacher)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    noisy = torch.rand(n, generator=g) < 0.1
    y[noisy] = torch.randint(0, 4, (int(noisy.sum()),), generator=g)
    return x, y


def _optimizer(model: torch.nn.Module, optimizer: str, steps: int, lr: float | None):
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr or SGD_LR, momentum=0.9,
                              weight_decay=5e-3)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr or ADAMW_LR, weight_decay=0.05)
    else:
        raise ValueError(f"optimizer={optimizer!r}: use 'sgd' or 'adamw'")
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))


def train_scenario(optimizer: str = "sgd", steps: int = 120, batch: int = 32,
                   recorder_path: str | Path | None = None, lr: float | None = None,
                   model_fn: Callable[[], torch.nn.Module] = StageScenario.model,
                   train: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """Train `model_fn()` (default: the scenario's model on its teacher data), recorded into
    `recorder_path` (or not recorded: the plain training a benchmark compares with); returns
    the wall-clock seconds."""
    train = teacher_data(512, 0) if train is None else train
    model = model_fn()
    opt, schedule = _optimizer(model, optimizer, steps, lr)
    g = torch.Generator().manual_seed(5)
    started = time.perf_counter()
    with (Recorder(recorder_path, model, opt, capture=False, checkpoint_every=40,
                   overwrite=True) if recorder_path is not None else nullcontext()) as rec:
        for _ in range(steps):
            ids = torch.randint(0, len(train[1]), (batch,), generator=g)
            if rec is not None:
                rec.examples(ids)
            loss = torch.nn.functional.cross_entropy(model(train[0][ids]), train[1][ids])
            loss.backward()
            opt.step()
            opt.zero_grad()
            schedule.step()
            if rec is not None:
                rec.log(loss=loss)
    return time.perf_counter() - started


def stage_scenario(path: str | Path, optimizer: str = "sgd", steps: int = 120,
                   batch: int = 32, lr: float | None = None) -> StageScenario:
    """METHODS.md §4's prototype: tanh MLP, SGD + momentum 0.9 with weight decay (or AdamW
    with decoupled decay), cosine learning rate; 9 stages of 5, 10 and 20 steps early, in the
    middle and late; 40 test points."""
    train_scenario(optimizer, steps, batch, path, lr)
    positions = {"early": 2, "middle": steps // 2 - 10, "late": steps - 25}
    stages = {f"{where}+{length}": range(start, start + length)
              for where, start in positions.items() for length in STAGE_LENGTHS}
    return StageScenario(open_run(path), teacher_data(512, 0), teacher_data(40, 1), stages)
