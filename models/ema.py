"""Exponential moving average of parameters, keyed by parameter name (the reference's update rule).

decay_n = min(decay, (1 + n) / (10 + n)) with n the update count after incrementing;
shadow <- shadow - (1 - decay_n) * (shadow - param). Keys are parameter names, so loading can
never silently assign a tensor to the wrong parameter (the reference stores an unnamed list).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad
        }
        self._stored: dict[str, Tensor] | None = None

    @torch.no_grad()
    def reset(self, module: nn.Module) -> None:
        """Restart the average at the module's current weights (update count 0)."""
        for name, p in self._params(module).items():
            self.shadow[name] = p.detach().clone()
        self.num_updates = 0

    def _params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())
            extra = sorted(params.keys() - self.shadow.keys())
            raise KeyError(f"EMA keys do not match the module: missing={missing} extra={extra}")
        return params

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, p in self._params(module).items():
            s = self.shadow[name]
            if s.device != p.device:
                s = self.shadow[name] = s.to(p.device)
            s.sub_((1.0 - decay) * (s - p))

    @torch.no_grad()
    def store(self, module: nn.Module) -> None:
        """Remember the live weights so that `restore` can put them back."""
        self._stored = {n: p.detach().clone() for n, p in self._params(module).items()}

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for name, p in self._params(module).items():
            p.copy_(self.shadow[name])

    @torch.no_grad()
    def restore(self, module: nn.Module) -> None:
        if self._stored is None:
            raise RuntimeError("EMA.restore called without a preceding store")
        for name, p in self._params(module).items():
            p.copy_(self._stored[name])
        self._stored = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - shadow.keys())
            extra = sorted(shadow.keys() - self.shadow.keys())
            raise KeyError(f"EMA checkpoint keys differ: missing={missing} unexpected={extra}")
        for name, t in shadow.items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(
                    f"EMA tensor {name}: checkpoint shape {tuple(t.shape)} "
                    f"!= model shape {tuple(self.shadow[name].shape)}"
                )
            self.shadow[name] = t.detach().clone().to(self.shadow[name].device)
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
