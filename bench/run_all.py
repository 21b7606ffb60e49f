"""`make bench` and `make bench-extra`: every benchmark and reproduction of this repository, outputs under results/.

    python bench/run_all.py [--quick | --extra]

`make bench` (this script, no option; under 2 hours on 2 cores, measured in BENCHMARKS.md):

- bench.engine_overhead: our engine vs Flower's FedAvg.start on the same in-process Grid (BENCHMARKS.md)
- bench.server_link_cost: the engine's updates/s with the server's link on and off (BENCHMARKS.md)
- bench.contention_cost: AD-PSGD's updates/s with the contended network (locks, overlap, server link) on and off
- bench.codec_throughput: encode + decode throughput of every codec (BENCHMARKS.md)
- bench.dashboard_load: the dashboard's data-load time on stores of 1k, 10k and 100k updates (BENCHMARKS.md)
- bench.checkpoint_cost: what checkpoint-every costs (RELIABILITY.md)
- bench.fuzz_report: malformed inputs per target, rejected / accepted / crashes; the norm filter (RELIABILITY.md)
- bench.byzantine: FedAvg, FedBuff and FedAsync against hostile nodes, per aggregation rule (RELIABILITY.md)
- bench/local_executors.py: Leashed-SGD, HOGWILD!, lock-based and sequential local executors (BENCHMARKS.md)
- bench/leashed_sweep.py: Leashed-SGD's sweeps on the native executor, threads x persistence x step size (BENCHMARKS.md)
- bench.scale: 1,000 in-process nodes, memory over the run and updates/s (BENCHMARKS.md, RELIABILITY.md)
- bench.client_task: a ClientApp training task's CPU, real tasks replayed, against local steps through autograd
- server_app.compare --quick: FedAvg, FedAsync and FedBuff tuned with 2 trials each and evaluated on 2 seeds, on the
  straggler scenario (results/compare_quick.*; README "Comparing strategies")
- bench.comparisons: the tuned comparisons behind RESULTS.md, stragglers and the OLCO3 family, IID and
  Dirichlet(0.3) (results/compare/*)
- bench.olco3_plateau: OLCO3's final accuracy against local SGD's without the 93% stop (RESULTS.md)

`make bench-extra` (``--extra``): the reproductions RESULTS.md keeps from before the tuning harness, each section
saying what is unfair about it, the extra tuned comparison at D = 4, and the tuned ABS and AD-PSGD comparisons
(about 6 more hours):

- bench.olco3_delay: OLCO3 against its baselines as the delay grows, Fashion-MNIST, untuned (RESULTS.md)
- bench.abs_stragglers: ABS and the bounded-staleness family against stragglers, untuned (RESULTS.md)
- bench.abs_sweep: the sweep behind ABS's default schedule (RESULTS.md)
- bench.abs_restart: ABS with restarts as Flower runs them (restart = "finish") against free ones (RESULTS.md)
- bench.abs_adaptive: ABS's closed loop (abs-mode = "adaptive") against its clock schedule, untuned (RESULTS.md)
- bench.adpsgd_straggler: AD-PSGD against D-PSGD, AllReduce-SGD and async-SGD with one slow node (RESULTS.md)
- bench.comparisons olco3-iid-d4: the OLCO3 family at D = 4 under the harness (RESULTS.md)
- bench.comparisons gossip-*: AD-PSGD against D-PSGD, AllReduce-SGD and async-SGD, eight scenarios, tuned (about an
  hour), then bench.speedups gossip (RESULTS.md)
- bench.comparisons abs-*: ABS against seven methods, six scenarios, tuned (about three hours), then bench.speedups
  abs (RESULTS.md)
- bench/batched_executor.py: vmapped fleets against node-by-node training, local and end to end (BENCHMARKS.md)

``--quick`` runs every benchmark of both small, and only the quick form of the comparisons.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The tuned AD-PSGD and ABS comparisons (bench/comparisons.py names them; a test keeps these lists in step).
GOSSIP = [f"gossip-{p}-{t}" for p in ("iid", "dirichlet") for t in ("1x", "10x", "100x", "link10x")]
ABS = ["abs-u4", "abs-u1", "abs-48-dirichlet", "abs-pareto", "abs-u4-interrupt", "abs-u1-interrupt"]
# The comparison harness's smoke form on the straggler preset, run to 5 s of clock time (not to its 90% stop).
COMPARE_QUICK = ["--run-config", "configs/stragglers-fedbuff.toml", "--set", "target-accuracy=0", "--set",
                 "max-time=5", "--nodes", "10", "--methods", "fedavg,fedasync,fedbuff", "--quick", "--quiet",
                 "--metrics-db", "results/compare_quick.db", "--json", "results/compare_quick.json",
                 "--markdown", "results/compare_quick.md", "--plot", "results/compare_quick.png"]


def main() -> int:
    """Run each benchmark as its own process (clean imports and thread settings); stop at the first failure."""
    quick = "--quick" in sys.argv[1:]
    extra = "--extra" in sys.argv[1:]
    seeds = ["0"] if quick else ["0", "1"]
    core = [
        ["-m", "bench.engine_overhead", "--nodes", "100", "--rounds", "2" if quick else "5",
         "--repeats", "1" if quick else "3", "--json", "results/engine_overhead.json",
         "--markdown", "results/engine_overhead.md"],
        ["-m", "bench.server_link_cost", "--nodes", "100" if quick else "1000", "--updates", "200" if quick else "2000",
         "--repeats", "1" if quick else "5", "--json", "results/server_link_cost.json",
         "--markdown", "results/server_link_cost.md"],
        ["-m", "bench.contention_cost", "--updates", "200" if quick else "1500", "--repeats", "1" if quick else "3",
         "--json", "results/contention_cost.json", "--markdown", "results/contention_cost.md"],
        ["-m", "bench.codec_throughput", "--json", "results/codec_throughput.json"],
        ["-m", "bench.dashboard_load", "--json", "results/dashboard_load.json", "--markdown",
         "results/dashboard_load.md"],
        ["-m", "bench.checkpoint_cost", "--repeats", "1" if quick else "3", "--out", "results/checkpoint_cost.md"],
        ["-m", "bench.fuzz_report", "--n", "200" if quick else "2000", "--json", "results/fuzz_report.json",
         "--markdown", "results/fuzz_report.md"],
        ["-m", "bench.byzantine", *(["--quick"] if quick else []), "--json", "results/byzantine.json",
         "--markdown", "results/byzantine.md"],
        ["bench/local_executors.py", *(["--quick"] if quick else []), "--json", "results/local_executors.json"],
        ["bench/leashed_sweep.py", *(["--quick"] if quick else []), "--json", "results/leashed_sweep.json",
         "--markdown", "results/leashed_sweep.md", "--plot", "results/leashed_sweep.png"],
        ["-m", "bench.scale", "--updates", "1000,4000" if quick else "5000,20000", "--json", "results/scale.json",
         "--markdown", "results/scale.md"],
        ["-m", "bench.client_task", "--against-autograd", *(["--tasks", "20", "--repeats", "3"] if quick else []),
         "--json", "results/client_task.json", "--markdown", "results/client_task.md"],
        ["-m", "server_app.compare", *COMPARE_QUICK],
        *([] if quick else [["-m", "bench.comparisons"], ["-m", "bench.olco3_plateau"]]),
    ]
    extras = [
        ["-m", "bench.olco3_delay", "--seeds", *seeds, "--out", "results/olco3_delay"],
        ["-m", "bench.abs_stragglers", "--seeds", *seeds, "--out", "results/abs_stragglers"],
        ["-m", "bench.abs_sweep", "--seed", "0", "--out", "results/abs_sweep.md"],
        ["-m", "bench.abs_restart", "--seeds", *(seeds if quick else ["0", "1", "2", "3", "4"]), "--out",
         "results/abs_restart"],
        ["-m", "bench.abs_adaptive", "--seeds", *(seeds if quick else ["0", "1", "2", "3", "4"]), "--out",
         "results/abs_adaptive"],
        ["-m", "bench.adpsgd_straggler", "--seeds", *seeds, "--slowdowns",
         *(["1", "10"] if quick else ["1", "2", "10", "100"]), "--out", "results/adpsgd_straggler"],
        *([] if quick else [["-m", "bench.comparisons", "olco3-iid-d4"],
                            ["-m", "bench.comparisons", *GOSSIP],
                            ["-m", "bench.speedups", "gossip", "--out", "results/compare/gossip-speedups.md"],
                            ["-m", "bench.comparisons", *ABS],
                            ["-m", "bench.speedups", "abs", "--out", "results/compare/abs-summary.md"]]),
        ["bench/batched_executor.py", *(["--quick"] if quick else ["--nodes", "100", "1000", "10000"]), "--json",
         "results/batched_executor.json", "--markdown", "results/batched_executor.md"],
    ]
    runs = extras if extra else [*core, *extras] if quick else core
    if not extra:
        (ROOT / "results" / "compare_quick.db").unlink(missing_ok=True)  # a fresh store, as the other benchmarks
    start = time.monotonic()
    for args in runs:
        print("$ python", " ".join(args), flush=True)
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, *args], cwd=ROOT).returncode
        print(f"# {time.monotonic() - t0:.0f} s ({(time.monotonic() - start) / 60:.1f} min in all)", flush=True)
        if rc != 0:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
