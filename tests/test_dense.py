"""``client_app.dense``: a dense stack's step without autograd's graph gives autograd's loss and gradients.

``dense_step``'s step calls the backward kernels autograd's formulas call, on the same operands, so on one machine both
runs are the same computation and the results are compared bit for bit. The shapes cover both layout branches of
``mm_mat2_backward`` (a weight stored transposed takes the other one; taking the wrong one fails here) and the
column-major branch of ``mm_mat1_backward`` (batch 1 through a width-1 layer, the only column-major activation
these layers make, where both branches give the same dot product), with batches of 1 to 32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client_app.dense import dense_plan, dense_step
from client_app.models import build_model
from client_app.trainer import LocalSGD

SHAPE = (1, 8, 8)


def _stack(*layers: torch.nn.Module) -> torch.nn.Sequential:
    """The layers, with weights from a generator of their own rather than torch's global one.

    Seeding the global generator here once gave, in a full parallel run only, a stack whose ReLUs were all off for
    one sample: another thread in the worker process can draw from that generator between the seed and the draws.
    """
    model = torch.nn.Sequential(*layers)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.uniform(-0.3, 0.3, p.shape).astype(np.float32)))
    return model


def _transposed_weight() -> torch.nn.Sequential:
    """A Linear whose weight is stored column-major (a transposed view), for mm_mat2_backward's other branch."""
    model = _stack(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    model[1].weight = torch.nn.Parameter(model[1].weight.detach().t().contiguous().t())
    return model


MODELS = {
    "logreg": lambda: build_model("logreg", SHAPE, 10, seed=0),
    "mlp": lambda: build_model("mlp", SHAPE, 10, seed=0),
    "no-bias": lambda: _stack(torch.nn.Flatten(), torch.nn.Linear(64, 7, bias=False), torch.nn.ReLU(),
                              torch.nn.Linear(7, 10, bias=False)),
    "width-1": lambda: _stack(torch.nn.Flatten(), torch.nn.Linear(64, 1), torch.nn.ReLU(), torch.nn.Linear(1, 10)),
    "relu-first": lambda: _stack(torch.nn.Flatten(), torch.nn.ReLU(), torch.nn.Linear(64, 10)),
    "transposed-weight": _transposed_weight,
}


def _autograd(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = torch.nn.functional.cross_entropy(model(xb), yb)
    return loss.detach(), list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("batch", [1, 2, 7, 32])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_dense_step_is_autograd_bit_for_bit(name: str, batch: int) -> None:
    model = MODELS[name]()
    params = list(model.parameters())
    step = dense_step(model, params)
    assert step is not None
    rng = np.random.default_rng(batch)
    xb = torch.from_numpy(rng.normal(0, 1, (batch, *SHAPE)).astype(np.float32))
    yb = torch.from_numpy(rng.integers(0, 10, batch).astype(np.int64))
    loss, grads = step(xb, yb)
    want_loss, want = _autograd(model, xb, yb)
    assert torch.equal(loss, want_loss)
    assert len(grads) == len(want)
    for got, ref, p in zip(grads, want, params, strict=True):
        assert got.shape == p.shape and got.dtype == p.dtype
        assert torch.equal(got, ref)
    assert any(g.abs().sum() > 0 for g in grads), "all-zero gradients prove nothing"


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_local_sgd_trains_the_same_with_and_without_the_dense_step(momentum: float, monkeypatch) -> None:
    rng = np.random.default_rng(5)
    x = rng.random((40, *SHAPE), dtype=np.float32)
    y = rng.integers(0, 10, 40).astype(np.int64)
    sgd = LocalSGD(steps=9, batch_size=8, lr=0.1, momentum=momentum, seed=4)
    fast, slow = build_model("mlp", SHAPE, 10, seed=1), build_model("mlp", SHAPE, 10, seed=1)
    start = {k: v.clone() for k, v in fast.state_dict().items()}
    got = sgd.run(fast, x, y, torch.device("cpu"))
    monkeypatch.setattr("client_app.trainer.dense_step", lambda *args: None)
    want = sgd.run(slow, x, y, torch.device("cpu"))
    assert got["train-loss"] == want["train-loss"]
    for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
        assert not torch.equal(a, start[k]), f"{k} did not train"


class _ScaledLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def _forward_hooked() -> torch.nn.Module:
    model = build_model("logreg", SHAPE, 10, seed=0)
    model.register_forward_hook(lambda *args: None)
    return model


def _tensor_hooked() -> torch.nn.Module:
    model = build_model("logreg", SHAPE, 10, seed=0)
    next(model.parameters()).register_hook(lambda g: g * 2)
    return model


def _frozen() -> torch.nn.Module:
    model = build_model("mlp", SHAPE, 10, seed=0)
    next(model.parameters()).requires_grad_(False)
    return model


@pytest.mark.parametrize("make", [
    lambda: build_model("cnn", SHAPE, 10, seed=0),
    lambda: _stack(torch.nn.Linear(8, 10)),  # no Flatten first
    lambda: _stack(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.ReLU()),  # ends in a ReLU
    lambda: _stack(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Tanh(), torch.nn.Linear(10, 10)),
    lambda: _stack(torch.nn.Flatten(start_dim=2), torch.nn.Linear(8, 10)),
    lambda: _stack(torch.nn.Flatten(), _ScaledLinear(64, 10)),
    _forward_hooked, _tensor_hooked, _frozen,
], ids=["cnn", "no-flatten", "ends-relu", "tanh", "flatten-2", "subclass", "forward-hook", "tensor-hook", "frozen"])
def test_anything_else_keeps_autograd(make) -> None:
    model = make()
    assert dense_step(model, list(model.parameters())) is None


def test_a_proximal_term_keeps_autograd() -> None:
    model = build_model("logreg", SHAPE, 10, seed=0)
    assert dense_plan(model) is not None
    assert dense_step(model, list(model.parameters()), prox_mu=0.1) is None


def test_a_tensor_hook_still_runs_in_local_sgd() -> None:
    """The hooked model trains through autograd, so its hook doubles the step (what it would do without us)."""
    rng = np.random.default_rng(2)
    x, y = rng.random((8, *SHAPE), dtype=np.float32), rng.integers(0, 10, 8).astype(np.int64)
    sgd = LocalSGD(steps=1, batch_size=8, lr=0.1, seed=0)
    plain, hooked = build_model("logreg", SHAPE, 10, seed=0), _tensor_hooked()
    before = next(plain.parameters()).detach().clone()
    sgd.run(plain, x, y, torch.device("cpu"))
    sgd.run(hooked, x, y, torch.device("cpu"))
    moved_plain = next(plain.parameters()).detach() - before
    moved_hooked = next(hooked.parameters()).detach() - before
    torch.testing.assert_close(moved_hooked, 2 * moved_plain, rtol=1e-5, atol=1e-7)
