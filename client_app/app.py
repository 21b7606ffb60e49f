"""The Flower ClientApp: local training that uploads a model delta, local evaluation, and self-description."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.batched import BATCHER
from client_app.data import Dataset, load_dataset, load_partition
from client_app.executors import BATCHED, ExecutorSpec, train_local
from client_app.models import MODELS, build_model, task_rng
from client_app.records import NodeState
from client_app.trainer import LocalSGD, pick_device
from strategies import get_strategy
from strategies import taskkeys as keys
from strategies.client import ClientJob, decode_received, downlink_model
from strategies.codecs import CodecSpec, from_record
from strategies.config import RunConfig
from strategies.flower_arrays import checked_record, record_of, required_record

app = ClientApp()

#: A node's task is the unit of work, and a run sends the same ClientApp thousands of them: what does not change
#: between tasks (the run config parsed, a built-in model's structure) is made once per process (per thread, for a
#: model, which training mutates) instead of once per task, where it was a third of a small model's task.
_CONFIGS: dict[tuple[object, ...], RunConfig] = {}
_MODELS = threading.local()


def run_config(values: Mapping[str, object]) -> RunConfig:
    """``RunConfig.from_mapping(values, lenient=True)``, parsed once per distinct config (a frozen dataclass)."""
    try:
        key = (tuple(values.items()), tuple(map(type, values.values())))  # 1, 1.0 and True: equal keys, not configs
        found = _CONFIGS.get(key)
    except TypeError:  # an unhashable value: parse it every time
        return RunConfig.from_mapping(values, lenient=True)  # type: ignore[arg-type]
    if found is None:
        found = RunConfig.from_mapping(values, lenient=True)  # type: ignore[arg-type]
        if len(_CONFIGS) >= 16:
            _CONFIGS.clear()
        _CONFIGS[key] = found
    return found


def task_model(cfg: RunConfig, data: Dataset) -> torch.nn.Module:
    """The run's model for a task, its weights to be loaded: a built-in one is built once per thread and reused.

    A built-in model's whole state is its ``state_dict`` (no dropout, no batch norm, no other attributes), which
    every task loads, so a task cannot tell a reused model from a new one; a user's ``module:Class`` may keep
    state elsewhere, so it is built for every task, as before.
    """
    if cfg.model not in MODELS:
        return build_model(cfg.model, data.input_shape, data.num_classes)
    key = (cfg.model, tuple(data.input_shape), data.num_classes)
    cache = _MODELS.__dict__.setdefault("models", {})
    model = cache.get(key)
    if model is None:
        model = cache[key] = build_model(cfg.model, data.input_shape, data.num_classes)
    return model.train()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the strategy's client half on the received model; reply with the delta and metrics."""
    cfg = run_config(context.run_config)  # Flower checked the keys
    # local-executor = "batched": tell the process's batcher a node is on its way before decoding its task, so
    # the batcher waits for it rather than starting a smaller batch (client_app/batched.py).
    with BATCHER.session(cfg.local_executor == BATCHED):
        return _train(msg, context, cfg)


def _train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    task = required_record(msg.content, "config", ConfigRecord)
    data, (x, y) = _partition(cfg, context)
    model = task_model(cfg, data)
    state = model.state_dict()
    shapes = [t.detach().cpu().numpy() for t in state.values()]
    names = list(state)
    sgd = LocalSGD(steps=int(task[keys.LOCAL_STEPS]), batch_size=int(task[keys.BATCH_SIZE]), lr=float(task[keys.LR]),
                   momentum=float(task[keys.MOMENTUM]), prox_mu=float(task[keys.PROX_MU]),
                   seed=int(task[keys.TASK_SEED]))
    device = pick_device(cfg.device)
    executor = ExecutorSpec.from_config(cfg)  # local-executor, local-threads, persistence

    def local_train(start: list) -> tuple[list, dict[str, float]]:
        model.load_state_dict({n: torch.from_numpy(w) for n, w in zip(names, start, strict=True)})
        with task_rng(model, sgd.seed):  # dropout's masks from the task's seed, not from the tasks before it
            metrics = train_local(sgd, model, x, y, device, executor)
        return [t.detach().cpu().numpy() for t in model.state_dict().values()], metrics

    record = required_record(msg.content, "arrays", ArrayRecord)
    received = decode_received(record, names, shapes) if len(record) else []
    if keys.DOWNLINK in task:  # two-way compression of the broadcast model
        received = downlink_model(NodeState(context.state), task, received)
    job = ClientJob(
        received=received,
        task=dict(task), train=local_train, state=NodeState(context.state), seed=int(task[keys.TASK_SEED]),
        codec=CodecSpec(cfg.codec, cfg.codec_ratio, cfg.codec_levels, cfg.codec_rank),
        error_feedback=cfg.error_feedback,
    )
    arrays, metrics = get_strategy(cfg.strategy).client(job)
    # Echo the task's seq and model version: the server rejects a reply meant for another task (server_app/guard.py).
    echo = {k: int(task[k]) for k in keys.ECHO if k in task}
    metrics = {**metrics, keys.NUM_EXAMPLES: len(y), **echo}
    delta = record_of(dict(zip(names, arrays, strict=True)))
    return Message(checked_record(RecordDict, {"delta": delta, "metrics": checked_record(MetricRecord, metrics)}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received model on this node's partition."""
    cfg = run_config(context.run_config)  # Flower checked the keys
    data, (x, y) = _partition(cfg, context)
    model = task_model(cfg, data).eval()
    names = list(model.state_dict())
    weights = from_record(required_record(msg.content, "arrays", ArrayRecord), names)
    model.load_state_dict({n: torch.from_numpy(w) for n, w in zip(names, weights, strict=True)})
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)))
        acc = float((logits.argmax(1) == torch.from_numpy(y)).float().mean())
    metrics = {"loss": loss, "accuracy": acc, keys.NUM_EXAMPLES: len(y)}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds and what it computes on (CUDA or CPU)."""
    cfg = run_config(context.run_config)  # Flower checked the keys
    info = {
        "partition-id": int(context.node_config.get("partition-id", -1)),
        "num-partitions": int(context.node_config.get("num-partitions", 0)),
        "torch-device": str(pick_device(cfg.device)),
        "torch-version": torch.__version__,
    }
    if torch.cuda.is_available():
        info["cuda-device"] = torch.cuda.get_device_name(0)
    return Message(RecordDict({"describe": ConfigRecord(info)}), reply_to=msg)


def _partition(cfg: RunConfig, context: Context) -> tuple[Dataset, tuple]:
    """Return this node's training partition, from ``partition-id`` / ``num-partitions`` in the node config."""
    try:
        pid = int(context.node_config["partition-id"])
        parts = int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ValueError(
            "node config lacks partition-id/num-partitions; start the SuperNode with "
            "--node-config 'partition-id=0 num-partitions=N'"
        ) from exc
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, test_fraction=cfg.test_fraction)
    return data, load_partition(data, pid, parts, scheme=cfg.partition, alpha=cfg.dirichlet_alpha, seed=cfg.seed)
