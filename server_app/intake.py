"""Intake: the one place a client's reply is read, turned into a validated ``Update`` or a ``RejectedUpdate``.

Everything a client sends is attacker-controlled. ``Intake.read`` is the engine's only way into a reply: error
replies, the door checks below, the form checks of ``server_app/wire.py`` (keys, stype, dtype, shape, every byte,
NaN and Inf), the reply's metrics (parsed once: the keys the server reads must each be one finite number, the
others are kept only when they are), then the outlier filter. A bad reply costs its task, never the run: whatever
it holds ends as ``RejectedUpdate`` with the reason the store records. Every check is meant to name what is
wrong; for the input nobody foresaw, ``Intake.read`` is also the one safety net around a whole reply: any other
exception while reading it is logged with its traceback and rejects that reply, so a bug in a check costs one
task, not the run. ``read_describe`` does the same for a node's answer to ``query.describe``.

A reply can be perfectly formed and still hostile or broken: far larger than any honest reply, meant for another
task, or a delta a thousand times larger than anybody else's (a diverged client, a scaling bug, a poisoning
attempt). ``UpdateGuard`` (one per run, checkpointed with the engine's state) catches those, in two calls around
the decoding:

- ``admit(reply, payload_bytes, seq, version)``, before decoding: a reply whose content is larger than
  ``2 x`` the dense model's serialized size plus 64 KiB is rejected as oversized, and a reply that echoes a
  ``task-seq`` or ``model-version`` (our ClientApp does, in its ``metrics``) other than its task's is rejected
  as a wrong model version; a reply that echoes neither (a Flower-style ClientApp) is accepted.
- ``screen(update)``, after decoding: first the absolute cap ``norm-cap`` (when > 0, a delta with a larger L2
  norm is scaled down to it, whatever the filter), then the outlier filter of run-config key ``update-filter``:

  - ``clip`` (default): an update whose delta's L2 norm exceeds ``norm-multiplier`` x the median norm of the last
    ``norm-window`` accepted updates is scaled down to that bound and applied; the row keeps the status the
    strategy gives it and its reason says ``clipped from X to Y``.
  - ``reject``: such an update is rejected (status ``rejected``, the reason gives both numbers).
  - ``none``: every update passes; norms are not even computed.

  **No warm-up hole.** A window of past norms cannot judge a run's first updates, and a node that is hostile
  from its first task would otherwise be applied unchecked (a x1e6 delta then wrecks the model for good). So
  until the window holds ``min(5, norm-window)`` norms, the missing entries are filled with a *reference norm*
  the server measures itself before the run: the norm of the delta plain local SGD makes from the initial model
  with the run's ``lr``, ``momentum``, ``batch-size`` and ``local-steps``, on the server's own evaluation split
  (``server_app.evaluation.Evaluator.reference_norm``). Honest first deltas are within a few times of it; a
  hostile one is not. While the prior is in use an update over the bound is clipped, never rejected, also under
  ``reject``: the prior is an estimate, and a run whose honest norms are larger than it must still fill its
  window (clipped norms count at the bound, so the bound grows ``norm-multiplier``-fold per window of clipped
  updates). Without a reference (a model the server cannot train, a resumed run from before the prior existed)
  the filter starts once the window is full, as before. The window holds the norms of what was accepted (a
  clipped update counts with its clipped norm; a rejected one not at all). The norm is that of the update's delta
  (``base - trained``: for a gossip node, against its own model), whatever the strategy does with it.

Raises ``RejectedUpdate``, so the engine records the reason and gives the node new work.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
from flwr.app import Message, MetricRecord

from server_app.inflation import is_refused
from server_app.wire import RejectedUpdate, numeric_metrics, shown, validate_reply
from strategies import taskkeys as keys
from strategies.base import Update
from strategies.client import Weights
from strategies.codecs import all_finite
from strategies.config import RunConfig
from strategies.flower_arrays import named_record
from strategies.sums import BLOCK

__all__ = ["ECHO_KEYS", "Intake", "RejectedUpdate", "UpdateGuard", "client_compute_s", "delta_norm", "join_reasons",
           "read_describe"]

log = logging.getLogger("staleflower")

ECHO_KEYS = keys.ECHO  # what our ClientApp echoes from its task's config in its metrics
SIZE_FACTOR = 2
SIZE_SLACK = 64 * 1024  # metrics, record and array headers: a few hundred bytes in practice
PER_TENSOR = 256  # .npy header and Array/record framing of one tensor, rounded up
MIN_WINDOW = 5


class UpdateGuard:
    """Size, version and norm checks of one run's replies (see the module docstring)."""

    # Class defaults: a guard unpickled from a checkpoint written before these existed has no prior and no cap.
    reference: float | None = None
    cap: float = 0.0
    _scratch: list[np.ndarray] | None = None  # delta_norm's work space for weights replies (never pickled)
    _measured: dict[int, tuple[np.ndarray, float]] | None = None  # tensor norms taken while validating (idem)

    def __init__(self, cfg: RunConfig, model: Sequence[np.ndarray], reference: float | None = None) -> None:
        self.mode = cfg.update_filter
        self.multiplier = cfg.norm_multiplier
        self.cap = cfg.norm_cap
        self.norms: deque[float] = deque(maxlen=cfg.norm_window)
        self.min_entries = min(MIN_WINDOW, cfg.norm_window)
        self.reference = reference if reference is not None and math.isfinite(reference) and reference > 0 else None
        self.dense_bytes = sum(int(w.nbytes) + PER_TENSOR for w in model)
        self.max_bytes = SIZE_FACTOR * self.dense_bytes + SIZE_SLACK

    @classmethod
    def for_run(cls, cfg: RunConfig, model: list[np.ndarray], evaluator: object) -> UpdateGuard:
        """A run's guard, with the filter's prior measured by ``evaluator.reference_norm`` when it has one.

        The prior is measured only when the filter is on; a model the server cannot train (an evaluator without
        the method, or one that raises) leaves the filter without a prior: it starts once its window is full.
        """
        measure = getattr(evaluator, "reference_norm", None)
        reference = None
        if cfg.update_filter != "none" and callable(measure):
            try:
                reference = float(measure(model, cfg))
            except Exception:
                log.exception("measuring the update filter's reference norm failed; it starts after %d updates",
                              min(MIN_WINDOW, cfg.norm_window))
        return cls(cfg, model, reference)

    # ------------------------------------------------------------------------------------------ before decoding
    def admit(self, reply: Message, payload_bytes: int, seq: int, version: int) -> None:
        """Reject an oversized reply, or one that echoes another task's ``task-seq`` / ``model-version``."""
        if payload_bytes > self.max_bytes:
            raise RejectedUpdate(f"oversized reply: {payload_bytes} bytes of content, more than the limit of "
                                 f"{self.max_bytes} ({SIZE_FACTOR} x the dense model's {self.dense_bytes} + "
                                 f"{SIZE_SLACK})")
        if not reply.has_content():
            raise RejectedUpdate("reply has neither content nor an error")
        metrics = named_record(reply.content, "metrics", MetricRecord)
        if metrics is None:
            return
        for key, expected in zip(ECHO_KEYS, (seq, version), strict=True):
            if key in metrics and not _equals(metrics[key], expected):
                raise RejectedUpdate(f"wrong model version: the reply echoes {key} = {shown(metrics[key])}, "
                                     f"its task was sent with {key} = {expected}")

    # ------------------------------------------------------------------------------------------- after decoding
    def screen(self, update: Update) -> tuple[Update, str]:
        """The outlier filter: ``(update to apply, note for the row's reason)``; raises ``RejectedUpdate``."""
        if self.mode == "none" and self.cap <= 0:
            return update, ""
        norm = self._norm(update)
        notes = []
        if 0 < self.cap < norm:
            update = _scaled(update, self.cap / norm)
            notes.append(f"capped from {norm:.4g} to norm-cap {self.cap:.4g}")
            norm = self.cap
        if self.mode == "none":
            return update, join_reasons(*notes)
        bound = self.bound()
        if bound is not None and norm > bound:
            warm = len(self.norms) < self.min_entries
            window = (f"{self.multiplier:g} x median {self.median():.4g} of the last {len(self.norms)} accepted"
                      + (f" and the reference norm {self.reference:.4g}" if warm else ""))
            if self.mode == "reject" and not warm:
                raise RejectedUpdate(f"update norm {norm:.4g} exceeds the bound {bound:.4g} ({window})")
            update = _scaled(update, bound / norm)
            notes.append(f"clipped from {norm:.4g} to {bound:.4g} ({window})")
            norm = bound
        self.norms.append(norm)
        return update, join_reasons(*notes)

    def finite_check(self, base: Weights) -> Callable[[int, np.ndarray, bool], bool] | None:
        """The NaN/Inf check of a reply's tensors (``wire.validate_reply``) that takes each tensor's delta norm.

        The norm of a tensor's delta is finite exactly when the tensor is (NaN and Inf reach it through the
        subtraction; an overflowing difference is infinite, and only then is ``all_finite`` asked), so the check
        costs nothing beyond the norm ``screen`` takes next, which it keeps. None when the filter takes no norm.
        """
        if self.mode == "none" and self.cap <= 0:
            return None
        scratch = self._work(base)
        measured: dict[int, tuple[np.ndarray, float]] = {}
        self._measured = measured

        def finite(i: int, values: np.ndarray, is_delta: bool) -> bool:
            norm = _tensor_norm(values) if is_delta else _diff_tensor_norm(base[i], values, scratch[i])
            measured[i] = (values, norm)
            return math.isfinite(norm) or all_finite(values)

        return finite

    def _work(self, base: Weights) -> list[np.ndarray]:
        scratch = self._scratch
        if scratch is None or [(s.size, s.dtype) for s in scratch] != [(min(b.size, BLOCK), b.dtype) for b in base]:
            scratch = self._scratch = work_space(base)
        return scratch

    def _norm(self, update: Update) -> float:
        """The norm of the update's delta, without making ``update.delta`` of a reply that sent weights.

        ``update.delta`` is cached on the update, and a strategy that holds its updates (FedAvg's round) would
        then hold a second model-sized copy of each; the difference is taken a block at a time in a small reused
        buffer instead, and is the same to the bit (``diff_norm``). A tensor's norm taken while validating it
        (``finite_check``) is reused. A strategy that needs the delta makes it when it does.
        """
        measured, self._measured = self._measured or {}, None
        if not update.sent_is_delta and "delta" in update.__dict__:
            return delta_norm(update.delta)
        scratch = None if update.sent_is_delta else self._work(update.base)
        total = 0.0
        for i, x in enumerate(update.sent):
            known = measured.get(i)
            if known is not None and known[0] is x:
                norm = known[1]
            elif scratch is None:
                norm = _tensor_norm(x)
            else:
                norm = _diff_tensor_norm(update.base[i], x, scratch[i])
            total = math.hypot(total, norm)
        return total

    def __getstate__(self) -> dict[str, object]:
        """Pickle (a checkpoint) without the work space."""
        state = dict(self.__dict__)
        state.pop("_scratch", None)
        state.pop("_measured", None)
        return state

    def window(self) -> list[float]:
        """The norms the bound is taken from: the accepted ones, the reference filling a window not full yet."""
        missing = self.min_entries - len(self.norms)
        return [*self.norms, *([self.reference] * missing if missing > 0 and self.reference else [])]

    def median(self) -> float:
        """Median norm of the window (0 when empty)."""
        window = self.window()
        return float(statistics.median(window)) if window else 0.0  # np.median's value, without its overhead

    def bound(self) -> float | None:
        """The largest norm accepted as is, or None while the filter is not active yet."""
        if len(self.window()) < self.min_entries:
            return None
        median = self.median()
        return self.multiplier * median if median > 0 else None


