"""What the recorder needs to know about each supported torch.optim optimizer.

METHODS.md §1 shows SGD (momentum, dampening, Nesterov, L2), Adam (L2) and AdamW (decoupled decay,
AMSGrad) are linear in the gradients given their state; this module reads the hyperparameters
and the state those formulas need, and refuses anything else up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attrib.schemas import format as fmt

SUPPORTED = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}


# Per-group constructor flags that pick torch.optim's kernels or semantics: a replay passes them
# back so it runs the code that trained (None: torch chose by device, as it will again).
IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable",
                        "decoupled_weight_decay")


class UnsupportedOptimizerError(TypeError):
    pass


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer's family and the state names recorded each step."""

    kind: str  # one of schemas.format.OPTIMIZER_KINDS
    class_name: str
    amsgrad: bool

    @property
    def step_state(self) -> tuple[str, ...]:
        """Per-step state tensors, under the names the format uses."""
        return fmt.STEP_STATE[self.kind]


def inspect_optimizer(optimizer: torch.optim.Optimizer) -> OptimizerSpec:
    """Classify the optimizer, raising a clear error for anything the math doesn't cover."""
    kind = SUPPORTED.get(type(optimizer))
    if kind is None:
        names = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED)
        raise UnsupportedOptimizerError(
            f"attrib can't record {type(optimizer).__module__}.{type(optimizer).__name__}: "
            f"supported optimizers are {names} (exact classes, not subclasses). "
            "Use one of them, or open an issue for the optimizer you need."
        )
    amsgrad = False
    for i, group in enumerate(optimizer.param_groups):
        if group.get("maximize", False):
            raise UnsupportedOptimizerError(
                f"param group {i} has maximize=True, which attrib does not record; "
                "minimize the negated objective instead"
            )
        if kind != "sgd" and group.get("decoupled_weight_decay", False):
            kind = "adamw"  # Adam(decoupled_weight_decay=True) is AdamW
        amsgrad = amsgrad or bool(group.get("amsgrad", False))
    if amsgrad and not all(g.get("amsgrad", False) for g in optimizer.param_groups):
        raise UnsupportedOptimizerError(
            "amsgrad is on for some param groups and off for others; use one setting for all"
        )
    return OptimizerSpec(kind=kind, class_name=type(optimizer).__name__, amsgrad=amsgrad)


def _as_float(value: object) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def group_hparams(spec: OptimizerSpec, group: dict) -> dict[str, float]:
    """The hyperparameters of one param group, keyed as schemas.format.HPARAM_NAMES (NaN: n/a)."""
    values = dict.fromkeys(fmt.HPARAM_NAMES, math.nan)
    values["lr"] = _as_float(group["lr"])
    values["weight_decay"] = _as_float(group.get("weight_decay", 0.0))
    if spec.kind == "sgd":
        values["momentum"] = _as_float(group.get("momentum", 0.0))
        values["dampening"] = _as_float(group.get("dampening", 0.0))
    else:
        beta1, beta2 = group["betas"]
        values["beta1"], values["beta2"] = _as_float(beta1), _as_float(beta2)
        values["eps"] = _as_float(group["eps"])
    return values


def static_config(spec: OptimizerSpec, optimizer: torch.optim.Optimizer) -> dict:
    """Flags that can't change during a run, stored once in the run metadata."""
    groups = []
    for group in optimizer.param_groups:
        flags = {"nesterov": bool(group.get("nesterov", False))} if spec.kind == "sgd" else {}
        flags["amsgrad"] = bool(group.get("amsgrad", False))
        # the implementation a replay must use to rebuild θ bit for bit (format v2)
        flags.update({k: group[k] for k in IMPLEMENTATION_FLAGS if k in group})
        if isinstance(group["lr"], torch.Tensor):  # a tensor lr takes other arithmetic
            flags["lr_dtype"] = str(group["lr"].dtype).removeprefix("torch.")
        groups.append(flags)
    return {"kind": spec.kind, "class": spec.class_name, "amsgrad": spec.amsgrad, "groups": groups}


def state_tensor(spec: OptimizerSpec, state: dict, name: str) -> torch.Tensor | None:
    """One per-step state tensor; for AMSGrad the running max is what the update divides by."""
    if name == "exp_avg_sq" and spec.amsgrad:
        return state.get("max_exp_avg_sq")
    return state.get(name)


def step_count(state: dict) -> int:
    """The optimizer's own step counter for a parameter (Adam's t_s); 0 when it keeps none."""
    step = state.get("step")
    return 0 if step is None else int(_as_float(step))


def adam_denominator(v: torch.Tensor, beta2: float, eps: float, t: int) -> torch.Tensor:
    """D_s = sqrt(v_s / (1 − β2^t)) + ε, with ε outside the square root as torch does."""
    return (v / (1.0 - beta2**t)).sqrt() + eps


def adam_update_scale(hparams: dict[str, float], v: torch.Tensor, t: int) -> torch.Tensor:
    """−η_s / ((1 − β1^t) D_s): what Adam's step s multiplies its first moment m_s by."""
    return -hparams["lr"] / ((1.0 - hparams["beta1"] ** t)
                             * adam_denominator(v, hparams["beta2"], hparams["eps"], t))


def momentum_intake(hparams: dict[str, float], first_momentum_step: bool) -> float:
    """The share of d_s that enters SGD's momentum buffer: all of it on the buffer's first
    step (torch skips dampening there) or without momentum, else 1 − τ."""
    if first_momentum_step or hparams["momentum"] == 0:
        return 1.0
    return 1.0 - hparams["dampening"]


def immediate_coefficient(spec: OptimizerSpec, hparams: dict[str, float], nesterov: bool,
                          state: dict, first_momentum_step: bool) -> float | torch.Tensor:
    """K_{s,s}: how step s's update scales the gradient it consumed at step s (METHODS.md §1).

    SGD: −η (plain), −η·(1−τ) into the momentum buffer (−η on the buffer's first step),
    Nesterov adds the direct term; Adam/AdamW: κ_s / D_s elementwise. Decay is data-free and
    not part of it.
    """
    if spec.kind == "sgd":
        intake = momentum_intake(hparams, first_momentum_step)
        return -hparams["lr"] * (1.0 + hparams["momentum"] * intake if nesterov else intake)
    v = state_tensor(spec, state, "exp_avg_sq")
    return (1.0 - hparams["beta1"]) * adam_update_scale(hparams, v, step_count(state))
