"""Equal-budget tuning and evaluation of strategies: ``python -m server_app.compare``.

    python -m server_app.compare [--run-config FILE] [--set key=value ...] [--nodes N]
        [--methods "fedavg,fedbuff[buffer-size=4],mypkg.mod:MyStrategy"] [--budget N] [--tune-seeds 0,1]
        [--eval-seeds 10,11,12,13,14] [--targets 0.8,0.9,0.95] [--score local-mean|local-min|average]
        [--design sobol|random]
        [--jobs J] [--search-seed S] [--metrics-db PATH] [--json OUT] [--markdown OUT] [--plot OUT.png] [--quick]

**What it does.** The scenario is fixed: the run config of ``--run-config``, ``--set`` (TOML syntax, as for
``server_app.simulate``) and ``--nodes``; its ``strategy`` and ``seed`` are replaced per run. For every method, a
search draws ``--budget`` settings (the same number for every method) from the method's ``search_space``, declared
beside its code (``strategies/tuning.py``; a ``module:Class`` strategy inherits the learning-rate space or declares
its own). Each setting runs once per tuning seed and is scored; the best-scored setting then runs once per
evaluation seed, and only those evaluation runs are reported. Tuning and evaluation seeds must be disjoint: a
setting is never graded on the runs it was picked on. The first trial of every search is the scenario's own values
(where they lie in the space), so tuning never ends on a setting worse, on the tuning seeds, than the untuned one.

**Methods with fixed settings.** An entry of ``--methods`` is ``NAME`` or ``NAME[KEY=VALUE;KEY=VALUE;...]``:
run-config values for that method only, e.g. ``"local-sgd,olco3[codec='topk';codec-ratio=0.01;error-feedback=true],
pipe-sgd[local-steps=1]"``. Brackets and ``;`` cannot occur in a ``module:Class`` name; values are TOML as for
``--set`` (bare text is a string), and commas, semicolons and brackets inside a quoted value do not split. The
method's label, its key in the JSON and its tag in the store, is the entry as written, or ``label='...'`` inside
the brackets; labels must differ, so one strategy may appear several times with different fixed settings. Fixed
keys are checked like ``--set`` (an unknown key gets a did-you-mean; exit 2), the run config with them is validated
as the method's own (``pipe-sgd`` needs ``local-steps = 1``), and they leave the method's search space. They may
not be ``strategy``, ``seed``, ``metrics-db``, ``resume``, ``clock``, ``max-time`` or ``target-accuracy``: the clock
and its budget are every method's. ``max-updates`` and ``eval-every`` may be fixed (a method whose update is one
SGD step needs more of them for the same computation); a note says so before the runs. A method whose fixed keys
cover its whole search space runs one tuning trial (more would repeat the same deterministic runs).

**Which accuracy** (``--score``, default ``local-mean``): the decentralized strategies publish the average of
their node models, which no node holds; ``local-mean`` scores the mean accuracy of the models the nodes hold,
``local-min`` the worst, ``average`` the published model (``server_app.compare_report``). A run without node models
(a star strategy) is scored on the published model whatever the choice. Every run's ``target-score`` is set to the
same choice, so a run that stops at ``target-accuracy`` stops on the score it is judged by, unless a method fixes
``target-score`` (a note says so); a scenario's own ``target-score`` is replaced (a note says so too). Every
"accuracy" below is this score.

**Objective** (lower is better). The objective's target is the middle one of ``--targets`` (sorted; the lower
middle for an even count). A tuning run that reaches it scores its time to it: the clock time (the run's clock, in
seconds) of its first evaluation with accuracy >= the target. A run that never reaches it scores
``H * (2 - final accuracy)``, with ``H`` = ``max-time``, or the run's own end time when ``max-time`` is 0: with
``max-time`` set this is worse than any run that reaches the target (all of them reach it by ``max-time``), and
among runs that miss it the more accurate one scores better. A trial's score is the mean over the tuning seeds; a
trial with a failed run is not scored (it still counts in the budget).

**Start-up design** (``--design``, default ``sobol``). TPE models the scores only after its first 10 trials, which
it draws at random; with a budget of a few trials per method that random phase is the whole search, and a few
random draws can all miss a method's stable range. With ``sobol`` those trials (after the scenario's own values)
are a scrambled Sobol sequence seeded with ``--search-seed``: points spread over every key's whole range (a
log-uniform key evenly in log space), the same points for every method with the same space. ``random`` keeps TPE's
own draws (the comparisons measured before the option existed).

**Why Optuna and not Ray Tune.** Optuna runs in this process with no cluster, no Ray and no scheduler; a
``TPESampler`` with a seed gives the same sequence of settings for the same sequence of scores, so a comparison is
a deterministic function of its seeds; and an equal budget is simply the same number of trials per method.
Ray Tune would add a cluster runtime, and its trial scheduling makes the order of results (hence TPE's next
suggestion) depend on timing.

**Determinism, also with --jobs > 1.** Every run is deterministic for its seed on the virtual clock. The search
advances in steps: in each step every method asks its study for one trial, the step's runs (methods x tuning
seeds) run (in this process for ``--jobs 1``, else on ``--jobs`` worker processes), and each study is told its
trial's score before the next step. The order of asks and tells never depends on ``--jobs`` or on timing, so the
report is the same for any ``--jobs``. Everything in the JSON but its ``run`` section (comparison and run ids, the
store, wall time) is a function of the command line.

**Store.** Every run is an ordinary run of the metrics store (``--metrics-db``, else the scenario's
``metrics-db``, else ``results/compare.db``), tagged in ``comparison_runs`` with its comparison, method, role
(``tune`` or ``eval``), seed and trial; ``comparisons`` holds the comparison itself and its final report.

**JSON** (``--json``): ``tune_seeds``, ``eval_seeds``, ``targets``, ``methods`` -> per method label ``trials``
(count), ``space`` (less the fixed keys), ``chosen`` (the chosen run-config values), ``strategy``, ``fixed`` (its
fixed settings, ``{}`` for none), ``eval`` (per evaluation seed: ``seed``, ``time_to`` per
target or null, ``final_accuracy``, ``bytes_up``, ``bytes_down``, ``wasted_compute``; see
``server_app.compare_report``), plus ``tuning`` (every trial), ``summary``, ``objective``, ``score`` (the
``--score`` choice), ``scenario``, ``search`` and ``run``.

Exit status: 0 done; 1 a run failed (the report is still written; the store says why); 2 bad command line or run
config (nothing runs); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import secrets
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server_app.app import validate
from server_app.compare_report import Outcome, markdown, plot, read_outcome, summarise
from server_app.simulate import check_fleet, default_config, merge_config, random_run_id, run_local
from server_app.store import MetricsStore
from strategies import get_strategy, parse_config
from strategies.config import MAX_INT, TARGET_SCORES, ConfigError, ConfigValue, RunConfig
from strategies.registry import registered
from strategies.tuning import Choice, IntRange, LogUniform, Param, Uniform, check_space, space_as_json

if TYPE_CHECKING:
    import optuna

DEFAULT_METHODS = "fedavg,fedasync,fedbuff"
DEFAULT_DB = Path("results") / "compare.db"
QUICK_TRIALS = 2
STARTUP = 10  # TPE's start-up trials (optuna's n_startup_trials default): drawn by --design
DESIGNS = ("sobol", "random")
QUICK_EVAL_SEEDS = 2
#: Tuning trials per method: TPE's gains flatten long before 10^4 trials, and each trial is several runs.
MAX_BUDGET = 10_000
#: Worker processes: each holds a model and a data set; more than a large machine's cores only thrashes.
MAX_JOBS = 256
PER_RUN_KEYS = ("strategy", "seed", "metrics-db")  # set per run by the harness, not part of the scenario
# Set for every run from --score (a method may fix it): the report states it as ``score``, not in ``scenario``.
SCORE_KEY = "target-score"
# Keys a method's fixed settings may not change: those the harness sets per run, and the scenario's clock and
# clock budget (max-time, target-accuracy: the objective's horizon and stop are the same for every method).
HARNESS_KEYS = frozenset({*PER_RUN_KEYS, "resume", "clock", "max-time", "target-accuracy"})
# Fixed keys that change what a method's budget counts (allowed: e.g. pipe-sgd's one-step periods need 10x the
# updates for the same computation); notes() says so before the runs.
BUDGET_KEYS = ("max-updates", "eval-every")


@dataclass(frozen=True)
class Method:
    """One entry of ``--methods``: its label, its strategy, its fixed settings and what is left to search.

    ``name`` is the strategy (a registered name or ``module:Class``); ``label`` names the method in the report and
    the store (the entry as written, or its ``label=``); ``fixed`` are run-config values set for this method only;
    ``space`` is the strategy's search space less the fixed keys.
    """

    name: str
    space: Mapping[str, Param]
    label: str = ""
    fixed: Mapping[str, ConfigValue] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)


@dataclass(frozen=True)
class Spec:
    """A comparison, as the command line asks for it (validated)."""

    scenario: dict[str, ConfigValue]
    nodes: int
    methods: tuple[Method, ...]
    budget: int
    tune_seeds: tuple[int, ...]
    eval_seeds: tuple[int, ...]
    targets: tuple[float, ...]
    search_seed: int
    db: Path
    jobs: int
    score: str = "local-mean"  # --score: which accuracy is read, and every run's target-score
    design: str = "sobol"      # --design: the start-up trials (see space_filling)

    @property
    def objective_target(self) -> float:
        """The middle target (the lower middle for an even count)."""
        return self.targets[(len(self.targets) - 1) // 2]

    def base(self, method: Method) -> dict[str, ConfigValue]:
        """The scenario as ``method`` runs it (:func:`scenario_for`), its target reading ``--score``'s accuracy."""
        return {**scenario_for(self.scenario, method.name), SCORE_KEY: self.score}

    def values(self, method: Method, seed: int, params: Mapping[str, ConfigValue]) -> dict[str, ConfigValue]:
        """The run config of one run."""
        return {**self.base(method), **method.fixed, **params, "strategy": method.name, "seed": seed,
                "metrics-db": str(self.db)}

    def changed(self) -> dict[str, ConfigValue]:
        """The scenario's keys that differ from the defaults (the per-run keys left out)."""
        defaults = default_config()
        return {k: v for k, v in sorted(self.scenario.items())
                if k not in (*PER_RUN_KEYS, SCORE_KEY) and defaults.get(k) != v}

    def as_json(self) -> dict[str, object]:
        """What the command line means, for the store's ``comparisons`` row."""
        return {"methods": [m.label for m in self.methods],
                "fixed": {m.label: dict(m.fixed) for m in self.methods if m.fixed}, "budget": self.budget,
                "tune_seeds": list(self.tune_seeds),
                "eval_seeds": list(self.eval_seeds), "targets": list(self.targets), "score": self.score,
                "nodes": self.nodes,
                "search_seed": self.search_seed, "design": self.design, "scenario": self.changed(), "jobs": self.jobs}


