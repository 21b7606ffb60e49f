"""tests/numpy_client.py: a torch-free ClientApp that speaks our protocol trains under FedBuff and FedAvg."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from client_app.models import build_model
from server_app.simulate import load_object
from tests.numpy_client import NAMES, loss_and_grads

ROOT = Path(__file__).resolve().parent.parent


def test_nothing_on_its_import_path_imports_torch():
    code = "import sys, tests.numpy_client; sys.exit('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr or "torch was imported"


def test_loss_and_gradients_are_those_of_the_torch_logreg():
    model = build_model("logreg", (1, 8, 8), 10, seed=3)
    assert list(model.state_dict()) == list(NAMES)
    rng = np.random.default_rng(0)
    x = rng.random((32, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 32)
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    w, b = (p.detach().numpy() for p in model.parameters())
    got, gw, gb = loss_and_grads(w, b, x.reshape(32, -1), y)
    # Two implementations of the same float32 formulas (different summation orders): equal to a few ulps.
    assert got == pytest.approx(loss.detach().item(), rel=1e-5)
    np.testing.assert_allclose(gw, model[1].weight.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gb, model[1].bias.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["fedbuff", "fedavg"])
def test_numpy_client_app_trains_like_ours(simulate, tmp_path, strategy):
    app = load_object("tests.numpy_client:app")  # what --clientapp tests.numpy_client:app loads
    settings = {"nodes": 4, "model": "logreg", "max_updates": 40, "eval_every": 8, "local_steps": 5, "lr": 0.1,
                "buffer_size": 2, "run_id": 2**62 + 5}
    run = simulate(strategy, clientapp=app, **settings)
    assert run.summary.stop_reason == "max-updates" and run.run_row()["status"] == "completed"
    rows = run.updates()
    assert rows and {r["status"] for r in rows} <= {"applied", "buffered"}  # nothing rejected or failed
    assert all(r["bytes_up"] > 0 for r in rows)
    accuracy = [e["accuracy"] for e in run.evals()]
    assert accuracy[-1] > accuracy[0] + 0.3, accuracy  # from chance (~0.1) to a model that has learnt
    assert run.evals()[-1]["loss"] < run.evals()[0]["loss"]
    # The same batches and update rule as client_app/app.py: the same run as with our torch ClientApp, whose
    # weights differ only by float32 summation order (measured: at most 6e-8).
    ours = simulate(strategy, db=tmp_path / "ours.db", **settings)
    keep = ("node_id", "base_version", "applied_version", "staleness", "status", "dispatched_at", "completed_at")
    assert [tuple(r[k] for k in keep) for r in rows] == [tuple(r[k] for k in keep) for r in ours.updates()]
    for a, b in zip(run.summary.weights, ours.summary.weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
