"""The in-process runner: ``python -m server_app.simulate``.

Runs the same ServerApp and ClientApp code as ``flwr run`` (or the user's own ClientApp) in one process, with no
Ray and no SuperLink, writes the metrics store, prints a short summary, and exits 0 on success, 1 when the run
failed, 2 for a bad command line or run config, and 128 + the signal's number when stopped by SIGINT (130),
SIGTERM (143) or SIGHUP (129).

    python -m server_app.simulate [--run-config FILE|PAIRS ...] [--set key=value ...] [--nodes N]
                                  [--clientapp MODULE:ATTR] [--workers N] [--executor thread|process]
                                  [--resume RUN_ID] [--quiet] [--check]

``--run-config`` takes what ``flwr run --run-config`` takes, a TOML file or ``"key=value key=value"`` pairs, and
may be repeated (later ones win): a preset and its overrides. ``--set`` values use the same TOML syntax
(``--set strategy='"fedavg"'``); a value that is not valid TOML is taken as a plain string (``--set
strategy=fedavg``). ``--check`` validates all of it (keys, values, fleet, data, model) and runs nothing; with
``--print-run-config`` it also prints the merged overrides as one ``flwr run --run-config`` string
(``scripts/flwr_run.sh`` checks ``make run`` this way before it starts a SuperLink).

On a terminal a progress bar shows the run (``server_app/progress.py``); otherwise a progress line at each tenth
of the run; ``--quiet`` shows only the summary. torch and Flower are imported after the command line is read:
``--help`` and a mistyped key answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import secrets
import sqlite3
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from flwr.app import Context

    from server_app.local_grid import ClientAppLike, Executor
    from server_app.progress import Reporter
    from server_app.state import RunSummary
    from strategies.config import ConfigValue, RunConfig

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
#: The most nodes one process simulates (``--nodes``, here and in ``server_app.compare``): bench.scale runs 1,000
#: (2 updates in 11 s on 2 cores), while 3,000 had not finished starting after minutes. Deployments have no such
#: cap: their fleet keys stop at strategies.config.MAX_NODES.
MAX_SIM_NODES = 1000
#: Client threads of the in-process runner: more than the nodes or the cores only adds contention.
MAX_WORKERS = 256
#: The ClientApp of a run that names none.
DEFAULT_CLIENTAPP = "client_app.app:app"
#: The largest run-config file read: presets are about 1 KB; a bigger file is a wrong path.
MAX_RUN_CONFIG_BYTES = 1 << 20


def default_config(app: str | Path | None = None) -> dict[str, ConfigValue]:
    """``[tool.flwr.app.config]`` of pyproject.toml: the defaults ``flwr run`` uses too; then the app's.

    Installed from a wheel there is no pyproject.toml beside the packages; ``RunConfig``'s own defaults are the
    same values (``tests/test_config.py`` keeps the two in step). A strategy's own keys, which the table declares
    too, are left to ``strategies.parse_config``: a run gets only its own strategy's. ``app`` is a user's Flower
    app directory (what ``flwr run DIR`` takes): its ``[tool.flwr.app.config]`` sets defaults of ours and declares
    its own keys.
    """
    from strategies.config import RunConfig

    ours = RunConfig().to_mapping()
    if PYPROJECT.is_file():
        with PYPROJECT.open("rb") as fh:
            table = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
        # The strategies' own keys that the table also declares (for flwr run) come with the run's strategy only.
        ours = {k: v for k, v in table.items() if k in ours}
    return {**ours, **app_config(app)}


def app_config(app: str | Path | None) -> dict[str, ConfigValue]:
    """The ``[tool.flwr.app.config]`` table of ``app``'s pyproject.toml ({} for no app); a bad one is a ConfigError."""
    if app is None:
        return {}
    from strategies.config import ConfigError

    project = Path(app) / "pyproject.toml"
    table = read_toml(str(project)) if Path(app).is_dir() else None
    if table is None:
        raise ConfigError(f"--app {app}: not a directory")
    config = table.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    if not isinstance(config, Mapping):
        raise ConfigError(f"{project}: [tool.flwr.app.config] must be a table")
    return dict(_flatten(config))