@dataclass(frozen=True)
class Job:
    """One run of the comparison (picklable: it may run in a worker process)."""

    method: str
    role: str  # tune | eval
    seed: int
    trial: int | None
    values: dict[str, ConfigValue]
    nodes: int
    run_id: int


def run_job(job: Job) -> str:
    """Run one job in this process: "" on success, else why it failed (the store marks the run failed too)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the ServerApp prints a summary per run
            run_local(job.values, nodes=job.nodes, run_id=job.run_id)
    except Exception as exc:  # a failed run is a result of the comparison, not the end of it
        return f"{type(exc).__name__}: {exc}"
    return ""


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # each run's clients already run on threads; one intra-op thread each
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


class Runner:
    """Runs a batch of jobs, in this process (``jobs == 1``: no pool) or on worker processes; results in order."""

    def __init__(self, jobs: int) -> None:
        self.pool = None
        if jobs > 1:  # spawn, not fork: torch and the client threads do not survive a fork safely
            self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker)

    def run(self, jobs: Sequence[Job]) -> list[str]:
        """Each job's error ("" for none), in the order of ``jobs`` whatever order they finish in."""
        if self.pool is None:
            return [run_job(j) for j in jobs]
        futures = [self.pool.submit(run_job, j) for j in jobs]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop the workers (pending jobs are cancelled)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Comparison:
    """One comparison in progress: the spec, the store, the runner, and every run made so far."""

    spec: Spec
    store: MetricsStore
    comparison_id: str
    runner: Runner
    quiet: bool = False

    def __post_init__(self) -> None:
        self.runs: list[dict[str, object]] = []
        self.failures: list[str] = []

    def execute(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Tag, run and read back a batch of runs."""
        for j in jobs:
            self.store.tag_run(str(j.run_id), self.comparison_id, j.method, j.role, j.seed, j.trial)
            self.runs.append({"run_id": str(j.run_id), "method": j.method, "role": j.role, "seed": j.seed,
                              "trial": j.trial})
        errors = self.runner.run(jobs)
        outcomes = []
        for j, err in zip(jobs, errors, strict=True):
            out = read_outcome(self.spec.db, str(j.run_id), self.spec.targets, self.spec.score)
            if err or out.status != "completed":
                why = err or out.error or out.status
                self.failures.append(f"{j.method} {j.role} seed {j.seed}: {why}")
                self.say(f"  run {j.run_id} ({j.method}, {j.role}, seed {j.seed}) failed: {why}")
                out = dataclasses.replace(out, status="failed", error=why)
            outcomes.append(out)
        return outcomes

    def say(self, line: str) -> None:
        """Progress on stderr."""
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def job(self, method: Method, role: str, seed: int, trial: int | None,
            params: Mapping[str, ConfigValue]) -> Job:
        """A new run of ``method`` with ``params`` on ``seed``."""
        return Job(method.label, role, seed, trial, self.spec.values(method, seed, params), self.spec.nodes,
                   random_run_id())

    # -------------------------------------------------------------------------------------------- tuning
    def tune(self) -> dict[str, dict[str, Any]]:
        """``budget`` steps; in each, one trial per method on every tuning seed. Returns each method's log.

        A method whose fixed settings leave nothing to search runs one trial only (its fixed setting): further
        trials would repeat the same deterministic runs.
        """
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        spec = self.spec
        studies = {m.label: self._study(m) for m in spec.methods}
        logs: dict[str, dict[str, Any]] = {m.label: {"trials": []} for m in spec.methods}
        for step in range(spec.budget):
            asked = {}
            jobs: list[Job] = []
            active = [m for m in spec.methods if m.space or step == 0]
            for m in active:
                trial = studies[m.label].ask()
                params = suggest(trial, m.space)
                asked[m.label] = (trial, params)
                jobs += [self.job(m, "tune", seed, trial.number, params) for seed in spec.tune_seeds]
            outcomes = iter(self.execute(jobs))
            for m in active:
                trial, params = asked[m.label]
                runs = [next(outcomes) for _ in spec.tune_seeds]
                entry = self._score(trial.number, params, runs)
                if entry["score"] is None:
                    studies[m.label].tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    studies[m.label].tell(trial, entry["score"])
                logs[m.label]["trials"].append(entry)
                reached = sum(r["time_to_objective"] is not None for r in entry["runs"])
                score = "failed" if entry["score"] is None else f"{entry['score']:.4g}"
                self.say(f"[{step + 1}/{spec.budget}] {m.label}: {_params(params) or '(nothing to tune)'} -> "
                         f"score {score} (reached {spec.objective_target:g} in {reached}/{len(runs)} tuning runs)")
        for m in spec.methods:
            scored = [t for t in logs[m.label]["trials"] if t["score"] is not None]
            best = min(scored, key=lambda t: (t["score"], t["trial"])) if scored else None
            logs[m.label]["chosen"] = best
        return logs

    def _study(self, method: Method) -> optuna.Study:
        import optuna

        study = optuna.create_study(direction="minimize",
                                    sampler=optuna.samplers.TPESampler(seed=self.spec.search_seed))
        base = self.spec.base(method)
        start = {k: base[k] for k, p in method.space.items() if k in base and p.contains(base[k])}
        if start:  # trial 0: the scenario's own values (those inside the space; the others are drawn)
            study.enqueue_trial(start)
        if self.spec.design == "sobol" and method.space:
            for point in space_filling(method.space, min(self.spec.budget, STARTUP) - bool(start),
                                       self.spec.search_seed):
                study.enqueue_trial(point)
        return study

    def _score(self, number: int, params: Mapping[str, ConfigValue], runs: Sequence[Outcome]) -> dict[str, Any]:
        target, horizon = self.spec.objective_target, float(self.spec.scenario["max-time"])
        per_run = []
        for seed, o in zip(self.spec.tune_seeds, runs, strict=True):
            score = None if o.status != "completed" else run_score(o, target, horizon)
            per_run.append({"seed": seed, "score": score, "time_to_objective": o.time_to[target],
                            "final_accuracy": o.final_accuracy, "end_time": o.end_time})
        scores = [r["score"] for r in per_run if r["score"] is not None]
        mean = math.fsum(scores) / len(scores) if len(scores) == len(per_run) else None
        return {"trial": number, "params": dict(params), "score": mean, "runs": per_run}

    # -------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, chosen: Mapping[str, Mapping[str, ConfigValue] | None]) -> dict[str, list[dict[str, Any]]]:
        """Every method with a chosen setting, once per evaluation seed."""
        jobs = [self.job(m, "eval", seed, None, chosen[m.label] or {}) for m in self.spec.methods
                if chosen[m.label] is not None for seed in self.spec.eval_seeds]
        self.say(f"evaluating {len(jobs)} runs ({len(self.spec.eval_seeds)} seeds per method)")
        entries: dict[str, list[dict[str, Any]]] = {m.label: [] for m in self.spec.methods}
        for j, out in zip(jobs, self.execute(jobs), strict=True):
            entries[j.method].append(out.entry(j.seed))
        return entries

    def report(self) -> dict[str, Any]:
        """Tune, evaluate, and assemble the JSON report (without its ``run`` section)."""
        import optuna

        spec = self.spec
        logs = self.tune()
        chosen = {name: (log["chosen"]["params"] if log["chosen"] else None) for name, log in logs.items()}
        evals = self.evaluate(chosen)
        methods = {}
        for m in spec.methods:
            best = logs[m.label]["chosen"]
            methods[m.label] = {
                "strategy": m.name, "fixed": dict(m.fixed), "trials": len(logs[m.label]["trials"]),
                "space": space_as_json(m.space), "chosen": chosen[m.label], "eval": evals[m.label],
                "chosen_trial": best["trial"] if best else None, "chosen_score": best["score"] if best else None,
                "summary": summarise(evals[m.label], spec.targets), "tuning": logs[m.label]["trials"],
            }
            if best is None:
                methods[m.label]["error"] = "every tuning trial failed: nothing was evaluated"
        return {
            "tune_seeds": list(spec.tune_seeds), "eval_seeds": list(spec.eval_seeds), "targets": list(spec.targets),
            "score": spec.score, "methods": methods, "budget": spec.budget, "nodes": spec.nodes,
            "scenario": spec.changed(),
            "objective": objective(spec),
            "search": {"library": f"optuna {optuna.__version__}", "sampler": "TPESampler", "seed": spec.search_seed,
                       "first_trial": "the scenario's own values of the space's keys (those inside its ranges)",
                       "design": spec.design, "startup_trials": STARTUP},
        }


def space_filling(space: Mapping[str, Param], n: int, seed: int) -> list[dict[str, ConfigValue]]:
    """``n`` settings of ``space`` from a scrambled Sobol sequence (seeded): the start-up trials of ``--design sobol``.

    TPE draws its first ``STARTUP`` trials at random, and with a budget of a few trials that is all a search does:
    six random learning rates may all miss the stable range of one method (measured: six draws between 0.035 and
    0.135, where async-SGD with 4 local steps needs about 0.01). A low-discrepancy sequence spreads the same number
    of trials over every key's whole range (a log range evenly in log space), so no method's budget is spent in one
    corner. Every method of a comparison gets the same points of its own space.
    """
    if n <= 0:
        return []
    import warnings

    from scipy.stats import qmc  # scikit-learn's dependency

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n need not be a power of 2 for a start-up design
        units = qmc.Sobol(d=len(space), scramble=True, seed=seed).random(n)
    return [{key: p.at(float(u)) for (key, p), u in zip(space.items(), row, strict=True)} for row in units]


def suggest(trial: optuna.Trial, space: Mapping[str, Param]) -> dict[str, ConfigValue]:
    """Draw one setting of ``space`` (in its declared order) from an Optuna trial."""
    out: dict[str, ConfigValue] = {}
    for key, p in space.items():
        if isinstance(p, LogUniform | Uniform):
            out[key] = trial.suggest_float(key, p.lo, p.hi, log=isinstance(p, LogUniform))
        elif isinstance(p, IntRange):
            out[key] = trial.suggest_int(key, p.lo, p.hi, log=p.log)
        elif isinstance(p, Choice):
            value = trial.suggest_categorical(key, list(p.options))
            assert value is not None, "a Choice holds run-config values, never None"
            out[key] = value
    return out


def run_score(outcome: Outcome, target: float, max_time: float) -> float:
    """One tuning run's score: its time to ``target``, else ``H * (2 - final accuracy)`` (module docstring)."""
    reached = outcome.time_to[target]
    if reached is not None:
        return reached
    horizon = max(max_time, outcome.end_time)
    return horizon * (2.0 - (outcome.final_accuracy or 0.0))


def objective(spec: Spec) -> dict[str, object]:
    """The objective, stated in the report."""
    target = spec.objective_target
    horizon = ("max-time" if float(spec.scenario["max-time"]) > 0 else
               "the run's own end time (max-time is 0: set it to make a miss always score worse than a hit)")
    return {"target": target, "direction": "minimize", "aggregate": "mean over the tuning seeds",
            "description": f"the mean over the tuning seeds of each run's time to accuracy {target:g} (the middle "
                           f"target; accuracy as --score {spec.score} reads it), in seconds on the run's clock; a run "
                           f"that never reaches it scores H * (2 - final accuracy), with H = {horizon}; a trial with "
                           "a failed run is not scored."}


def scenario_for(scenario: Mapping[str, ConfigValue], name: str) -> dict[str, ConfigValue]:
    """The scenario for strategy ``name``: other strategies' own keys left out, ``name``'s own at their defaults.

    A scenario file written for one strategy (``configs/abs.toml`` sets ``abs-mode``) is every method's scenario;
    its strategy's own hyperparameters mean nothing to another strategy, which would refuse them as unknown keys.
    """
    own = get_strategy(name).hyperparameters
    others = {k for c in registered().values() for k in c.hyperparameters} - set(own)
    return {**{k: spec.default for k, spec in own.items()}, **{k: v for k, v in scenario.items() if k not in others}}


# ------------------------------------------------------------------------------------------------ command line
def build_spec(args: argparse.Namespace) -> Spec:
    """Check everything before anything runs; ``ConfigError`` with a message for the user."""
    if not 1 <= args.budget <= MAX_BUDGET:
        raise ConfigError(f"--budget must be in [1, {MAX_BUDGET}], got {args.budget}")
    if not 1 <= args.jobs <= MAX_JOBS:
        raise ConfigError(f"--jobs must be in [1, {MAX_JOBS}], got {args.jobs}")
    check_fleet(args.nodes)
    if not 0 <= args.search_seed < 2**32:
        raise ConfigError(f"--search-seed must be in [0, 2**32), got {args.search_seed}")
    tune = _seeds("--tune-seeds", args.tune_seeds)
    evals = _seeds("--eval-seeds", args.eval_seeds)
    both = sorted(set(tune) & set(evals))
    if both:
        raise ConfigError(f"--tune-seeds and --eval-seeds overlap on {', '.join(map(str, both))}: a setting must not "
                          "be graded on the runs it was tuned on; give disjoint seed sets")
    budget = min(args.budget, QUICK_TRIALS) if args.quick else args.budget
    if args.quick:
        evals = evals[:QUICK_EVAL_SEEDS]
    targets = _targets(args.targets)
    if args.design not in DESIGNS:
        raise ConfigError(f"--design must be one of {', '.join(DESIGNS)}, got {args.design!r}: how the start-up "
                          "trials are drawn (a space-filling Sobol sequence, or TPE's random draws)")
    if args.score not in TARGET_SCORES:
        raise ConfigError(f"--score must be one of {', '.join(TARGET_SCORES)}, got {args.score!r}: which accuracy "
                          "the comparison reads (the node models' mean, the worst node model, or the average)")
    scenario = merge_config(args.run_config, args.set)
    scenario_cfg = parse_config(scenario)  # types and ranges of the scenario itself
    if args.nodes < scenario_cfg.min_nodes:
        raise ConfigError(f"--nodes {args.nodes} is fewer than min-nodes = {scenario_cfg.min_nodes}: every run would "
                          "wait for nodes that never come")
    db = Path(args.metrics_db or str(scenario.get("metrics-db") or "") or DEFAULT_DB).expanduser().resolve()
    entries = parse_methods(args.methods)
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--methods names a method twice: {args.methods} (give the variants different fixed "
                          "settings or a label=...)")
    methods = []
    for e in entries:
        cls = get_strategy(e.name)  # unknown name: ConfigError with the valid ones
        check_space(cls.search_space, e.name, cls.hyperparameters)
        fixed = check_fixed(e)
        cfg = parse_config({**scenario_for(scenario, e.name), SCORE_KEY: args.score, **fixed, "strategy": e.name,
                            "seed": tune[0], "metrics-db": str(db)})
        try:
            validate(cfg)  # stop condition, profiles, data, model: as simulate checks them
        except ConfigError as exc:
            raise ConfigError(f"{e.label}: {exc}") from exc
        if args.nodes < cfg.min_nodes:
            raise ConfigError(f"{e.label}: --nodes {args.nodes} is fewer than min-nodes = {cfg.min_nodes}")
        space = {k: p for k, p in cls.search_space.items() if k not in fixed}
        methods.append(Method(e.name, space, e.label, fixed))
    for out in (args.json, args.markdown, args.plot):
        if out:
            try:
                Path(out).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot write {out}: {exc}") from exc
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the metrics store's folder {db.parent}: {exc}") from exc
    return Spec(scenario=dict(scenario), nodes=args.nodes, methods=tuple(methods), budget=budget, tune_seeds=tune,
                eval_seeds=evals, targets=targets, search_seed=args.search_seed, db=db, jobs=args.jobs,
                score=args.score, design=args.design)


@dataclass(frozen=True)
class MethodArg:
    """One entry of ``--methods`` as written: its label, its strategy and its fixed ``key=value`` texts."""

    label: str
    name: str
    fixed: tuple[tuple[str, ConfigValue], ...]


def parse_methods(text: str) -> list[MethodArg]:
    """``--methods``: comma-separated ``NAME`` or ``NAME[KEY=VALUE;KEY=VALUE;...]`` (see the module docstring).

    Commas and semicolons inside brackets or quotes do not split, so a TOML value may hold them. The label is the
    entry as written (spaces around it stripped), or its ``label=...``.
    """
    items = [i.strip() for i in _split_top(text, ",", "--methods") if i.strip()]
    if not items:
        raise ConfigError("--methods is empty: name one or more strategies (registered names or module:Class)")
    return [_parse_method(item) for item in items]


def _parse_method(item: str) -> MethodArg:
    if "[" not in item:
        if "]" in item or "=" in item:
            raise ConfigError(f"--methods: {item!r} is not NAME or NAME[KEY=VALUE;...]")
        return MethodArg(item, item, ())
    name, _, rest = item.partition("[")
    name = name.strip()
    if not name or not rest.endswith("]"):
        raise ConfigError(f"--methods: {item!r} is not NAME[KEY=VALUE;...] (the fixed settings close the entry)")
    body = rest[:-1]
    parts = [p.strip() for p in _split_top(body, ";", f"--methods entry {item!r}")]
    if not any(parts):
        raise ConfigError(f"--methods: {item!r} has empty brackets: give KEY=VALUE pairs or drop the brackets")
    label, fixed = item, []
    seen: set[str] = set()
    for part in filter(None, parts):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"--methods {name}: expected KEY=VALUE, got {part!r}")
        if key in seen:
            raise ConfigError(f"--methods {name}: {key} is given twice")
        seen.add(key)
        value = _toml_value(raw.strip())
        if key == "label":
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"--methods {name}: label must be a non-empty string, got {raw.strip()!r}")
            label = value.strip()
        else:
            fixed.append((key, value))
    return MethodArg(label, name, tuple(fixed))


