"""A ClientApp with no torch: multinomial logistic regression in plain numpy, on this node's digits partition.

It speaks the protocol of ``client_app/app.py`` (the message contents the ServerApp and ``server_app/wire.py``
expect), so every strategy runs with it, with ``model = "logreg"``:

- ``train``: decode the received arrays (``strategies.client.decode_received``, any codec; two-way compression
  through ``downlink_model``), hand the strategy's client half (``get_strategy(...).client``) a local trainer,
  and reply with ``delta`` (an ArrayRecord under the model's parameter names; for most strategies received -
  trained) and ``metrics`` (``train-loss``, ``compute-s``, ``examples-seen``, ``num-examples``, and echoes of the
  task's ``task-seq`` and ``model-version``, which the server checks).
- ``evaluate``: loss, accuracy and ``num-examples`` of the received model on the partition.
- ``query("describe")``: the partition id and count (the server orders nodes by them) and the compute device.

The parameters are those of ``client_app.models.build_model("logreg", ...)``: ``nn.Sequential(nn.Flatten(),
nn.Linear(features, classes))``, i.e. ``1.weight`` (classes x features) and ``1.bias`` (classes), logits
``x @ W.T + b``. Local SGD follows ``client_app.trainer.LocalSGD``: the same ``local-steps`` index batches
(reshuffled passes over the partition, seeded by ``task-seed``), mean cross-entropy, optional momentum
(``buf = m buf + g``) and FedProx term ``mu/2 ||w - w0||^2``; so a run with this ClientApp is the run with ours
up to float32 rounding (``tests/test_numpy_client.py`` compares them).

Nothing on its import path imports torch (``tests/test_numpy_client.py`` checks it in a fresh interpreter):
``client_app.data``, ``client_app.records`` and ``strategies`` are numpy-only.

    python -m server_app.simulate --clientapp tests.numpy_client:app --set model='"logreg"' --set strategy=fedbuff
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.data import load_dataset, load_partition
from client_app.records import NodeState
from strategies import get_strategy
from strategies.client import ClientJob, decode_received, downlink_model
from strategies.codecs import CodecSpec
from strategies.config import RunConfig

NAMES = ("1.weight", "1.bias")  # build_model("logreg"): Sequential(Flatten(), Linear) -> module "1"

app = ClientApp()


def _data(context: Context) -> tuple[RunConfig, np.ndarray, np.ndarray, int]:
    """The run config, this node's training partition (flattened float32, int64 labels) and the class count."""
    cfg = RunConfig.from_mapping(context.run_config)
    if cfg.model != "logreg":
        raise ValueError(f"tests.numpy_client trains logreg only, not model = {cfg.model!r}")
    try:
        pid = int(context.node_config["partition-id"])
        parts = int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ValueError("node config lacks partition-id/num-partitions") from exc
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, test_fraction=cfg.test_fraction)
    x, y = load_partition(data, pid, parts, scheme=cfg.partition, alpha=cfg.dirichlet_alpha, seed=cfg.seed)
    return cfg, x.reshape(len(x), -1).astype(np.float32, copy=False), y.astype(np.int64), data.num_classes


def _shapes(x: np.ndarray, classes: int) -> list[np.ndarray]:
    return [np.zeros((classes, x.shape[1]), np.float32), np.zeros(classes, np.float32)]


