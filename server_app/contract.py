"""What the engine checks of every ``Verdict`` a strategy returns, so that a mistaken strategy stops the run at once.

A strategy is the user's code; its verdicts drive the store and the stop conditions (``max-updates`` counts the
seqs verdicts list in ``applied``). A verdict that contradicts itself would make a run record nonsense or never
stop: ``Verdict("applied")`` without ``applied=(update.seq,)`` counts nothing, so ``max-updates`` is never reached.
``Contract.check`` refuses such a verdict with a ``StrategyContractError`` naming the strategy, the verdict and
the seq, and the run ends ``failed`` with that reason. The rules (``strategies/base.py``'s ``Verdict``):

- ``applied`` lists each seq once, and only the update being answered or updates the strategy answered
  ``buffered`` earlier and has not applied since; a ``dropped`` update can never be applied later;
- a verdict on an update (``apply``) lists that update's own seq in ``applied`` exactly when its status is
  ``applied``; a verdict on a failure (``fail``) lists earlier buffered seqs only;
- ``restart`` names nodes that have a task in flight.

And one guard: a strategy that lets ``idle_limit`` results in a row go by without applying any (not applied,
not a buffer flushed) stops the run, with the same error, instead of spinning until ``max-time`` (or forever).
The limit, ``max(1000, 50 x buffer-size x nodes)``, leaves room for any buffer or round a strategy may hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strategies.base import Status, Strategy, Verdict


class StrategyContractError(RuntimeError):
    """A strategy returned a verdict its contract forbids, or applies nothing: the run ends ``failed``."""


def strategy_label(strategy: Strategy | type[Strategy]) -> str:
    """``'fedbuff'`` for a registered strategy, ``'module:Class'`` for any other (a class of a test included)."""
    cls = strategy if isinstance(strategy, type) else type(strategy)
    return cls.name or f"{cls.__module__}:{cls.__qualname__}"


def show(verdict: Verdict) -> str:
    """A verdict as a strategy would write it: ``Verdict('applied', applied=(3,))``."""
    extra = f", restart={verdict.restart!r}" if verdict.restart else ""
    return f"Verdict({str(verdict.status)!r}, applied={verdict.applied!r}{extra})"


def idle_limit(buffer_size: int, nodes: int) -> int:
    """Results in a row that may apply nothing before the run is stopped (see the module docstring)."""
    return max(1000, 50 * max(buffer_size, 1) * max(nodes, 1))


@dataclass
class Contract:
    """The bookkeeping the checks need; part of ``EngineState``, so a checkpoint keeps it.

    ``since``: seqs below it may have been buffered before the bookkeeping began (a run resumed from a
    checkpoint written by a version of the code without it): those are taken on trust.
    """

    buffered: set[int] = field(default_factory=set)  # answered ``buffered`` and not applied since
    idle: int = 0                                    # results in a row that applied nothing
    since: int = 0

    def check(self, strategy: Strategy, verdict: Verdict, seq: int | None = None) -> None:
        """Refuse ``strategy``'s ``verdict`` (on update ``seq``; ``None`` on a failure), else record what it did."""
        status, applied = verdict.status, verdict.applied
        problem = ""
        if seq is not None and status == Status.APPLIED and seq not in applied:
            problem = f"an 'applied' verdict must list the update's own seq: applied=(..., {seq})"
        elif seq is not None and status != Status.APPLIED and seq in applied:
            problem = f"a {str(status)!r} verdict must not list the update's own seq {seq} in applied"
        elif len(set(applied)) != len(applied):
            problem = "applied lists a seq twice"
        elif bad := [q for q in applied if q != seq and q not in self.buffered and q >= self.since]:
            problem = (f"applied lists seq {bad[0]}, which is not an update this strategy answered 'buffered' and "
                       "has not applied since")
        elif lost := [n for n in verdict.restart if n not in strategy.in_flight]:
            problem = f"restart names node {lost[0]}, which has no task in flight"
        if problem:
            on = f"update seq={seq}" if seq is not None else "a failed task"
            raise StrategyContractError(f"strategy {strategy_label(strategy)!r} returned {show(verdict)} for {on}: "
                                        f"{problem} (see strategies.base.Verdict)")
        if seq is not None and status == Status.BUFFERED:
            self.buffered.add(seq)
        self.buffered.difference_update(applied)
        self.idle = 0 if applied else self.idle + 1
        limit = idle_limit(strategy.cfg.buffer_size, len(strategy.nodes))
        if self.idle >= limit:
            raise StrategyContractError(
                f"strategy {strategy_label(strategy)!r} applied no update in the last {self.idle} results: does its "
                "Verdict list the applied seqs (Verdict('applied', applied=(update.seq,)))?")
