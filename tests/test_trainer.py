"""``client_app.trainer``: local SGD without ``torch.optim`` (whose constructor imports TorchDynamo, seconds per
deployed task) must be ``torch.optim.SGD``'s training step for step.

The reference loop below is the one the trainer used before: same batches, same loss, ``torch.optim.SGD``. Both run
the same torch operations on the same machine, so the weights are compared bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from client_app.models import build_model
from client_app.trainer import LocalSGD

ROOT = Path(__file__).resolve().parents[1]


def _stepwise_batches(sgd: LocalSGD, n: int) -> list[np.ndarray]:
    """The batches' definition, step by step: take a batch off the front, drawing a new pass when too few are left."""
    rng = np.random.default_rng(sgd.seed)
    size = min(sgd.batch_size, n)
    order: list[int] = []
    out = []
    for _ in range(sgd.steps):
        if len(order) < size:
            order.extend(rng.permutation(n).tolist())
        out.append(np.asarray(order[:size], dtype=np.int64))
        del order[:size]
    return out


@pytest.mark.parametrize(("n", "batch"), [(1, 16), (9, 16), (16, 16), (40, 16), (33, 7), (0, 4)])
def test_batches_are_the_stepwise_reshuffled_passes(n, batch):
    sgd = LocalSGD(13, batch, 0.1, seed=n)
    got = sgd.batches(n)
    assert got.shape == (13, min(batch, n)) and got.dtype == np.int64
    np.testing.assert_array_equal(got, np.stack(_stepwise_batches(sgd, n)))


def _reference(sgd: LocalSGD, model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    xt, yt = torch.tensor(x), torch.tensor(y)
    anchor = [p.detach().clone() for p in model.parameters()] if sgd.prox_mu else []
    opt = torch.optim.SGD(model.parameters(), lr=sgd.lr, momentum=sgd.momentum)
    total = 0.0
    for idx in sgd.batches(len(y)):
        i = torch.from_numpy(idx)
        loss = torch.nn.functional.cross_entropy(model(xt[i]), yt[i])
        if anchor:
            drift = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
            loss = loss + sgd.prox_mu / 2 * drift
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total / sgd.steps


@pytest.mark.parametrize(("model_name", "momentum", "prox_mu"),
                         [("logreg", 0.0, 0.0), ("mlp", 0.9, 0.0), ("cnn", 0.5, 0.1)])
def test_local_sgd_is_torch_optim_sgd_bit_for_bit(model_name: str, momentum: float, prox_mu: float) -> None:
    rng = np.random.default_rng(7)
    x = rng.random((96, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 96).astype(np.int64)
    sgd = LocalSGD(steps=12, batch_size=16, lr=0.05, momentum=momentum, prox_mu=prox_mu, seed=3)
    torch.manual_seed(0)
    ours = build_model(model_name, (1, 8, 8), 10)
    theirs = build_model(model_name, (1, 8, 8), 10)
    theirs.load_state_dict(ours.state_dict())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    metrics = sgd.run(ours, x, y, torch.device("cpu"))
    loss = _reference(sgd, theirs, x, y)
    assert metrics["train-loss"] == loss
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert any(not torch.equal(v, before[k]) for k, v in ours.state_dict().items()), "nothing trained"


def test_local_training_does_not_import_dynamo() -> None:
    code = ("import sys, numpy as np, torch; from client_app.trainer import LocalSGD; "
            "from client_app.models import build_model; "
            "LocalSGD(steps=2, batch_size=4, lr=0.1, momentum=0.9).run(build_model('mlp', (1, 8, 8), 10), "
            "np.zeros((8, 1, 8, 8), np.float32), np.zeros(8, np.int64), torch.device('cpu')); "
            "assert 'torch._dynamo' not in sys.modules, 'TorchDynamo imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
