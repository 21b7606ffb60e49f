"""The in-process runner: ``python -m server_app.simulate``.

Runs the same ServerApp and ClientApp code as ``flwr run`` (or the user's own ClientApp) in one process, with no
Ray and no SuperLink, writes the metrics store, prints a short summary, and exits 0 on success, 1 when the run
failed, 2 for a bad command line or run config, and 128 + the signal's number when stopped by SIGINT (130),
SIGTERM (143) or SIGHUP (129).

    python -m server_app.simulate [--run-config FILE] [--set key=value ...] [--nodes N]
                                  [--clientapp MODULE:ATTR] [--resume RUN_ID]

``--set`` values use the TOML syntax of ``flwr run --run-config`` (``--set strategy='"fedavg"'``); a value that
is not valid TOML is taken as a plain string (``--set strategy=fedavg``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import secrets
import sqlite3
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from flwr.app import Context, RecordDict

from server_app.app import RESUMABLE_CHANGES, validate
from server_app.app import app as server_app
from server_app.contract import StrategyContractError
from server_app.lifecycle import RunStopped, stop_on_signals
from server_app.local_grid import ClientAppLike, LocalGrid
from server_app.state import RunSummary
from server_app.store import stored_run
from strategies import get_strategy
from strategies.base import ModelNotFinite
from strategies.config import ConfigError, ConfigValue, RunConfig

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
#: The most nodes one process simulates (``--nodes``, here and in ``server_app.compare``): bench.scale runs 1,000
#: (2 updates in 11 s on 2 cores), while 3,000 had not finished starting after minutes. Deployments have no such
#: cap: their fleet keys stop at strategies.config.MAX_NODES.
MAX_SIM_NODES = 1000
#: Client threads of the in-process runner: more than the nodes or the cores only adds contention.
MAX_WORKERS = 256
#: The largest run-config file read: presets are about 1 KB; a bigger file is a wrong path.
MAX_RUN_CONFIG_BYTES = 1 << 20


def default_config() -> dict[str, ConfigValue]:
    """``[tool.flwr.app.config]`` of pyproject.toml: the defaults ``flwr run`` uses too."""
    with PYPROJECT.open("rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def merge_config(file: str | None = None, sets: list[str] | None = None,
                 overrides: Mapping[str, ConfigValue] | None = None) -> dict[str, ConfigValue]:
    """Defaults, then a TOML file, then ``key=value`` pairs, then a mapping; unknown keys are an error."""
    values = default_config()
    layers: list[Mapping[str, ConfigValue]] = []
    if file:
        layers.append(_flatten(read_toml(file)))
    layers.append(dict(_parse_set(s) for s in sets or []))
    layers.append(dict(overrides or {}))
    for layer in layers:
        unknown = sorted(set(layer) - set(values))
        if unknown:
            RunConfig.from_mapping(layer)  # raises with the did-you-mean message
        values.update(layer)
    return values


def read_toml(file: str) -> dict[str, Any]:
    """A run-config file's table; a missing, unreadable, oversized or malformed file is a ``ConfigError``.

    The message quotes tomllib's position and reason (which cites at most one character), not the file's text.
    """
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


def run_local(values: Mapping[str, ConfigValue], *, nodes: int = 8, clientapp: ClientAppLike | None = None,
              workers: int = 2, reorder_seed: int | None = None, run_id: int | None = None) -> RunSummary:
    """Run one experiment in-process on a ``LocalGrid`` and return its summary."""
    cfg = RunConfig.from_mapping(values)
    if clientapp is None:
        from client_app.app import app as default_app

        clientapp = default_app
    run_id = run_id if run_id is not None else random_run_id()
    grid = LocalGrid(clientapp, nodes, cfg.to_mapping(), run_id=run_id, workers=workers,
                     reorder_seed=reorder_seed)
    context = server_context(run_id, cfg.to_mapping())
    try:
        server_app(grid, context)  # the very ServerApp that `flwr run` starts
    finally:
        grid.close()
    weights = context.state.array_records["final-weights"].to_numpy_ndarrays()
    return RunSummary.from_config(dict(context.state.config_records["summary"]), weights)


def resume_config(values: Mapping[str, ConfigValue], run_id: str) -> tuple[dict[str, ConfigValue], int]:
    """The config and fleet size of a stored run, to resume it; ``values`` may change only its stop conditions.

    The store is the one ``values`` names (``metrics-db``, else the default); the nodes are as many as the run had.
    """
    path = RunConfig.from_mapping(values).metrics_path()
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
    defaults = default_config()
    stops = {k: v for k, v in values.items() if k in RESUMABLE_CHANGES and v != defaults.get(k)}
    resumed = {**stored, **stops, "metrics-db": str(path), "resume": run_id}
    cfg = RunConfig.from_mapping(resumed)
    if why := get_strategy(cfg.strategy).node_state_reason(cfg):
        raise ConfigError(f"--resume {run_id}: {why}, and the in-process runner's nodes died with it; such a run "
                          "resumes exactly only in deployment, where SuperNodes keep their state")
    return resumed, nodes


def server_context(run_id: int, values: Mapping[str, ConfigValue]) -> Context:
    """The Context the ServerApp would get from Flower."""
    return Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(values))


def load_object(path: str) -> object:
    """Import ``package.module:attr``."""
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
    args = _parser().parse_args(argv)
    try:
        with stop_on_signals(handoff=False):
            return _main(args)
    except RunStopped as exc:
        print(f"{exc.reason}: exit {exc.exit_code}; a run already started is recorded as stopped in its metrics "
              "store", file=sys.stderr)
        return exc.exit_code


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(1)  # clients run on parallel threads; one intra-op thread each avoids oversubscription
    try:
        values = merge_config(args.run_config, args.set)
        if args.resume:
            values, args.nodes = resume_config(values, args.resume)
        check_fleet(args.nodes, args.workers)
        cfg = RunConfig.from_mapping(values)
        if args.nodes < cfg.min_nodes:
            raise ConfigError(f"--nodes {args.nodes} is fewer than min-nodes = {cfg.min_nodes}: the run would wait "
                              "for nodes that never come")
        validate(cfg)
        # Not checked here: whatever calling it raises becomes an error reply (LocalGrid), as in Flower's runtime.
        clientapp = cast(ClientAppLike, load_object(args.clientapp)) if args.clientapp else None
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_local(values, nodes=args.nodes, clientapp=clientapp, workers=args.workers)
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
    del summary, cfg  # the ServerApp printed the summary
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server_app.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-config", metavar="FILE",
                   help="TOML file of run-config keys (e.g. configs/fedbuff-digits.toml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key (repeatable)")
    p.add_argument("--nodes", type=int, default=8, help="number of simulated nodes (default 8)")
    p.add_argument("--clientapp", metavar="MODULE:ATTR", help="your own ClientApp instead of client_app.app:app")
    p.add_argument("--resume", metavar="RUN_ID", help="resume a checkpointed run (RELIABILITY.md)")
    p.add_argument("--workers", type=int, default=2, help="threads running clients in parallel (default 2)")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    return p


def _parse_set(item: str) -> tuple[str, ConfigValue]:
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
