"""The model the run trains and its server-side evaluation on the held-out test split."""

from __future__ import annotations

import copy

import numpy as np
import torch

from client_app.data import load_dataset
from client_app.models import build_model, flops_per_sample
from client_app.trainer import LocalSGD
from server_app.intake import delta_norm
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

    def reference_norm(self, weights: list[np.ndarray], cfg: RunConfig) -> float:
        """The L2 norm of the delta plain local SGD makes from ``weights``: the update filter's prior.

        Trains a copy on this (test) split with the run's ``lr``, ``momentum``, ``batch-size`` and ``local-steps``
        (at most ``REFERENCE_STEPS``, the norm scaled up linearly past them: an upper estimate, as gradients
        shrink), so the filter can judge a run's very first updates (``server_app/intake.py``). The test split
        only measures a norm here; the model it trains is thrown away.
        """
        steps = min(cfg.local_steps, REFERENCE_STEPS)
        model = copy.deepcopy(self.model)
        model.load_state_dict({n: torch.from_numpy(w.copy()) for n, w in zip(self.names, weights, strict=True)})
        LocalSGD(steps, cfg.batch_size, cfg.lr, cfg.momentum, seed=cfg.seed).run(
            model, self.x.numpy(), self.y.numpy(), torch.device("cpu"))
        trained = [t.detach().numpy() for t in model.state_dict().values()]
        norm = delta_norm([w - t for w, t in zip(weights, trained, strict=True)])
        return norm * cfg.local_steps / steps


#: Local steps the server runs for the reference norm: enough to see the scale, cheap next to one evaluation.
REFERENCE_STEPS = 20
