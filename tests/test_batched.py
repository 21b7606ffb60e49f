"""Batched local training (client_app/batched.py): LocalSGD.run's numbers node by node, bitwise independent of the
batch a node lands in, the coalescing batcher, the fallback, and a batched run that is a function of its seed."""

import copy
import threading
import time

import numpy as np
import pytest
import torch

from client_app.batched import (
    CoalescingBatcher,
    NodeJob,
    _dense_forward,
    _vmapped_forward,
    train_batched,
    train_many,
    unbatchable,
)
from client_app.executors import ExecutorSpec, train_local
from client_app.models import build_model
from client_app.trainer import LocalSGD
from strategies import taskkeys as keys
from strategies.config import ConfigError, RunConfig
from tests.test_engine import trace

CPU = torch.device("cpu")
SHAPE = (1, 8, 8)
# Batched and single matmuls round differently; after 4 steps the weights agree to this (worst seen: 3e-8 abs;
# 1e-5 relative after 10 steps of a diverging MLP at lr 0.1, momentum 0.9).
RTOL, ATOL = 1e-4, 1e-5
LOSS_RTOL = 1e-5  # worst seen: 5e-7


def fleet(model_name: str, sizes: list[int], *, momentum: float = 0.0, prox_mu: float = 0.0, steps: int = 4):
    """A model and one job per partition size: own data, own start weights near the model's, own seed."""
    model = build_model(model_name, SHAPE, 10, seed=0)
    rng = np.random.default_rng(1)
    base = [t.detach().numpy() for t in model.state_dict().values()]
    jobs = [NodeJob([(w + rng.normal(0, 0.05, w.shape)).astype(np.float32) for w in base],
                    rng.random((n, *SHAPE), dtype=np.float32), rng.integers(0, 10, n),
                    LocalSGD(steps, 16, 0.05, momentum, prox_mu, seed=k)) for k, n in enumerate(sizes)]
    return model, jobs


def alone(model: torch.nn.Module, job: NodeJob):
    """The reference: ``LocalSGD.run`` on a copy of the model holding the job's start weights."""
    m = copy.deepcopy(model)
    m.load_state_dict({n: torch.from_numpy(w.copy()) for n, w in zip(m.state_dict(), job.start, strict=True)})
    metrics = job.sgd.run(m, job.x, job.y, CPU)
    return [t.detach().numpy() for t in m.state_dict().values()], metrics


CASES = [(m, mom, mu) for m in ("logreg", "mlp") for mom, mu in ((0.0, 0.0), (0.9, 0.0), (0.0, 0.1), (0.9, 0.1))]


@pytest.mark.parametrize(("model_name", "momentum", "prox_mu"), [*CASES, ("cnn", 0.0, 0.0)])
def test_each_node_matches_local_sgd_within_tolerance(model_name, momentum, prox_mu):
    """Unequal partitions included: 9 samples < batch 16 makes a group of its own (batch 9). The CNN: vmap over
    convolutions and pooling works too."""
    model, jobs = fleet(model_name, [40, 9, 23], momentum=momentum, prox_mu=prox_mu)
    for job, (weights, metrics) in zip(jobs, train_many(model, jobs, CPU), strict=True):
        ref_weights, ref = alone(model, job)
        for got, want in zip(weights, ref_weights, strict=True):
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        assert metrics[keys.TRAIN_LOSS] == pytest.approx(ref[keys.TRAIN_LOSS], rel=LOSS_RTOL)
        assert metrics["examples-seen"] == ref["examples-seen"] == 4 * min(16, len(job.y))
        assert metrics[keys.COMPUTE_S] > 0


