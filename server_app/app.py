"""The Flower ServerApp: validates the run config, finds the nodes, and runs the event engine."""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from client_app.data import DataError, DatasetMissingError
from client_app.models import ModelError
from server_app import checkpoint, progress
from server_app.checkpoint import CheckpointError
from server_app.engine import Engine
from server_app.evaluation import FederatedEvaluator, model_spec, server_evaluator
from server_app.inflation import bounded
from server_app.intake import UpdateGuard, read_describe
from server_app.lifecycle import Heartbeat, RunStopped, on_runtime_exit, stop_on_signals
from server_app.profiles import ProfileError, check_profile_file, parse_mix
from server_app.progress import format_summary
from server_app.state import EngineState, ModelSpec, RunSummary
from server_app.store import MetricsStore, stored_run
from strategies import check_implemented, get_strategy, parse_config
from strategies.config import MAX_NODES, ConfigError, RunConfig, near_misses
from strategies.registry import registered

log = logging.getLogger("staleflower")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under ``flwr run`` (simulation or deployment)."""
    cfg = parse_config(context.run_config, lenient=True)  # Flower held every key to the app's pyproject.toml
    if typos := near_misses({k: v for k, v in cfg.extra.items()
                             if k not in get_strategy(cfg.strategy).hyperparameters}):
        log.warning("run-config key(s) %s are not staleflower's: passed to the ClientApp as they are",
                    ", ".join(typos))
    t0 = time.monotonic()
    with progress.run(cfg, cfg.resume or str(context.run_id)):  # progress lines, or the caller's bar
        summary = run_experiment(grid, cfg, run_id=str(context.run_id))
    context.state["summary"] = ConfigRecord(summary.as_config())
    context.state["final-weights"] = ArrayRecord(list(summary.weights))
    stats = progress.run_stats(cfg.metrics_path(), summary.run_id, cfg.target_accuracy, cfg.target_score)
    print(format_summary(summary, cfg, wall_s=time.monotonic() - t0, stats=stats, sep=progress.separator()),
          flush=True)


def run_experiment(grid: Grid, cfg: RunConfig, run_id: str) -> RunSummary:
    """Run one experiment and keep the store's record of it honest, whatever happens.

    A stop signal ends the run ``stopped`` with the signal's name (``server_app/lifecycle.py``), and the
    heartbeat lets a reader see a run whose process died without a word.
    """
    spec = validate(cfg)
    # Deployment's grid inflates each reply from its objects: bounded first, every reply discovery included.
    grid = bounded(grid, UpdateGuard(cfg, spec.initial).max_bytes)
    evaluator = server_evaluator(cfg, spec.names)
    store = MetricsStore.open(cfg.metrics_path())
    with stop_on_signals():
        state = None
        if cfg.resume:
            run_id, state = cfg.resume, reopen(store, cfg)
        else:
            store.start_run(run_id, cfg.strategy, cfg.to_mapping())
        try:
            on_runtime_exit(store.path, run_id)
            with Heartbeat(store.path, run_id):
                nodes, info = discover(grid, cfg)
                nodes = fleet_for(cfg, nodes, info)
                evaluate = evaluator or FederatedEvaluator(grid, cfg, spec.names, nodes)
                try:  # the profile file's node indices are checked against the fleet only now
                    engine = Engine(grid, cfg, get_strategy(cfg.strategy), spec, evaluate, store, run_id, nodes,
                                    info, resume_from=state)
                except ProfileError as exc:
                    raise ConfigError(str(exc)) from None
                summary = engine.run()
            if summary.stop_reason.startswith("stalled"):
                raise RuntimeError(summary.stop_reason)
            store.finish_run("completed")  # inside: a signal after it finds the run closed, and leaves it so
        except RunStopped as exc:
            store.finish_run("stopped", exc.reason)
            raise
        except KeyboardInterrupt:
            store.finish_run("stopped", "interrupted (KeyboardInterrupt)")
            raise
        except BaseException as exc:
            store.finish_run("failed", f"{type(exc).__name__}: {exc}")
            raise
    store.close()
    return summary


# Keys a resumed run may change: where it stops (target-score: which accuracy its target reads), and the resume key.
RESUMABLE_CHANGES = frozenset({"resume", "max-updates", "max-time", "target-accuracy", "target-score", "metrics-db"})


def reopen(store: MetricsStore, cfg: RunConfig) -> EngineState:
    """The checkpoint of run ``cfg.resume``, verified, then its later rows rolled back; the config must be the run's.

    A checkpoint that fails verification (``checkpoint.load``) is a ``ConfigError`` raised before any row changes:
    the user gets one line and the store stays as it was, ready for a resume with the right key.
    """
    run = stored_run(store.db, cfg.resume)
    if run is None:
        raise ConfigError(f"resume = {cfg.resume!r}: no such run in {store.path}")
    before, now = run[0], cfg.to_mapping()
    changed = sorted(k for k in set(before) | set(now) if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(f"resume = {cfg.resume!r}: the run config differs from the run's own ({diffs})")
    try:
        return store.resume_run(cfg.resume, checkpoint.load)
    except LookupError as exc:
        raise ConfigError(str(exc)) from exc
    except CheckpointError as exc:
        raise ConfigError(f"cannot resume run {cfg.resume} from {store.path}: {exc}") from exc


def validate(cfg: RunConfig) -> ModelSpec:
    """Everything that can be checked before training: registry, stop condition, fleet, data and model.

    Problems found by the modules that own them (profile mix, dataset files, model path) come back as one
    ``ConfigError``, so the user sees one kind of clear message before anything runs.
    """
    check_implemented(cfg)
    if not cfg.max_updates and not cfg.max_time:
        raise ConfigError("set a stop condition: max-updates > 0 or max-time > 0")
    try:
        if cfg.checkpoint_every and not cfg.resume:  # made now, not at the first checkpoint mid-run
            checkpoint.signing_key()
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        parse_mix(cfg.profiles)
        if cfg.profile_file:  # every row, for the largest fleet; the node range waits for the real one
            check_profile_file(cfg.profile_file, MAX_NODES)
        return model_spec(cfg)
    except (ProfileError, DataError, DatasetMissingError, ModelError) as exc:
        raise ConfigError(str(exc)) from exc


def discover(grid: Grid, cfg: RunConfig, wait_s: float = 120.0) -> tuple[list[int], dict[int, dict[str, object]]]:
    """Wait for ``min-nodes`` nodes, ask each to describe itself, and order them by partition id.

    Ordering by partition id (not by Flower's random node ids) makes profile assignment and dispatch order,
    hence the whole virtual-clock run, a function of the seed. Nodes whose ClientApp has no ``query`` handler
    (e.g. one written for Flower's FedAvg) answer with an error and are ordered by node id after the others;
    so are nodes whose describe reply gives no valid partition id (``server_app.intake.read_describe``: a
    client's answer is its word, checked like any reply, and a bad one costs that node its place, not the run).
    """
    deadline = time.monotonic() + wait_s
    while len(nodes := sorted(grid.get_node_ids())) < cfg.min_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} node(s) connected after {wait_s:.0f} s; min-nodes = {cfg.min_nodes}")
        time.sleep(0.2)
    info = _describe(grid, nodes, timeout=min(cfg.task_ttl, 60.0))
    order = sorted(nodes, key=lambda n: (info.get(n, {}).get("partition-id", float("inf")), n))
    return order, info


#: Run-config keys of staleflower's own client training, which a stock ClientApp does not read (``lr`` it does:
#: the train message's config carries it, as Flower's templates expect).
OWN_TRAINING_KEYS = ("local-steps", "batch-size", "momentum", "prox-mu", "error-feedback")


def fleet_for(cfg: RunConfig, nodes: list[int], info: dict[int, dict[str, object]]) -> list[int]:
    """The nodes this run can use, given which run staleflower's ClientApp (they describe themselves).

    A stock Flower ClientApp (``flwr new``'s template, Flower's quickstarts) answers no describe query. It
    serves any strategy whose client half is the default (``Strategy.client_half_reason``). For one that needs
    ours, a fleet with none of ours is refused before any training, with the reason; a mixed fleet runs on the
    nodes that have ours (a node that will not describe itself costs its own place, never the run).
    """
    stock = [n for n in nodes if not info.get(n)]
    if not stock:
        return nodes
    reason = get_strategy(cfg.strategy).client_half_reason(cfg)
    if not reason:
        defaults = RunConfig()
        unread = [k for k in OWN_TRAINING_KEYS if cfg[k] != defaults[k]]
        if unread:
            log.warning("%d node(s) run their own ClientApp, which trains by its own settings: %s do not reach it",
                        len(stock), ", ".join(unread))
        return nodes
    if len(stock) == len(nodes):
        plain = cfg.replace(codec="none", codec_downlink="none", local_executor="sequential")
        usable = [name for name, cls in registered().items() if not cls.client_half_reason(plain)]
        raise ConfigError(f"{reason}: that needs staleflower's ClientApp (client_app.app:app) on the nodes, and none "
                          f"of the {len(nodes)} nodes runs it (none describes itself, as a stock Flower ClientApp "
                          f"does not). With your own ClientApp use codec = 'none' and one of: {', '.join(usable)}")
    kept = [n for n in nodes if n not in set(stock)]
    log.warning("%s: %d node(s) without staleflower's ClientApp are left out of the run", reason, len(stock))
    if len(kept) < cfg.min_nodes:
        raise ConfigError(f"{reason}: only {len(kept)} node(s) run staleflower's ClientApp; min-nodes = "
                          f"{cfg.min_nodes}")
    return kept


def _describe(grid: Grid, nodes: list[int], timeout: float) -> dict[int, dict[str, object]]:
    msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.describe",
                    ttl=timeout) for n in nodes]
    pending = {mid: n for mid, n in zip(grid.push_messages(msgs), nodes, strict=True) if mid}
    info: dict[int, dict[str, object]] = {}  # node -> its describe reply
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            info[node], problem = read_describe(reply)
            if problem:
                log.warning("node %d described itself wrongly (%s): ordered as undescribed", node, problem)
        time.sleep(0.01)
    return info
