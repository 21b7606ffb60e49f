"""The model the run trains, and how it is evaluated.

Three ways: on the server's held-out test split (``Evaluator``), by the user's own ``evaluate_fn``
(``UserEvaluator``), or by the nodes' ClientApps (``FederatedEvaluator``). The last two follow Flower's conventions
(the ``evaluate_fn(server_round, arrays)`` its strategies take, and ``@app.evaluate`` handlers), so a user's model
never has to take the shape of the platform's data.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from client_app.data import load_dataset
from client_app.models import ModelError, build_model, count_params, flops_per_sample, task_rng
from client_app.trainer import LocalSGD
from server_app.intake import delta_norm
from server_app.state import ModelSpec
from server_app.wire import finite_number, num_examples, shown, to_record
from strategies.config import ConfigError, RunConfig

log = logging.getLogger("staleflower")
#: Metric names read from an evaluation: ours first, then Flower's templates' (``eval_acc``, ``eval_loss``).
ACCURACY_KEYS = ("accuracy", "eval_acc", "eval_accuracy", "acc")
LOSS_KEYS = ("loss", "eval_loss")


def own_evaluation(cfg: RunConfig) -> bool:
    """Whether the server evaluates on its own test split (so the model must take the data's shape)."""
    return cfg.evaluation == "server" and not cfg.evaluate_fn


def model_spec(cfg: RunConfig) -> ModelSpec:
    """Build the model once with the run's seed: clients start from exactly these weights.

    With the user's evaluation the model is not held to the platform's data shape (a model on flattened inputs
    is fine); its training cost for the virtual clock is then ``6 x parameters`` per sample when it cannot run
    on that shape (``client_app.models.flops_per_sample``'s own fallback).
    """
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, test_fraction=cfg.test_fraction)
    try:
        model = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.seed,
                            check_fit=own_evaluation(cfg))
    except ModelError as exc:
        if ":" not in cfg.model:
            raise
        raise ModelError(f"{exc}. The server evaluates on {cfg.dataset}'s test split in that shape; a model that "
                         "takes other inputs (its ClientApp loads its own data) needs evaluate-fn = "
                         "'package.module:function' or evaluation = 'federated'") from None
    try:
        flops = flops_per_sample(model, data.input_shape)
    except Exception:  # noqa: BLE001 - a user model on other inputs: counted by its parameters instead
        flops = 6.0 * count_params(model)
    state = model.state_dict()
    if cfg.evaluate_fn and cfg.evaluation == "server":
        user_evaluate_fn(cfg.evaluate_fn)  # importable and callable, before anything runs
    return ModelSpec(
        names=list(state),
        initial=[t.detach().cpu().numpy().copy() for t in state.values()],
        flops_per_step=flops * cfg.batch_size,
    )


def user_evaluate_fn(path: str) -> Callable[[int, ArrayRecord], object]:
    """Import ``package.module:function``; any failure is a ``ConfigError`` naming it."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in [*module_name.split("."), attr]):
        raise ConfigError(f"evaluate-fn = {path[:200]!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - user code: whatever importing it raises is a config mistake
        raise ConfigError(f"evaluate-fn = {path!r} cannot be imported: {type(exc).__name__}: {exc}"[:400]) from exc
    if not callable(fn):
        raise ConfigError(f"evaluate-fn = {path!r} is not callable")
    return fn  # type: ignore[no-any-return]


def read_metrics(metrics: Mapping[str, object], where: str) -> tuple[float, float]:
    """``(loss, accuracy)`` from an evaluation's metrics, under our names or Flower's templates'; else ValueError."""
    def first(keys: Sequence[str], lo: float, hi: float) -> float:
        for key in keys:
            if key in metrics:
                value = finite_number(metrics[key])
                if value is None or not lo <= value <= hi:
                    raise ValueError(f"{where}: {key} = {shown(metrics[key], 40)} is not a number in [{lo}, {hi}]")
                return value
        raise ValueError(f"{where}: no {' or '.join(keys)} among its metrics ({', '.join(sorted(metrics))[:200]})")

    return first(LOSS_KEYS, 0.0, math.inf), first(ACCURACY_KEYS, 0.0, 1.0)


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
        model = copy.deepcopy(self.model).train()  # training mode first: task_rng looks for active random layers
        model.load_state_dict({n: torch.from_numpy(w.copy()) for n, w in zip(self.names, weights, strict=True)})
        with task_rng(model, cfg.seed):  # a dropout model's masks from the run's seed, as a client's from its task's
            LocalSGD(steps, cfg.batch_size, cfg.lr, cfg.momentum, seed=cfg.seed).run(
                model, self.x.numpy(), self.y.numpy(), torch.device("cpu"))
        trained = [t.detach().numpy() for t in model.state_dict().values()]
        norm = delta_norm([w - t for w, t in zip(weights, trained, strict=True)])
        return norm * cfg.local_steps / steps