@pytest.mark.parametrize("model_name", ["logreg", "mlp"])
def test_a_nodes_result_is_bitwise_the_same_whatever_batch_it_is_in(model_name):
    """Alone, in a batch of 3, of 12, first among others, on 3 threads (chunks of 4): the same bits, so a run does
    not depend on the arrival order that made its batches."""
    model, jobs = fleet(model_name, [20 + k % 7 for k in range(12)], momentum=0.9, prox_mu=0.1, steps=3)
    solo = train_many(model, [jobs[5]], CPU)[0][0]
    for batch, at, threads in ((jobs[4:7], 1, 1), (jobs, 5, 1), ([jobs[5], *jobs[8:12]], 0, 1), (jobs, 5, 3)):
        for got, want in zip(train_many(model, batch, CPU, threads=threads)[at][0], solo, strict=True):
            np.testing.assert_array_equal(got, want)
    padded = train_many(model, jobs[4:7], CPU, lanes=4, pad=True)[1][0]  # the GPU's fixed lanes, on the CPU
    for got, want in zip(padded, solo, strict=True):
        np.testing.assert_array_equal(got, want)


def _linear_stack(*layers: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("model", [
    build_model("logreg", SHAPE, 10, seed=0), build_model("mlp", SHAPE, 10, seed=0),
    _linear_stack(torch.nn.Flatten(), torch.nn.Linear(64, 7, bias=False), torch.nn.ReLU(), torch.nn.Linear(7, 10))],
    ids=["logreg", "mlp", "no-bias"])
def test_the_dense_forward_is_the_vmapped_forward_within_rounding(model):
    """Stacks of Linear and ReLU layers skip vmap for feature-major batched matmuls: the same logits per lane, to
    float32 rounding (different kernels, so not bitwise), in the (lanes, classes, batch) layout."""
    lanes, rng = 5, np.random.default_rng(3)
    params = {n: torch.from_numpy(np.stack([(p.detach().numpy() + rng.normal(0, 0.1, p.shape)).astype(np.float32)
                                            for _ in range(lanes)])) for n, p in model.named_parameters()}
    xb = torch.from_numpy(rng.random((lanes, 16, *SHAPE), dtype=np.float32))
    dense = _dense_forward(model)
    assert dense is not None
    got, want = dense(params, xb), _vmapped_forward(model)(params, xb)
    assert got.shape == want.shape == (lanes, 10, 16)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_other_models_take_the_vmapped_forward():
    for model in (build_model("cnn", SHAPE, 10, seed=0),
                  _linear_stack(torch.nn.Linear(8, 10)),  # no Flatten first: Linear on the last axis
                  _linear_stack(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.ReLU()),  # ends in a ReLU
                  _linear_stack(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Tanh(), torch.nn.Linear(10, 10)),
                  _linear_stack(torch.nn.Flatten(start_dim=2), torch.nn.Linear(8, 10)),
                  _linear_stack(torch.nn.Flatten(), _ScaledLinear(64, 10)),  # a subclass with its own forward
                  _hooked(build_model("logreg", SHAPE, 10, seed=0))):
        assert _dense_forward(model) is None


class _ScaledLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def _hooked(model: torch.nn.Module) -> torch.nn.Module:
    model[1].register_forward_hook(lambda module, args, out: out * 0)
    return model


def test_a_model_with_buffers_trains_alone_and_says_so(caplog):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.BatchNorm1d(10))
    assert "buffers" in unbatchable(model)
    assert unbatchable(build_model("mlp", SHAPE, 10)) is None
    _, jobs = fleet("logreg", [20])
    reference = copy.deepcopy(model)
    batcher = CoalescingBatcher(wait_s=10.0)
    with batcher.session():
        metrics = train_batched(jobs[0].sgd, model, jobs[0].x, jobs[0].y, CPU, batcher)
        assert batcher.expected == 0  # counted off at once: no batch waits for a node that trains alone
    reference_metrics = jobs[0].sgd.run(reference, jobs[0].x, jobs[0].y, CPU)
    assert metrics["exec-batched"] == 0.0
    assert metrics[keys.TRAIN_LOSS] == reference_metrics[keys.TRAIN_LOSS]
    with pytest.raises(ValueError, match="buffers"):
        train_many(model, jobs, CPU)