def app_component(app: str | Path, name: str) -> str | None:
    """``[tool.flwr.app.components]``'s ``clientapp`` or ``serverapp`` of ``app``'s pyproject.toml."""
    table = read_toml(str(Path(app) / "pyproject.toml"))
    value = table.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get(name)
    return value if isinstance(value, str) else None


def merge_config(file: str | Sequence[str] | None = None, sets: list[str] | None = None,
                 overrides: Mapping[str, ConfigValue] | None = None,
                 app: str | Path | None = None) -> dict[str, ConfigValue]:
    """Defaults (ours, then the app's), then run configs, then ``key=value`` pairs, then a mapping.

    Checked whole, with the strategy's hyperparameters and the app's keys declared, and returned complete (every
    declared key with its value or default). An unknown key is a ``ConfigError`` with a did-you-mean hint
    (``RunConfig.from_mapping``).
    """
    from strategies import parse_config
    from strategies.config import app_keys

    values = default_config(app)
    for layer in [*run_config_layers(file), dict(_parse_set(s) for s in sets or []), dict(overrides or {})]:
        values.update(layer)
    cfg = parse_config(values, app_keys(app_config(app)))
    return {**values, **cfg.extra}


def run_config_layers(file: str | Sequence[str] | None) -> list[dict[str, ConfigValue]]:
    """What ``--run-config`` items say, one mapping each: a TOML file, or ``flwr run``'s ``key=value`` pairs.

    As ``flwr run --run-config``: an item ending in ``.toml``, or naming a file, or without ``=``, is a file;
    otherwise it is space-separated ``key=value`` pairs whose values may be quoted (``strategy='fedavg'
    lr=0.01``).
    """
    items = [file] if isinstance(file, str) else list(file or [])
    layers: list[dict[str, ConfigValue]] = []
    for item in items:
        if not item:
            continue
        if item.endswith(".toml") or "=" not in item or Path(item).is_file():
            layers.append(_flatten(read_toml(item)))
        else:
            layers.append(dict(_parse_set(pair) for pair in split_pairs(item)))
    return layers


#: ``flwr run --run-config``'s own pattern for a ``key=value`` pair (flwr.common.config.parse_config_args).
_PAIR = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def split_pairs(text: str) -> list[str]:
    """``"a=1 b='x y'"`` -> ``["a=1", "b='x y'"]``, as ``flwr run`` splits them; anything else is a ``ConfigError``."""
    from strategies.config import ConfigError

    pairs = [f"{k}={v}" for k, v in _PAIR.findall(text)]
    rest = _PAIR.sub(" ", text).split()
    if rest:
        raise ConfigError(f"run config {text!r}: expected space-separated KEY=VALUE pairs, got {rest[0]!r}")
    return pairs


def flwr_run_config(values: Mapping[str, ConfigValue]) -> str:
    """``values`` as one ``flwr run --run-config`` string (TOML values Flower's pattern splits back the same)."""
    from strategies.config import ConfigError

    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif "'" not in value and "\n" not in value:
            text = f"'{value}'"
        elif '"' not in value:
            text = json.dumps(value)  # a TOML basic string
        else:
            raise ConfigError(f"{key}: a value with both kinds of quotes cannot be passed to flwr run")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def read_toml(file: str) -> dict[str, Any]:
    """A run-config file's table; a missing, unreadable, oversized or malformed file is a ``ConfigError``.

    The message quotes tomllib's position and reason (which cites at most one character), not the file's text.
    """
    from strategies.config import ConfigError

    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"run-config file not found: {file}")
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_RUN_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read run-config file {file}: {exc.strerror}") from None
    if len(data) > MAX_RUN_CONFIG_BYTES:
        raise ConfigError(f"run-config file {file} is larger than {MAX_RUN_CONFIG_BYTES} bytes: not a run config")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"run-config file {file} is not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"run-config file {file} is not valid TOML: {str(exc)[:200]}") from None


def check_fleet(nodes: int, workers: int = 1) -> None:
    """``--nodes`` and ``--workers`` of the in-process runner, in range (``MAX_SIM_NODES``, ``MAX_WORKERS``)."""
    from strategies.config import ConfigError

    if not 1 <= nodes <= MAX_SIM_NODES:
        raise ConfigError(f"--nodes must be in [1, {MAX_SIM_NODES}] (the in-process runner's limit), got {nodes}")
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be in [1, {MAX_WORKERS}], got {workers}")


