"""Gossip graphs: shape, bipartiteness, connectivity, and clear errors for graphs AD-PSGD cannot use."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies.topology import TopologyError, build, require_gossip_graph


def test_bipartite_exponential_neighbours_are_at_odd_offsets():
    g = build("bipartite-exponential", 8)
    assert g.neighbours[0] == (1, 3, 5, 7)
    assert g.neighbours[2] == (1, 3, 5, 7)
    assert require_gossip_graph(g) == ([0, 2, 4, 6], [1, 3, 5, 7])


@given(st.integers(2, 64).map(lambda k: 2 * (k // 2)))
def test_even_rings_and_exponential_graphs_are_bipartite_symmetric_and_connected(n):
    for name in ("ring", "bipartite-exponential"):
        g = build(name, n)
        assert all(i in g.neighbours[j] for i in range(n) for j in g.neighbours[i])
        active, passive = require_gossip_graph(g)
        assert all(j in passive for i in active for j in g.neighbours[i])


@pytest.mark.parametrize(("name", "n", "message"), [
    ("ring", 5, "not bipartite (use an even number of nodes)"),
    ("bipartite-exponential", 9, "not bipartite"),
    ("complete", 4, "'complete' on 4 nodes is not bipartite"),
])
def test_graphs_ad_psgd_cannot_use_are_refused(name, n, message):
    with pytest.raises(TopologyError, match=re.escape(message)):
        require_gossip_graph(build(name, n))


def test_bad_names_and_sizes():
    with pytest.raises(TopologyError, match="ring, bipartite-exponential, complete"):
        build("torus", 4)
    with pytest.raises(TopologyError, match="at least 2 nodes"):
        build("ring", 1)


def test_complete_graph_is_connected_and_exponential_is_sparse():
    assert build("complete", 6).connected()
    assert max(len(nb) for nb in build("bipartite-exponential", 64).neighbours) <= 2 * 6
