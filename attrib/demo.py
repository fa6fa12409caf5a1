"""`attrib demo`: record a real small training run, then summarise and query it.

A three-class spiral (generated, no download) learned by an MLP with AdamW, a warm-up then
cosine learning-rate schedule, gradient clipping and two named stages: every recorder feature a
researcher's loop exercises, in seconds on a laptop CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

import attrib
from attrib.cli import render

STAGE_QUERY = """
SELECT stage, count(*) AS steps, min(step) AS first_step, round(avg(loss), 4) AS mean_loss,
       round(avg(metrics['accuracy']), 3) AS mean_accuracy, round(max(lr[1]), 5) AS max_lr,
       round(avg(clip_factor), 3) AS mean_clip_factor
FROM steps GROUP BY stage ORDER BY first_step
""".strip()


def spirals(n_per_class: int = 500, classes: int = 3, seed: int = 0):
    """Interleaved noisy spirals in 2-D: a small problem an MLP must bend to solve."""
    g = torch.Generator().manual_seed(seed)
    radius = torch.linspace(0.05, 1.0, n_per_class).repeat(classes)
    label = torch.arange(classes).repeat_interleave(n_per_class)
    angle = label * (2 * math.pi / classes) + radius * 4.0
    angle = angle + 0.2 * torch.randn(angle.shape, generator=g)
    x = torch.stack([radius * torch.sin(angle), radius * torch.cos(angle)], dim=1)
    return x, label


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 3),
    )


def train_and_record(out: Path, epochs: int, progress: bool) -> Path:
    x, y = spirals()
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    batch, warmup_epochs = 64, 2
    per_epoch = math.ceil(len(x) / batch)
    total = epochs * per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (warmup_epochs * per_epoch))
        * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    order = torch.Generator().manual_seed(1)
    bar = tqdm(total=total, desc="training (recorded)", disable=not progress, unit="step")
    with attrib.Recorder(out, model, opt, checkpoint_every=per_epoch, overwrite=True,
                         metadata={"demo": "spirals-mlp"}) as rec:
        rec.stage("warmup")
        for epoch in range(epochs):
            if epoch == warmup_epochs:
                rec.stage("train")
            rec.epoch(epoch)
            perm = torch.randperm(len(x), generator=order)
            for ids in perm.split(batch):
                rec.examples(ids)
                logits = model(x[ids])
                loss = torch.nn.functional.cross_entropy(logits, y[ids])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
                opt.step()
                opt.zero_grad()
                schedule.step()
                accuracy = (logits.argmax(1) == y[ids]).float().mean()
                rec.log(loss=loss, accuracy=accuracy)
                bar.update()
    bar.close()
    return out


def run_demo(out: Path, quick: bool = False, progress: bool = True,
             echo: Callable[[str], None] = print) -> Path:
    """Train, record, then print `attrib info` and a per-stage SQL summary."""
    train_and_record(out, epochs=4 if quick else 30, progress=progress)
    echo(f"\n$ attrib info {out}")
    echo(render.summary(attrib.open_run(out).info()))
    echo(f'\n$ attrib sql {out} "{" ".join(STAGE_QUERY.split())}"')
    echo(render.aligned(attrib.sql(out, STAGE_QUERY)))
    return out
