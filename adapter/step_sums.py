"""A training or eval step's summed loss and named sums, kept on the device and
all-reduced in one collective."""

from __future__ import annotations

import torch
import torch.distributed as dist

from adapter.objectives.base import LossOutput


class Sums:
    """The summed loss and the objective's named sums over micro-batches, on the device
    (``loss`` first, then the keys of ``LossOutput.sums`` as the first batch had them)."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.device = device
        self.values: dict[str, torch.Tensor] = {"loss": self._zero()}

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=self.dtype, device=self.device)

    def __len__(self) -> int:
        return len(self.values)

    def add(self, output: LossOutput) -> None:
        for key, value in {"loss": output.loss, **output.sums}.items():
            if key not in self.values:
                self.values[key] = self._zero()
            self.values[key] += value.detach().to(self.dtype)

    def stacked(self) -> torch.Tensor:
        return torch.stack(list(self.values.values()))

    def all_reduced(self, *extra: torch.Tensor) -> torch.Tensor:
        """The sums over every rank (one collective), stacked in key order, then the sums of
        the 1-D tensors ``extra``."""
        stacked = torch.cat([self.stacked(), *extra]) if extra else self.stacked()
        dist.all_reduce(stacked)
        return stacked

    def named(self, values: list[float]) -> dict[str, float]:
        return dict(zip(self.values, values, strict=True))
