"""Multi-thread local training on one shared model: Leashed-SGD and its baselines.

Bäckström, Walulya, Papatriantafilou and Tsigas, "Consistent Lock-free Parallel Stochastic Gradient Descent for
Fast and Stable Convergence", IPDPS 2021 (arXiv 2102.09032); ``docs/algorithms.md``

One mechanism and four policies. The mechanism (``run_executor``) starts ``m`` worker threads that take the task's
``local-steps`` batches (``LocalSGD.batches``, the same list the sequential trainer walks) from a shared counter,
so the total number of gradients is the same whatever ``m``. Each worker computes a gradient on a parameter vector
(a list of tensors) with ``torch.func.functional_call`` on its own replica of the model (replicas share the
``nn.Parameter`` objects, so they cost no parameter memory; they own their buffers), and hands it to the policy:

``sequential``  one thread, in-place updates. The ClientApp runs ``LocalSGD.run`` itself for this name (the
                reference path, untouched); the policy exists so the benchmark times every executor through the
                same mechanism, and it is tested to be bit-identical to ``LocalSGD.run``.
``hogwild``     HOGWILD!: no locks; gradients are computed on the shared tensors while other threads update them
                in place (``add_``), so a read can mix versions.
``locked``      consistent lock-based AsyncSGD: copy the shared vector under a mutex, compute, update it in place
                under the same mutex.
``leashed``     Leashed-SGD: published vectors are immutable; compute on the latest, copy it, apply the gradient
                to the copy and publish it with a compare-and-swap on the "latest" pointer; a failed swap retries
                on the newer vector, at most ``persistence`` times, then the gradient is dropped; a vector is
                reclaimed once it is stale and has no readers.

Honest primitives. CPython has no compare-and-swap instruction. ``AtomicRef``, ``AtomicInt`` and ``AtomicFlag``
give CAS, fetch-and-add and test-and-set semantics with a ``threading.Lock`` held only around the read-modify-write
of one word (never around a copy, a gradient or an update), which is the smallest critical section with those
semantics in Python. Every property the algorithm needs follows from that linearisability: consistent reads
(published vectors are never written), a bounded number of attempts per gradient (``1 + persistence``), and
bounded memory (at most ``2m + 1`` live vectors: the published one, one read per thread, one private copy per
thread). No ABA problem: the CAS compares object identity, and a thread holds a reference to the object it
compares, so its identity cannot be reused.

The native executor. ``client_app/native`` runs ``leashed``, ``hogwild`` and ``locked`` on C++ threads over
libtorch with a real ``std::atomic`` compare-and-swap and a pool of 2m + 1 vectors, outside the GIL;
``train_local`` uses it when the run-config key ``native-executor`` (``auto``, the default) and the model allow,
and this module's policies otherwise: they stay the reference and the fallback.

Momentum is thread-local for every multi-thread policy (as in the reference code's thread-local optimizers): each
thread keeps its own buffer ``buf = momentum * buf + g`` over the gradients it computed, with
``torch.optim.SGD``'s arithmetic, and applies ``-lr * buf``. Leashed-SGD updates the buffer once per gradient,
before its first publish attempt; a dropped gradient stays in that thread's buffer.

Threads and cores. Torch releases the GIL inside its kernels, so ``m`` Python threads overlap on several cores;
the Python between kernels (autograd bookkeeping, ``functional_call``) is serialised by the GIL, which narrows the
contention regime for small models. With ``m`` threads torch's intra-op pool is lowered to ``cores // m`` threads
for the duration of the run (never raised; restored afterwards) so ``m`` workers do not oversubscribe the cores;
the setting is process-wide, which only affects the speed of other clients running in the same process.

CUDA. On a GPU each worker thread issues its kernels on its own CUDA stream. A worker synchronises its stream
before it publishes a vector (so a published vector is complete), before it gives up a read (so a vector is never
reclaimed under a kernel still reading it), and, for ``locked``, before it releases the mutex. The GPU path is
written for, but has not been run on, a GPU in this project (none was lent to issue 6).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch.func import functional_call

from client_app.batched import train_batched
from client_app.trainer import LocalSGD, Momentum
from strategies import taskkeys as keys

if TYPE_CHECKING:
    from strategies.config import RunConfig

__all__ = [
    "EXECUTORS",
    "STALENESS_BUCKETS",
    "AtomicFlag",
    "AtomicInt",
    "AtomicRef",
    "ExecReport",
    "ExecutorSpec",
    "Hogwild",
    "Leashed",
    "Locked",
    "ParameterVector",
    "Policy",
    "Sequential",
    "checksum",
    "make_policy",
    "run_executor",
    "train_local",
]

_log = logging.getLogger(__name__)

EXECUTORS = ("sequential", "leashed", "hogwild", "locked")
#: Not a multi-thread policy: many nodes' local steps as one vmapped computation (``client_app/batched.py``).
BATCHED = "batched"
#: Staleness histogram in the reply metrics: ``exec-staleness-hist-0`` .. ``-7`` count updates of staleness 0..7,
#: ``exec-staleness-hist-8+`` those of 8 or more.
STALENESS_BUCKETS = 8

Tensors = list[torch.Tensor]


# ------------------------------------------------------------------------------------------------ primitives
class AtomicInt:
    """An integer with linearisable ``load``, ``fetch_add`` and ``update_max`` (a lock around each one)."""

    __slots__ = ("_lock", "_value")

    def __init__(self, value: int = 0) -> None:
        self._lock = threading.Lock()
        self._value = value

    def load(self) -> int:
        """Current value (a single read of one reference is atomic in CPython; no lock needed)."""
        return self._value

    def fetch_add(self, delta: int) -> int:
        """Add ``delta``; return the new value."""
        with self._lock:
            self._value += delta
            return self._value

    def update_max(self, value: int) -> None:
        """Set to ``max(current, value)``."""
        with self._lock:
            if value > self._value:
                self._value = value


class AtomicFlag:
    """A boolean with ``load``, ``set`` and ``compare_and_set``."""

    __slots__ = ("_lock", "_value")

    def __init__(self, value: bool = False) -> None:
        self._lock = threading.Lock()
        self._value = value

    def load(self) -> bool:
        """Current value."""
        return self._value

    def set(self) -> None:
        """Set to True."""
        self._value = True

    def compare_and_set(self, expected: bool, new: bool) -> bool:
        """Set to ``new`` if the value is ``expected``; True when this call made the change."""
        with self._lock:
            if self._value is not expected:
                return False
            self._value = new
            return True


class AtomicRef:
    """The "latest" pointer: ``load`` and ``compare_and_set`` by identity.

    The lock is held only around the compare and the store of one reference: the software stand-in for a CAS
    instruction. Nothing else (reading, copying, applying a gradient) ever runs under it.
    """

    __slots__ = ("_lock", "_ref")

    def __init__(self, ref: object) -> None:
        self._lock = threading.Lock()
        self._ref = ref

    def load(self) -> object:
        """The current reference."""
        return self._ref

    def compare_and_set(self, expected: object, new: object) -> bool:
        """Point at ``new`` if the pointer is still ``expected`` (identity); True on success."""
        with self._lock:
            if self._ref is not expected:
                return False
            self._ref = new
            return True


@dataclass(eq=False)
class ParameterVector:
    """One published (hence immutable) version of the parameters, with the reclamation bookkeeping of §4.2.

    ``tensors`` is emptied when the vector is reclaimed. ``check`` is a checksum taken at publication when the
    policy runs with ``verify=True`` (tests), so a reader can prove it saw one version and only one.
    """

    tensors: Tensors
    timestamp: int
    readers: AtomicInt = field(default_factory=AtomicInt)
    stale: AtomicFlag = field(default_factory=AtomicFlag)
    deleted: AtomicFlag = field(default_factory=AtomicFlag)
    check: float | None = None


def checksum(tensors: Sequence[torch.Tensor]) -> float:
    """A position-weighted float64 sum of every entry: any change of any entry, or a swap, changes it."""
    total = 0.0
    for i, t in enumerate(tensors):
        flat = t.detach().reshape(-1).double()
        weights = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device) % 97 + 1 + i
        total += float((flat * weights).sum())
    return total


# ------------------------------------------------------------------------------------------------ the workers
@dataclass
class ThreadStats:
    """What one worker saw; merged into an ``ExecReport`` after the threads join."""

    gradients: int = 0
    published: int = 0
    failed_cas: int = 0
    dropped: int = 0
    inconsistent: int = 0
    staleness: list[int] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


class Worker:
    """One thread's replica, momentum buffers, CUDA stream and statistics."""

    def __init__(self, replica: torch.nn.Module, names: list[str], sgd: LocalSGD, anchor: Tensors,
                 device: torch.device, t0: float) -> None:
        self.replica = replica
        self.names = names
        self.sgd = sgd
        self.anchor = anchor
        self.momentum = Momentum(sgd.momentum)
        self.stats = ThreadStats()
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.t0 = t0

    def grad(self, tensors: Sequence[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> Tensors:
        """Loss and gradient of ``tensors`` on one batch, the arithmetic of ``LocalSGD.run``; records the loss.

        The leaves are ``.data`` aliases: the same storage (no copy), but a version counter of their own, so
        HOGWILD!'s in-place updates by other threads do not trip autograd's in-place check.
        """
        leaves = [t.data.requires_grad_() for t in tensors]
        loss = torch.nn.functional.cross_entropy(
            functional_call(self.replica, dict(zip(self.names, leaves, strict=True)), (xb,)), yb)
        if self.anchor:  # FedAsync / FedProx proximal term: mu/2 ||w - w_received||^2
            drift = sum(((p - a) ** 2).sum() for p, a in zip(leaves, self.anchor, strict=True))
            loss = loss + self.sgd.prox_mu / 2 * drift
        grads = list(torch.autograd.grad(loss, leaves))
        self.stats.gradients += 1
        self.stats.losses.append(loss.detach())
        self.stats.times.append(time.perf_counter() - self.t0)
        return grads

    def direction(self, grads: Tensors) -> Tensors:
        """The momentum direction of this thread (``trainer.Momentum``: ``torch.optim.SGD``'s arithmetic)."""
        return self.momentum.direction(grads)

    def sync(self) -> None:
        """Wait for this thread's queued kernels (GPU only)."""
        if self.stream is not None:
            self.stream.synchronize()


# ------------------------------------------------------------------------------------------------ the policies
class Policy(ABC):
    """What a worker does with one batch; the mechanism (``run_executor``) is the same for every policy."""

    name = ""
    max_threads: int | None = None

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.live = AtomicInt(0)
        self.peak_live = AtomicInt(0)

    @abstractmethod
    def start(self, tensors: Tensors) -> None:
        """Install the starting parameters (the policy owns copies from now on)."""

    @abstractmethod
    def step(self, w: Worker, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """One gradient: read, compute, update (or drop); statistics go to ``w.stats``."""

    @abstractmethod
    def result(self) -> Tensors:
        """The parameters after every worker has finished."""

    def _allocated(self, n: int = 1) -> None:
        self.peak_live.update_max(self.live.fetch_add(n))

    def _freed(self, n: int = 1) -> None:
        self.live.fetch_add(-n)


class Hogwild(Policy):
    """HOGWILD!: one shared vector, gradients computed on it as it changes, updates in place, no locks.

    The update counter is ``itertools.count`` (one C call, atomic under the GIL) and serves only to estimate
    staleness (updates applied between a thread's read and its update); it synchronises nothing.
    """

    name = "hogwild"

    def start(self, tensors: Tensors) -> None:
        """Clone the start into the one shared vector."""
        self.shared = [t.detach().clone() for t in tensors]
        self._count = itertools.count()
        self.version = 0
        self._allocated()

    def step(self, w: Worker, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Compute on the shared tensors, update them in place."""
        t0 = self.version
        d = w.direction(w.grad(self.shared, xb, yb))
        with torch.no_grad():
            for p, g in zip(self.shared, d, strict=True):
                p.add_(g, alpha=-self.lr)
        done = next(self._count)
        self.version = done + 1  # racy on purpose: an estimate for the staleness statistics only
        w.stats.published += 1
        w.stats.staleness.append(max(done - t0, 0))

    def result(self) -> Tensors:
        """The shared vector."""
        return self.shared


class Sequential(Hogwild):
    """Plain SGD: HOGWILD! with one thread, which is exactly ``LocalSGD.run`` (tested bit for bit)."""

    name = "sequential"
    max_threads = 1


class Locked(Policy):
    """Lock-based consistent AsyncSGD: snapshot under the mutex, compute, update in place under the mutex."""

    name = "locked"

    def start(self, tensors: Tensors) -> None:
        """Clone the start into the shared vector guarded by the mutex."""
        self.shared = [t.detach().clone() for t in tensors]
        self.lock = threading.Lock()
        self.version = 0
        self._allocated()

    def step(self, w: Worker, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Consistent copy, gradient on the copy, consistent update."""
        with self.lock:
            snapshot = [p.clone() for p in self.shared]
            t0 = self.version
            w.sync()
        self._allocated()
        d = w.direction(w.grad(snapshot, xb, yb))
        w.sync()
        del snapshot
        self._freed()
        with self.lock, torch.no_grad():
            for p, g in zip(self.shared, d, strict=True):
                p.add_(g, alpha=-self.lr)
            w.stats.staleness.append(self.version - t0)
            self.version += 1
            w.sync()
        w.stats.published += 1

    def result(self) -> Tensors:
        """The shared vector."""
        return self.shared


class Leashed(Policy):
    """Leashed-SGD (``docs/algorithms.md``): immutable published vectors, CAS on "latest".

    Parameters
    ----------
    lr
        Step size.
    persistence
        B: at most ``1 + B`` publish attempts per gradient (B retries after the first failed CAS); when all of
        them fail the gradient is dropped.
    verify
        Tests: checksum every published vector and check it again when each read ends, after the gradient or the
        copy made from it (a mismatch is counted in ``inconsistent``), and poison (NaN-fill) reclaimed vectors so
        a read of freed memory shows.
    """

    name = "leashed"

    def __init__(self, lr: float, persistence: int = 200, *, verify: bool = False) -> None:
        super().__init__(lr)
        if persistence < 0:
            raise ValueError(f"persistence must be >= 0, got {persistence}")
        self.persistence = persistence
        self.verify = verify

    def start(self, tensors: Tensors) -> None:
        """Publish the start as version 0."""
        self.latest = AtomicRef(self._new([t.detach().clone() for t in tensors], 0))

    # ---- the protocol of §4.2
    def acquire(self) -> ParameterVector:
        """Safe read of the latest vector: count in as a reader; if it went stale meanwhile, back off and reload."""
        while True:
            v = cast(ParameterVector, self.latest.load())
            v.readers.fetch_add(1)
            if not v.stale.load():
                return v
            v.readers.fetch_add(-1)
            self._try_reclaim(v)

    def release(self, w: Worker, v: ParameterVector) -> None:
        """End a read (after this thread's kernels on it have finished); reclaim the vector if it is stale."""
        w.sync()
        if self.verify and checksum(v.tensors) != v.check:
            w.stats.inconsistent += 1
        v.readers.fetch_add(-1)
        self._try_reclaim(v)

    def step(self, w: Worker, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Gradient on the latest vector, then the publish loop (the leash)."""
        v0 = self.acquire()
        try:
            grads = w.grad(v0.tensors, xb, yb)
        finally:
            self.release(w, v0)
        d = w.direction(grads)
        for attempt in range(1, self.persistence + 2):
            v1 = self.acquire()
            self._allocated()  # the private copy counts as live from before it is made
            try:
                # copy and apply in one pass: torch.add(t, g, alpha) computes t + alpha * g into a new tensor,
                # the same arithmetic as t.clone().add_(g, alpha=alpha) with half the memory traffic
                with torch.no_grad():
                    tensors = [torch.add(t, g, alpha=-self.lr) for t, g in zip(v1.tensors, d, strict=True)]
            finally:
                self.release(w, v1)  # with verify=True, checks that v1 did not change while it was copied
            w.sync()
            new = ParameterVector(tensors, v1.timestamp + 1, check=self._check(tensors))
            self._before_cas(w, attempt)
            if self.latest.compare_and_set(v1, new):
                v1.stale.set()
                self._try_reclaim(v1)
                w.stats.published += 1
                w.stats.staleness.append(v1.timestamp - v0.timestamp)
                w.stats.attempts.append(attempt)
                return
            new.tensors = []  # never published: private, freed at once
            self._freed()
            w.stats.failed_cas += 1
        w.stats.dropped += 1
        w.stats.attempts.append(self.persistence + 1)

    def result(self) -> Tensors:
        """The latest published vector."""
        return cast(ParameterVector, self.latest.load()).tensors

    def _before_cas(self, w: Worker, attempt: int) -> None:
        """Test seam: runs between building a new vector and its CAS (``attempt`` counts from 1)."""

    def _new(self, tensors: Tensors, timestamp: int) -> ParameterVector:
        """A new vector holding ``tensors``, counted as live."""
        self._allocated()
        return ParameterVector(tensors, timestamp, check=self._check(tensors))

    def _check(self, tensors: Tensors) -> float | None:
        return checksum(tensors) if self.verify else None

    def _try_reclaim(self, v: ParameterVector) -> None:
        """Free ``v`` if it is stale and unread; the CAS on ``deleted`` lets exactly one thread do it."""
        if v.stale.load() and v.readers.load() == 0 and v.deleted.compare_and_set(False, True):
            if self.verify:
                with torch.no_grad():
                    for t in v.tensors:
                        t.fill_(float("nan"))
            v.tensors = []
            self._freed()


def make_policy(name: str, lr: float, persistence: int = 200, *, verify: bool = False) -> Policy:
    """The policy of an executor name (one of ``EXECUTORS``)."""
    if name == "leashed":
        return Leashed(lr, persistence, verify=verify)
    if name in ("hogwild", "locked", "sequential"):
        return {"hogwild": Hogwild, "locked": Locked, "sequential": Sequential}[name](lr)
    raise ValueError(f"unknown local executor {name!r}; valid choices: {', '.join(EXECUTORS)}")


# ------------------------------------------------------------------------------------------------ the mechanism
NATIVE_SETTINGS = ("auto", "on", "off")


@dataclass(frozen=True)
class ExecutorSpec:
    """Run-config keys ``local-executor``, ``local-threads``, ``persistence`` and ``native-executor``.

    ``native``: ``auto`` runs ``leashed``, ``hogwild`` and ``locked`` on the native C++ executor
    (``client_app.native``) when it can be built and supports the model and device, else on the Python executor
    (a warning says why, and the metric ``exec-native`` is 0); ``on`` makes that an error; ``off`` always uses
    Python.
    """

    name: str = "sequential"
    threads: int = 1
    persistence: int = 200
    native: str = "auto"

    def __post_init__(self) -> None:
        """Reject unknown names and impossible counts."""
        if self.name not in (*EXECUTORS, BATCHED):
            raise ValueError(f"unknown local executor {self.name!r}; valid choices: {', '.join(EXECUTORS)}, {BATCHED}")
        if self.native not in NATIVE_SETTINGS:
            raise ValueError(f"native-executor must be one of {', '.join(NATIVE_SETTINGS)}, got {self.native!r}")
        if self.threads < 1 or self.persistence < 0:
            raise ValueError(f"need local-threads >= 1 and persistence >= 0, got {self.threads}, {self.persistence}")

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ExecutorSpec:
        """From the run config."""
        return cls(cfg.local_executor, cfg.local_threads, cfg.persistence, cfg.native_executor)


@dataclass
class ExecReport:
    """One multi-thread run: merged statistics and the trace of (seconds since start, batch loss) per gradient."""

    executor: str
    threads: int
    seconds: float
    gradients: int
    published: int
    failed_cas: int
    dropped: int
    inconsistent: int
    peak_live: int
    staleness: list[int]
    attempts: list[int]
    trace: list[tuple[float, float]]

    @property
    def mean_loss(self) -> float:
        """Mean batch loss over every computed gradient (dropped ones included)."""
        return sum(loss for _, loss in self.trace) / max(len(self.trace), 1)

    def metrics(self) -> dict[str, float]:
        """The ``exec-*`` keys of the reply's MetricRecord (scalars only: the server keeps ints and floats)."""
        hist = np.bincount(np.minimum(self.staleness, STALENESS_BUCKETS), minlength=STALENESS_BUCKETS + 1)
        out = {
            "exec-threads": float(self.threads),
            "exec-updates": float(self.published),
            "exec-updates-per-s": self.published / self.seconds if self.seconds > 0 else 0.0,
            "exec-staleness-mean": float(np.mean(self.staleness)) if self.staleness else 0.0,
            "exec-staleness-max": float(max(self.staleness, default=0)),
            "exec-failed-cas": float(self.failed_cas),
            "exec-dropped": float(self.dropped),
            "exec-max-attempts": float(max(self.attempts, default=1)),
            "exec-peak-live": float(self.peak_live),
        }
        for i in range(STALENESS_BUCKETS):
            out[f"exec-staleness-hist-{i}"] = float(hist[i])
        out[f"exec-staleness-hist-{STALENESS_BUCKETS}+"] = float(hist[STALENESS_BUCKETS])
        return out


@contextlib.contextmanager
def _intra_op_threads(threads: int) -> Iterator[None]:
    """Lower torch's intra-op pool to ``cores // threads`` while ``threads`` workers run (never raise it)."""
    before = torch.get_num_threads()
    want = max(1, (os.cpu_count() or 1) // threads)
    if want >= before:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _replicas(model: torch.nn.Module, threads: int) -> list[torch.nn.Module]:
    """``model`` itself for thread 0, deep copies sharing its ``nn.Parameter`` objects for the others."""
    shared = {id(p): p for p in model.parameters()}
    return [model] + [copy.deepcopy(model, memo=dict(shared)) for _ in range(threads - 1)]


def run_executor(policy: Policy, sgd: LocalSGD, model: torch.nn.Module, x: np.ndarray, y: np.ndarray,
                 device: torch.device, threads: int = 1) -> ExecReport:
    """Train ``model`` in place with ``threads`` workers over ``sgd.batches``; return the run's report.

    The model ends with the policy's final parameters; its buffers (BatchNorm statistics, if any) are those of
    thread 0's replica, since replicas share parameters but not buffers.
    """
    if policy.max_threads is not None and threads > policy.max_threads:
        raise ValueError(f"the {policy.name} executor runs on {policy.max_threads} thread(s), got {threads}")
    model.to(device).train()
    xt, yt = torch.tensor(x, device=device), torch.tensor(y, device=device)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    anchor = [p.clone() for p in params] if sgd.prox_mu else []
    policy.start(params)
    batches = sgd.batches(len(y))
    counter = itertools.count()  # next() is one C call: atomic under the GIL, so each batch goes to one thread
    stop = threading.Event()
    errors: list[BaseException] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    workers = [Worker(r, names, sgd, anchor, device, start) for r in _replicas(model, threads)]

    def loop(w: Worker) -> None:
        try:
            with torch.cuda.stream(w.stream) if w.stream is not None else contextlib.nullcontext():
                while not stop.is_set():
                    k = next(counter)
                    if k >= len(batches):
                        break
                    i = torch.from_numpy(batches[k]).to(device)
                    policy.step(w, xt[i], yt[i])
                w.sync()
        except BaseException as exc:  # re-raised in the caller's thread below
            errors.append(exc)
            stop.set()

    with _intra_op_threads(threads):
        if threads == 1:
            loop(workers[0])
        else:
            pool = [threading.Thread(target=loop, args=(w,), name=f"{policy.name}-{j}", daemon=True)
                    for j, w in enumerate(workers)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    with torch.no_grad():
        for p, t in zip(model.parameters(), policy.result(), strict=True):
            p.copy_(t)
    stats = [w.stats for w in workers]
    trace = sorted((t, float(loss)) for s in stats for t, loss in zip(s.times, s.losses, strict=True))
    return ExecReport(
        executor=policy.name, threads=threads, seconds=seconds,
        gradients=sum(s.gradients for s in stats), published=sum(s.published for s in stats),
        failed_cas=sum(s.failed_cas for s in stats), dropped=sum(s.dropped for s in stats),
        inconsistent=sum(s.inconsistent for s in stats), peak_live=policy.peak_live.load(),
        staleness=[v for s in stats for v in s.staleness], attempts=[v for s in stats for v in s.attempts],
        trace=trace,
    )


def train_local(sgd: LocalSGD, model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device,
                spec: ExecutorSpec) -> dict[str, float]:
    """The ClientApp's local training: ``LocalSGD.run``, the batcher (``batched``) or ``spec``'s executor.

    ``sequential`` adds no key to the metrics, so the default's replies (and their sizes, which the virtual
    clock charges) are unchanged; ``batched`` adds ``exec-batched`` (``client_app.batched.train_batched``); the
    other executors add the ``exec-*`` keys of ``ExecReport.metrics`` and ``exec-native`` (1 when the native C++
    executor ran, 0 when the Python one did).
    """
    if spec.name == "sequential":
        return sgd.run(model, x, y, device)
    if spec.name == BATCHED:  # local-threads and native-executor do not apply: the batch is the parallelism
        return train_batched(sgd, model, x, y, device)
    start = time.perf_counter()
    report = _native_or_none(spec, sgd, model, x, y, device)
    native = report is not None
    if report is None:
        report = run_executor(make_policy(spec.name, sgd.lr, spec.persistence), sgd, model, x, y, device,
                              spec.threads)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    losses = [loss for _, loss in report.trace]
    return {keys.TRAIN_LOSS: sum(losses) / max(len(losses), 1), keys.COMPUTE_S: time.perf_counter() - start,
            "examples-seen": float(report.gradients * min(sgd.batch_size, len(y))), **report.metrics(),
            "exec-native": float(native)}


_fallbacks_logged: set[str] = set()


def _native_or_none(spec: ExecutorSpec, sgd: LocalSGD, model: torch.nn.Module, x: np.ndarray, y: np.ndarray,
                    device: torch.device) -> ExecReport | None:
    """Run ``spec`` on the native executor if ``native-executor`` allows it and it can; None means: use Python.

    The reason for a fallback is logged once per process (a warning); with ``native-executor = "on"`` it is an
    error instead.
    """
    if spec.native == "off":
        return None
    try:
        from client_app import native  # imported here: the sequential default never needs it
    except ImportError as exc:  # a copy of client_app without its native/ folder
        native = None
        reason: str | None = f"client_app.native cannot be imported ({exc})"
    else:
        reason = native.unsupported(spec.name, model, device)
        if reason is None:
            try:
                native.load()
            except native.NativeUnavailable as exc:
                reason = str(exc)
    if reason is not None:
        if spec.native == "on":
            raise RuntimeError(f"native-executor = 'on' but {reason}")
        if reason not in _fallbacks_logged:
            _fallbacks_logged.add(reason)
            _log.warning("native executor not used (%s): running the Python %s executor", reason, spec.name)
        return None
    assert native is not None
    return native.run_native(spec.name, sgd, model.to(device), x, y, spec.threads, spec.persistence)
