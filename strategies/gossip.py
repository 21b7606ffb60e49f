"""Decentralized training: AD-PSGD (Lian et al., ICML 2018, arXiv 1710.06952), D-PSGD and AllReduce-SGD.

Flower is hub and spoke and a node handles one message at a time, so the pairwise exchange is carried by the
platform: the server side keeps every node's model as that node's authoritative copy, sends a node a snapshot of
its own model to compute on, and applies the gossip step between two nodes' models when the result arrives.
What a task costs on the virtual clock and in the store is the node-to-node traffic the real algorithm would
send (``Exchange``), not the emulation's messages, whose real sizes go to the ``transport_bytes_*`` columns.

- ``ad-psgd`` (``docs/algorithms.md``): node i computes a gradient on its snapshot
  x̂_i; when it completes, if i is *active* it picks a random neighbour j (drawn at dispatch) on the bipartite
  ``topology`` and atomically sets x_i, x_j <- (x_i + x_j) / 2, then applies its now stale gradient:
  x_i <- x_i - delta_i. *Passive* nodes only apply their gradients; they are averaged when an active node
  picks them. Results are applied one at a time in clock order, so every averaging is atomic and nobody ever
  waits for a partner: there is nothing to deadlock, and a slow node simply takes part in fewer averagings.
- ``d-psgd``: synchronous gossip rounds, X <- X W - Delta with lazy Metropolis-Hastings weights on the topology.
- ``allreduce-sgd``: synchronous exact averaging of the nodes' deltas, timed as an all-reduce (dense), or as an
  all-gather of the compressed deltas when a codec is set: the faster of a ring and recursive halving/doubling.

With a ``codec``, the models exchanged between nodes travel compressed: node j keeps a copy of what it last
learnt of node i's model and i sends ``C(x_i - copy)``, difference coding per directed edge (a
``strategies.links.LinkCompressor`` in model mode, every copy starting from the initial model), so a sparse codec
still converges to the node's model; ``codec = "none"`` sends exact models and makes every averaging
sum-preserving. The family refuses ``clock = "wall"``: a deployment relays every model through the server, so
its real times would be the star's, not the algorithm's (``check_config``). The "delta" of a local task is the
sum of ``local-steps`` SGD steps (one step: ``lr * gradient``, as in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array

from strategies import collectives, topology
from strategies.base import EngineView, Exchange, Status, Strategy, Task, Update, Verdict, step
from strategies.client import ClientJob, Weights
from strategies.codecs import CodecSpec, encoded_bytes
from strategies.config import ConfigError, RunConfig
from strategies.flower_arrays import npy_array
from strategies.links import LinkCompressor
from strategies.registry import register
from strategies.sums import weighted_sum
from strategies.taskkeys import PEER, ROUND, TaskConfig
from strategies.tuning import LR


def consensus_distance(models: Sequence[Weights], mean: Weights) -> float:
    """Mean over nodes of the squared distance of a node's model to the average model."""
    total = 0.0
    for m in models:
        total += sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(m, mean, strict=True))
    return total / len(models)