def _scaled(update: Update, factor: float) -> Update:
    """The update with its delta scaled by ``factor`` (sent as a delta from now on)."""
    scaled = [np.multiply(d, factor, dtype=d.dtype) for d in update.delta]
    return dataclasses.replace(update, sent=scaled, sent_is_delta=True)


def delta_norm(delta: Sequence[np.ndarray]) -> float:
    """L2 norm of all tensors together, exact even where squares overflow the dtype (inf only for inf input)."""
    total = 0.0
    for d in delta:
        total = math.hypot(total, _tensor_norm(d))
    return total


def diff_norm(base: Sequence[np.ndarray], trained: Sequence[np.ndarray], scratch: Sequence[np.ndarray]) -> float:
    """``delta_norm([b - t ...])`` without making the differences: each is taken a block at a time in ``scratch``.

    ``scratch``: one work array per tensor, of its dtype, with at least ``min(size, BLOCK)`` entries (``work_space``
    makes them). The same subtraction, then the same blocks of the same norm: the same float to the bit.
    """
    total = 0.0
    for b, t, s in zip(base, trained, scratch, strict=True):
        total = math.hypot(total, _diff_tensor_norm(b, t, s))
    return total


def work_space(base: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``diff_norm``'s scratch for tensors like ``base``: a block of each one's dtype (small, reused)."""
    return [np.empty(min(b.size, BLOCK), b.dtype) for b in base]


def _tensor_norm(d: np.ndarray) -> float:
    """The L2 norm of one tensor: float64 sum of float32 dot products over blocks (see ``strategies.sums.BLOCK``)."""
    flat = d.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        squares = 0.0
        for start in range(0, flat.size, BLOCK):
            squares += _squares(flat[start:start + BLOCK])
    return _checked_norm(math.sqrt(squares), d)  # NaN and Inf pass through sqrt


def _diff_tensor_norm(b: np.ndarray, t: np.ndarray, scratch: np.ndarray) -> float:
    """``_tensor_norm(b - t)`` with the difference taken a block at a time in ``scratch``: no model-sized write."""
    flat_b, flat_t, work = b.reshape(-1), np.ascontiguousarray(t).reshape(-1), scratch.reshape(-1)
    if flat_t.size != flat_b.size or work.size < min(flat_b.size, BLOCK):
        raise ValueError(f"diff_norm: shapes {b.shape} and {t.shape}, scratch of {work.size}")
    with np.errstate(over="ignore", invalid="ignore"):
        squares = 0.0
        for start in range(0, flat_b.size, BLOCK):
            part = work[:min(BLOCK, flat_b.size - start)]
            np.subtract(flat_b[start:start + BLOCK], flat_t[start:start + BLOCK], out=part, dtype=b.dtype)
            squares += _squares(part)
    norm = math.sqrt(squares)
    if math.isfinite(norm):
        return norm
    return _checked_norm(norm, np.subtract(b, t, dtype=b.dtype))  # rare: overflow, NaN or Inf; the slow way


def _squares(part: np.ndarray) -> float:
    """Sum of squares of a 1-D block: a BLAS dot for floats; integers in float64 (their dot would wrap around)."""
    if part.dtype.kind == "c":
        return float(np.vdot(part, part).real)
    if part.dtype.kind != "f":
        part = part.astype(np.float64)
    return float(np.dot(part, part))


def _checked_norm(n: float, d: np.ndarray) -> float:
    """``n`` when finite; else the norm again in float64 after rescaling (squares overflow float32 past ~1.8e19)."""
    if math.isfinite(n) or not d.size:
        return n
    with np.errstate(over="ignore", invalid="ignore"):
        peak = float(np.max(np.abs(d)))
        if not math.isfinite(peak):
            return peak if peak == peak else math.nan  # NaN or Inf in the tensor: not finite, as before
        return peak * float(np.linalg.norm(d.reshape(-1).astype(np.float64) / peak)) if peak else 0.0


def join_reasons(*parts: str) -> str:
    """A row's reason from the non-empty parts."""
    return "; ".join(p for p in parts if p)


def _equals(value: object, expected: int) -> bool:
    """Whether an echoed metric is the integer ``expected`` (3 and 3.0 are; NaN, lists, bools are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value == expected


class Delivery(Protocol):
    """What intake reads of a task in flight (``server_app.state.Flight`` is one)."""

    seq: int
    node: int
    version: int
    failure: str
    reply: Message | None
    payload_up: int


class Intake:
    """Turns a flight's reply into an ``Update`` for the strategy, or raises ``RejectedUpdate`` with the reason."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def read(self, f: Delivery, guard: UpdateGuard, base: Weights, staleness: int, now: float) -> Update:
        """The reply of ``f`` as an update computed on ``base``, ``staleness`` versions old, applied at ``now``.

        Raises ``TaskFailed`` or ``RejectedUpdate`` only: an unforeseen exception while reading the reply (a bug
        in a check, an object no check expected) rejects the reply with its type and message, and is logged.
        """
        reply = f.reply
        if f.failure or reply is None:
            raise TaskFailed(f.failure)
        try:
            if is_refused(reply):  # too large to inflate: refused by the grid, the reason says why (inflation.py)
                raise RejectedUpdate(reply.error.reason)
            if reply.has_error():
                raise TaskFailed(f"client error {reply.error.code}: {reply.error.reason}")
            guard.admit(reply, f.payload_up, f.seq, f.version)
            sent, is_delta, n, metrics = validate_reply(reply, self.names, base, guard.finite_check(base))
            return Update(f.seq, f.node, f.version, staleness, sent, base, n, metrics, is_delta, now)
        except (TaskFailed, RejectedUpdate):
            raise
        except Exception as exc:
            log.exception("reading the reply of task %d raised %s; rejecting the reply", f.seq, type(exc).__name__)
            raise RejectedUpdate(f"malformed reply (reading it raised {type(exc).__name__}: {exc})") from exc


class TaskFailed(Exception):
    """A task that produced no reply to read (dropout, lost node, time-out, client error): the reason."""


def client_compute_s(reply: Message | None) -> float:
    """The compute seconds a reply claims (``compute-s``), what the wall clock charges; 0 unless a finite number >= 0.

    Read for replies of every fate, rejected ones included: a hostile value costs nothing but its own row's timing.
    """
    try:
        if reply is None or reply.has_error() or not reply.has_content():
            return 0.0
        value = numeric_metrics(named_record(reply.content, "metrics", MetricRecord)).get(keys.COMPUTE_S, 0.0)
    except Exception:  # the reply's own row says what is wrong with it (Intake.read); its timing only loses this
        log.exception("reading compute-s of a reply raised; charging 0 s of compute")
        return 0.0
    return float(value) if value >= 0 else 0.0


#: What a node may say of itself in its ``query.describe`` reply, and the bounds the server holds it to.
MAX_PARTITIONS = 2**31        # a partition count beyond this is not a dataset split, it is a lie
MAX_DEVICE_CHARS = 100        # "cuda:0", "cpu", "mps": a device name is short
UNKNOWN_PARTITION = -1        # what our ClientApp says when its node config names no partition


def read_describe(reply: Message) -> tuple[dict[str, object], str]:
    """``(what the node said of itself, what was wrong with it)`` from its ``query.describe`` reply.

    The server reads three fields: ``partition-id`` (an int in ``0 .. num-partitions - 1``; it orders the fleet
    and goes to the ``nodes`` table), ``num-partitions`` (an int in ``1 .. 2**31``) and ``torch-device`` (a
    short string). A field of the wrong kind or out of range is left out, and the reason says which, so a bad
    describe reply costs its node its place in the partition order (it is ordered after the described nodes,
    like a ClientApp that cannot describe itself), never the run. Other fields are not read, hence not kept.
    """
    try:
        if not reply.has_content() or "describe" not in reply.content.config_records:
            return {}, ""  # a ClientApp with no query handler (Flower's templates): undescribed, nothing wrong
        said = dict(reply.content.config_records["describe"])
        info: dict[str, object] = {}
        problems: list[str] = []
        parts = _bounded_int(said, "num-partitions", 1, MAX_PARTITIONS, problems)
        if parts is not None:
            info["num-partitions"] = parts
        pid = said.get("partition-id")
        if not (type(pid) is int and pid == UNKNOWN_PARTITION):  # -1 is our ClientApp's "none": nothing wrong
            pid = _bounded_int(said, "partition-id", 0, (parts or MAX_PARTITIONS) - 1, problems)
            if pid is not None:
                info["partition-id"] = pid
        device = said.get("torch-device")
        if isinstance(device, str) and 0 < len(device) <= MAX_DEVICE_CHARS:
            info["torch-device"] = device
        elif "torch-device" in said:
            problems.append(f"torch-device must be a name of up to {MAX_DEVICE_CHARS} characters, "
                            f"got {shown(device)}")
        return info, "; ".join(problems)
    except Exception as exc:  # the net, as in Intake.read: a describe reply costs its node, never the run
        log.exception("reading a describe reply raised %s; the node is taken as undescribed", type(exc).__name__)
        return {}, f"malformed describe reply (reading it raised {type(exc).__name__}: {exc})"


def _bounded_int(said: Mapping[str, object], key: str, lo: int, hi: int, problems: list[str]) -> int | None:
    """``said[key]`` when it is an int in ``lo .. hi`` (not a bool, not a float); else None and a problem."""
    if key not in said:
        return None
    value = said[key]
    if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
        return value
    problems.append(f"{key} must be an integer in {lo} .. {hi}, got {shown(value)}")
    return None