def _split_top(text: str, sep: str, where: str) -> list[str]:
    """Split ``text`` on ``sep`` outside brackets and TOML strings ('...' literal, "..." with backslash escapes)."""
    parts, start, depth, quote, escaped = [], 0, 0, "", False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"{where}: unmatched ']' in {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if quote:
        raise ConfigError(f"{where}: unterminated string in {text!r}")
    if depth:
        raise ConfigError(f"{where}: unmatched '[' in {text!r}")
    return [*parts, text[start:]]


def _toml_value(raw: str) -> ConfigValue:
    """A value as ``--set`` reads it: TOML, else the text itself (``codec=topk`` is the string "topk")."""
    try:
        value: ConfigValue = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return value


def check_fixed(entry: MethodArg) -> dict[str, ConfigValue]:
    """A method's fixed settings, held to the run config like ``--set`` (unknown key: did-you-mean)."""
    fixed = dict(entry.fixed)
    for key, value in fixed.items():
        if key in HARNESS_KEYS:
            raise ConfigError(f"--methods {entry.label}: {key} cannot be fixed per method (the harness sets "
                              f"{', '.join(sorted(HARNESS_KEYS))}; the scenario's clock and time budget are every "
                              "method's)")
        try:
            RunConfig.from_mapping({key: value}, get_strategy(entry.name).hyperparameters)
        except ConfigError as exc:
            raise ConfigError(f"--methods {entry.label}: {exc}") from exc
    return fixed