def random_run_id() -> int:
    """A fresh run id in [2**62, 2**63): always a 9-byte varint on the wire.

    Every message's metadata carries the run id, so with ids of any size the stored wire sizes (``bytes_up``,
    ``bytes_down``) of two runs of the same seed would differ by a byte per message, one run in 128.
    """
    return 2**62 + secrets.randbits(62)


def run_local(values: Mapping[str, ConfigValue], *, nodes: int = 8, clientapp: ClientAppLike | str | None = None,
              workers: int = 2, reorder_seed: int | None = None, run_id: int | None = None,
              reporter: Reporter | None = None, app: str | Path | None = None,
              executor: Executor = "thread") -> RunSummary:
    """Run one experiment in-process on a ``LocalGrid`` and return its summary.

    ``reporter`` shows its progress (``server_app/progress.py``); by default the run says nothing until its
    summary. ``app``: the user's Flower app directory whose ``[tool.flwr.app.config]`` declares the keys its
    ClientApp reads (``merge_config``). ``executor``: clients on ``workers`` threads of this process, or in
    ``workers`` processes (``clientapp`` then an import path ``"module:attr"`` or a picklable callable).
    """
    from server_app import progress
    from server_app.app import app as server_app
    from server_app.local_grid import LocalGrid
    from server_app.state import RunSummary
    from strategies import parse_config
    from strategies.config import app_keys

    cfg = parse_config(values, app_keys(app_config(app)))
    if clientapp is None:
        clientapp = DEFAULT_CLIENTAPP
    run_id = run_id if run_id is not None else random_run_id()
    grid = LocalGrid(clientapp, nodes, cfg.to_mapping(), run_id=run_id, workers=workers,
                     reorder_seed=reorder_seed, executor=executor)
    context = server_context(run_id, cfg.to_mapping())
    try:
        with progress.reporting(reporter or progress.Reporter()):
            server_app(grid, context)  # the very ServerApp that `flwr run` starts
    finally:
        grid.close()
    weights = context.state.array_records["final-weights"].to_numpy_ndarrays()
    return RunSummary.from_config(dict(context.state.config_records["summary"]), weights)


def resume_config(values: Mapping[str, ConfigValue], run_id: str) -> tuple[dict[str, ConfigValue], int]:
    """The config and fleet size of a stored run, to resume it; ``values`` may change only its stop conditions.

    The store is the one ``values`` names (``metrics-db``, else the default); the nodes are as many as the run had.
    """
    from server_app.app import RESUMABLE_CHANGES
    from server_app.store import stored_run
    from strategies import get_strategy, parse_config
    from strategies.config import ConfigError

    path = parse_config(values, lenient=True).metrics_path()
    if not path.is_file():
        raise ConfigError(f"--resume {run_id}: no metrics store at {path} (set metrics-db)")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            run = stored_run(db, run_id)
    except sqlite3.Error as exc:
        raise ConfigError(f"--resume {run_id}: cannot read the metrics store {path}: {exc}") from None
    if run is None:
        raise ConfigError(f"--resume {run_id}: no such run in {path}")
    stored, nodes = run
    stored.setdefault("target-score", "average")  # a run stored before the key existed: its target read the average
    defaults = default_config()
    stops = {k: v for k, v in values.items() if k in RESUMABLE_CHANGES and v != defaults.get(k)}
    resumed = {**stored, **stops, "metrics-db": str(path), "resume": run_id}
    cfg = parse_config(resumed, lenient=True)
    if why := get_strategy(cfg.strategy).node_state_reason(cfg):
        raise ConfigError(f"--resume {run_id}: {why}, and the in-process runner's nodes died with it; such a run "
                          "resumes exactly only in deployment, where SuperNodes keep their state")
    return resumed, nodes


def server_context(run_id: int, values: Mapping[str, ConfigValue]) -> Context:
    """The Context the ServerApp would get from Flower."""
    from flwr.app import Context, RecordDict

    return Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(values))


