"""Smoke test of bench/byzantine.py (``--quick`` on one strategy, two attacks, two defences) and its attack wrapper."""

import json

import numpy as np

from bench import byzantine
from bench.attacks import Attack, attackers, corrupt
from server_app.wire import validate_reply
from tests.hostile import NAMES, model, reply, valid_content


def test_attackers_are_two_of_ten_by_partition():
    assert attackers(10) == {0, 1}
    assert attackers(4) == {0} and attackers(1) == {0}
    assert attackers(10, 0.0) == frozenset()


def test_claim_attack_reaches_the_server_as_sent():
    """The 2**53 claim passes the wire's checks (it is the largest count allowed) and the delta arrives negated."""
    honest = valid_content("none", seed=3)
    sent = corrupt(honest, Attack(factor=-8.0, claim=2**53))
    base = model()
    values, is_delta, n, _ = validate_reply(reply(sent), NAMES, base)
    expected, _, honest_n, _ = validate_reply(reply(honest), NAMES, base)
    assert is_delta and n == 2**53 and honest_n == 32
    for got, want in zip(values, expected, strict=True):
        np.testing.assert_allclose(got, -8.0 * want, rtol=1e-6)


def test_byzantine_quick(tmp_path, capsys):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    argv = ["--quick", "--strategies", "fedbuff", "--attacks", "scaled-x1e6", "--defences", "update-filter=none",
            "--json", str(out), "--markdown", str(md)]
    report = byzantine.main(argv)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert data["seeds"] == [0] and data["max_updates"] == byzantine.QUICK_UPDATES
    assert data["attacks"] == ["honest", "scaled-x1e6"] and data["failed_runs"] == 0
    rows = data["table"]["fedbuff"]
    assert list(rows) == ["default", "update-filter=none"]  # default is always run, first
    for row in rows.values():
        assert set(row["cells"]) == {"honest", "scaled-x1e6"}
        for c in row["cells"].values():
            assert c["seeds"] == [0] and c["ci95"] is None and isinstance(c["holds"], bool)
    assert len(data["runs"]) == 4
    by = {(r["defence"], r["attack"]): r for r in data["runs"]}
    # The attack really ran: every attacker task was corrupted, and no task of an honest run.
    for (_, attack), r in by.items():
        if attack == "honest":
            assert r["corrupted_replies"] == 0
        else:
            # (a task still in flight when the run stops was corrupted but has no row; a failed one has no reply)
            assert r["corrupted_replies"] >= r["attacker_tasks"] - r["attacker_failed"] > 0 and r["honest_tasks"] > 0
    # With nothing in its way, x1e6 wrecks the model; the default filter saw norms ~1e5 x its bound.
    honest = rows["update-filter=none"]["cells"]["honest"]["mean"]
    attacked = rows["update-filter=none"]["cells"]["scaled-x1e6"]
    assert honest > 0.7
    assert attacked["mean"] is None or attacked["mean"] < honest - 0.3
    assert not attacked["holds"] and rows["default"]["cells"]["honest"]["holds"]
    assert by[("default", "scaled-x1e6")]["attacker_max_clip_ratio"] > 1e4
    assert by[("default", "honest")]["attacker_clipped"] == by[("default", "honest")]["honest_clipped"] == 0
    text = md.read_text()
    assert text.strip() in capsys.readouterr().out
    assert text.startswith("    python -m bench.byzantine --quick --strategies fedbuff")
    assert "| strategy | defence | honest | scaled x1e6 |" in text
    assert "| fedbuff | update-filter=none |" in text