def loss_and_grads(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean softmax cross-entropy of ``x @ w.T + b`` against ``y``, and its gradients (float32)."""
    logits = x @ w.T + b
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    total = exp.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log(total[:, 0]) - logits[np.arange(len(y)), y]))
    g = exp / total
    g[np.arange(len(y)), y] -= 1.0
    g /= len(y)
    return loss, (g.T @ x).astype(np.float32), g.sum(axis=0).astype(np.float32)


def batches(n: int, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """``steps`` index batches: consecutive slices of seeded permutations of ``range(n)`` (an epoch at a time)."""
    rng = np.random.default_rng(seed)
    size = min(batch_size, n)
    order: list[int] = []
    out = []
    for _ in range(steps):
        while len(order) < size:
            order.extend(rng.permutation(n).tolist())
        out.append(np.asarray(order[:size]))
        del order[:size]
    return out


def sgd(start: list[np.ndarray], x: np.ndarray, y: np.ndarray, *, steps: int, batch_size: int, lr: float,
        momentum: float, prox_mu: float, seed: int) -> tuple[list[np.ndarray], dict[str, float]]:
    """Local SGD from ``start``; returns the trained parameters and the metrics ``LocalSGD.run`` reports."""
    t0 = time.perf_counter()
    w, b = (np.array(a, dtype=np.float32) for a in start)
    anchor = (w.copy(), b.copy()) if prox_mu else None
    buf: tuple[np.ndarray, np.ndarray] | None = None
    losses = []
    for idx in batches(len(y), steps, batch_size, seed):
        loss, gw, gb = loss_and_grads(w, b, x[idx], y[idx])
        if anchor is not None:
            drift = float(np.sum((w - anchor[0]) ** 2) + np.sum((b - anchor[1]) ** 2))
            loss += prox_mu / 2 * drift
            gw += prox_mu * (w - anchor[0])
            gb += prox_mu * (b - anchor[1])
        if momentum:
            buf = (gw, gb) if buf is None else (momentum * buf[0] + gw, momentum * buf[1] + gb)
            gw, gb = buf
        w -= np.float32(lr) * gw
        b -= np.float32(lr) * gb
        losses.append(loss)
    metrics = {"train-loss": float(np.mean(losses)) if losses else 0.0, "compute-s": time.perf_counter() - t0,
               "examples-seen": float(steps * min(batch_size, len(y)))}
    return [w, b], metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The strategy's client half on the received model, with numpy SGD as the local trainer."""
    cfg, x, y, classes = _data(context)
    task = msg.content.config_records["config"]
    record = msg.content.array_records["arrays"]
    received = decode_received(record, list(NAMES), _shapes(x, classes)) if len(record) else []
    if "downlink" in task:  # two-way compression of the broadcast model
        received = downlink_model(NodeState(context.state), task, received)

    def local_train(start: list[np.ndarray]) -> tuple[list[np.ndarray], dict[str, float]]:
        return sgd(start, x, y, steps=int(task["local-steps"]), batch_size=int(task["batch-size"]),
                   lr=float(task["lr"]), momentum=float(task["momentum"]), prox_mu=float(task["prox-mu"]),
                   seed=int(task["task-seed"]))

    job = ClientJob(received=received, task=dict(task), train=local_train, state=NodeState(context.state),
                    codec=CodecSpec(cfg.codec, cfg.codec_ratio, cfg.codec_levels, cfg.codec_rank),
                    error_feedback=cfg.error_feedback, seed=int(task["task-seed"]))
    arrays, metrics = get_strategy(cfg.strategy).client(job)
    echo = {k: int(task[k]) for k in ("task-seq", "model-version") if k in task}
    metrics = {**metrics, "num-examples": len(y), **echo}
    delta = ArrayRecord(dict(zip(NAMES, arrays, strict=True)))
    return Message(RecordDict({"delta": delta, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received model on this node's partition."""
    _, x, y, classes = _data(context)
    w, b = decode_received(msg.content.array_records["arrays"], list(NAMES), _shapes(x, classes))
    loss, _, _ = loss_and_grads(w, b, x, y)
    accuracy = float(np.mean(np.argmax(x @ w.T + b, axis=1) == y))
    return Message(RecordDict({"metrics": MetricRecord({"loss": loss, "accuracy": accuracy,
                                                        "num-examples": len(y)})}), reply_to=msg)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """Which partition this node holds (the server orders nodes by it) and what it computes on."""
    info = {"partition-id": int(context.node_config.get("partition-id", -1)),
            "num-partitions": int(context.node_config.get("num-partitions", 0)),
            "torch-device": "cpu", "numpy-version": np.__version__}
    return Message(RecordDict({"describe": ConfigRecord(info)}), reply_to=msg)