def notes(spec: Spec) -> list[str]:
    """What the user should know about the scenario before the runs start (nothing is refused here)."""
    out = []
    if float(spec.scenario["max-time"]) <= 0:
        out.append("max-time is 0, so a tuning run that misses the objective's target is scored on its own end "
                   "time; set max-time to make a miss always score worse than a hit")
    for m in spec.methods:
        changed = {k: m.fixed[k] for k in BUDGET_KEYS if k in m.fixed and m.fixed[k] != spec.scenario[k]}
        if changed:
            out.append(f"{m.label} fixes {', '.join(f'{k} = {v}' for k, v in changed.items())} (the scenario has "
                       f"{', '.join(f'{k} = {spec.scenario[k]}' for k in changed)}): its budget counts differently "
                       "from the other methods'")
        if SCORE_KEY in m.fixed and m.fixed[SCORE_KEY] != spec.score:
            out.append(f"{m.label} fixes {SCORE_KEY} = {m.fixed[SCORE_KEY]!r}: its runs stop at target-accuracy on "
                       f"that score, but are judged on --score {spec.score}")
        if not m.space:
            out.append(f"{m.label} fixes every key of its search space: it runs one tuning trial (its fixed "
                       "setting), not the budget's trials, which would repeat the same runs")
    own = spec.scenario.get(SCORE_KEY, spec.score)
    if own != spec.score and own != default_config().get(SCORE_KEY):
        out.append(f"the scenario's {SCORE_KEY} = {own!r} is replaced by --score {spec.score}: every run stops on "
                   "the score the comparison reads (give --score to choose it)")
    stop = float(spec.scenario["target-accuracy"])
    if 0 < stop < max(spec.targets):
        out.append(f"target-accuracy = {stop:g} stops every run there: targets above it are never reached and "
                   "final accuracies stop near it (--set target-accuracy=0 runs to the budget)")
    return out


