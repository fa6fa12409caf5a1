"""The step's check that per-example rows explain each tensor's gradient, batched.

For every captured tensor j the recorder compares G_j / α (the gradient before clipping) with
S_j = Σ_i c_i (or both projected by the same R): ‖G_j/α − S_j‖ / max(‖G_j/α‖, floor). Done
tensor by tensor that was ~7 small ops per tensor; here all tensors on one device share a
handful (one concatenation, one subtraction, two grouped norms). On the 36-tensor GPT the
loop had been ~0.5% of the training thread, so the step time did not change measurably. Sums
are taken in float64 so that float32 rounding of the rows themselves is what the check sees,
not rounding of the check.
"""

from __future__ import annotations

import torch


def relative_gaps(gradients: list[torch.Tensor], sums: list[torch.Tensor | None],
                  clip_factor: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Per tensor, ‖G/α − S‖ / max(‖G/α‖, floor) as float64 on clip_factor's device; a
    missing sum (None: no row reached the tensor) counts as zero, a gap of 1."""
    out = torch.empty(len(gradients), dtype=torch.float64, device=clip_factor.device)
    by_device: dict[torch.device, list[int]] = {}
    for index, gradient in enumerate(gradients):
        by_device.setdefault(gradient.device, []).append(index)
    for device, indices in by_device.items():
        alpha = clip_factor.to(device, torch.float64)
        before = _flat([gradients[i] for i in indices]) / alpha
        total = _flat([torch.zeros_like(gradients[i]) if sums[i] is None else sums[i]
                       for i in indices])
        sizes = [gradients[i].numel() for i in indices]
        gap = torch.stack(torch._foreach_norm(list((before - total).split(sizes))))
        scale = torch.stack(torch._foreach_norm(list(before.split(sizes))))
        ratio = gap / torch.maximum(scale, floor.to(device, torch.float64))
        out[torch.tensor(indices, device=out.device)] = ratio.to(out.device)
    return out


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One float64 vector of the tensors (cat promotes mixed dtypes, one cast for all)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double()