class Decentralized(Strategy):
    """Every node has its own model, kept here; a task trains on a snapshot of the node's own model.

    The published ``weights`` (what is evaluated) are the average of the node models; ``version`` counts applied
    updates (AD-PSGD) or rounds (synchronous ones), so a task's staleness is the number of versions published
    while it computed, the global view's tau of the paper.
    """

    requires_bipartite = False
    search_space = {"lr": LR}  # the mixing is the topology's; local SGD's rate is the knob

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Refuse the wall clock: a deployment relays every exchange through the server (real times: the star's)."""
        if cfg.clock == "wall":
            raise ConfigError(
                f"strategy = {cls.name!r} runs on clock = 'virtual' only: the node-to-node exchanges it is charged for "
                f"do not happen peer to peer in a deployment (Flower's server relays every model and the server side "
                f"does the averaging), so wall-clock times would be those of the star, not of {cls.name}")

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        self.graph = topology.build(self.cfg.topology, self.num_nodes)
        if self.requires_bipartite:
            self.active = set(topology.require_gossip_graph(self.graph)[0])
        elif not self.graph.connected():
            raise topology.TopologyError(f"topology {self.cfg.topology!r} on {self.num_nodes} nodes is not connected")
        self.models: list[Weights] = [self.weights] * self.num_nodes  # replaced, never mutated in place
        self.codec = CodecSpec(self.cfg.codec, self.cfg.codec_ratio, self.cfg.codec_levels, self.cfg.codec_rank)
        self.links: LinkCompressor[tuple[int, int]] = LinkCompressor(self.codec, initial=self.weights)
        self.model_bytes = encoded_bytes(self.codec, self.weights)
        self._index = {n: i for i, n in enumerate(self.nodes)}

    def index(self, node: int) -> int:
        """A node id's position in the fleet (its place on the topology)."""
        return self._index[node]

    def snapshot(self, i: int, exchange: Exchange, config: TaskConfig | None = None) -> Task:
        """A task training on node i's own model as it is now."""
        model = self.models[i]
        return Task(self.version, config or {}, model, base=model, exchange=exchange)

    def received(self, src: int, dst: int, model: Weights, seed: int) -> Weights:
        """The view node ``dst`` holds of node ``src``'s ``model`` after src sent it (compressed with a codec)."""
        if self.codec.name == "none":
            return model
        return self.links.send_model((src, dst), model, seed)[1]

    def publish_average(self) -> None:
        """Publish the average of the node models as the next version."""
        self._publish(weighted_sum([(1.0 / self.num_nodes, m) for m in self.models]))

    def node_models(self) -> Sequence[Weights]:
        """Each node's own model: what it would hold and serve, scored beside the average."""
        return self.models

    def state_summary(self) -> dict[str, float]:
        """The consensus distance goes to the store's ``evals.consensus_distance``."""
        return {"consensus-distance": consensus_distance(self.models, self.weights)}

    @staticmethod
    def client(job: ClientJob) -> tuple[list[Array], dict[str, float]]:
        """Local steps on the snapshot; the delta goes back exact.

        In the real algorithm the gradient never leaves the node: this message is the emulation's transport,
        so it is not compressed (the codec applies to the models the nodes exchange).
        """
        trained, metrics = job.train(job.received)
        return [npy_array(np.ascontiguousarray(w - t)) for w, t in zip(job.received, trained, strict=True)], metrics


@register
class ADPSGD(Decentralized):
    """Asynchronous decentralized parallel SGD: atomic pairwise averaging on a bipartite graph."""

    name = "ad-psgd"
    overlap = True  # the computation thread computes the next gradient while the communication thread averages
    requires_bipartite = True

    @classmethod
    def aggregation_set(cls, cfg: RunConfig) -> int | None:
        """A task averages one pair of models, no set of updates."""
        return 1

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        self.rng = np.random.default_rng([self.cfg.seed, 0xAD95])
        self.partner: dict[int, int] = {}  # active node -> the passive neighbour it will average with

    def task_for(self, node: int) -> Task | None:
        """A snapshot of the node's model; an active node also draws the neighbour it will average with."""
        i = self.index(node)
        if i not in self.active:
            return self.snapshot(i, Exchange())
        j = int(self.rng.choice(self.graph.neighbours[i]))
        self.partner[node] = j
        b, peer = self.model_bytes, self.nodes[j]
        exchange = Exchange(((node, peer, b), (peer, node, b)), bytes_up=2 * b, bytes_down=2 * b, peer=peer,
                            holds=peer)
        return self.snapshot(i, exchange, {PEER: j})

    def apply(self, update: Update) -> Verdict:
        """Average atomically with the partner (active nodes), then apply the stale gradient."""
        i = self.index(update.node)
        j = self.partner.pop(update.node, None)
        if j is not None:
            self.gossip(i, j, seed=update.seq)
        self.models[i] = step(self.models[i], update.delta, 1.0)
        self.publish_average()
        return Verdict(Status.APPLIED, applied=(update.seq,))

    def gossip(self, i: int, j: int, seed: int) -> None:
        """x_i, x_j <- (x_i + x_j) / 2, each end averaging with what it received of the other."""
        xi, xj = self.models[i], self.models[j]
        xj_at_i = self.received(j, i, xj, seed * 2)
        xi_at_j = self.received(i, j, xi, seed * 2 + 1)
        self.models[i] = [(a + b) * 0.5 for a, b in zip(xi, xj_at_i, strict=True)]
        self.models[j] = [(a + b) * 0.5 for a, b in zip(xj, xi_at_j, strict=True)]

    def fail(self, node: int, base_version: int) -> Verdict:
        """A lost task averages with nobody; the node gets a fresh snapshot next."""
        self.partner.pop(node, None)
        return Verdict(Status.DROPPED)


class SyncRounds(Decentralized):
    """Rounds in which every node computes once; the round closes when all n results are in.

    A failed task is redone by the same node: a synchronous decentralized round cannot close without it.
    """

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        self.round = 0
        self.running: set[int] = set()
        self.results: dict[int, Update] = {}

    def task_for(self, node: int) -> Task | None:
        """One task per node per round."""
        if node in self.running or node in self.results:
            return None
        self.running.add(node)
        return self.round_task(node)

    def round_task(self, node: int) -> Task:
        """The node's task of the current round."""
        raise NotImplementedError

    def apply(self, update: Update) -> Verdict:
        """Hold results until the round is complete, then close it."""
        self.running.discard(update.node)
        self.results[update.node] = update
        if len(self.results) < self.num_nodes:
            return Verdict(Status.BUFFERED, f"round {self.round}: {len(self.results)}/{self.num_nodes} in")
        updates = [self.results[n] for n in self.nodes]
        self.close(updates)
        self.round += 1
        self.results = {}
        return Verdict(Status.APPLIED, applied=tuple(u.seq for u in updates))

    def close(self, updates: list[Update]) -> None:
        """Combine one round's updates (in fleet order) into the node models."""
        raise NotImplementedError

    def fail(self, node: int, base_version: int) -> Verdict:
        """The node redoes its part of the round."""
        self.running.discard(node)
        return Verdict(Status.DROPPED)

    def state_summary(self) -> dict[str, float]:
        """Round number and consensus distance."""
        return {**super().state_summary(), "round": float(self.round)}


@register
class DPSGD(SyncRounds):
    """Synchronous decentralized SGD (Lian et al., NeurIPS 2017): X <- X W - Delta, W lazy Metropolis-Hastings."""

    name = "d-psgd"

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        nbrs = self.graph.neighbours
        # Lazy Metropolis-Hastings weights, (I + W_MH) / 2: on a bipartite graph plain W_MH has an eigenvalue
        # near -1 (the two sides swap their models every round) and D-PSGD oscillates; the lazy form does not.
        self.mixing = [
            {j: 0.5 / (1 + max(len(nbrs[i]), len(nbrs[j]))) for j in nbrs[i]} for i in range(self.num_nodes)
        ]
        # A round's traffic, the same every round: every node's model to each of its neighbours.
        b = self.model_bytes
        self.transfers = tuple((self.nodes[a], self.nodes[c], b) for a in range(self.num_nodes) for c in nbrs[a])

    def round_task(self, node: int) -> Task:
        """Every node sends its model to each neighbour and receives theirs; the round's links are shared."""
        i = self.index(node)
        sent = len(self.graph.neighbours[i]) * self.model_bytes
        return self.snapshot(i, Exchange(self.transfers, bytes_up=sent, bytes_down=sent), {ROUND: self.round})

    def close(self, updates: list[Update]) -> None:
        """x_i <- W_ii x_i + sum_j W_ij x_j (as i received it) - delta_i, from the round's start models."""
        old = self.models
        new = []
        for i, u in enumerate(updates):
            w_self = 1.0 - sum(self.mixing[i].values())
            parts = [(w_self, old[i])]
            for j, w in self.mixing[i].items():
                parts.append((w, self.received(j, i, old[j], seed=(self.round * self.num_nodes + j) * 64 + i)))
            new.append(step(self.aggregate(parts), u.delta, 1.0))
        self.models = new
        self.publish_average()


@register
class AllReduceSGD(SyncRounds):
    """Synchronous SGD with exact averaging: every node applies the mean of all deltas to the shared model.

    Timed as an all-reduce of the delta (in fp16 with ``codec = "fp16"``), or, with a sparse or quantized codec, as
    an all-gather of the compressed deltas: such payloads cannot be summed on the way, so compression pays only
    beyond about n/2. Each is the faster of a ring and recursive halving/doubling for the model size and the
    links (``strategies/collectives.py``, what a collective library chooses between).
    """

    name = "allreduce-sgd"

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        self.ring = self._ring()

    def _ring(self) -> Exchange:
        """Every node's traffic in every round: the faster of the ring and halving/doubling (``collectives``)."""
        summable = self.codec.name in ("none", "fp16")  # sums travel in the same format: a true all-reduce
        return collectives.allreduce(self.nodes, self.model_bytes, summable=summable)

    def round_task(self, node: int) -> Task:
        """The shared model (all node models are equal), and the ring's traffic."""
        return Task(self.version, {ROUND: self.round}, exchange=self.ring)

    @staticmethod
    def client(job: ClientJob) -> tuple[list[Array], dict[str, float]]:
        """Local steps; the delta is what the ring reduces, so the run's codec (and error feedback) applies."""
        return Strategy.client(job)

    def close(self, updates: list[Update]) -> None:
        """Set w <- w - mean_i delta_i: what an all-reduce of the deltas computes on every node."""
        mean = self.aggregate([(1.0 / len(updates), u.delta) for u in updates])
        self._publish(step(self.weights, mean, 1.0))
        self.models = [self.weights] * self.num_nodes
