"""An exponential moving average of a network's weights: what a diffusion trainer releases.

Diffusion networks are released as the EMA of their training weights (Ho et al. 2020; Karras et al.
2022 study the averaging length): the average smooths the last steps' noise out of the weights and
samples better than the raw weights at the same step. The decay warms up as
``min(decay, (1 + n) / (10 + n))`` after n updates (the TensorFlow ``ExponentialMovingAverage``
``num_updates`` rule), so a short or freshly resumed run is not pinned to its initial weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EmaWeights:
    """A float32 shadow of every floating tensor of ``model.state_dict()`` (buffers too), on the model's device."""

    def __init__(self, model: nn.Module, decay: float, updates: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay, self.updates = decay, updates
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average toward the model's current weights (call after each optimizer step)."""
        decay = self.current_decay()
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach().float(), 1.0 - decay)
        self.updates += 1

    def averaged(self, model: nn.Module) -> nn.Module:
        """A CPU copy of ``model`` holding the averaged weights (the model itself is untouched)."""
        copied = copy.deepcopy(model).cpu()
        state = copied.state_dict()
        copied.load_state_dict({k: (self.shadow[k].to(v.dtype).cpu() if k in self.shadow else v)
                                for k, v in state.items()})
        return copied

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {k: v.detach().cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.updates = int(state["updates"])
        self.shadow = {k: v.to(device).float() for k, v in state["shadow"].items()}
