"""The model the run trains and its server-side evaluation on the held-out test split."""

from __future__ import annotations

import numpy as np
import torch

from client_app.data import load_dataset
from client_app.models import build_model, flops_per_sample
from server_app.state import ModelSpec
from strategies.config import RunConfig


def model_spec(cfg: RunConfig) -> ModelSpec:
    """Build the model once with the run's seed: clients start from exactly these weights."""
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, test_fraction=cfg.test_fraction)
    model = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.seed)
    state = model.state_dict()
    return ModelSpec(
        names=list(state),
        initial=[t.detach().cpu().numpy().copy() for t in state.values()],
        flops_per_step=flops_per_sample(model, data.input_shape) * cfg.batch_size,
    )


class Evaluator:
    """Loss and accuracy of a weight list on the test split (CPU; evaluation is cheap next to training)."""

    def __init__(self, cfg: RunConfig, names: list[str], batch: int = 2048) -> None:
        data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, test_fraction=cfg.test_fraction)
        self.model = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.seed).eval()
        self.names = names
        self.x = torch.tensor(data.x_test)
        self.y = torch.tensor(data.y_test)
        self.batch = batch

    @torch.no_grad()
    def __call__(self, weights: list[np.ndarray]) -> tuple[float, float]:
        """Return ``(mean cross-entropy loss, accuracy)``."""
        self.model.load_state_dict({n: torch.from_numpy(w) for n, w in zip(self.names, weights, strict=True)})
        loss, correct = 0.0, 0
        for i in range(0, len(self.y), self.batch):
            logits = self.model(self.x[i : i + self.batch])
            y = self.y[i : i + self.batch]
            loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
        n = len(self.y)
        return loss / n, correct / n