def load_object(path: str) -> object:
    """Import ``package.module:attr``."""
    from strategies.config import ConfigError

    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ConfigError(f"expected MODULE:ATTR, got {path!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load {path!r}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    SIGINT, SIGTERM and SIGHUP stop the run (recorded ``stopped`` with the signal's name, rows so far kept) and
    exit with the shell's code for the signal (130, 143, 129) after one line on stderr: a stop asked for is no
    crash, so no traceback.
    """
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--app")
    pre, _ = pre_parser.parse_known_args(argv, _AppOnly())  # --app first, for --help's list of its keys
    args = _parser(pre.app).parse_args(argv)  # before any import of torch or Flower: --help answers at once
    from server_app.lifecycle import RunStopped, stop_on_signals

    try:
        with stop_on_signals(handoff=False):
            return _check(args) if args.check else _main(args)
    except RunStopped as exc:
        print(f"{exc.reason}: exit {exc.exit_code}; a run already started is recorded as stopped in its metrics "
              "store", file=sys.stderr)
        return exc.exit_code


def _configure(args: argparse.Namespace) -> tuple[dict[str, ConfigValue], RunConfig]:
    """The run's values and config from the command line, every check that needs no model or data done."""
    from strategies import parse_config
    from strategies.config import MAX_NODES, ConfigError, app_keys

    if args.app is not None:
        if not Path(args.app).is_dir():
            raise ConfigError(f"--app {args.app}: not a directory")
        import_from(args.app)
        args.clientapp = args.clientapp or app_component(args.app, "clientapp")
    values = merge_config(args.run_config, args.set, app=args.app)
    if args.resume:
        values, args.nodes = resume_config(values, args.resume)
    if args.check:  # a fleet of Flower's runtime (make run), not of this process
        if not 1 <= args.nodes <= MAX_NODES:
            raise ConfigError(f"--nodes must be in [1, {MAX_NODES}], got {args.nodes}")
    else:
        check_fleet(args.nodes, args.workers)
    cfg = parse_config(values, app_keys(app_config(args.app)))
    if args.nodes < cfg.min_nodes:
        raise ConfigError(f"--nodes {args.nodes} is fewer than min-nodes = {cfg.min_nodes}: the run would wait "
                          "for nodes that never come")
    return values, cfg


def _check(args: argparse.Namespace) -> int:
    """``--check``: everything a run checks before it starts, and nothing run; 0, or 2 with one line."""
    from strategies.config import ConfigError

    try:
        values, cfg = _configure(args)
        path = cfg.metrics_path()
        defaults = default_config()
        pinned = flwr_run_config({**{k: v for k, v in values.items() if v != defaults.get(k)},
                                  "metrics-db": str(path)})
        from server_app.app import validate  # torch and Flower: only for a config whose keys and values are right
        from server_app.store import MetricsStore

        validate(cfg)
        MetricsStore.open(path).close()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_run_config:
        print(pinned)
    else:
        print(f"ok: {cfg.strategy} on {args.nodes} nodes; results in {path}")
    return 0


def _main(args: argparse.Namespace) -> int:
    from server_app import progress
    from strategies.config import ConfigError

    reporter = _reporter(args.quiet)
    try:
        values, cfg = _configure(args)
        from server_app.app import validate  # torch and Flower: only for a config whose keys and values are right

        validate(cfg)
        # Not checked here: whatever calling it raises becomes an error reply (LocalGrid), as in Flower's runtime.
        clientapp: ClientAppLike | str | None = None
        if args.clientapp:
            clientapp = cast("ClientAppLike", load_object(args.clientapp))
            if args.executor == "process":
                clientapp = args.clientapp  # imported here to check it, and by each client process to run it
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from server_app.contract import StrategyContractError
    from strategies.base import ModelNotFinite

    torch.set_num_threads(1)  # clients run on parallel threads; one intra-op thread each avoids oversubscription
    try:
        summary = run_local(values, nodes=args.nodes, clientapp=clientapp, workers=args.workers, reporter=reporter,
                            app=args.app, executor=args.executor)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModelNotFinite as exc:  # a diverged run, told in one line: the traceback would only show _publish
        print(f"error: run failed: {exc}; recorded as failed in its metrics store, whose checkpoint (if any) "
              "predates it", file=sys.stderr)
        return 1
    except StrategyContractError as exc:  # the user's strategy broke its contract: the line names it and why
        print(f"error: run failed: {exc}; recorded as failed in its metrics store", file=sys.stderr)
        return 1
    except Exception as exc:  # the store already says "failed"; tell the user why
        logging.getLogger("staleflower").exception("run failed")
        print(f"error: run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        reporter.close()  # the bar, if any, is gone before the error line
    del summary, cfg, progress  # the ServerApp printed the summary
    return 0


def _reporter(quiet: bool) -> Reporter:
    """The run's progress: a bar on a terminal, a line per tenth of the run otherwise, nothing with --quiet.

    The engine's own line per evaluation is left out of the log then (the progress shows it), and so is the
    repeat of the last one that a run ending on an evaluation gives; warnings and failed tasks stay.
    """
    from server_app import progress

    handler: logging.Handler
    if quiet:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        return progress.Reporter()
    if sys.stdout.isatty() and sys.stderr.isatty():
        bar = progress.Bar()
        reporter: Reporter = bar
        handler = bar.logging_handler()
    else:
        reporter, handler = progress.Lines(), logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_not_evaluations)
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    return reporter


def _not_evaluations(record: logging.LogRecord) -> bool:
    """False for the engine's line per evaluation (``Engine._evaluate``)."""
    return not (record.name == "staleflower" and record.funcName == "_evaluate")


class _AppOnly(argparse.Namespace):
    app: str | None = None


def _declared_help(app: str | None) -> str | None:
    """``--help``'s list of the keys ``--app DIR`` declares (read as TOML only: --help stays instant)."""
    if not app:
        return None
    try:
        ours = set(default_config())
        mine = {k: v for k, v in app_config(app).items() if k not in ours}
    except Exception as exc:  # noqa: BLE001 - --help never fails: the run itself reports the bad app
        return f"--app {app}: {exc}"
    if not mine:
        return f"--app {app} declares no run-config keys beyond staleflower's"
    lines = [f"  {k} ({type(v).__name__}, default {v!r})" for k, v in sorted(mine.items())]
    return f"run-config keys that --app {app} declares (set them like any key):\n" + "\n".join(lines)


def _parser(app: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server_app.simulate", description=__doc__.split("\n\n")[0],
                                epilog=_declared_help(app), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-config", action="append", default=[], metavar="FILE|PAIRS",
                   help="TOML file of run-config keys (e.g. configs/fedbuff-digits.toml), or \"key=value ...\" "
                        "pairs as flwr run takes them; repeatable, later ones win")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key (repeatable)")
    p.add_argument("--nodes", type=int, default=8, help="number of simulated nodes (default 8)")
    p.add_argument("--app", metavar="DIR",
                   help="your Flower app's directory (what flwr run DIR takes): its pyproject.toml's "
                        "[tool.flwr.app.config] declares your ClientApp's keys and sets defaults, its clientapp "
                        "component is the ClientApp, and DIR is importable")
    p.add_argument("--clientapp", metavar="MODULE:ATTR",
                   help="your own ClientApp instead of client_app.app:app (default with --app: its clientapp)")
    p.add_argument("--resume", metavar="RUN_ID", help="resume a checkpointed run (RELIABILITY.md)")
    p.add_argument("--workers", type=int, default=2,
                   help="threads (or processes, with --executor process) running clients in parallel (default 2)")
    p.add_argument("--executor", choices=("thread", "process"), default="thread",
                   help="run clients on threads of this process (default), or in --workers processes that do not "
                        "share the engine's interpreter lock (faster with many small clients; see README)")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    p.add_argument("--check", action="store_true", help="validate the run config and the fleet, run nothing")
    p.add_argument("--print-run-config", action="store_true",
                   help="with --check: print the merged config as one flwr run --run-config string")
    return p


def import_from(app: str | Path) -> None:
    """Make the app's modules importable, as Flower does for the app it runs."""
    where = str(Path(app).resolve())
    if where not in sys.path:
        sys.path.insert(0, where)


def _parse_set(item: str) -> tuple[str, ConfigValue]:
    from strategies.config import ConfigError

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, ConfigValue]:
    """A TOML document (tomllib's ``dict[str, Any]``) as dotted keys; RunConfig.from_mapping checks the values."""
    out: dict[str, ConfigValue] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


if __name__ == "__main__":
    sys.exit(main())
