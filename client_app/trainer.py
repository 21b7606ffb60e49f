"""Local training: ``local-steps`` SGD steps on the node's partition, on CUDA when there is one."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from client_app.dense import dense_step
from strategies import taskkeys as keys


def pick_device(setting: str) -> torch.device:
    """``auto`` uses CUDA when present; ``cuda`` without a GPU is an error, not a silent CPU run."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but torch sees no CUDA device on this node")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class Momentum:
    """Heavy-ball momentum with ``torch.optim.SGD``'s arithmetic (no dampening, no Nesterov).

    ``buf = m buf + g``, the first buffer a copy of the first gradient; with ``m = 0`` the direction is the
    gradient itself.

    Written out rather than using ``torch.optim.SGD`` because constructing that optimizer imports TorchDynamo
    (about 1.9 s of CPU): on Flower's deployment runtime every task is a fresh ClientApp process, so that import
    was most of a small task's cost. ``tests/test_trainer.py`` checks the steps are ``torch.optim.SGD``'s bit for bit.
    """

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.buffers: list[torch.Tensor] | None = None

    def direction(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The step direction for these gradients (updates the buffers in place)."""
        if not self.momentum:
            return grads
        if self.buffers is None:
            self.buffers = [g.clone().detach() for g in grads]
        else:
            for b, g in zip(self.buffers, grads, strict=True):
                b.mul_(self.momentum).add_(g)
        return self.buffers


def sgd_step(params: list[torch.Tensor], direction: list[torch.Tensor], lr: float) -> None:
    """``p -= lr * d`` in place, as ``torch.optim.SGD.step`` computes it (``p.add_(d, alpha=-lr)``)."""
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(d, alpha=-lr)


@dataclass(frozen=True)
class LocalSGD:
    """Hyper-parameters of one task's local training."""

    steps: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    prox_mu: float = 0.0
    seed: int = 0

    def batches(self, n: int) -> np.ndarray:
        """Index batches, one row per step: reshuffled passes over the partition, seeded per task (reproducible).

        A pass is drawn when fewer than a batch are left of the previous ones, and a batch is at most ``n``, so
        the batches are consecutive slices of back-to-back permutations drawn from one generator: one reshape
        instead of a Python loop over the steps (``tests/test_trainer.py`` holds it to that loop).
        """
        size = min(self.batch_size, n)
        if size == 0:
            return np.zeros((self.steps, 0), np.int64)
        need = self.steps * size
        rng = np.random.default_rng(self.seed)
        order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])
        return order[:need].reshape(self.steps, size)

    def run(self, model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device) -> dict[str, float]:
        """Train ``model`` in place; return metrics (mean loss, compute seconds, examples seen)."""
        start = time.perf_counter()
        params = list(model.parameters())
        if any(t.device != device for t in (*params, *model.buffers())):
            model.to(device)
            params = list(model.parameters())  # .to may replace them (torch.__future__'s conversion settings)
        model.train()
        xt, yt = torch.tensor(x, device=device), torch.tensor(y, device=device)
        anchor = [p.detach().clone() for p in params] if self.prox_mu else []
        momentum = Momentum(self.momentum)
        dense = dense_step(model, params, self.prox_mu)  # autograd's kernels without its graph (client_app/dense.py)
        total = 0.0
        for i in torch.from_numpy(self.batches(len(y))).to(device):
            if dense is not None:
                loss, grads = dense(xt[i], yt[i])
            else:
                loss = torch.nn.functional.cross_entropy(model(xt[i]), yt[i])
                if anchor:  # FedAsync / FedProx proximal term: mu/2 ||w - w_received||^2
                    drift = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                    loss = loss + self.prox_mu / 2 * drift
                grads = list(torch.autograd.grad(loss, params))
            sgd_step(params, momentum.direction(grads), self.lr)
            total += float(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {keys.TRAIN_LOSS: total / self.steps, keys.COMPUTE_S: time.perf_counter() - start,
                "examples-seen": float(self.steps * min(self.batch_size, len(y)))}
