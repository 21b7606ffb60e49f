"""Strategies as pure policies: exact update rules, checked against Flower where Flower has the algorithm."""

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.supercore.task_identity import TaskIdentity

from strategies.base import Update
from strategies.codecs import to_record
from strategies.config import RunConfig
from strategies.fedasync import FedAsync
from strategies.fedavg import FedAvg
from strategies.fedbuff import FedBuff
from strategies.staleness import staleness_fn

RNG = np.random.default_rng(0)
SHAPES = [(3, 4), (4,)]


def weights():
    return [RNG.standard_normal(s).astype(np.float32) for s in SHAPES]


def update(seq, base, delta, version=0, staleness=0, n=10, node=None):
    return Update(seq, node if node is not None else seq, version, staleness, delta, base, n)


def test_staleness_functions_exact_values():
    hinge = staleness_fn("hinge", a=10, b=4)
    assert [hinge(0), hinge(4), hinge(5)] == [1.0, 1.0, 1 / 11]
    poly = staleness_fn("polynomial", a=0.5)
    assert poly(0) == 1.0 and poly(3) == pytest.approx(0.5)
    assert staleness_fn("sqrt")(8) == pytest.approx(1 / 3)
    assert staleness_fn("constant")(100) == 1.0
    with pytest.raises(ValueError):
        poly(-1)


@pytest.mark.parametrize("sent_is_delta", [True, False], ids=["deltas", "weights"])
def test_fedavg_equals_flowers_fedavg_on_the_same_replies(sent_is_delta):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    names = ["w", "b"]
    base = weights()
    trained = [weights() for _ in range(3)]
    examples = [5, 17, 30]
    # Flower: aggregate the clients' weights, weighted by num-examples.
    replies = []
    for t, n in zip(trained, examples, strict=True):
        ins = Message(RecordDict(), dst_node_id=1, message_type="train")
        ins.metadata.__dict__["_message_id"] = f"m{n}"
        content = RecordDict({"arrays": to_record(names, t),
                              "metrics": MetricRecord({"num-examples": n})})
        replies.append(Message(content, reply_to=ins))
    flower_arrays, _ = FlowerFedAvg().aggregate_train(1, replies)
    expected = [flower_arrays[n].numpy() for n in names]
    # Ours: the same replies as deltas against the base.
    ours = FedAvg(RunConfig(), base, fleet=range(3))
    tasks = [ours.task_for(node) for node in range(3)]
    assert all(t is not None and t.version == 0 for t in tasks)
    def sent(i):
        return [b - w for b, w in zip(base, trained[i], strict=True)] if sent_is_delta else trained[i]

    verdicts = [ours.apply(Update(i, i, 0, 0, sent(i), base, examples[i], sent_is_delta=sent_is_delta))
                for i in range(3)]
    assert [v.status for v in verdicts] == ["buffered", "buffered", "applied"]
    assert verdicts[-1].applied == (0, 1, 2)
    assert ours.version == 1
    for got, want in zip(ours.weights, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_fedavg_round_waits_for_everyone_and_survives_a_failure():
    base = weights()
    s = FedAvg(RunConfig(concurrency=3), base, fleet=range(5))
    assert [s.task_for(n) is not None for n in range(5)] == [True, True, True, False, False]
    zero = [np.zeros_like(w) for w in base]
    assert s.apply(update(0, base, zero, node=0)).status == "buffered"
    assert s.task_for(0) is None  # finished early: waits for the round
    assert s.fail(1, 0).status == "dropped"
    v = s.apply(update(2, base, zero, node=2))
    assert v.applied == (0, 2) and s.version == 1 and s.round == 1
    assert s.task_for(3) is not None  # a new round is open


def test_fedasync_mixes_with_staleness_weight():
    base = weights()
    cfg = RunConfig(strategy="fedasync", mixing=0.5, staleness_fn="polynomial", staleness_a=1.0)
    s = FedAsync(cfg, [w.copy() for w in base], fleet=range(2))
    s.weights = [w + 1 for w in base]  # the global model moved on since `base` was sent
    current = [w.copy() for w in s.weights]
    delta = weights()
    v = s.apply(update(0, base, delta, staleness=1))
    alpha = 0.5 * (1 + 1) ** -1.0
    client = [b - d for b, d in zip(base, delta, strict=True)]
    for got, w, x in zip(s.weights, current, client, strict=True):
        np.testing.assert_allclose(got, (1 - alpha) * w + alpha * x, rtol=1e-5, atol=1e-6)
    assert v.status == "applied" and v.applied == (0,) and s.version == 1


def test_fedbuff_buffers_k_then_applies_the_weighted_mean():
    base = weights()
    cfg = RunConfig(buffer_size=3, server_lr=0.5, staleness_fn="sqrt")
    s = FedBuff(cfg, [w.copy() for w in base], fleet=range(4))
    deltas = [weights() for _ in range(3)]
    taus = [0, 3, 8]
    verdicts = [s.apply(update(i, base, deltas[i], staleness=taus[i])) for i in range(3)]
    assert [v.status for v in verdicts] == ["buffered", "buffered", "applied"]
    assert verdicts[2].applied == (0, 1, 2) and s.version == 1
    mean = [sum((1 + t) ** -0.5 * d[j] for t, d in zip(taus, deltas, strict=True)) / 3 for j in range(2)]
    for got, b, m in zip(s.weights, base, mean, strict=True):
        np.testing.assert_allclose(got, b - 0.5 * m, rtol=1e-5, atol=1e-6)
    assert s.apply(update(3, base, deltas[0])).status == "buffered"  # the buffer starts over


def test_update_derives_the_form_that_was_not_sent():
    base = weights()
    delta = weights()
    u = Update(0, 0, 0, 0, delta, base, 1)
    assert u.delta is delta
    for m, b, d in zip(u.model, base, delta, strict=True):
        np.testing.assert_allclose(m, b - d)
    v = Update(0, 0, 0, 0, u.model, base, 1, sent_is_delta=False)
    for d1, d2 in zip(v.delta, delta, strict=True):
        np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-6)


def test_fedbuff_with_weights_replies_equals_deltas_replies():
    base_a, base_b = weights(), weights()
    trained = [weights() for _ in range(4)]
    bases = [base_a, base_a, base_b, base_a]
    cfg = RunConfig(buffer_size=4, staleness_fn="sqrt")
    results = []
    for as_delta in (True, False):
        s = FedBuff(cfg, [w.copy() for w in base_b], fleet=range(4))
        for i, (b, t) in enumerate(zip(bases, trained, strict=True)):
            sent = [x - y for x, y in zip(b, t, strict=True)] if as_delta else t
            s.apply(Update(i, i, 0, i, sent, b, 1, sent_is_delta=as_delta))
        results.append(s.weights)
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
