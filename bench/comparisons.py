"""The tuned comparisons behind RESULTS.md, each one ``python -m server_app.compare`` command.

    python -m bench.comparisons                 # run the comparisons ``make bench`` runs (all but the extras)
    python -m bench.comparisons olco3-iid-d4    # run some of them, by name
    python -m bench.comparisons --all           # every comparison, extras included
    python -m bench.comparisons --list          # their names
    python -m bench.comparisons --print NAME    # the command, as RESULTS.md prints it above its tables

One list, so that the command printed in RESULTS.md, the one ``make bench`` runs and the one a reader re-runs are
the same (``tests/test_bench_comparisons.py`` checks RESULTS.md against this list, and that every command passes
the harness's own checks: methods, settings and disjoint seeds). Every comparison is deterministic for its seeds,
whatever ``--jobs`` is, so ``--jobs 2`` only changes the wall time.

Budgets: 6 trials per method on tuning seeds 0-1, then evaluation seeds 10-14, targets 0.85 / 0.9 / 0.93. Measured
wall times (in each JSON under ``run.wall_s``) in one ``make bench`` on 2 busy cores (BENCHMARKS.md): stragglers 4 min
(IID) and 6 min (Dirichlet), OLCO3 IID 16 min and Dirichlet 31 min; OLCO3 IID at D = 4 35 min (beside another
comparison).

``make bench`` has 2 hours on 2 cores for everything it runs, so the D = 4 comparison is an extra: RESULTS.md prints
its command and ``python -m bench.comparisons olco3-iid-d4`` (or ``--all``) re-runs it. So are the ABS comparisons
(``abs-*``: eight methods, five scenarios, 88 runs each) and the AD-PSGD comparisons (``gossip-*``: four methods,
eight scenarios, 44 runs each), which score each trial on one tuning seed (0) to fit in hours; ``python -m
bench.speedups abs`` and ``python -m bench.speedups gossip`` turn their reports into the summary tables of
RESULTS.md.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = "results/compare"

# Honest fleets: the comparisons measure the algorithms, not the outlier filter (whose default clips about 1% of
# honest updates at norm-multiplier 3, RELIABILITY.md), so they run without it, as they were first measured.
HONEST = ["--set", "update-filter='none'"]
# The OLCO3 comparisons were measured before the clock charged the overlap these methods declare (every method but
# local-sgd hides its upload behind its next period): they pin the sequential charge, which favours local-sgd.
SEQUENTIAL = ["--set", "overlap=false"]
# These comparisons were measured before the harness's space-filling start-up design: they pin TPE's random draws.
SEEDS = ["--budget", "6", "--tune-seeds", "0,1", "--eval-seeds", "10,11,12,13,14", "--targets", "0.85,0.9,0.93",
         "--design", "random", "--jobs", "2"]

# FedAvg, FedAsync and FedBuff against stragglers: the straggler preset, stopped at 93% or 30 s of virtual time.
STRAGGLERS = ["--run-config", "configs/stragglers-fedbuff.toml", "--nodes", "10", "--set", "dirichlet-alpha=0.3",
              "--set", "max-time=30.0", "--set", "target-accuracy=0.93", "--set", "max-updates=0",
              "--methods", "fedavg,fedasync,fedbuff", *HONEST]

# The OLCO3 family at D = 2 (and D = 4 IID): digits MLP, 8 laptops on 4G, 10 local steps per period. Compressed
# methods use top-k 1% with error feedback on the uplink; "olco3-two-way" compresses the downlink too. Pipe-SGD runs
# one step per period, so it gets 10x the periods (the same number of SGD steps), and the same compression as OLCO3.
TOPK = "codec='topk';codec-ratio=0.01;error-feedback=true"


def _olco3(partition: str, periods: int, delay: int = 2) -> list[str]:
    updates = periods * 8
    methods = ",".join([
        "local-sgd", "naive-overlap", "cocod-sgd", "overlap-local-sgd", f"olco3[{TOPK}]",
        f"olco3-staleness-only[{TOPK}]", f"olco3[{TOPK};codec-downlink='topk';label='olco3-two-way']",
        f"pipe-sgd[local-steps=1;max-updates={updates * 10};eval-every={updates // 10};{TOPK}]",
    ])
    alpha = ["--set", "dirichlet-alpha=0.3"] if partition == "dirichlet" else []
    return ["--set", "dataset=digits", "--set", "model=mlp", "--set", "profiles='laptop/4g=1'",
            "--set", "local-steps=10", "--set", f"delay={delay}", "--set", f"max-updates={updates}",
            "--set", f"eval-every={updates // 100}", "--set", "target-accuracy=0.93",
            "--set", f"max-time={periods // 2}", "--set", f"partition='{partition}'", *alpha, "--nodes", "8",
            "--methods", methods, *HONEST, *SEQUENTIAL]


# ABS against the bounded-staleness family and FedBuff (configs/abs.toml: 16 laptops on ethernet, 1 + Exp(1) per local
# step, two 5x stragglers). Every method is tuned (ABS's closed-loop knobs included); abandoned tasks run to their end
# (restart = "finish", what Flower does) unless the name says "interrupt". Targets up to 95%, stopped at 3 s of
# virtual time (1.5 s at U = 1, where tasks are 4x shorter) or 6,000 updates. Eight methods and five scenarios: to
# fit the runs into hours, each trial is scored on one tuning seed (0) instead of two.
ABS_METHODS = ("abs[abs-mode='adaptive';label='abs'],async-sgd,k-async,k-batch-async,k-sync,ssp,adasync,fedbuff")
GOSSIP_SEEDS = ["--budget", "6", "--tune-seeds", "0", "--eval-seeds", "10,11,12,13,14", "--targets", "0.85,0.9,0.93",
                "--jobs", "2"]
ABS_SEEDS = ["--budget", "6", "--tune-seeds", "0", "--eval-seeds", "10,11,12,13,14", "--targets", "0.85,0.9,0.95",
             "--jobs", "2"]


def _abs(steps: int = 4, restart: str = "finish", nodes: int = 16, *extra: str) -> list[str]:
    return ["--run-config", "configs/abs.toml", "--nodes", str(nodes), "--set", f"local-steps={steps}",
            "--set", f"restart='{restart}'", "--set", "target-accuracy=0.95", "--set", "max-updates=6000",
            "--set", f"max-time={3.0 if steps > 1 else 1.5}", *extra, "--methods", ABS_METHODS, *HONEST]


# AD-PSGD against D-PSGD (ring, as Lian et al. 2017), AllReduce-SGD (the faster of ring and halving/doubling) and
# async-SGD on a parameter server that is one more machine of the cluster (1 Gbit/s, like the workers' ethernet):
# configs/ad-psgd.toml (16 laptops on ethernet, one SGD step of 32 examples per task), one node 1x, 10x or 100x
# slower, or one node's link 10x slower; scored on what the nodes hold (the harness's default, --score local-mean).
GOSSIP_METHODS = ("ad-psgd[topology='bipartite-exponential';label='ad-psgd'],d-psgd[topology='ring';label='d-psgd'],"
                  "allreduce-sgd,async-sgd")


def _gossip(partition: str, slow_node: float = 1.0, slow_link: float = 1.0) -> list[str]:
    alpha = ["--set", "dirichlet-alpha=0.3"] if partition == "dirichlet" else []
    link = ["--set", "slow-link-fraction=0.0625", "--set", f"slow-link-factor={slow_link:g}"] if slow_link > 1 else []
    return ["--run-config", "configs/ad-psgd.toml", "--nodes", "16", "--set", f"straggler-slowdown={slow_node:g}",
            *link, "--set", f"partition='{partition}'", *alpha, "--set", "server-bandwidth=1000.0",
            "--set", "server-latency=0.25", "--set", "target-accuracy=0.93", "--set", "max-updates=2000",
            "--set", "max-time=30.0", "--methods", GOSSIP_METHODS, *HONEST]


def _outputs(name: str) -> list[str]:
    return ["--metrics-db", f"{OUT}/{name}.db", "--json", f"{OUT}/{name}.json", "--markdown", f"{OUT}/{name}.md",
            "--plot", f"{OUT}/{name}.png"]


COMPARISONS: dict[str, list[str]] = {
    "stragglers-iid": [*STRAGGLERS, "--set", "partition='iid'", *SEEDS, *_outputs("stragglers-iid")],
    "stragglers-dirichlet": [*STRAGGLERS, "--set", "partition='dirichlet'", *SEEDS,
                             *_outputs("stragglers-dirichlet")],
    "olco3-iid": [*_olco3("iid", 100), *SEEDS, *_outputs("olco3-iid")],
    "olco3-dirichlet": [*_olco3("dirichlet", 200), *SEEDS, *_outputs("olco3-dirichlet")],
    "olco3-iid-d4": [*_olco3("iid", 100, delay=4), *SEEDS, *_outputs("olco3-iid-d4")],
    "abs-u4": [*_abs(4), *ABS_SEEDS, *_outputs("abs-u4")],
    "abs-u1": [*_abs(1), *ABS_SEEDS, *_outputs("abs-u1")],
    # 48 nodes, a third of them 8x slower, Dirichlet(0.3) labels.
    "abs-48-dirichlet": [*_abs(4, "finish", 48, "--set", "straggler-fraction=0.3334", "--set", "straggler-slowdown=8.0",
                                "--set", "partition='dirichlet'", "--set", "dirichlet-alpha=0.3"),
                         *ABS_SEEDS, *_outputs("abs-48-dirichlet")],
    # Heavy-tailed compute: Pareto of shape 2 per task (infinite variance), no persistent stragglers.
    "abs-pareto": [*_abs(4, "finish", 16, "--set", "compute-dist='pareto'", "--set", "straggler-fraction=0.0"),
                   *ABS_SEEDS, *_outputs("abs-pareto")],
    "abs-u4-interrupt": [*_abs(4, "interrupt"), *ABS_SEEDS, *_outputs("abs-u4-interrupt")],
    "abs-u1-interrupt": [*_abs(1, "interrupt"), *ABS_SEEDS, *_outputs("abs-u1-interrupt")],
    **{f"gossip-{p}-{tag}": [*_gossip(p, node, link), *GOSSIP_SEEDS, *_outputs(f"gossip-{p}-{tag}")]
       for p in ("iid", "dirichlet")
       for tag, node, link in (("1x", 1.0, 1.0), ("10x", 10.0, 1.0), ("100x", 100.0, 1.0), ("link10x", 1.0, 10.0))},
}
# Not run by ``make bench`` (its time budget); run by name or with --all.
EXTRAS = frozenset({"olco3-iid-d4", *(n for n in COMPARISONS if n.startswith(("abs-", "gossip-")))})


def _quote(word: str) -> str:
    """Double quotes where a word needs quoting and has no double quote, dollar, backtick or backslash."""
    if shlex.quote(word) == word or any(c in word for c in '"$`\\'):
        return shlex.quote(word)
    return f'"{word}"'


def command(name: str) -> str:
    """The shell command of one comparison, wrapped between options like the blocks in RESULTS.md."""
    argv = COMPARISONS[name]
    units = ["python -m server_app.compare"]
    i = 0
    while i < len(argv):  # an option and its value stay on one line
        take = 2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else 1
        units.append(" ".join(_quote(w) for w in argv[i:i + take]))
        i += take
    lines, line = [], ""
    for unit in units:
        if line.strip() and len(line) + len(unit) > 110:
            lines.append(line + " \\")
            line = "   "
        line += f" {unit}" if line else unit
    return "\n".join([*lines, line])


def run(name: str) -> int:
    """Run one comparison from a fresh metrics store (the harness appends to an existing one)."""
    for suffix in ("", "-wal", "-shm"):
        (ROOT / OUT / f"{name}.db{suffix}").unlink(missing_ok=True)
    print(f"$ {command(name)}", flush=True)
    return subprocess.run([sys.executable, "-m", "server_app.compare", "--quiet", *COMPARISONS[name]],
                          cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; an unknown name is exit 2."""
    p = argparse.ArgumentParser(prog="python -m bench.comparisons", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"comparisons to run (default: all but {', '.join(sorted(EXTRAS))})")
    p.add_argument("--all", action="store_true", help="run every comparison, the extras too")
    p.add_argument("--list", action="store_true", help="print the names and exit")
    p.add_argument("--print", dest="show", metavar="NAME", help="print one comparison's command and exit")
    args = p.parse_args(argv)
    unknown = [n for n in [*args.names, *([args.show] if args.show else [])] if n not in COMPARISONS]
    if unknown:
        print(f"error: unknown comparison {', '.join(unknown)}; known: {', '.join(COMPARISONS)}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(COMPARISONS))
        return 0
    if args.show:
        print(command(args.show))
        return 0
    default = [n for n in COMPARISONS if args.all or n not in EXTRAS]
    for name in args.names or default:
        rc = run(name)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
