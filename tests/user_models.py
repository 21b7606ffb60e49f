"""Stand-ins for a user's own model module, imported by tests/test_models.py as ``tests.user_models:Net``."""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """A user model in the style of Flower's quickstart ``Net()``: no constructor arguments, 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((4, 4))  # any image size works
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


class Outer:
    """Holds a nested model class, to exercise dotted attribute paths."""

    class Inner(Net):
        """Same network, reached as ``tests.user_models:Outer.Inner``."""


class RgbNet(nn.Module):
    """Expects 3-channel input, so it must be rejected for the single-channel datasets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3)
        self.fc = nn.LazyLinear(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


class ThreeLogits(nn.Module):
    """Returns the wrong number of logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


class NeedsArguments(nn.Module):
    """Cannot be built with no arguments."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(64, width)


class NotAModule:
    """A class that is not a torch module."""


def make_net() -> Net:
    """A factory function: not a class, so rejected."""
    return Net()


class DropoutNet(nn.Module):
    """A user model with a random layer: its training draws from torch's generator (client_app.models.task_rng)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