def test_concurrent_calls_coalesce_into_one_batch_with_train_manys_results():
    model, jobs = fleet("logreg", [24] * 6)
    batcher = CoalescingBatcher(wait_s=10.0)
    entered = threading.Barrier(len(jobs))
    results: dict[int, tuple] = {}

    def node(k: int) -> None:
        with batcher.session():
            entered.wait()  # every node announced before any arrives: the batch waits for all six
            results[k] = batcher.train(copy.deepcopy(model), jobs[k], CPU)

    threads = [threading.Thread(target=node, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert batcher.sizes == [6]
    for k, (weights, _) in enumerate(train_many(model, jobs, CPU)):
        for got, want in zip(results[k][0], weights, strict=True):
            np.testing.assert_array_equal(got, want)


def test_nodes_that_arrive_while_a_batch_trains_form_the_next_batch():
    class Gated(CoalescingBatcher):
        """Holds the first batch in training until the test opens the gate."""

        gate = threading.Event()

        def _run(self, batch):
            if len(self.sizes) == 1:
                self.gate.wait(timeout=30)
            super()._run(batch)

    model, jobs = fleet("logreg", [20] * 3)
    batcher = Gated(wait_s=10.0, grace_s=0.0)
    threads = [threading.Thread(target=batcher.train, args=(copy.deepcopy(model), job, CPU)) for job in jobs]
    threads[0].start()
    while not batcher.sizes:  # the first node started a batch of its own (nobody else announced)
        time.sleep(0.001)
    for t in threads[1:]:
        t.start()
    while batcher.queued < 2:  # both wait for the running batch rather than start their own
        time.sleep(0.001)
    Gated.gate.set()
    for t in threads:
        t.join(timeout=30)
    assert batcher.sizes == [1, 2]


def test_a_failing_batch_raises_in_every_caller():
    model, jobs = fleet("logreg", [20, 20])
    bad = NodeJob(jobs[1].start, np.zeros((20, 3), np.float32), jobs[1].y, jobs[1].sgd)  # not 1x8x8 images
    batcher = CoalescingBatcher(wait_s=10.0)
    entered = threading.Barrier(2)
    errors: list[BaseException] = []

    def node(job: NodeJob) -> None:
        with batcher.session():
            entered.wait()
            try:
                batcher.train(copy.deepcopy(model), job, CPU)
            except (ValueError, RuntimeError) as exc:  # the bad node's shapes do not fit the model
                errors.append(exc)

    threads = [threading.Thread(target=node, args=(j,)) for j in (jobs[0], bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(errors) == 2 and errors[0] is errors[1]


def test_the_run_config_selects_the_batched_executor():
    cfg = RunConfig(local_executor="batched")
    assert ExecutorSpec.from_config(cfg).name == "batched"
    with pytest.raises(ConfigError, match="batched"):
        RunConfig(local_executor="vmap")  # the message lists the valid choices
    model, jobs = fleet("logreg", [20])
    metrics = train_local(jobs[0].sgd, model, jobs[0].x, jobs[0].y, CPU, ExecutorSpec("batched"))
    assert metrics["exec-batched"] == 1.0


def test_a_batched_run_is_a_function_of_its_seed(simulate, tmp_path):
    """Different thread counts and reply orders give different batches, and the same run, bit for bit."""
    runs = [simulate("fedavg", nodes=4, max_updates=4, local_executor="batched", workers=w, reorder_seed=r,
                     run_id=2**62 + 1, eval_every=0, db=tmp_path / f"{w}.db") for w, r in ((4, None), (2, 1))]
    assert len(trace(runs[0])) >= 4
    assert trace(runs[0]) == trace(runs[1])
    for a, b in zip(runs[0].summary.weights, runs[1].summary.weights, strict=True):
        np.testing.assert_array_equal(a, b)
