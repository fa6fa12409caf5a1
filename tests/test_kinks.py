"""Kinks along a segment (analyzer/path_kernel/kinks.py, points.py): the recorded offsets and
probe slopes against forward hooks and autograd, and the located crossings against a
bisection of the model's own pre-activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from attrib.analyzer.path_kernel.kinks import crossings, locate, refine
from attrib.analyzer.path_kernel.points import PathPoints


class Kinked(torch.nn.Module):
    """Every activation the recorder knows, one after another; unit 0 of the last hidden layer
    is multiplied by zero before the output, so it cannot move f."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = (torch.nn.Linear(5, 8), torch.nn.Linear(8, 8),
                                  torch.nn.Linear(8, 8))
        self.d, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)
        self.acts = [torch.nn.ReLU(), torch.nn.Hardtanh(-0.3, 0.4), torch.nn.LeakyReLU(0.1),
                     torch.nn.ReLU(inplace=True)]
        self.mask = torch.ones(8, dtype=torch.float64)
        self.mask[0] = 0

    def forward(self, x):
        h = x
        for layer, act in zip((self.a, self.b, self.c, self.d), self.acts):
            h = act(layer(h))
        return self.out(h * self.mask)


def model_and_points(n=4):
    model = Kinked().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.arange(n) % 3
    names = [name for name, _ in model.named_parameters()]
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    delta = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.5
             for k, v in theta.items()}
    points = PathPoints(model, names, x, y, "loss")
    points.on(theta, delta)
    return model, points, x, y


def hooked(model, params, x, y):
    """Pre-activations (minus each level) and ∂f/∂activation output, with hooks and autograd."""
    inputs, outputs = [], []

    def hook(module, args, output):
        inputs.append(args[0].detach().clone() if module.inplace else args[0].detach())
        output.retain_grad()
        outputs.append(output)

    for act in model.acts:
        act.register_forward_hook(hook)
    model.acts[3].inplace = False  # a hook can't keep an in-place output's input
    loss = F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")
    loss.sum().backward()
    levels = [(0.0,), (-0.3, 0.4), (0.0,), (0.0,)]
    offsets = torch.cat([torch.cat([(z - lv).reshape(len(x), -1) for lv in lvs], 1)
                         for z, lvs in zip(inputs, levels)], 1)
    slopes = torch.cat([o.grad.reshape(len(x), -1).repeat(1, len(lvs))
                        for o, lvs in zip(outputs, levels)], 1)
    return offsets, slopes


def test_offsets_and_slopes_match_hooks_and_autograd():
    """Per test point, each activation's input minus its levels (both hardtanh bounds), in
    call order, and ∂f/∂output for each; zero for the unit that can't reach f."""
    model, points, x, y = model_and_points()
    t = torch.full((len(y),), 0.3, dtype=torch.float64)
    offsets, slopes = points.kinks(torch.arange(len(y)), t)
    params = {k: v.detach().requires_grad_(True) for k, v in points.at(0.3).items()}
    want_offsets, want_slopes = hooked(model, params, x, y)
    torch.testing.assert_close(offsets, want_offsets, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slopes, want_slopes, rtol=1e-10, atol=1e-12)
    last = offsets.shape[1] - 8  # the in-place ReLU's units; unit 0 is masked out
    assert (slopes[:, last] == 0).all() and (slopes[:, last + 1:].abs() > 0).any()


def test_crossings_are_located_where_the_pre_activation_changes_sign():
    """Crossings found between the segment's ends, refined by Illinois steps, agree with a
    60-step bisection of the model's own pre-activation to 1e-8 of the segment, although the
    deeper layers' pre-activations are far from linear in t (their linear guesses are not)."""
    _, points, _, y = model_and_points()
    rows = torch.arange(len(y))
    (z0, s0), (z1, s1) = (points.kinks(rows, torch.full((len(y),), float(t),
                                                         dtype=torch.float64)) for t in (0, 1))
    at, column, guess, jump = crossings(z0, z1, s0, s1)
    assert len(at) > 10 and (jump >= 0).all()

    def offset_at(which, t):
        z = points.kinks(rows[at[which]], t, slopes=False)[0]
        return z[torch.arange(len(which)), column[which]]

    located = locate(offset_at, guess, z0[at, column], z1[at, column])
    lo, hi = torch.zeros_like(guess), torch.ones_like(guess)
    everything = torch.arange(len(at))
    for _ in range(60):
        middle = (lo + hi) / 2
        left = (offset_at(everything, middle) > 0) != (z0[at, column] > 0)
        lo, hi = torch.where(left, lo, middle), torch.where(left, middle, hi)
    torch.testing.assert_close(located, (lo + hi) / 2, rtol=0, atol=1e-8)
    assert (guess - (lo + hi) / 2).abs().max() > 1e-3  # linear interpolation alone is off


def test_illinois_steps_converge_superlinearly_on_a_curved_offset():
    """(t − 0.25)(3 + 40 (t − 0.1)²): plain regula falsi creeps in from one side (error
    ~1e-4 after 14 steps); Illinois reaches 1e-12 within 12."""
    def z(t):
        return (t - 0.25) * (3 + 40 * (t - 0.1) ** 2)

    zeros, ones = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    bracket = (zeros, ones, z(zeros), z(ones), torch.zeros(1, dtype=torch.long))
    t = z(zeros) / (z(zeros) - z(ones))
    for _ in range(12):
        bracket, t = refine(bracket, t, z(t))
    assert abs(float(t) - 0.25) < 1e-12


class Statements(torch.nn.Module):
    """ReLU applied as an in-place statement (the result unused) or through `input=`."""

    def __init__(self, style: str) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a, self.out, self.style = torch.nn.Linear(5, 8), torch.nn.Linear(8, 3), style

    def forward(self, x):
        h = self.a(x)
        if self.style == "statement":
            h.relu_()
        elif self.style == "keyword":
            h = torch.relu(input=h)
        else:
            h = F.relu(h)
        return self.out(h)


def test_in_place_statements_and_keyword_inputs_record_the_same_kinks():
    """`h.relu_()` whose result is unused must still carry the probe (the model reads h), and
    `torch.relu(input=h)` passes its tensor by keyword: both equal the plain F.relu's."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2])
    found = {}
    for style in ("plain", "statement", "keyword"):
        model = Statements(style).double()
        theta = {k: v.detach() for k, v in model.named_parameters()}
        points = PathPoints(model, list(theta), x, y, "loss")
        points.on(theta, {k: torch.ones_like(v) for k, v in theta.items()})
        found[style] = points.kinks(torch.arange(3), torch.full((3,), 0.5, dtype=torch.float64))
    assert found["plain"][1].abs().max() > 0
    for style in ("statement", "keyword"):
        torch.testing.assert_close(found[style], found["plain"], rtol=0, atol=0)
