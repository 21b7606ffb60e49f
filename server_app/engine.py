"""The event engine: one loop that runs every strategy over Flower's Grid.

It keeps up to ``concurrency`` nodes busy with at most one task each (a SuperNode handles one message at a
time), asks the strategy what a free node should do, applies results in clock order, records every task's fate,
evaluates, checkpoints, and stops on ``max-updates``, ``max-time`` or ``target-accuracy``.

The loop is all this module holds; each concern it drives has its own module:

- ``state``: the records (flights, versions, totals) in one ``EngineState`` that checkpoints save whole;
- ``clocks``: virtual, scripted and wall clocks (what a task takes, which result comes next);
- ``outbox`` and ``mailbox``: what a task's message carries, and pushing/pulling it through the Grid;
- ``intake``: a reply turned into a validated ``Update`` or a ``RejectedUpdate`` with its reason;
- ``ledger``: the store's rows and the running totals; ``restarts``: the tasks a strategy abandons;
- ``membership``: on the wall clock, the fleet as it changes; ``checkpoint``: saving and resuming.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import numpy as np
from flwr.serverapp import Grid

from server_app import checkpoint, overlap, restarts
from server_app.autodelay import resolve_delay
from server_app.clocks import Clock, make_clock
from server_app.downlink import DownlinkCompressor
from server_app.intake import Intake, RejectedUpdate, TaskFailed, UpdateGuard, client_compute_s, join_reasons
from server_app.ledger import Ledger, bounded_reason
from server_app.localscores import local_scores, target_score
from server_app.mailbox import Mailbox
from server_app.membership import FleetChange, Membership, fleet_profiles, node_profile
from server_app.outbox import Outbox
from server_app.serverlink import ServerLink
from server_app.state import EngineState, Flight, ModelSpec, RunSummary, Version
from server_app.store import MetricsStore
from server_app.wire import message_sizes
from strategies.base import Status, Strategy, Task
from strategies.client import Weights
from strategies.codecs import CodecSpec
from strategies.config import RunConfig

__all__ = ["Engine", "RunSummary"]

log = logging.getLogger("staleflower")

Evaluate = Callable[[Weights], tuple[float, float]]


class Engine:
    """Runs one strategy over a Grid until a stop condition holds. Use ``Engine(...).run()``."""

    def __init__(self, grid: Grid, cfg: RunConfig, strategy_cls: type[Strategy], spec: ModelSpec,
                 evaluate: Evaluate, store: MetricsStore, run_id: str, nodes: list[int],
                 node_info: dict[int, dict[str, object]] | None = None, *, poll_s: float = 0.005,
                 resume_from: EngineState | None = None, clock: Clock | None = None) -> None:
        self.grid, self.cfg, self.spec, self.evaluate, self.run_id = grid, cfg, spec, evaluate, run_id
        self.clock = clock or make_clock(cfg, spec.flops_per_step)
        self.ledger, self.intake, self.outbox = Ledger(store), Intake(spec.names), Outbox(cfg, spec.names)
        self.mailbox = Mailbox(grid, cfg.task_ttl, lambda: self.clock.now(self.state))
        self.poll_s = poll_s
        self.finish_restarts = restarts.finishes(cfg, self.clock)  # an abandoned task keeps its node to its end
        self.resumed = resume_from is not None
        if resume_from is None:
            self.state = self._new_state(strategy_cls, nodes)
            self.ledger.nodes(self.state, [(n, (node_info or {}).get(n, {})) for n in nodes])
        else:
            self.state = checkpoint.restore(resume_from, nodes, self.clock.virtual)
            for flight in sorted(self.state.flights.values(), key=lambda f: f.seq):
                if not flight.failure and flight.content is not None:
                    self.mailbox.resend(flight)
        s = self.state
        self.checkpointed = s.totals.applied  # applied updates at the last checkpoint
        self.membership = None if self.clock.virtual else Membership(
            grid, cfg, s.nodes, elastic=s.policy.elastic, failed=lambda: s.totals.statuses.get(Status.FAILED, 0))

    def _new_state(self, strategy_cls: type[Strategy], nodes: list[int]) -> EngineState:
        c = self.cfg
        profiles = fleet_profiles(c, len(nodes))
        down = CodecSpec(c.codec_downlink, c.codec_ratio, c.codec_levels, c.codec_rank)
        state = EngineState(
            nodes=list(nodes), profiles=dict(zip(nodes, profiles, strict=True)),
            rng=np.random.default_rng([c.seed, 0x5EED]), cap=self._cap(len(nodes)), fleet_online=len(nodes),
            guard=UpdateGuard.for_run(c, self.spec.initial, self.evaluate), idle=deque(nodes),
            downlink=DownlinkCompressor(down) if down.name != "none" else None, link=ServerLink.of(c))
        c = resolve_delay(c, state.profiles, self.spec)  # delay = "auto": D from the fleet's latency and pace
        state.strategy = strategy_cls(c, [w.copy() for w in self.spec.initial], tuple(nodes), state)
        return state

    def _cap(self, fleet: int) -> int:
        return min(self.cfg.concurrency, fleet) if self.cfg.concurrency > 0 else fleet

    # ----------------------------------------------------------------------------------------------- the loop
    def run(self) -> RunSummary:
        """Dispatch, apply in clock order, evaluate, until a stop condition holds."""
        s = self.state
        if not self.resumed:
            self._evaluate()
        self._fill()
        reason = self._stop_reason()
        while not reason:
            head = self._next()
            if head is None and self.membership is not None and (change := self.membership.wait()) is not None:
                self._apply_fleet(change)  # a node joined or came back online
                self._fill()
                continue
            if head is None:
                reason = "stalled: no task in flight and the strategy gives none"
                break
            at, flight = head
            if self.cfg.max_time and at > self.cfg.max_time:
                s.now, reason = self.cfg.max_time, "max-time"
                break
            s.now = max(s.now, at)
            self._complete(flight)
            if s.failing >= max(100, 10 * len(s.nodes)):  # a ClientApp that fails every task must not spin
                raise RuntimeError(f"stopped after {s.failing} consecutive failed tasks and no success; "
                                   f"last: {s.last_failure}")
            self._maybe_evaluate()
            reason = self._stop_reason()
            if not reason:
                self._fill()
                self._checkpoint()
        loss, acc = self._evaluate()
        self._checkpoint(final=True)  # a resumed finished run ends at once; tests compare its weights
        t = s.totals
        return RunSummary(self.run_id, reason, s.now, s.policy.version, t.applied, t.bytes_up, t.bytes_down, loss,
                          acc, dict(t.statuses), s.policy.weights)

    def _stop_reason(self) -> str:
        c, s = self.cfg, self.state
        if c.max_updates and s.totals.applied >= c.max_updates:
            return "max-updates"
        if (c.target_accuracy and s.last_eval  # the accuracy target-score names (server_app/localscores.py)
                and target_score(c.target_score, s.last_eval[2], s.last_local) >= c.target_accuracy):
            return "target-accuracy"
        return ""

    # ------------------------------------------------------------------------------------------- dispatching
    def _fill(self) -> None:
        """Give work to free nodes, in the order they became free, while there is room."""
        s, members = self.state, self.membership
        if members is not None:
            self._apply_fleet(members.sync())
        waiting: list[int] = []
        while s.idle and len(s.flights) < s.cap:
            node = s.idle.popleft()
            task = s.policy.task_for(node) if members is None or members.usable(node) else None
            if task is None:
                waiting.append(node)
            else:
                self._dispatch(node, task)
        s.idle.extendleft(reversed(waiting))  # still first, in their order (not a copy of the whole queue)

    def _dispatch(self, node: int, task: Task) -> None:
        s = self.state
        seq, s.seq = s.seq, s.seq + 1
        version = self._version(task.version)
        content = self.outbox.content(s, seq, node, task, version)
        msg = self.mailbox.message(node, task.version, content)
        bytes_down, payload_down = message_sizes(msg)
        flight = Flight(seq, node, task.version, self.clock.now(s), bytes_down, base=task.base,
                        exchange=task.exchange, content=content)
        flight.timing = self.clock.draw(s, node, payload_down, task.exchange)
        version.users += 1
        s.flights[seq] = flight
        if flight.timing is not None and flight.timing.fail_after_s is not None:
            flight.failure = "dropout (simulated)"
        else:
            self.mailbox.send(flight, msg)

    def _version(self, v: int) -> Version:
        s = self.state
        if v not in s.versions:
            if v != s.policy.version:
                raise RuntimeError(f"strategy asked for version {v}, which is neither current nor in flight")
            s.versions[v] = Version(s.policy.weights, self.spec.names)
        return s.versions[v]

    def release(self, v: int) -> None:
        """Drop a task's hold on its version; forget versions nobody holds that are no longer current."""
        s = self.state
        s.versions[v].users -= 1
        for old in [k for k, e in s.versions.items() if e.users == 0 and k != s.policy.version]:
            del s.versions[old]

    # ---------------------------------------------------------------------------------------- applying results
    def _next(self) -> tuple[float, Flight] | None:
        """Block until the next result in clock order is in hand; None when nothing is in flight."""
        pause, flights = self.poll_s / 8, self.state.flights
        while flights:
            self.mailbox.pull(flights.values())
            head = self.clock.head(self.state)
            if head is not None:
                return head
            self.ledger.store.commit()  # waiting for a client: what happened so far is committed first
            time.sleep(pause)
            pause = min(pause * 2, self.poll_s * 10)
        self.ledger.store.commit()
        return None

    def _complete(self, f: Flight) -> None:
        s, strategy = self.state, self.state.policy
        if f.abandoned is not None:  # restart = "finish": the strategy gave it up; it only frees its node now
            return restarts.settle(self, f)
        del s.flights[f.seq]
        self.mailbox.forget(f)
        s.idle.append(f.node)
        base = f.base if f.base is not None else s.versions[f.version].weights
        staleness = strategy.version - f.version
        status, reason = Status.FAILED, f.failure
        applied: tuple[int, ...] = ()  # seqs that went into the model
        restart: tuple[int, ...] = ()  # nodes whose task the strategy abandons
        try:
            update = self.intake.read(f, s.guard, base, staleness, s.now)
            self.ledger.task_metrics(f, update.metrics)
            update, note = s.guard.screen(update)
            verdict = strategy.apply(update)
            s.contract.check(strategy, verdict, f.seq)  # a verdict at odds with itself stops the run
            status, applied, restart = verdict.status, verdict.applied, verdict.restart
            reason = join_reasons(note, verdict.reason)
        except TaskFailed as exc:
            reason = str(exc)
        except RejectedUpdate as exc:
            status, reason = Status.REJECTED, str(exc)
        reason = bounded_reason(reason)  # it may quote the client: the log and the store get the same bounded text
        if s.downlink is not None:
            (s.downlink.discard if status in (Status.FAILED, Status.REJECTED) else s.downlink.confirm)(f.node)
        if status in (Status.FAILED, Status.REJECTED):
            if self.membership is not None:  # a lost node: the strategy sees the fleet without it
                self._apply_fleet(self.membership.sync(force=True))
            verdict = strategy.fail(f.node, f.version)
            s.contract.check(strategy, verdict)
            applied, restart = verdict.applied, verdict.restart
            log.info("task %d on node %d %s: %s", f.seq, f.node, status, reason)
            s.failing, s.last_failure = s.failing + 1, f"{status}: {reason}"
        else:
            s.failing = 0
        compute = 0.0 if self.clock.virtual else client_compute_s(f.reply)  # the virtual clock draws its own
        durations = self.clock.durations(f, s.now, compute)
        overlap.finished(s.tails, f, s.now)  # what the node's next task may hide (server_app/overlap.py)
        self.ledger.record(s.totals, f, status, reason, now=s.now, staleness=staleness, durations=durations,
                           applied_version=strategy.version if f.seq in applied else None)
        self.ledger.applied_later(s.totals, [q for q in applied if q != f.seq], strategy.version)
        s.totals.applied += len(applied)
        self.release(f.version)
        for node in restart:  # the tasks the strategy abandons (server_app/restarts.py)
            restarts.abandon(self, node)

    # ------------------------------------------------------------------------------------------------ the fleet
    def _apply_fleet(self, change: FleetChange) -> None:
        """Admit the newcomers a membership look found, and follow the number of nodes online."""
        s = self.state
        for node, _ in change.joined:
            s.profiles[node] = node_profile(self.cfg, len(s.nodes))
            s.nodes.append(node)
            s.idle.append(node)
        self.ledger.nodes(s, change.joined)
        s.cap = self._cap(len(s.nodes))
        s.fleet_online = change.online or s.fleet_online

    # ----------------------------------------------------------------------------- evaluation and checkpoints
    def _maybe_evaluate(self) -> None:
        s, every = self.state, self.cfg.eval_every
        last_applied = s.last_eval[0] if s.last_eval else 0
        if every and s.totals.applied // every > last_applied // every:
            self._evaluate()

    def _evaluate(self) -> tuple[float, float]:
        s = self.state
        self.ledger.store.commit()  # an evaluation may take seconds: no group holds the store's write lock meanwhile
        loss, acc = self.evaluate(s.policy.weights)
        s.last_eval = (s.totals.applied, loss, acc)
        s.last_local = local_scores(self.cfg, s.policy, acc, self.evaluate)
        summary = {**s.policy.state_summary(), **s.last_local}
        self.ledger.evaluation(s.totals, s.now, s.policy.version, loss, acc, summary)
        log.info("t=%.1f version=%d applied=%d loss=%.4f acc=%.4f", s.now, s.policy.version, s.totals.applied,
                 loss, acc)
        return loss, acc

    def _checkpoint(self, final: bool = False) -> None:
        """Every ``checkpoint-every`` applied updates, and at the end of the run."""
        applied, every = self.state.totals.applied, self.cfg.checkpoint_every
        if every and (final or applied // every > self.checkpointed // every):
            self.ledger.store.save_checkpoint(applied, lambda extent: checkpoint.capture(self.state, extent))
            self.checkpointed = applied