def _seeds(flag: str, text: str) -> tuple[int, ...]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        seeds = tuple(int(s) for s in items)
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError(f"{flag} is empty")
    if any(not 0 <= s <= MAX_INT for s in seeds):
        raise ConfigError(f"{flag}: seeds are in [0, 2**63), got {text[:200]!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{flag} repeats a seed: {text!r}")
    return seeds


def _targets(text: str) -> tuple[float, ...]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        targets = [float(s) for s in items]
    except ValueError:
        raise ConfigError(f"--targets expects comma-separated accuracies in (0, 1], got {text!r}") from None
    if not targets:
        raise ConfigError("--targets is empty")
    bad = [t for t in targets if not (math.isfinite(t) and 0 < t <= 1)]
    if bad:
        raise ConfigError(f"--targets are accuracies in (0, 1], got {', '.join(map(str, bad))}")
    return tuple(sorted(set(targets)))


def _params(params: Mapping[str, ConfigValue]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        spec = build_spec(args)
        store = MetricsStore.open(spec.db)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in notes(spec):
        print(f"note: {note}", file=sys.stderr)
    import torch

    torch.set_num_threads(1)
    comparison_id = f"cmp-{secrets.token_hex(6)}"
    store.start_comparison(comparison_id, spec.as_json())
    started = time.time()
    runner = Runner(spec.jobs)
    cmp = Comparison(spec, store, comparison_id, runner, quiet=args.quiet)
    try:
        report = cmp.report()
    except KeyboardInterrupt:
        store.finish_comparison(comparison_id, "stopped")
        print("error: interrupted; the runs so far are in the store", file=sys.stderr)
        return 130
    except BaseException:
        store.finish_comparison(comparison_id, "failed")
        raise
    finally:
        runner.close()
    report["run"] = {"comparison_id": comparison_id, "metrics_db": str(spec.db), "jobs": spec.jobs,
                     "started_at": started, "wall_s": round(time.time() - started, 3), "failures": cmp.failures,
                     "runs": cmp.runs}
    store.finish_comparison(comparison_id, "failed" if cmp.failures else "completed", report)
    store.close()
    write_outputs(report, args.json, args.markdown, args.plot)
    if cmp.failures:
        print(f"error: {len(cmp.failures)} run(s) failed (first: {cmp.failures[0]}); see the store {spec.db}",
              file=sys.stderr)
        return 1
    return 0


def write_outputs(report: Mapping[str, Any], json_path: str | None, markdown_path: str | None,
                  plot_path: str | None) -> None:
    """The JSON, the Markdown (also printed) and the figure."""
    table = markdown(report)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    if markdown_path:
        Path(markdown_path).write_text(table + "\n")
    if plot_path:
        plot(report, plot_path)
    print(table)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server_app.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-config", metavar="FILE", help="TOML file of run-config keys: the scenario")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key (repeatable)")
    p.add_argument("--nodes", type=int, default=8, help="simulated nodes (default 8)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated registered names or module:Class, each optionally with fixed settings "
                        "NAME[KEY=VALUE;...] (TOML values; label='...' names it) "
                        f"(default {DEFAULT_METHODS})")
    p.add_argument("--budget", type=int, default=20, help="tuning trials per method, the same for all (default 20)")
    p.add_argument("--tune-seeds", default="0,1", help="seeds of the tuning runs (default 0,1)")
    p.add_argument("--eval-seeds", default="10,11,12,13,14", help="seeds of the evaluation runs, disjoint from "
                                                                  "the tuning seeds (default 10,11,12,13,14)")
    p.add_argument("--targets", default="0.8,0.9,0.95", help="accuracy targets; the middle one is the tuning "
                                                             "objective's (default 0.8,0.9,0.95)")
    p.add_argument("--score", default="local-mean",
                   help="which accuracy is read: local-mean (the mean of the models the nodes hold), local-min (the "
                        "worst of them) or average (the published model); runs without node models always read the "
                        "published model; every run's target-score is set to it (default local-mean)")
    p.add_argument("--design", default="sobol",
                   help=f"the first {STARTUP} trials of every search: sobol (a scrambled Sobol sequence over the "
                        "space, after the scenario's own values; default) or random (TPE's own random draws)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in worker processes (default 1: no pool)")
    p.add_argument("--search-seed", type=int, default=0, help="seed of every method's TPE sampler (default 0)")
    p.add_argument("--metrics-db", metavar="PATH", help="the metrics store of the runs (default: the scenario's "
                                                        f"metrics-db, else {DEFAULT_DB})")
    p.add_argument("--json", metavar="OUT", help="write the JSON report here")
    p.add_argument("--markdown", metavar="OUT", help="write the Markdown tables here (they are printed too)")
    p.add_argument("--plot", metavar="OUT.png", help="write the accuracy-against-clock figure here")
    p.add_argument("--quick", action="store_true", help=f"smoke test: at most {QUICK_TRIALS} trials and the first "
                                                        f"{QUICK_EVAL_SEEDS} evaluation seeds")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


if __name__ == "__main__":
    # Through the package's module, so that worker processes unpickle ``server_app.compare.run_job``.
    from server_app.compare import main as _main

    sys.exit(_main())
