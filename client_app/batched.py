"""Many simulated nodes' local training as one batched computation (batched matmuls, or ``vmap`` + ``functional_call``).

Why: the in-process runner trains each node's ``local-steps`` on its own client thread, and for the small models
of a simulation a step costs more Python and dispatch than arithmetic. Stacking the parameters of K nodes along a
new leading dimension and running one batched forward and one backward per step pays that overhead once for K
nodes. On one CPU core that is worth 14-16x for logreg and 1.6-1.8x for the MLP, local training alone, 1,000
nodes (``bench/batched_executor.py``): the MLP's steps are mostly arithmetic, which per-node training already
runs at 40 % of the speed of batched kernels of its shapes (BENCHMARKS.md). A GPU, where small kernels cost little
next to their launch, is where the MLP should gain; not measured here (no GPU was lent). End to end, in the
in-process runner with 100 nodes and client threads on 2 cores (MLP), batched runs were 1.5-1.7x per-node ones at
10 local steps and 3.1-3.3x at 50, for FedAvg and FedBuff: the per-task Python of the ClientApp and the engine,
serialised by the interpreter lock, is what is left (``CoalescingBatcher``).

``train_many`` is the pure function; ``CoalescingBatcher`` (below; one per process, ``BATCHER``) feeds it the
concurrent calls of the runner's client threads when the run config says ``local-executor = "batched"``
(``executors.train_local`` -> ``train_batched``); ``local-threads`` and ``native-executor`` do not apply to it.

Same arithmetic as ``LocalSGD.run`` node by node: the same index batches (``LocalSGD.batches``, same seeds), the
mean cross-entropy of the batch plus the proximal term ``mu/2 ||w - w_received||^2``, ``torch.optim.SGD``'s
momentum (``trainer.Momentum``) and the update ``p - lr * d``. The results are not bit-identical to ``LocalSGD.run``
(a batched matmul rounds differently from a single one): ``tests/test_batched.py`` holds the weights to rtol 1e-4,
atol 1e-5 after 4 steps (worst seen 3e-8 absolute; 1e-5 relative after 10 steps of a diverging MLP at lr 0.1,
momentum 0.9) and the mean loss to rtol 1e-5.

Unequal partitions. A node's batch size is ``min(batch_size, n)``; nodes are *grouped* by (steps, that batch
size, lr, momentum, prox_mu), never padded with masked samples: padding would change the loss's arithmetic (a
masked mean is not ``cross_entropy``'s mean) and make a node's result depend on how much padding its batch got.
In a simulation nearly every partition holds at least ``batch_size`` samples, so there is one group.

Determinism. The engine promises the same trace for the same seed whatever the arrival order, so a node's result
must not depend on which nodes share its batch. Nothing reduces across the node dimension (one backward pass of
the sum of the nodes' losses gives each node the gradient of its own loss, exactly), so what is left is whether
a kernel computes node k's slice the same way whatever the batch count and k's place in it:

- CPU: it does, measured: ``tests/test_batched.py`` checks a node's end weights are bitwise equal trained
  alone, in batches of 3 and 12 and at another place, for logreg and the MLP with momentum and prox_mu (MKL's
  batched matmul, torch 2.13, AVX-512, one intra-op thread; by hand also with two threads and batches up to 256).
  Chunks are not padded. An earlier version that vmapped ``torch.func.grad_and_value`` was *not* independent:
  its results changed with the batch count, in the last bits.
- GPU: cuBLAS chooses batched-matmul kernels by batch count, so chunks are padded to exactly ``lanes`` nodes
  (copies of the chunk's first node, whose results are dropped): each node's numbers then come from kernels of
  the same shapes whatever the batch. Written for, not yet run on, a GPU in this project.

So a batched run is reproducible bit for bit on one machine (same seed, any arrival order, any ``--workers``),
and differs from a ``sequential`` run of the same seed within the tolerance above.

Compute seconds. A chunk's wall time is divided evenly among its real (unpadded) nodes, so the sum over a
batch's nodes is the thread-seconds the batch took: what the fleet cost the machine, not how long a node waited
for its result (its chunk's whole wall time). Per node (``LocalSGD.run``) compute-s is the task's wall time in
training, which with many client threads on few cores is mostly waiting for a core.

What is not batched (the node trains alone with ``LocalSGD.run``, the reply says ``exec-batched = 0`` and a
warning says why once per process): a model with buffers (BatchNorm's running statistics are updated in place,
which ``vmap`` cannot do per node), or whose ``state_dict`` is not just its parameters. Convolutions and pooling
batch (the built-in CNN is tested). Every strategy's client half trains through ``job.train``, so every strategy
batches; one that trains twice in a task simply queues twice.

Under ``flwr run``. Batching needs several nodes' tasks in one process at the same time. Flower's simulation
runtime runs each ClientApp call in a Ray actor that serves one message at a time, and a deployment's SuperNode
starts a fresh ``flwr-clientapp`` process per message, so there every batch holds one node: the executor still
runs (a batch of one, after a 2 ms grace for company, with the same bits as in any batch) but cannot speed
anything up. Reaching those runtimes would take a trainer outside the ClientApp, e.g. one Ray actor per device
that the ClientApps send (start weights, partition id, ``LocalSGD``) to and that coalesces them as the batcher
does; in a real deployment, where each node is its own machine, there is nothing to batch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, vmap

from client_app.dense import dense_plan
from client_app.trainer import LocalSGD
from strategies import taskkeys as keys

__all__ = ["BATCHER", "LANES", "CoalescingBatcher", "NodeJob", "group_key", "train_batched",
           "train_many", "unbatchable"]

#: Most nodes per batched computation (a chunk). In one sweep on CPU (1,000 nodes, ``bench/batched_executor.py
#: --lanes N`` reruns it) logreg trained 7,000, 8,900, 9,500, 11,600 and 7,600 nodes/s at 32, 64, 128, 256 and
#: 1,000 lanes, the MLP about 385 at 32-128 and 250 at 256 and above. On a GPU every chunk is padded to exactly
#: this many nodes (module docstring).
LANES = 64
#: Fewest nodes per chunk when a batch is cut up for several threads: below this a chunk's fixed Python cost per
#: step is shared by too few nodes to be worth another core.
MIN_CHUNK = 8

Weights = list[np.ndarray]


@dataclass(frozen=True)
class NodeJob:
    """One node's local training: its start weights (the model's ``state_dict`` order), partition and SGD."""

    start: Sequence[np.ndarray]
    x: np.ndarray
    y: np.ndarray
    sgd: LocalSGD


def group_key(sgd: LocalSGD, n: int) -> tuple[int, int, float, float, float]:
    """What nodes in one vmapped computation must share: steps, the effective batch size, lr, momentum, prox_mu."""
    return sgd.steps, min(sgd.batch_size, n), sgd.lr, sgd.momentum, sgd.prox_mu


def unbatchable(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot be trained by ``train_many`` (None when it can)."""
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        return f"the model has buffers ({', '.join(buffers[:3])}), which vmap cannot update per node"
    if list(model.state_dict()) != [n for n, _ in model.named_parameters()]:
        return "the model's state_dict is not its parameters"
    return None


