"""Restarts: what a task costs when its strategy abandons it in flight (run-config key ``restart``).

k-sync and AdaSync cancel the tasks still in flight after an update, ABS restarts the nodes staler than its
bound (``Verdict.restart``). Flower cannot interrupt a running ClientApp: a SuperNode handles one message at a
time and runs it to its end. Flower 1.41's ``Grid`` pushes and pulls messages (``push_messages``,
``pull_messages``, ``send_and_receive``) and lists nodes, and has no call that cancels or deletes a message once
pushed; a message's TTL only bounds how long the SuperLink still delivers it and accepts its reply (once a
ClientApp has started, it runs on regardless); ``flwr stop`` ends a whole run, not one task; and a ClientApp has
no call that tells it its task was superseded. So:

- ``restart = "finish"`` (the default, what a deployment does): the abandoned task runs to its end, its node takes
  no new work until then, and its reply is dropped on arrival. The task's ``restarted`` row is written then:
  ``completed_at`` is the arrival, ``compute_s`` the whole task's computation (all of it wasted), ``bytes_up`` the
  reply's real size, and ``staleness`` the versions published until the restart. The strategy no longer sees the
  task in ``in_flight``. The wall clock always does this, whatever the key says.
- ``restart = "interrupt"`` (a what-if of the virtual clock): the node is free at once, as if the ClientApp could
  be stopped. The row is written at the restart with the computation done so far and no upload. The real
  ClientApp still runs to its end: the mailbox drops its reply and holds the node's next message until then, while
  the virtual clock starts that task at its dispatch.
"""

from __future__ import annotations

import logging
from typing import Protocol

from server_app.clocks import Clock
from server_app.intake import client_compute_s
from server_app.ledger import Ledger
from server_app.mailbox import Mailbox
from server_app.state import EngineState, Flight
from strategies.base import Status
from strategies.config import RunConfig

log = logging.getLogger("staleflower")


class Engine(Protocol):
    """What of the engine (``server_app.engine.Engine``) a restart touches."""

    state: EngineState
    clock: Clock
    mailbox: Mailbox
    ledger: Ledger
    finish_restarts: bool

    def release(self, v: int) -> None:
        """Drop a task's hold on its model version."""
        ...


def finishes(cfg: RunConfig, clock: Clock) -> bool:
    """Whether an abandoned task keeps its node until it ends: ``restart = "finish"``, or any wall-clock run."""
    if cfg.restart == "interrupt" and not clock.virtual:
        log.warning("restart = 'interrupt' is a what-if of the virtual clock: on the wall clock a ClientApp "
                    "cannot be interrupted, so abandoned tasks run to their end (restart = 'finish')")
    return cfg.restart == "finish" or not clock.virtual


def abandon(engine: Engine, node: int) -> None:
    """The strategy abandons ``node``'s task in flight: keep the node until the task ends, or free it at once."""
    s = engine.state
    f = next((fl for fl in s.flights.values() if fl.node == node and fl.abandoned is None), None)
    if f is None:
        return
    staleness = s.policy.version - f.version
    if engine.finish_restarts:
        f.abandoned = (s.now, staleness)  # settled when it ends (``settle``)
        return
    del s.flights[f.seq]
    engine.mailbox.abandon(f)
    durations = engine.clock.wasted(f, s.now)
    f.bytes_up = 0  # abandoned before its upload, on the run's clock
    engine.ledger.record(s.totals, f, Status.RESTARTED, "abandoned by the strategy", now=s.now,
                         staleness=staleness, applied_version=None, durations=durations)
    engine.release(f.version)
    s.idle.appendleft(node)


def settle(engine: Engine, f: Flight) -> None:
    """An abandoned task ended (``restart = "finish"``): drop its reply, record it ``restarted``, free its node."""
    assert f.abandoned is not None
    s, clock = engine.state, engine.clock
    at, staleness = f.abandoned
    del s.flights[f.seq]
    engine.mailbox.forget(f)
    s.idle.append(f.node)
    done = f.reply is not None and not f.failure and not f.reply.has_error()
    if done:
        durations = clock.durations(f, s.now, 0.0 if clock.virtual else client_compute_s(f.reply))
        reason = f"abandoned by the strategy at t={at:.6g}; its reply was dropped on arrival"
    else:
        durations = clock.wasted(f, s.now)
        reason = f"abandoned by the strategy at t={at:.6g}; then failed: {f.failure or 'error reply'}"
    if s.downlink is not None:  # what the node now holds, as for any task that ended
        (s.downlink.confirm if done else s.downlink.discard)(f.node)
    engine.ledger.record(s.totals, f, Status.RESTARTED, reason, now=s.now, staleness=staleness,
                         applied_version=None, durations=durations)
    engine.release(f.version)
