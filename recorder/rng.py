"""Random-number-generator states per training forward, so stochastic models can be replayed.

A model with dropout draws a fresh mask every forward; replaying a step (stage accountability,
METHODS.md §4) must draw the same one. A forward pre-hook on the model copies the generator
state (CPU, and the model's CUDA device when it has one) before every training-mode forward;
the k-th forward after an optimizer step belongs to the k-th micro-batch of the next step.
A CPU state is 5 KB; it is recorded only for stochastic models unless asked.
"""

from __future__ import annotations

import torch


def stochastic_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules that draw random numbers in training mode (dropout with p > 0,
    RReLU, attention with dropout): what makes a replay need the recorded RNG states."""
    found = []
    for name, module in model.named_modules():
        dropout = isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0
        attention = isinstance(module, torch.nn.MultiheadAttention) and module.dropout > 0
        if dropout or attention or isinstance(module, torch.nn.RReLU):
            found.append(name or "(model)")
    return found


def device_of(model: torch.nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def generator_states(device: torch.device) -> list[tuple[str, bytes]]:
    """(device name, state bytes) for the CPU generator and, on CUDA, the device's."""
    states = [("cpu", torch.get_rng_state().numpy().tobytes())]
    if device.type == "cuda":
        states.append((str(device), torch.cuda.get_rng_state(device).numpy().tobytes()))
    return states


def restore_states(states: list[tuple[str, bytes]], device: torch.device) -> None:
    """Set the generators a forward on `device` draws from to recorded states."""
    for name, state in states:
        tensor = torch.frombuffer(bytearray(state), dtype=torch.uint8)
        if name == "cpu":
            torch.set_rng_state(tensor)
        elif device.type == "cuda" and torch.device(name) == device:
            torch.cuda.set_rng_state(tensor, device)


class RngCapture:
    """Collects the generator states of each training-mode forward until the step ends."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = device_of(model)
        self.forwards: list[list[tuple[str, bytes]]] = []
        self.enabled = True
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        if self.enabled and module.training:
            self.forwards.append(generator_states(self.device))

    def take(self) -> list[list[tuple[str, bytes]]]:
        """The states of the step that just ended; the next forward starts the next step."""
        forwards, self.forwards = self.forwards, []
        return forwards

    def remove(self) -> None:
        self._handle.remove()