#: Local steps the server runs for the reference norm: enough to see the scale, cheap next to one evaluation.
REFERENCE_STEPS = 20


def server_evaluator(cfg: RunConfig, names: list[str]) -> Evaluator | UserEvaluator | None:
    """The run's server-side evaluation: ``evaluate-fn`` when set, else the test split.

    None for ``federated``: a ``FederatedEvaluator`` needs the fleet, known only once the nodes are found.
    """
    if cfg.evaluation == "federated":
        return None
    if cfg.evaluate_fn:
        return UserEvaluator(cfg.evaluate_fn, names)
    return Evaluator(cfg, names)


class UserEvaluator:
    """The user's ``evaluate_fn(server_round, arrays) -> MetricRecord``, as Flower's strategies call it.

    ``server_round`` counts evaluations from 0 (the initial model), as Flower's rounds do. The result must carry
    a loss and an accuracy (``loss``/``accuracy``, or the templates' ``eval_loss``/``eval_acc``): a run needs
    them for its ``target-accuracy`` and its store. A failure is the run's (this is the user's server code).
    """

    def __init__(self, path: str, names: list[str]) -> None:
        self.path, self.fn, self.names, self.round = path, user_evaluate_fn(path), names, 0

    def __call__(self, weights: list[np.ndarray]) -> tuple[float, float]:
        """Return ``(loss, accuracy)``."""
        arrays = to_record(self.names, weights)
        result = self.fn(self.round, arrays)
        self.round += 1
        if not isinstance(result, Mapping):
            raise RuntimeError(f"evaluate-fn {self.path!r} returned {type(result).__name__}, not a MetricRecord")
        try:
            return read_metrics(result, f"evaluate-fn {self.path!r}")
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None


class FederatedEvaluator:
    """Evaluation by the nodes' own ClientApps (``@app.evaluate``): their metrics averaged by ``num-examples``.

    Every node is asked (``evaluate-nodes``: a seeded sample of that many); each reply is a client's word, checked
    like any (``read_metrics``): a bad or missing one costs that node's vote, never the run. An evaluation nobody
    answers repeats the last one, with a warning; the first one fails the run with the reason (a ClientApp without
    an evaluate handler). Its wall time is not charged to the virtual clock.
    """

    def __init__(self, grid: Grid, cfg: RunConfig, names: list[str], nodes: Sequence[int]) -> None:
        self.grid, self.cfg, self.names, self.nodes = grid, cfg, names, list(nodes)
        self.round = 0
        self.last: tuple[float, float] | None = None

    def __call__(self, weights: list[np.ndarray]) -> tuple[float, float]:
        """Return the examples-weighted ``(loss, accuracy)`` of the nodes that answered."""
        nodes = self._sample()
        arrays = to_record(self.names, weights)  # one record for every node: serialized and hashed once
        msgs = [Message(RecordDict({"arrays": arrays,
                                    "config": ConfigRecord({"server-round": self.round})}),
                        dst_node_id=n, message_type="evaluate", ttl=self.cfg.task_ttl) for n in nodes]
        self.round += 1
        replies = self.grid.send_and_receive(msgs, timeout=self.cfg.task_ttl)
        total, loss, acc, problems = 0.0, 0.0, 0.0, []
        for reply in replies:
            try:
                if reply.has_error():
                    raise ValueError(f"error reply: {shown(reply.error.reason, 200)}")
                metrics: MetricRecord = reply.content.metric_records["metrics"]
                node_loss, node_acc = read_metrics(metrics, f"node {reply.metadata.src_node_id}")
                n = num_examples(metrics)  # the training replies' own check of the claim
            except Exception as exc:  # noqa: BLE001 - a reply is the client's word: it costs its vote only
                problems.append(str(exc))
                continue
            total, loss, acc = total + n, loss + n * node_loss, acc + n * node_acc
        if total:
            self.last = (loss / total, acc / total)
            if problems:
                log.warning("federated evaluation: %d of %d nodes gave no usable answer (%s)", len(problems),
                            len(nodes), problems[0])
            return self.last
        why = problems[0] if problems else f"no reply within task-ttl = {self.cfg.task_ttl:g} s"
        if self.last is None:
            raise RuntimeError(f"evaluation = 'federated': none of {len(nodes)} nodes answered the evaluate message "
                               f"({why}); does your ClientApp have an @app.evaluate handler?")
        log.warning("federated evaluation: no node answered (%s); the last evaluation is repeated", why)
        return self.last

    def _sample(self) -> list[int]:
        k = self.cfg.evaluate_nodes
        if not k or k >= len(self.nodes):
            return self.nodes
        return sorted(random.Random(self.cfg.seed * 1_000_003 + self.round).sample(self.nodes, k))
