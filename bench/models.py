"""Models for the benchmarks, loadable by the run config as ``bench.models:ClassName`` (no constructor arguments).

The inputs are the ``digits`` dataset's (N, 1, 8, 8) images; every model outputs 10 logits.
"""

from __future__ import annotations

import torch
from torch import nn


class Big(nn.Module):
    """About a million parameters (1,076,010): 64 -> 1000 -> 1000 -> 10, ReLU between.

    Big enough that moving, hashing and averaging the weights dominates a no-op client's round trip.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images."""
        return self.net(x)


class Small(nn.Module):
    """A few thousand parameters (64 -> 32 -> 10), for smoke tests of the benchmark scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images."""
        return self.net(x)
