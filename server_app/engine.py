"""The event engine: one mechanism that runs every strategy over Flower's Grid.

It keeps up to ``concurrency`` nodes busy with at most one task each (a SuperNode handles one message at a
time), asks the strategy what a free node should do, applies results in clock order, records every task's fate
in the metrics store, evaluates, and stops on ``max-updates``, ``max-time`` or ``target-accuracy``.

Clocks
------
``virtual``: at dispatch the engine draws the task's download and compute time from the node's profile with a
seeded generator; the upload time follows from the reply's real serialized size. Results are applied strictly
in (virtual completion time, dispatch seq) order, so a run is a function of its seed, however the real replies
arrive. A reply can only be applied once no task still outstanding could complete earlier: every outstanding
task has a lower bound (download + compute + upload latency), and the head waits until all bounds are past it
(conservative discrete-event simulation). Clients still run in parallel meanwhile.

``wall``: replies are applied in real arrival order; times are real seconds since the run started.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server_app import checkpoint
from server_app.downlink import DownlinkCompressor
from server_app.evaluation import ModelSpec
from server_app.guard import UpdateGuard, join_reasons
from server_app.links import exchange_seconds
from server_app.membership import Membership
from server_app.profiles import NodeProfile, TaskTiming, assign_profiles, sample_task
from server_app.store import MetricsStore, UpdateRow
from server_app.wire import RejectedUpdate, message_sizes, read_reply, to_record
from strategies.base import Exchange, Strategy, Task, Update, Weights
from strategies.codecs import CodecSpec
from strategies.config import RunConfig

log = logging.getLogger("staleflower")

Evaluate = Callable[[Weights], tuple[float, float]]


@dataclass
class Flight:
    """A task in flight: dispatched, not yet applied."""

    seq: int
    node: int
    version: int
    dispatched_at: float
    bytes_down: int
    wall_deadline: float
    timing: TaskTiming | None = None     # virtual clock only
    msg_id: str | None = None            # None: never sent (simulated dropout)
    reply: Message | None = None
    bytes_up: int = 0                    # real serialized size of the reply
    payload_up: int = 0                  # its content's size: what the virtual clock charges
    arrived_at: float | None = None      # wall clock: when the reply arrived
    failure: str = ""                    # set for failures known without a reply
    base: Weights | None = None          # the node's own model the task trains from (gossip); else the version's
    content: RecordDict | None = None    # what was sent, to send again after a resume (server_app/checkpoint.py)
    exchange: Exchange | None = None     # node-to-node traffic charged instead of the star's (gossip)

    def due(self) -> float | None:
        """Virtual completion time once it is known (reply in hand, or a failure decided at dispatch)."""
        t = self.timing
        if t is None:
            return None
        if t.fail_after_s is not None:
            return self.dispatched_at + t.fail_after_s
        if self.failure:
            return self.dispatched_at + t.lower_bound_s()
        if self.reply is None:
            return None
        if self.reply.has_error():
            return self.dispatched_at + t.down_s + t.compute_s
        return self.dispatched_at + t.down_s + t.compute_s + t.upload_s(self.payload_up)

    def lower_bound(self) -> float:
        """Earliest virtual time this task could complete."""
        assert self.timing is not None
        return self.dispatched_at + self.timing.lower_bound_s()


@dataclass
class Version:
    """A published model version kept alive while tasks computed on it are in flight."""

    weights: Weights
    names: list[str]
    users: int = 0
    _record: ArrayRecord | None = None

    @property
    def record(self) -> ArrayRecord:
        """The version as a record, serialized on first use (gossip tasks send each node's own model instead)."""
        if self._record is None:
            self._record = to_record(self.names, self.weights)
        return self._record


@dataclass
class Totals:
    """Running totals for evaluations and the summary."""

    applied: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSummary:
    """What a finished run reports."""

    run_id: str
    stop_reason: str
    time: float
    version: int
    applied: int
    bytes_up: int
    bytes_down: int
    loss: float
    accuracy: float
    statuses: dict[str, int]
    weights: Weights

    def as_config(self) -> dict[str, int | float | str]:
        """Flat form for a ConfigRecord (the ServerApp leaves it in ``context.state``)."""
        out: dict[str, int | float | str] = {
            k: getattr(self, k) for k in ("run_id", "stop_reason", "time", "version", "applied", "bytes_up",
                                          "bytes_down", "loss", "accuracy")
        }
        out.update({f"status-{k}": v for k, v in self.statuses.items()})
        return out

    @classmethod
    def from_config(cls, cfg: dict, weights: Weights) -> RunSummary:
        """Inverse of ``as_config``."""
        statuses = {k[len("status-"):]: int(v) for k, v in cfg.items() if k.startswith("status-")}
        plain = {k: v for k, v in cfg.items() if not k.startswith("status-")}
        return cls(**plain, statuses=statuses, weights=weights)


class Engine:
    """Runs one strategy over a Grid until a stop condition holds. Use ``Engine(...).run()``."""

    def __init__(self, grid: Grid, cfg: RunConfig, strategy_cls: type[Strategy], spec: ModelSpec,
                 evaluate: Evaluate, store: MetricsStore, run_id: str, nodes: list[int],
                 node_info: dict[int, dict] | None = None, poll_s: float = 0.005,
                 resume_from: bytes | None = None) -> None:
        self.grid, self.cfg, self.spec, self.evaluate, self.store = grid, cfg, spec, evaluate, store
        self.run_id = run_id
        self.nodes = nodes
        self.virtual = cfg.clock == "virtual"
        self.profiles: dict[int, NodeProfile] = dict(zip(nodes, assign_profiles(
            len(nodes), mix=cfg.profiles, seed=cfg.seed, straggler_fraction=cfg.straggler_fraction,
            straggler_slowdown=cfg.straggler_slowdown, dropout=cfg.dropout, profile_file=cfg.profile_file,
        ), strict=True))
        if resume_from is None:
            self._record_fleet(node_info or {})
        self.rng = np.random.default_rng([cfg.seed, 0x5EED])
        self.strategy = strategy_cls(cfg, [w.copy() for w in spec.initial], len(nodes))
        self.strategy.nodes = list(nodes)
        self.cap = min(cfg.concurrency, len(nodes)) if cfg.concurrency > 0 else len(nodes)
        self.idle: deque[int] = deque(nodes)
        self.flights: dict[int, Flight] = {}          # seq -> flight
        self.by_msg: dict[str, int] = {}              # message id -> seq
        self.versions: dict[int, Version] = {}
        self._payload: tuple[list | None, ArrayRecord | None] = (None, None)
        self.node_tasks: dict[int, int] = {}
        self.zombies: dict[str, int] = {}            # message id of an abandoned task -> its node (still busy)
        self.zombie_deadlines: dict[str, float] = {}
        self.held: dict[int, tuple[int, Message]] = {}  # node -> task waiting for the node to be free
        down = CodecSpec(cfg.codec_downlink, cfg.codec_ratio, cfg.codec_levels, cfg.codec_rank)
        self.downlink = DownlinkCompressor(down) if down.name != "none" else None
        self.guard = UpdateGuard(cfg, spec.initial)  # size, version and norm checks of replies (issue 9)
        self.totals = Totals()
        self.seq = 0
        self.now = 0.0
        self.poll_s = poll_s
        self.t0 = time.monotonic()
        self.last_eval: tuple[int, float, float] | None = None
        # A ClientApp that fails every task must not spin forever on the virtual clock.
        self.failure_limit = max(100, 10 * len(nodes))
        self.failing = 0
        self.last_failure = ""
        # Wall clock: nodes join late, vanish and come back (server_app/membership.py); virtual: a fixed fleet.
        self.membership = None if self.virtual else Membership(self)
        self.checkpointed = 0  # applied updates at the last checkpoint
        self.resumed = resume_from is not None
        if resume_from is not None:
            checkpoint.restore(self, resume_from)
            self.checkpointed = self.totals.applied

    def _record_fleet(self, info: dict[int, dict]) -> None:
        self.store.record_nodes(
            (n, i, info.get(n, {}).get("partition-id"), p.device.name, p.network.name, p.slowdown, p.dropout,
             info.get(n, {}).get("torch-device"))
            for i, (n, p) in enumerate(self.profiles.items())
        )

    # ----------------------------------------------------------------------------------------------- the loop
    def run(self) -> RunSummary:
        """Dispatch, apply in clock order, evaluate, until a stop condition holds."""
        if not self.resumed:
            self._evaluate()
        self._fill()
        reason = self._stop_reason()
        while not reason:
            flight = self._next()
            if flight is None and self.membership is not None and self.membership.wait():
                self._fill()  # a node joined or came back online
                continue
            if flight is None:
                reason = "stalled: no task in flight and the strategy gives none"
                break
            t = flight.due() if self.virtual else flight.arrived_at
            assert t is not None
            if self.cfg.max_time and t > self.cfg.max_time:
                self.now = self.cfg.max_time
                reason = "max-time"
                break
            self.now = max(self.now, t)
            self._complete(flight)
            if self.failing >= self.failure_limit:
                raise RuntimeError(f"stopped after {self.failing} consecutive failed tasks and no success; "
                                   f"last: {self.last_failure}")
            self._maybe_evaluate()
            reason = self._stop_reason()
            if not reason:
                self._fill()
                self._maybe_checkpoint()
        loss, acc = self._evaluate()
        if self.cfg.checkpoint_every:
            self._checkpoint()  # the final state: a resumed finished run ends at once, tests compare weights
        return RunSummary(self.run_id, reason, self.now, self.strategy.version, self.totals.applied,
                          self.totals.bytes_up, self.totals.bytes_down, loss, acc, dict(self.totals.statuses),
                          self.strategy.weights)

    def _maybe_checkpoint(self) -> None:
        every = self.cfg.checkpoint_every
        if every and self.totals.applied // every > self.checkpointed // every:
            self._checkpoint()

    def _checkpoint(self) -> None:
        self.store.save_checkpoint(self.totals.applied, checkpoint.capture(self))
        self.checkpointed = self.totals.applied

    def resend(self, flight: Flight) -> None:
        """Send a restored task's message again (a resumed run: the old process and its messages are gone)."""
        assert flight.content is not None
        self._push(flight, self._train_message(flight.node, flight.version, flight.content))

    def _train_message(self, node: int, version: int, content: RecordDict) -> Message:
        return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(version),
                       ttl=self.cfg.task_ttl)

    def _stop_reason(self) -> str:
        c = self.cfg
        if c.max_updates and self.totals.applied >= c.max_updates:
            return "max-updates"
        if c.target_accuracy and self.last_eval and self.last_eval[2] >= c.target_accuracy:
            return "target-accuracy"
        return ""

    # ------------------------------------------------------------------------------------------- dispatching
    def _fill(self) -> None:
        """Give work to free nodes, in the order they became free, while there is room."""
        if self.membership is not None:
            self.membership.sync()
        waiting: deque[int] = deque()
        while self.idle and len(self.flights) < self.cap:
            node = self.idle.popleft()
            online = self.membership is None or self.membership.usable(node)
            task = self.strategy.task_for(node) if online else None
            if task is None:
                waiting.append(node)
            else:
                self._dispatch(node, task)
        waiting.extend(self.idle)
        self.idle = waiting

    def _dispatch(self, node: int, task: Task) -> None:
        seq, self.seq = self.seq, self.seq + 1
        version = self._version(task.version)
        config = self._task_config(seq, node, task)
        arrays = version.record if task.payload is None else self._payload_record(task.payload)
        broadcast = task.payload is None and task.exchange is None  # gossip and all-reduce broadcast nothing
        if broadcast and self.downlink is not None:  # two-way compression of the broadcast model
            extra, compressed = self.downlink.payload(node, task.version, version.weights, config["task-seed"])
            config.update(extra)
            if compressed is not None:
                arrays = ArrayRecord(dict(zip(self.spec.names, compressed, strict=True)))
        msg = self._train_message(node, task.version, RecordDict({"arrays": arrays, "config": ConfigRecord(config)}))
        bytes_down, payload_down = message_sizes(msg)
        flight = Flight(seq, node, task.version, self._clock(), bytes_down, time.monotonic() + self.cfg.task_ttl,
                        base=task.base, exchange=task.exchange, content=msg.content)
        if self.virtual:
            flight.timing = self._timing(node, payload_down, task.exchange)
        version.users += 1
        self.flights[seq] = flight
        self.strategy.in_flight[node] = task.version
        if flight.timing is not None and flight.timing.fail_after_s is not None:
            flight.failure = "dropout (simulated)"
            return
        if node in self.zombies.values():  # still running an abandoned task: a node takes one message at a time
            self.held[node] = (seq, msg)
            return
        self._push(flight, msg)

    def _timing(self, node: int, payload_down: int, exchange: Exchange | None) -> TaskTiming:
        """Draw a task's times; a node-to-node exchange replaces the star's download and upload."""
        timing = sample_task(
            self.profiles[node], self.rng, local_steps=self.cfg.local_steps,
            flops_per_step=self.spec.flops_per_step, bytes_down=payload_down,
            compute_dist=self.cfg.compute_dist, compute_jitter=self.cfg.compute_jitter,
            network_jitter=self.cfg.network_jitter,
        )
        if exchange is None:
            return timing
        # The node already holds its model (the message carrying it is this emulation's transport, not the
        # algorithm's traffic): no download; the "upload" is the exchange, whatever the reply's size.
        return dataclasses.replace(timing, down_s=0.0, up_latency_s=exchange_seconds(exchange, self.profiles),
                                   up_bps=math.inf)

    def _push(self, flight: Flight, msg: Message) -> None:
        ids = list(self.grid.push_messages([msg]))
        if not ids or not ids[0]:
            flight.failure = "push rejected by the SuperLink"
            flight.arrived_at = self._clock()
            return
        flight.msg_id = ids[0]
        flight.wall_deadline = time.monotonic() + self.cfg.task_ttl
        self.by_msg[ids[0]] = flight.seq

    def _payload_record(self, payload: list) -> ArrayRecord:
        """A strategy's payload as a record; the same list object is serialized (and hashed) once."""
        if self._payload[0] is not payload:
            names = self.spec.names if payload else []
            self._payload = (payload, ArrayRecord(dict(zip(names, payload, strict=True))))
        return self._payload[1]

    def _task_seed(self, node: int) -> int:
        """Seed of a node's n-th task: its batches do not depend on how other nodes' tasks interleave."""
        n = self.node_tasks[node] = self.node_tasks.get(node, -1) + 1
        return int(np.random.SeedSequence([self.cfg.seed, self.nodes.index(node), n]).generate_state(1)[0])

    def _task_config(self, seq: int, node: int, task: Task) -> dict:
        c = self.cfg
        return {
            "lr": c.lr, "local-steps": c.local_steps, "batch-size": c.batch_size, "momentum": c.momentum,
            "prox-mu": c.prox_mu, "task-seq": seq, "model-version": task.version,
            "task-seed": self._task_seed(node),
            **task.config,
        }

    def _version(self, v: int) -> Version:
        if v not in self.versions:
            if v != self.strategy.version:
                raise RuntimeError(f"strategy asked for version {v}, which is neither current nor in flight")
            self.versions[v] = Version(self.strategy.weights, self.spec.names)
        return self.versions[v]

    def _release(self, v: int) -> None:
        """Drop a task's hold on its version; forget versions nobody holds that are no longer current."""
        self.versions[v].users -= 1
        for old in [k for k, e in self.versions.items() if e.users == 0 and k != self.strategy.version]:
            del self.versions[old]

    # ------------------------------------------------------------------------------------- waiting for results
    def _next(self) -> Flight | None:
        """Block until the next result in clock order is in hand; None when nothing is in flight."""
        pause = self.poll_s / 8
        while self.flights:
            self._pull()
            flight = self._head_virtual() if self.virtual else self._head_wall()
            if flight is not None:
                return flight
            time.sleep(pause)
            pause = min(pause * 2, self.poll_s * 10)
        return None

    def _pull(self) -> None:
        waiting = [mid for mid, seq in self.by_msg.items() if self.flights[seq].reply is None]
        if waiting:
            for reply in self.grid.pull_messages(waiting):
                seq = self.by_msg.get(reply.metadata.reply_to_message_id)
                flight = self.flights[seq] if seq is not None else None
                if flight is not None and flight.reply is None and not flight.failure:
                    flight.reply = reply
                    flight.bytes_up, flight.payload_up = message_sizes(reply)
                    flight.arrived_at = self._clock()
        if self.zombies:
            gone = {r.metadata.reply_to_message_id for r in self.grid.pull_messages(list(self.zombies))}
            now = time.monotonic()
            gone |= {mid for mid, deadline in self.zombie_deadlines.items() if now > deadline}
            for mid in gone & set(self.zombies):
                self._free(self.zombies.pop(mid), mid)
        now = time.monotonic()
        for f in self.flights.values():
            if f.reply is None and not f.failure and now > f.wall_deadline:
                f.failure = f"no reply within task-ttl = {self.cfg.task_ttl:g} s"
                f.arrived_at = self._clock()

    def _free(self, node: int, msg_id: str) -> None:
        """An abandoned task's reply arrived (and was dropped): send the node the task it was given meanwhile."""
        del self.zombie_deadlines[msg_id]
        if node in self.held:
            seq, msg = self.held.pop(node)
            if seq in self.flights:
                self._push(self.flights[seq], msg)

    def _head_virtual(self) -> Flight | None:
        known, bound = None, None
        for f in self.flights.values():
            due = f.due()
            if due is not None:
                if known is None or (due, f.seq) < known[0]:
                    known = ((due, f.seq), f)
            else:
                lb = (f.lower_bound(), f.seq)
                bound = lb if bound is None or lb < bound else bound
        if known is None or (bound is not None and bound < known[0]):
            return None
        return known[1]

    def _head_wall(self) -> Flight | None:
        done = [f for f in self.flights.values() if f.arrived_at is not None]
        return min(done, key=lambda f: (f.arrived_at, f.seq)) if done else None

    # ---------------------------------------------------------------------------------------- applying results
    def _complete(self, f: Flight) -> None:
        del self.flights[f.seq]
        if f.msg_id is not None:
            del self.by_msg[f.msg_id]
        self.strategy.in_flight.pop(f.node, None)
        self.idle.append(f.node)
        base = f.base if f.base is not None else self.versions[f.version].weights
        staleness = self.strategy.version - f.version
        status, reason, applied, restart = "failed", f.failure, (), ()
        try:
            if f.failure or f.reply is None:
                pass
            elif f.reply.has_error():
                reason = f"client error {f.reply.error.code}: {f.reply.error.reason}"
            else:
                self.guard.admit(f.reply, f.payload_up, f.seq, f.version)
                sent, is_delta, n, metrics = read_reply(f.reply, self.spec.names, base)
                if any(k.startswith("exec-") for k in metrics):  # multi-thread executors' numbers (issue 6)
                    self.store.record_task_metrics(f.seq, f.node, metrics)
                update = Update(f.seq, f.node, f.version, staleness, sent, base, n, metrics, is_delta, self.now)
                update, note = self.guard.screen(update)
                verdict = self.strategy.apply(update)
                status, applied, restart = verdict.status, verdict.applied, verdict.restart
                reason = join_reasons(note, verdict.reason)
                if f.seq in applied:
                    status = "applied"
        except RejectedUpdate as exc:
            status, reason = "rejected", str(exc)
        if self.downlink is not None:
            (self.downlink.discard if status in ("failed", "rejected") else self.downlink.confirm)(f.node)
        if status in ("failed", "rejected"):
            if self.membership is not None:  # a lost node: the strategy sees the fleet without it
                self.membership.sync(force=True)
            verdict = self.strategy.fail(f.node, f.version)
            applied, restart = verdict.applied, verdict.restart
            log.info("task %d on node %d %s: %s", f.seq, f.node, status, reason)
            self.failing, self.last_failure = self.failing + 1, f"{status}: {reason}"
        else:
            self.failing = 0
        self._record(f, status, reason, staleness, f.seq in applied)
        others = [s for s in applied if s != f.seq]
        if others:
            self.store.mark_applied(others, self.strategy.version)
            counts = self.totals.statuses
            counts["buffered"] -= len(others)
            counts["applied"] = counts.get("applied", 0) + len(others)
            if not counts["buffered"]:
                del counts["buffered"]
        self.totals.applied += len(applied)
        self._release(f.version)
        for node in restart:
            self._restart(node)

    def _restart(self, node: int) -> None:
        """Abandon ``node``'s task in flight: record the work wasted so far, and let the node take fresh work.

        Flower cannot interrupt a running ClientApp, so its reply is awaited and dropped; a task given to the
        node meanwhile is held until then (on the virtual clock it starts now all the same).
        """
        f = next((fl for fl in self.flights.values() if fl.node == node), None)
        if f is None:
            return
        del self.flights[f.seq]
        self.strategy.in_flight.pop(node, None)
        if f.msg_id is not None:
            del self.by_msg[f.msg_id]
            if f.reply is None:
                self.zombies[f.msg_id], self.zombie_deadlines[f.msg_id] = node, f.wall_deadline
        elapsed = self.now - f.dispatched_at
        down = f.timing.down_s if f.timing else 0.0
        wasted = min(max(elapsed - down, 0.0), f.timing.compute_s) if f.timing else elapsed
        f.bytes_up = 0  # abandoned before its upload, on the run's clock
        self._record(f, "restarted", "abandoned by the strategy", self.strategy.version - f.version, False,
                     durations=(wasted, min(elapsed, down)))
        self._release(f.version)
        self.idle.appendleft(node)

    def _record(self, f: Flight, status: str, reason: str, staleness: int, applied: bool,
                durations: tuple[float, float] | None = None) -> None:
        """Write the task's row and count it in the totals; ``durations`` overrides (compute_s, comm_s).

        A gossip task's bytes are its node-to-node exchange's (``Exchange``); what Flower's messages carried in
        this emulation (the node's model out, its delta back) goes to the ``transport_bytes_*`` columns.
        """
        compute_s, comm_s = durations or self._durations(f, f.bytes_up)
        ex = f.exchange
        if ex is None:
            bytes_up, bytes_down = f.bytes_up, f.bytes_down
        elif status in ("failed", "restarted"):  # the node never got to its exchange
            bytes_up = bytes_down = 0
        else:
            bytes_up, bytes_down = ex.bytes_up, ex.bytes_down
        self.totals.bytes_up += bytes_up
        self.totals.bytes_down += bytes_down
        self.totals.statuses[status] = self.totals.statuses.get(status, 0) + 1
        self.store.record_update(UpdateRow(
            seq=f.seq, node_id=f.node, dispatched_at=f.dispatched_at, completed_at=self.now,
            base_version=f.version, applied_version=self.strategy.version if applied else None,
            staleness=None if status == "failed" else staleness,
            bytes_up=bytes_up, bytes_down=bytes_down, compute_s=compute_s, comm_s=comm_s,
            status=status, reason=reason, peer_id=ex.peer if ex is not None else None,
            transport_bytes_up=f.bytes_up, transport_bytes_down=f.bytes_down,
        ))

    def _durations(self, f: Flight, bytes_up: int) -> tuple[float, float]:
        """Compute and communication seconds: drawn (virtual), or measured by the client (wall)."""
        if f.timing is not None:
            up = f.timing.upload_s(f.payload_up) if bytes_up else 0.0
            return f.timing.compute_s, f.timing.down_s + up
        total = self.now - f.dispatched_at
        metrics = f.reply.content.metric_records.get("metrics") if f.reply and f.reply.has_content() else None
        compute = float(metrics.get("compute-s", 0.0)) if metrics else 0.0
        return compute, max(total - compute, 0.0)

    # -------------------------------------------------------------------------------------------- evaluation
    def _maybe_evaluate(self) -> None:
        every = self.cfg.eval_every
        last_applied = self.last_eval[0] if self.last_eval else 0
        if every and self.totals.applied // every > last_applied // every:
            self._evaluate()

    def _evaluate(self) -> tuple[float, float]:
        loss, acc = self.evaluate(self.strategy.weights)
        self.last_eval = (self.totals.applied, loss, acc)
        self.store.record_eval(self.now, self.strategy.version, self.totals.applied, self.totals.bytes_up,
                               self.totals.bytes_down, loss, acc, self.strategy.state_summary())
        log.info("t=%.1f version=%d applied=%d loss=%.4f acc=%.4f", self.now, self.strategy.version,
                 self.totals.applied, loss, acc)
        return loss, acc

    def _clock(self) -> float:
        return self.now if self.virtual else time.monotonic() - self.t0
