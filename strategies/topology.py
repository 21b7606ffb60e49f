"""Gossip graphs for decentralized training (AD-PSGD, D-PSGD): who may average with whom.

Nodes are numbered 0..n-1 (the engine's node order, i.e. partition ids). ``topology`` names:

- ``ring``: i ~ i +- 1 (mod n). Bipartite only for even n.
- ``bipartite-exponential``: i ~ i +- 1 and i +- (1 + 2^k) for k >= 1 while 1 + 2^k < n (mod n), the graph of
  Assran et al.'s ``DynamicBipartiteExponentialGraph`` (``docs/algorithms.md``). Every
  offset is odd, so for even n even nodes only meet odd ones: the graph is bipartite by construction.
- ``complete``: everybody with everybody (the AllReduce view; never bipartite for n > 2).

AD-PSGD's atomic pairwise averaging cannot deadlock when active nodes (one side of a bipartite graph) only
contact passive ones (the other side); ``require_gossip_graph`` refuses a graph that is not bipartite or not
connected, with the reason.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from strategies.config import ConfigError

TOPOLOGIES = ("ring", "bipartite-exponential", "complete")


class TopologyError(ConfigError):
    """A topology that cannot be built, or cannot be used by the algorithm that asked for it (a config error)."""


@dataclass(frozen=True)
class Graph:
    """An undirected graph on nodes 0..n-1 as sorted neighbour tuples."""

    name: str
    neighbours: tuple[tuple[int, ...], ...]

    @property
    def n(self) -> int:
        """Number of nodes."""
        return len(self.neighbours)

    def sides(self) -> tuple[list[int], list[int]] | None:
        """A 2-colouring (active, passive) if the graph is bipartite, else None (BFS from every component)."""
        colour: dict[int, int] = {}
        for start in range(self.n):
            if start in colour:
                continue
            colour[start] = 0
            todo = deque([start])
            while todo:
                i = todo.popleft()
                for j in self.neighbours[i]:
                    if j not in colour:
                        colour[j] = 1 - colour[i]
                        todo.append(j)
                    elif colour[j] == colour[i]:
                        return None
        return [i for i in range(self.n) if colour[i] == 0], [i for i in range(self.n) if colour[i] == 1]

    def connected(self) -> bool:
        """Whether every node can reach every other."""
        seen, todo = {0}, deque([0])
        while todo:
            for j in self.neighbours[todo.popleft()]:
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return len(seen) == self.n


def build(name: str, n: int) -> Graph:
    """The named topology on n nodes."""
    if n < 2:
        raise TopologyError(f"a gossip topology needs at least 2 nodes, got {n}")
    if name == "ring":
        offsets = {1}
    elif name == "bipartite-exponential":
        offsets = {1} | {1 + 2**k for k in range(1, n.bit_length() + 1) if 1 + 2**k < n}
    elif name == "complete":
        offsets = set(range(1, n))
    else:
        raise TopologyError(f"topology = {name!r} is not one of: {', '.join(TOPOLOGIES)}")
    edges: list[set[int]] = [set() for _ in range(n)]
    for i in range(n):
        for d in offsets:
            for j in ((i + d) % n, (i - d) % n):
                if j != i:
                    edges[i].add(j)
                    edges[j].add(i)
    return Graph(name, tuple(tuple(sorted(e)) for e in edges))


def require_gossip_graph(graph: Graph) -> tuple[list[int], list[int]]:
    """The (active, passive) sides for AD-PSGD; a clear error for a graph it cannot use."""
    if not graph.connected():
        raise TopologyError(f"topology {graph.name!r} on {graph.n} nodes is not connected")
    sides = graph.sides()
    if sides is None:
        hint = " (use an even number of nodes)" if graph.name in ("ring", "bipartite-exponential") else ""
        raise TopologyError(f"AD-PSGD needs a bipartite topology so pairwise averaging cannot deadlock; "
                            f"{graph.name!r} on {graph.n} nodes is not bipartite{hint}")
    return sides
