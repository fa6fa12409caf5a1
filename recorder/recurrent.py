"""Per-example contributions of recurrent layers (nn.RNN, nn.GRU, nn.LSTM) in closed form.

torch.func has no batching rule for the fused recurrent kernels, so the generic vmap path can't
run them. Each example's computation is still independent of the others', so the layer is run
again, unrolled over time with batched tensor ops (a loop over time steps, never over examples),
and one backward of the output gradients through it gives every example's gate gradients δ. A
weight's per-example gradient is then a sum of outer products, as for a Linear layer:
W_ih: Σ_t δ^i_t x_tᵀ, W_hh: Σ_t δ^h_t h_{t−1}ᵀ, the biases Σ_t δ_t; δ^h differs from δ^i for
the GRU's candidate gate, which multiplies W_hn h + b_hn by the reset gate.
"""

from __future__ import annotations

import torch
from torch import nn

from attrib.recorder.per_example import Dense, Outer, PerExample


class RecurrentCaptureError(ValueError):
    """A call the closed form does not cover (packed or unbatched input)."""


def unsupported(module: nn.RNNBase) -> str | None:
    """Why this layer's configuration can't be captured, or None."""
    if getattr(module, "proj_size", 0):
        return "LSTM with proj_size is not supported"
    if module.dropout and module.num_layers > 1:
        return "dropout between recurrent layers is random per call; set dropout=0"
    return None


def rule(module: nn.RNNBase, args: tuple, kwargs: dict, grads: list[torch.Tensor | None]
         ) -> dict[str, PerExample]:
    """Contributions of every parameter of `module` for one call with inputs `args` and the
    gradients of its outputs (output, h_n[, c_n]; None where the loss did not read one)."""
    x = args[0]  # packed input and unsupported layers never get here (capture.py refuses)
    if x.dim() != 3:
        raise RecurrentCaptureError("unbatched input is not supported")
    first = module.batch_first
    x = x.detach() if first else x.detach().transpose(0, 1)  # (B, T, I)
    batch, steps = x.shape[:2]
    hidden, layers = module.hidden_size, module.num_layers
    directions = 2 if module.bidirectional else 1
    lstm = module.mode == "LSTM"
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    h0, c0 = (hx if lstm and hx is not None else (hx, None))
    zeros = x.new_zeros(layers * directions, batch, hidden)
    h0 = zeros if h0 is None else h0.detach()
    c0 = zeros if c0 is None and lstm else (c0.detach() if lstm else None)

    suffixes = [f"_l{layer}" + ("_reverse" if d else "")
                for layer in range(layers) for d in range(directions)]
    with torch.enable_grad():
        layer_input = x
        gi_all, gh_all, inputs, previous, finals_h, finals_c = [], [], [], [], [], []
        for layer in range(layers):
            outputs = []
            for d in range(directions):
                suffix = suffixes[layer * directions + d]
                # fresh leaves: the recomputation needs a graph through the gates
                w_ih, w_hh, b_ih, b_hh = (
                    None if p is None else p.detach().requires_grad_()
                    for p in (getattr(module, name + suffix, None)
                              for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
                gi = layer_input @ w_ih.T
                if b_ih is not None:
                    gi = gi + b_ih
                h = h0[layer * directions + d]
                c = c0[layer * directions + d] if lstm else None
                order = range(steps - 1, -1, -1) if d else range(steps)
                hs, ghs, prevs = [None] * steps, [None] * steps, [None] * steps
                for t in order:
                    gh = h @ w_hh.T
                    if b_hh is not None:
                        gh = gh + b_hh
                    prevs[t], ghs[t] = h, gh
                    h, c = _cell(module.mode, gi[:, t], gh, h, c)
                    hs[t] = h
                outputs.append(torch.stack(hs, 1))
                gi_all.append(gi)
                gh_all.append(ghs)
                inputs.append(layer_input)
                previous.append(torch.stack(prevs, 1))
                finals_h.append(h)
                finals_c.append(c)
            layer_input = torch.cat(outputs, -1) if directions == 2 else outputs[0]
        results = [layer_input, torch.stack(finals_h)] + ([torch.stack(finals_c)] if lstm else [])
        seeds = [_batch_first(grads[0], first) if grads[0] is not None else None,
                 *grads[1:]]
        pairs = [(r, s) for r, s in zip(results, seeds) if s is not None]
        wrt = gi_all + [gh for ghs in gh_all for gh in ghs]
        deltas = torch.autograd.grad([r for r, _ in pairs], wrt, [s for _, s in pairs],
                                     allow_unused=True)
    n = len(gi_all)
    out: dict[str, PerExample] = {}
    for k, suffix in enumerate(suffixes):
        d_gi = _zero_if_none(deltas[k], gi_all[k])
        ghs = gh_all[k]
        d_gh = torch.stack([_zero_if_none(deltas[n + k * steps + t], ghs[t])
                            for t in range(steps)], 1)
        w_ih = getattr(module, "weight_ih" + suffix)
        w_hh = getattr(module, "weight_hh" + suffix)
        out["weight_ih" + suffix] = Outer(d_gi.detach(), inputs[k].detach(), tuple(w_ih.shape))
        out["weight_hh" + suffix] = Outer(d_gh.detach(), previous[k].detach(),
                                          tuple(w_hh.shape))
        if getattr(module, "bias_ih" + suffix, None) is not None:
            out["bias_ih" + suffix] = Dense(d_gi.detach().sum(1))
            out["bias_hh" + suffix] = Dense(d_gh.detach().sum(1))
    return out


def _cell(mode: str, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor,
          c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One time step of PyTorch's cell equations, from the two affine parts."""
    if mode == "GRU":
        ir, iz, i_n = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        candidate = torch.tanh(i_n + r * hn)
        return (1 - z) * candidate + z * h, None
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    pre = gi + gh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def _batch_first(t: torch.Tensor, first: bool) -> torch.Tensor:
    return t if first else t.transpose(0, 1)


def _zero_if_none(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if value is None else value