def train_many(model: torch.nn.Module, jobs: Sequence[NodeJob], device: torch.device, *, lanes: int = LANES,
               pad: bool | None = None, threads: int = 1) -> list[tuple[Weights, dict[str, float]]]:
    """Train every job's node from its start weights; return (end weights, metrics) per job, in order.

    ``model`` is the architecture only (its own weights are not read or changed). The metrics are
    ``LocalSGD.run``'s: train loss (mean over the steps), compute seconds (the node's share of its chunk's wall
    time) and examples seen. Jobs are grouped by ``group_key`` and each group runs in chunks of at most ``lanes``
    nodes, padded to exactly ``lanes`` when ``pad`` (default: on any device but the CPU; module docstring).

    ``threads`` > 1 (CPU only, unpadded) trains chunks on that many threads at once, each on its own copy of
    ``model`` (``functional_call`` swaps a module's parameters while it runs), with the groups cut into up to
    ``threads`` chunks (of ``MIN_CHUNK`` nodes or more): the batcher's whole batch otherwise runs on the one
    thread that leads it, while node by node the runner's client threads share every core. Chunk sizes do not
    change a node's bits on the CPU.
    """
    reason = unbatchable(model)
    if reason is not None:
        raise ValueError(f"train_many cannot batch this model: {reason}")
    if lanes < 1 or threads < 1:
        raise ValueError(f"lanes and threads must be >= 1, got {lanes}, {threads}")
    padded = device.type != "cpu" if pad is None else pad
    threads = 1 if padded else threads
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(group_key(job.sgd, len(job.y)), []).append(i)
    chunks = []
    for members in groups.values():
        size = min(lanes, max(MIN_CHUNK, -(-len(members) // threads)))
        chunks += [members[c:c + size] for c in range(0, len(members), size)]
    out: list[tuple[Weights, dict[str, float]] | None] = [None] * len(jobs)

    def work(mine: list[list[int]], replica: torch.nn.Module) -> None:
        step_fn = _step_function(replica)
        for chunk in mine:
            results = _train_chunk(step_fn, replica, [jobs[i] for i in chunk], device, lanes if padded else 0)
            for i, result in zip(chunk, results, strict=True):
                out[i] = result

    workers = min(threads, len(chunks))
    if workers <= 1:
        work(chunks, model)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batched") as pool:
            for done in [pool.submit(work, chunks[w::workers], copy.deepcopy(model)) for w in range(workers)]:
                done.result()
    return [r for r in out if r is not None]


StepFn = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float],
                  tuple[dict[str, torch.Tensor], torch.Tensor]]


def _step_function(model: torch.nn.Module) -> StepFn:
    """One step for every lane: (stacked params, x batches, y batches, anchor, prox_mu) -> (gradients, losses).

    Each lane's loss is its batch's mean cross-entropy (plus its proximal term), and one backward pass of the
    *sum* of the lanes' losses gives every lane the gradient of its own loss exactly (d sum / d loss_k = 1),
    without ``torch.func.grad``'s per-call overhead, which was most of a small model's step. The forward is
    ``_dense_forward`` for a stack of linear layers (the built-in logreg and MLP) and ``functional_call`` vmapped
    over the lanes for any other model.
    """
    names = [n for n, _ in model.named_parameters()]
    forward = _dense_forward(model) or _vmapped_forward(model)

    def step(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, anchor: dict[str, torch.Tensor],
             mu: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        with torch.enable_grad():
            logits = forward(leaves, xb)  # (lanes, classes, batch): cross_entropy's (N, C, d) layout
            loss = torch.nn.functional.cross_entropy(logits, yb, reduction="none").mean(1)
            if mu:  # LocalSGD.run's proximal term, mu/2 * sum over tensors of ||p - a||^2, per lane
                drift = sum(((leaves[n] - anchor[n]) ** 2).flatten(1).sum(1) for n in names)
                loss = loss + mu / 2 * drift
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return dict(zip(names, grads, strict=True)), loss.detach()

    return step


Forward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def _vmapped_forward(model: torch.nn.Module) -> Forward:
    """Any model: ``functional_call`` vmapped over the lanes, logits turned to (lanes, classes, batch)."""
    forward = vmap(lambda params, xb: functional_call(model, params, (xb,)))
    return lambda params, xb: forward(params, xb).transpose(1, 2)


def _dense_forward(model: torch.nn.Module) -> Forward | None:
    """A ``Sequential`` of ``Flatten`` then ``Linear`` and ``ReLU`` layers as batched matmuls; None for others.

    Why not vmap: vmapping ``Linear`` multiplies (batch, in) activations by the transposed weights, and its
    backward then computes each weight's gradient as a (lanes, in, out) batched matmul, a shape that MKL runs
    several times slower than the (lanes, out, in) one. Here activations stay feature-major, (lanes, features,
    batch): a layer is ``baddbmm(bias, W, a)``, its weight gradient ``g @ a^T`` comes out in the weight's own
    layout, and the logits come out in cross-entropy's (N, C, d) layout. Logreg's step at 256 lanes: 5.9 ms
    vmapped, 1.2 ms here; the MLP's 1.1-1.25x (it is bound by its arithmetic). The same numbers within rounding
    (``tests/test_batched.py``), and, as with vmap, nothing mixes lanes.
    """
    plan = dense_plan(model)  # exact types, no hooks (client_app/dense.py)
    if plan is None:
        return None

    def forward(params: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        a = xb.flatten(2).transpose(1, 2)  # (lanes, features, batch)
        for linear in plan:
            if linear is None:
                a = torch.relu(a)
            else:
                weight, bias = linear
                a = (torch.baddbmm(params[bias].unsqueeze(2), params[weight], a) if bias is not None
                     else torch.bmm(params[weight], a))
        return a

    return forward


def _train_chunk(step_fn: StepFn, model: torch.nn.Module, jobs: list[NodeJob], device: torch.device,
                 width: int) -> list[tuple[Weights, dict[str, float]]]:
    """One vmapped run of nodes sharing a ``group_key``, padded to ``width`` with copies of the first job."""
    start = time.perf_counter()
    real = len(jobs)
    jobs = jobs + [jobs[0]] * (width - real)
    lanes = len(jobs)
    sgd = jobs[0].sgd
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        params = {n: torch.from_numpy(np.stack([np.asarray(j.start[k]) for j in jobs])).to(device)
                  for k, n in enumerate(names)}
    anchor = {n: p.clone() for n, p in params.items()} if sgd.prox_mu else params
    # One gather per step: the partitions back to back, each node's batches shifted by its offset.
    sizes = [len(j.y) for j in jobs]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    x_all = torch.from_numpy(np.concatenate([j.x for j in jobs])).to(device)
    y_all = torch.from_numpy(np.concatenate([j.y for j in jobs])).to(device)
    index = np.stack([j.sgd.batches(n) + off for j, n, off in zip(jobs, sizes, offsets, strict=True)])
    index_t = torch.from_numpy(index).to(device)  # (lanes, steps, batch)
    x_flat = x_all.view(len(x_all), -1)
    buffers: dict[str, torch.Tensor] | None = None
    losses = []
    for s in range(sgd.steps):
        rows = index_t[:, s].reshape(-1)  # index_select of flat rows: a plain gather, 8x faster than x_all[rows]
        xb = x_flat.index_select(0, rows).view(lanes, -1, *x_all.shape[1:])
        grads, loss = step_fn(params, xb, y_all.index_select(0, rows).view(lanes, -1), anchor, sgd.prox_mu)
        with torch.no_grad():
            direction = grads
            if sgd.momentum:  # trainer.Momentum: buf = g (first step), then buf = m * buf + g
                if buffers is None:
                    buffers = {n: g.clone() for n, g in grads.items()}
                else:
                    for n, g in grads.items():
                        buffers[n].mul_(sgd.momentum).add_(g)
                direction = buffers
            params = {n: torch.add(p, direction[n], alpha=-sgd.lr) for n, p in params.items()}
        losses.append(loss.detach())
    per_step = torch.stack(losses).cpu().numpy().astype(np.float64)  # (steps, lanes)
    total = np.zeros(lanes)
    for row in per_step:  # LocalSGD.run's running Python-float sum, step by step
        total += row
    weights = {n: p.cpu().numpy() for n, p in params.items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    share = (time.perf_counter() - start) / real
    return [([weights[n][k].copy() for n in names],
             {keys.TRAIN_LOSS: float(total[k] / sgd.steps), keys.COMPUTE_S: share,
              "examples-seen": float(sgd.steps * min(sgd.batch_size, sizes[k]))})
            for k in range(real)]


# ------------------------------------------------------------------------------------------------ the batcher
_log = logging.getLogger(__name__)

#: The most nodes one batch takes; the runner's ``--workers`` (at most 256 client threads) is the real bound.
MAX_BATCH = 256
#: How long a queued node waits for nodes still on their way (decoding their task) before its batch starts.
WAIT_S = 0.1
#: The quiet spell (no node announced or arrived) after which a batch starts when nobody is on the way: long
#: enough for client threads just handed a task to reach the ClientApp and announce theirs, short next to a
#: task's own cost (milliseconds), which a lone node pays once.
GRACE_S = 0.002

Result = tuple[Weights, dict[str, float]]


@dataclass(eq=False)
class _Pending:
    """A queued node: its job, what it trains on, and (once its batch ran) its result or the batch's error."""

    model: torch.nn.Module
    job: NodeJob
    device: torch.device
    key: tuple
    taken: bool = False
    done: bool = False
    result: Result | None = None
    error: BaseException | None = None
    arrived: float = field(default_factory=time.monotonic)


class CoalescingBatcher:
    """Coalesce concurrent ``train`` calls from many threads into ``train_many`` batches.

    Leader/follower, no thread of its own: a caller queues its node and waits; the first waiting caller that sees
    its batch ready takes its own node plus up to ``max_batch - 1`` queued nodes of the same model and device,
    trains them outside the lock (on every core: ``train_many``'s ``threads``), and wakes the others with their
    results. While a batch trains, the next one gathers: the cores are busy anyway, so nodes that arrive meanwhile
    wait for it to end (or for ``max_batch`` of them). Otherwise a batch is ready when ``max_batch`` nodes are
    queued, when no node that announced itself (``session``) is still on its way and none has announced itself
    or arrived for ``grace_s``, or when the caller has waited ``wait_s``. ``session`` is how the ClientApp
    announces a node before it decodes its task, so the batcher knows how many more to wait for.

    In the in-process runner, client threads reach the ClientApp one every few milliseconds (the interpreter
    lock) and spend milliseconds decoding their task, so a FedAvg round of 100 nodes arrives over about half a
    second; gathering while a batch trains is what makes its batches large (FedAvg: a mean of 2.8 nodes without,
    44-50 with; FedBuff 13-23; ``bench/batched_executor.py``).

    Which nodes share a batch changes nothing in their results (``train_many``'s module docstring), so the
    arrival order, the thread count, ``grace_s`` and ``wait_s`` affect only speed.
    """

    def __init__(self, max_batch: int = MAX_BATCH, wait_s: float = WAIT_S, grace_s: float = GRACE_S,
                 lanes: int = LANES, threads: int | None = None) -> None:
        if max_batch < 1 or not 0 <= grace_s <= wait_s:
            raise ValueError(f"need max_batch >= 1 and 0 <= grace_s <= wait_s, got {max_batch}, {grace_s}, {wait_s}")
        self.max_batch, self.wait_s, self.grace_s, self.lanes = max_batch, wait_s, grace_s, lanes
        #: Threads a batch trains on (``train_many``'s ``threads``): every core, as the client threads would use.
        self.threads = threads or os.cpu_count() or 1
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._expected = 0
        self._last_event = 0.0  # when a node last announced itself or arrived
        self._running = 0  # batches training now
        self._local = threading.local()
        #: Size of every batch trained so far (for the bench and the tests; never in a reply: it depends on timing).
        self.sizes: list[int] = []

    @contextlib.contextmanager
    def session(self, active: bool = True) -> Iterator[None]:
        """Announce that this thread will call ``train`` once (a ClientApp handler wraps its task in this)."""
        if not active:
            yield
            return
        with self._cond:
            self._expected += 1
            self._local.expecting = True
            self._last_event = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._arrive()
                self._cond.notify_all()

    def train(self, model: torch.nn.Module, job: NodeJob, device: torch.device) -> Result:
        """Train ``job``'s node in some batch; return its end weights and metrics (or raise the batch's error)."""
        me = _Pending(model, job, device, key=(repr(model), _shapes(model), str(device)))
        with self._cond:
            self._arrive()
            self._last_event = time.monotonic()
            self._queue.append(me)
            self._cond.notify_all()
            batch: list[_Pending] = []
            while not me.done:
                if not me.taken and self._running and len(self._queue) < self.max_batch:
                    self._cond.wait()  # the cores are busy with a batch: gather the next one until it ends
                elif not me.taken:
                    now = time.monotonic()
                    left = me.arrived + self.wait_s - now
                    if self._expected == 0:  # nobody announced: start once arrivals have been quiet for grace_s
                        left = min(left, self._last_event + self.grace_s - now)
                    if len(self._queue) >= self.max_batch or left <= 0:
                        batch = self._take(me)
                        break
                    self._cond.wait(left)
                else:
                    self._cond.wait()
        if batch:
            self._run(batch)
        if me.error is not None:
            raise me.error
        assert me.result is not None
        return me.result

    @property
    def queued(self) -> int:
        """Nodes waiting for a batch."""
        return len(self._queue)

    @property
    def expected(self) -> int:
        """Nodes announced (``session``) that have not arrived yet."""
        return self._expected

    def skip(self) -> None:
        """Count off the node this thread announced: it trains on its own, so batches must not wait for it."""
        with self._cond:
            self._arrive()
            self._cond.notify_all()

    def _arrive(self) -> None:
        """Count off the node this thread announced (it arrived, or its session ended without it). Under the lock."""
        if getattr(self._local, "expecting", False):
            self._local.expecting = False
            self._expected -= 1

    def _take(self, me: _Pending) -> list[_Pending]:
        """``me`` and up to ``max_batch - 1`` queued nodes of its model and device, oldest first. Under the lock."""
        batch = [me] + [p for p in self._queue if p is not me and p.key == me.key][: self.max_batch - 1]
        taken = {id(p) for p in batch}
        self._queue = [p for p in self._queue if id(p) not in taken]
        for p in batch:
            p.taken = True
        self.sizes.append(len(batch))
        self._running += 1
        return batch

    def _run(self, batch: list[_Pending]) -> None:
        """Train ``batch`` (outside the lock), then hand every node its result or the error."""
        try:
            results: list[Result] | None = train_many(batch[0].model, [p.job for p in batch], batch[0].device,
                                                       lanes=self.lanes, threads=self.threads)
        except BaseException as exc:  # every node of the batch fails with it, in its own thread
            results = None
            for p in batch:
                p.error = exc
        with self._cond:
            for i, p in enumerate(batch):
                if results is not None:
                    p.result = results[i]
                p.done = True
            self._running -= 1
            self._cond.notify_all()


def _shapes(model: torch.nn.Module) -> tuple:
    return tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters())


#: The process's batcher: every client thread of the in-process runner shares it.
BATCHER = CoalescingBatcher()
_fallbacks_logged: set[str] = set()


def train_batched(sgd: LocalSGD, model: torch.nn.Module, x: np.ndarray, y: np.ndarray,
                  device: torch.device, batcher: CoalescingBatcher | None = None) -> dict[str, float]:
    """``train_local`` for ``local-executor = "batched"``: train ``model`` in place through the batcher.

    The metrics are ``LocalSGD.run``'s plus ``exec-batched`` (1; 0 when the model cannot be batched and the node
    trained alone, which a warning says once per process). The batch's size is not a metric: it depends on
    timing, and a reply must not.
    """
    batcher = batcher or BATCHER
    reason = unbatchable(model)
    if reason is not None:
        batcher.skip()
        if reason not in _fallbacks_logged:
            _fallbacks_logged.add(reason)
            _log.warning("local-executor = 'batched': %s; these nodes train one by one", reason)
        return {**sgd.run(model, x, y, device), "exec-batched": 0.0}
    start = [t.detach().cpu().numpy() for t in model.state_dict().values()]
    weights, metrics = batcher.train(model, NodeJob(start, x, y, sgd), device)
    model.load_state_dict({n: torch.from_numpy(w) for n, w in zip(model.state_dict(), weights, strict=True)})
    return {**metrics, "exec-batched": 1.0}
