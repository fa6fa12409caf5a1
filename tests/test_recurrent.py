"""Recurrent layers (nn.GRU, nn.LSTM, nn.RNN; batch-first or time-first, 1-2 layers,
bidirectional, a given initial state, the loss on the outputs or on h_n): per-example rows
against each example's own autograd gradient in float64 (torch.func has no batching rule for
their kernels, so the reference differentiates one example at a time)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rows_equal_autograd
from torch import nn

import attrib

F64 = torch.float64


class Recurrent(nn.Module):
    """Embedding → a recurrent layer → a linear head on its last output or its final h."""

    def __init__(self, kind: str, batch_first: bool, layers: int, bidirectional: bool,
                 read: str, initial: bool | str = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(12, 6)
        self.rnn = getattr(nn, kind)(6, 5, num_layers=layers, batch_first=batch_first,
                                     bidirectional=bidirectional)
        self.head = nn.Linear(5 * (2 if bidirectional else 1), 3)
        self.batch_first, self.read, self.initial = batch_first, read, initial

    def forward(self, tokens):
        x = self.embed(tokens)
        args = [x if self.batch_first else x.transpose(0, 1)]
        if self.initial:  # a given initial state (h0, and c0 for an LSTM)
            h0 = torch.full((self.rnn.num_layers * (2 if self.rnn.bidirectional else 1),
                             len(tokens), 5), 0.3, dtype=x.dtype)
            args.append((h0, -h0) if isinstance(self.rnn, nn.LSTM) else h0)
        if self.initial == "keyword":  # rnn(x, hx=...)
            out, state = self.rnn(args[0], hx=args[1])
        else:
            out, state = self.rnn(*args)
        if self.read == "h_n":
            h = state[0] if isinstance(state, tuple) else state
            last = torch.cat([h[-1], h[-2]], -1) if self.rnn.bidirectional else h[-1]
        else:
            last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last)


CASES = [("GRU", True, 1, False, "output"), ("GRU", False, 2, False, "h_n", True),
         ("LSTM", True, 1, True, "h_n"), ("LSTM", False, 2, True, "output", True),
         ("RNN", True, 2, False, "h_n"), ("GRU", True, 1, False, "output", "keyword"),
         ("LSTM", True, 1, False, "h_n", "keyword")]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_recurrent_rows_equal_each_examples_gradient(run_dir, case):
    def make():
        return Recurrent(*case).to(F64)

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 12, (64, 7), generator=g)
    labels = tokens[:, 0] % 3
    with attrib.Recorder(run_dir, model, opt, capture=attrib.Full(dtype="float64"),
                         strict=True) as rec:
        for _ in range(2):
            ids = torch.randperm(64, generator=g)[:6]
            rec.examples(ids)
            F.cross_entropy(model(tokens[ids]), labels[ids]).backward()
            opt.step()
            opt.zero_grad()
    run = attrib.open_run(run_dir)
    assert float(run.residual_norms().max()) < 1e-10
    def share(reference, ids, row):
        example = int(ids[row])
        return F.cross_entropy(reference(tokens[example][None]), labels[example][None]
                               ) / len(ids)

    assert_rows_equal_autograd(run, make, share, rel=1e-10)


def test_packed_sequences_are_said_and_recorded_as_residual(run_dir):
    model = Recurrent("GRU", True, 1, False, "output").to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 12, (4, 7), generator=torch.Generator().manual_seed(1))
    with attrib.Recorder(run_dir, model, opt, capture=attrib.Full(dtype="float64")) as rec, \
            pytest.warns(UserWarning, match="packed sequences are not supported; pad the batch"):
        rec.examples(torch.arange(4))
        packed = nn.utils.rnn.pack_padded_sequence(model.embed(tokens), [7, 6, 5, 3],
                                                   batch_first=True)
        out, _ = model.rnn(packed)
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        F.cross_entropy(model.head(padded.mean(1)), tokens[:, 0] % 3).backward()
        opt.step()
    norms = attrib.open_run(run_dir).residual_norms()[0]
    assert (norms[1:5] == 1.0).all()  # the GRU's four tensors: wholly residual
