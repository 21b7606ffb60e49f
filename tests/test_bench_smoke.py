"""Smoke test of bench/engine_overhead.py: tiny sizes, checks the report's shape, times nothing."""

import json
import time

import pytest

from bench import engine_overhead


def test_engine_overhead_smoke(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    md = tmp_path / "overhead.md"
    report = engine_overhead.main(["--nodes", "4", "--rounds", "1", "--model", "bench.models:Small", "--repeats", "1",
                                   "--no-warmup", "--quiet", "--json", str(out), "--markdown", str(md)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert data["workload"]["nodes"] == 4 and data["workload"]["rounds"] == 1
    engines = {r["engine"]: r for r in data["results"]}
    assert set(engines) == {"flower-fedavg", "staleflower-fedavg", "staleflower-fedbuff"}
    assert engines["flower-fedavg"]["updates"] == 4
    assert engines["staleflower-fedavg"]["updates"] >= 4
    for r in data["results"]:
        assert r["seconds"] > 0 and r["updates_per_s"] > 0
    assert data["ratio_vs_flower_fedavg"] > 0
    table = capsys.readouterr().out
    assert "| flower-fedavg |" in table and "| staleflower-fedavg |" in table
    assert "ratio_vs_flower_fedavg" in table
    assert md.read_text().strip() == table.strip()


def test_engine_overhead_settings_and_timers(tmp_path, capsys):
    """``--set`` reaches our rows (and a bad key exits 2); ``--timers`` times every phase and puts it all back."""
    from server_app import engine, intake

    small = ["--nodes", "4", "--rounds", "1", "--model", "bench.models:Small", "--repeats", "1", "--quiet"]
    report = engine_overhead.main([*small, "--no-warmup", "--engines", "staleflower-fedavg", "--set",
                                   "update-filter=none", "--json", str(tmp_path / "o.json"),
                                   "--markdown", str(tmp_path / "o.md")])
    assert report["workload"]["ours_settings"] == ["update-filter=none"]
    with pytest.raises(SystemExit) as exit_info:
        engine_overhead.main([*small, "--set", "update-filtr=none"])
    assert exit_info.value.code == 2 and "update-filter" in capsys.readouterr().err  # the did-you-mean hint
    before = (engine.Engine._dispatch, intake._diff_tensor_norm)
    timed = engine_overhead.main([*small, "--engines", "staleflower-fedavg", "--timers"])
    phases = timed["phases"]
    assert phases["dispatch a task"]["calls_per_run"] >= 4 and phases["  read its reply"]["median_us"] > 0
    assert phases["    the filter's norm of a tensor"]["calls_per_run"] > 0  # the default filter takes norms
    assert (engine.Engine._dispatch, intake._diff_tensor_norm) == before  # unwrapped again
    assert "wait for and pull the next result" in capsys.readouterr().out


def test_olco3_delay_reproduction_smoke(tmp_path):
    from bench import olco3_delay

    assert olco3_delay.main(["--dataset", "digits", "--nodes", "4", "--periods", "2", "--seeds", "0",
                             "--delays", "1", "--out", str(tmp_path / "o")]) == 0
    table = (tmp_path / "o.md").read_text()
    for method in olco3_delay.METHODS:
        assert f"| {method} |" in table
    assert (tmp_path / "o.png").stat().st_size > 0


def test_local_executors_smoke(tmp_path, capsys):
    """`python bench/local_executors.py --quick --json OUT`: every executor and model, the JSON keys, the table."""
    from bench import local_executors

    out = tmp_path / "le.json"
    report = local_executors.main(["--quick", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert data["machine"]["cores"] >= 1 and len(data["machine"]["loadavg_before"]) == 3
    rows = {(r["model"], r["executor"], r["threads"]) for r in data["results"]}
    assert rows == {(m, e, t) for m in ("mlp", "cnn") for e, t in local_executors.configurations((1, 2))}
    for r in data["results"]:
        for key in ("updates_per_s", "time_to_loss_threshold_s", "staleness_mean", "staleness_max", "failed_swaps",
                    "dropped_gradients", "peak_live_vectors"):
            assert key in r
        assert r["updates_per_s"] > 0 and r["peak_live_vectors"] <= 2 * r["threads"] + 1
    assert {c["threads"] for c in data["comparisons"]} == {1, 2}
    assert "| mlp | leashed | 2 |" in capsys.readouterr().out


def test_dashboard_load_smoke(tmp_path, capsys):
    from bench import dashboard_load

    out, md = tmp_path / "load.json", tmp_path / "load.md"
    report = dashboard_load.main(["--quick", "--sizes", "100,1000", "--dir", str(tmp_path / "stores"),
                                  "--json", str(out), "--markdown", str(md)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    rows = data["results"]
    assert [r["updates"] for r in rows] == [100, 1000]
    assert rows[0]["ratio_vs_first"] == 1.0 and all(r["ms_median"] > 0 for r in rows)
    assert rows[1]["evals"] > rows[0]["evals"] > 0
    table = capsys.readouterr().out
    assert "| 1,000 |" in table and md.read_text().strip() in table


def test_adpsgd_straggler_reproduction_smoke(tmp_path):
    from bench import adpsgd_straggler

    out = tmp_path / "a"
    assert adpsgd_straggler.main(["--seeds", "0", "--slowdowns", "10", "--epochs", "1", "--methods", "ad-psgd",
                                  "allreduce-sgd", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert {r["method"] for r in rows} == {"ad-psgd", "allreduce-sgd"}
    assert all(r["updates"] % 16 == 0 and r["curve"] for r in rows)
    by = {r["method"]: r for r in rows}
    assert by["allreduce-sgd"]["time"] > by["ad-psgd"]["time"]  # the slow node holds every all-reduce round
    table = out.with_suffix(".md").read_text()
    assert "| 10x | ad-psgd |" in table and "| 10x | allreduce-sgd |" in table
    assert out.with_suffix(".png").stat().st_size > 0


def test_checkpoint_cost_smoke(tmp_path):
    from bench import checkpoint_cost

    out = tmp_path / "c.md"
    assert checkpoint_cost.main(["--updates", "12", "--repeats", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| off | 0 |" in text and "| 1 | 13 |" in text and "One checkpoint:" in text


def test_fuzz_report_smoke(tmp_path, capsys):
    """`python -m bench.fuzz_report --quick`: every target tried, nothing crashed, the norm-filter example."""
    from bench import fuzz_report

    out, md = tmp_path / "fuzz.json", tmp_path / "fuzz.md"
    report = fuzz_report.main(["--quick", "--json", str(out), "--markdown", str(md)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    targets = {t["target"]: t for t in data["targets"]}
    assert {f"decode {c}" for c in ("none", "fp16", "topk", "randk", "qsgd", "sign", "powersgd")} < set(targets)
    assert {"reply records", "guard: size, version", "engine (hostile run)"} < set(targets)
    for t in targets.values():
        assert t["crashes"] == 0, t
        assert t["tried"] == t["rejected"] + t["accepted_valid"] > 0
    assert targets["engine (hostile run)"]["run"]["weights_finite"]
    modes = {r["update_filter"]: r for r in data["norm_filter"]}
    assert modes["reject"]["scaled_rejected"] == modes["reject"]["scaled_tasks"] > 0
    assert modes["clip"]["scaled_clipped"] == modes["clip"]["scaled_tasks"] > 0
    table = capsys.readouterr().out
    assert "| decode topk |" in table and md.read_text().strip() in table


def test_scale_smoke(tmp_path, capsys):
    """`python -m bench.scale --quick`: two run lengths in child processes, memory sampled along each run."""
    from bench import scale

    out, md = tmp_path / "scale.json", tmp_path / "scale.md"
    report = scale.main(["--quick", "--json", str(out), "--markdown", str(md)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert [r["updates"] for r in data["results"]] == [60, 120]
    for r in data["results"]:
        assert r["nodes"] == 20 and r["applied"] >= r["updates"] and r["updates_per_s"] > 0
        # the peak (ru_maxrss, KiB) and the last sample (statm, pages) are each rounded to 0.1 MiB
        assert r["peak_rss_mb"] >= r["rss_mb_100"] - 0.2 and r["rss_mb_100"] > 0 and len(r["samples"]) >= 8
        assert all(s["flights"] <= 5 for s in r["samples"])
    table = capsys.readouterr().out
    assert "| 20 | 5 |" in table and md.read_text().strip() in table


def test_scale_stops_client_processes_while_it_samples():
    """The scale benchmark's clock stops while it samples memory: client processes must not work meanwhile."""
    import subprocess

    from bench import scale

    def state(pid):
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]

    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        pids = [p.pid for p in procs]
        with pytest.raises(RuntimeError), scale.stopped(pids):
            deadline = time.monotonic() + 5
            while any(state(pid) != "T" for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [state(pid) for pid in pids] == ["T", "T"]
            raise RuntimeError("the sampling failed")  # continued all the same
        deadline = time.monotonic() + 5
        while any(state(pid) == "T" for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(state(pid) != "T" for pid in pids)
        with scale.stopped([procs[0].pid, 2**22 + 7]):  # a pid that is gone is no error
            pass
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_server_link_cost_smoke(tmp_path, capsys):
    from bench import server_link_cost

    out, md = tmp_path / "link.json", tmp_path / "link.md"
    assert server_link_cost.main(["--nodes", "4", "--updates", "8", "--repeats", "1", "--json", str(out),
                                  "--markdown", str(md)]) == 0
    data = json.loads(out.read_text())
    assert [r["row"] for r in data["results"]] == ["link off", "link on"]
    assert all(r["updates_per_s"] > 0 and r["virtual_s"] > 0 for r in data["results"]) and data["on_over_off"] > 0
    assert md.read_text().strip() in capsys.readouterr().out


def test_contention_cost_smoke_and_the_locks_come_back(tmp_path):
    from bench import contention_cost
    from server_app.peerlocks import PeerLocks

    schedule = PeerLocks.schedule
    out = tmp_path / "contention.json"
    assert contention_cost.main(["--nodes", "4", "--updates", "12", "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["row"] for r in data["results"]] == ["contention off", "contention on"]
    assert all(r["updates_per_s"] > 0 and r["virtual_s"] > 0 for r in data["results"]) and data["on_over_off"] > 0
    assert PeerLocks.schedule is schedule  # the what-if never outlives its run


def test_client_task_smoke(tmp_path, capsys):
    """`python -m bench.client_task`: real training tasks recorded from a run, replayed through the ClientApp."""
    from bench import client_task

    out, md = tmp_path / "task.json", tmp_path / "task.md"
    report = client_task.main(["--tasks", "5", "--repeats", "2", "--json", str(out), "--markdown", str(md)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["tasks"] == 5 and len(report["passes_us"]) == 2
    assert 0 < report["us_per_task_min"] <= report["us_per_task_median"]
    assert md.read_text().strip() in capsys.readouterr().out
    assert "autograd_passes_us" not in report


def test_client_task_against_autograd(tmp_path, monkeypatch):
    """`--against-autograd` adds passes with the dense step off: the replays ask for it exactly as often as without
    the flag, and it is back in place afterwards."""
    import client_app.trainer as trainer
    from bench import client_task

    asked: list[int] = []
    real = trainer.dense_step

    def counting(*args):
        asked.append(1)
        return real(*args)

    def recorded(*args, **kwargs):
        tasks = record_tasks(*args, **kwargs)
        asked.clear()  # count the replays only
        return tasks

    record_tasks = client_task.record_tasks
    monkeypatch.setattr(client_task, "record_tasks", recorded)
    monkeypatch.setattr(trainer, "dense_step", counting)
    common = ["--tasks", "3", "--repeats", "3",
              "--json", str(tmp_path / "t.json"), "--markdown", str(tmp_path / "t.md")]
    plain = client_task.main(common)
    assert len(asked) == 3 * (1 + 3)  # a warm-up pass and 3 timed passes over 3 tasks, one training each
    report = client_task.main([*common, "--against-autograd"])
    assert len(asked) == 3 * (1 + 3)  # the same: the 3 autograd passes never asked for it
    assert trainer.dense_step is counting
    assert "autograd_passes_us" not in plain
    assert len(report["passes_us"]) == len(report["autograd_passes_us"]) == 3
    assert report["autograd_over_dense_paired_median"] > 0
