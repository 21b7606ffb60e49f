"""The ``staleflower`` command (``pip install -e .`` puts it on the PATH; ``python -m server_app.cli`` without).

    staleflower run [--run-config FILE|PRESET] [--set KEY=VALUE ...] [--nodes N] ...   python -m server_app.simulate
    staleflower compare [--run-config FILE|PRESET] [--methods ...] ...                 python -m server_app.compare
    staleflower presets                                  the presets of configs/, by name
    staleflower runs list [--db PATH] [--json]           every run of a metrics store
    staleflower runs show RUN_ID [--db PATH] [--json] [--full-config]
    staleflower runs export RUN_ID [--table updates|evals] [--format csv|parquet] [-o FILE] [--db PATH]
    staleflower dashboard [--db PATH] [--stores DIR] [--address 127.0.0.1] [--port 8501] [--headless]

``run`` and ``compare`` take exactly the arguments of the module they stand for, and ``--run-config`` also takes
a preset's name (``fedbuff-digits``, ``configs/fedbuff-digits.toml`` from any directory): the presets ship with
the package. ``runs`` reads the store a run writes by default (``$STALEFLOWER_METRICS_DB``, else
``~/.staleflower/metrics.db``) or ``--db PATH``.

Exit status: the module's own for ``run`` and ``compare`` (0 done, 1 the run failed, 2 a bad command line or run
config); otherwise 0, or 2 with one line on stderr for any mistake (an unknown run id, a missing store, a bad
format, an unwritable output). ``--help`` imports nothing heavy: torch, Flower and the runners load only for the
command that needs them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import NoReturn

from server_app import runs
from server_app.runs import RunsError

PROG = "staleflower"
#: Subcommands handed, with the rest of the command line, to a module's own ``main``.
PASS_THROUGH = {"run": "server_app.simulate", "compare": "server_app.compare"}
HERE = Path(__file__).resolve().parent


class UsageError(Exception):
    """A mistake on the command line: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        """One line: the command, the mistake, where to look."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------------ presets
def preset_dirs() -> list[Path]:
    """Where presets are: ``server_app/presets`` in a wheel, ``configs/`` of a source tree (or editable install)."""
    dirs = [HERE / "presets"]
    if (HERE.parent / "pyproject.toml").is_file():
        dirs.append(HERE.parent / "configs")
    return [d for d in dirs if d.is_dir()]


def presets() -> dict[str, Path]:
    """Every preset by name (the file name less ``.toml``), the first directory's first."""
    found: dict[str, Path] = {}
    for d in preset_dirs():
        for f in sorted(d.glob("*.toml")):
            found.setdefault(f.stem, f)
    return found


def resolve_run_config(value: str) -> str:
    """A ``--run-config`` value as a file: an existing path as given, else the preset it names.

    ``fedbuff-digits``, ``fedbuff-digits.toml`` and ``configs/fedbuff-digits.toml`` (the repository's spelling,
    from any directory) name the same preset. ``key=value`` pairs (what ``flwr run --run-config`` also takes) and
    other paths are left to the runner, which reads them or says the file is missing.
    """
    path = Path(value).expanduser()
    if path.is_file() or "=" in value or not value.strip():
        return value
    if path.parent not in (Path("."), Path("configs")):
        return value
    name = path.name.removesuffix(".toml")
    found = presets().get(name)
    if found is None:
        raise UsageError(f"--run-config {value}: no such file, and no preset {name!r} (`{PROG} presets` lists them)")
    return str(found)


def with_presets(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every ``--run-config`` resolved by ``resolve_run_config``."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--run-config" and i + 1 < len(out):
            out[i + 1] = resolve_run_config(out[i + 1])
        elif arg.startswith("--run-config="):
            out[i] = "--run-config=" + resolve_run_config(arg.partition("=")[2])
    return out


def describe_presets() -> str:
    """``staleflower presets``: each preset's name and its first comment line."""
    found = presets()
    if not found:
        return "no presets found with this installation"
    width = max(len(n) for n in found)
    lines = []
    for name, path in found.items():
        first = next((ln.lstrip("# ").strip() for ln in path.read_text(encoding="utf-8").splitlines()
                      if ln.startswith("#")), "")
        lines.append(f"{name.ljust(width)}  {first}".rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ commands
def _pass_through(command: str, argv: Sequence[str]) -> int:
    """``run`` / ``compare``: the module's own ``main`` on the same arguments (presets resolved)."""
    try:
        args = with_presets(argv)
    except UsageError as exc:
        print(f"{PROG} {command}: error: {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(PASS_THROUGH[command])
    code: int = module.main(args)
    return code


def _store(db: str | None) -> Path:
    """``--db``, else the store runs write when their config leaves ``metrics-db`` empty."""
    if db:
        return Path(db).expanduser()
    from strategies.config import default_metrics_path  # $STALEFLOWER_METRICS_DB, else ~/.staleflower/metrics.db

    return default_metrics_path()


def _runs(args: argparse.Namespace) -> int:
    with runs.open_store(_store(args.db)) as db:
        if args.runs_command == "list":
            listed = runs.list_runs(db)
            print(json.dumps([r.as_json() for r in listed], indent=2) if args.json else runs.render_list(listed))
        elif args.runs_command == "show":
            run = runs.show_run(db, args.run_id)
            if args.json:
                print(json.dumps(run, indent=2, default=str))
            else:
                from strategies.config import RunConfig

                print(runs.render_show(run, RunConfig().to_mapping(), full_config=args.full_config))
        else:
            fmt = args.format or _format_of(args.output)
            names, types, rows = runs.export_rows(db, args.run_id, args.table)
            runs.write_export(names, types, rows, fmt, args.output)
            if args.output not in (None, "-"):
                print(f"{len(rows)} {args.table} rows of run {runs.find_run(db, args.run_id)} -> {args.output}",
                      file=sys.stderr)
    return 0


def _format_of(output: str | None) -> str:
    """The format an output file's suffix names (``.parquet``/``.pq``: parquet), else CSV."""
    return "parquet" if output and Path(output).suffix.lower() in (".parquet", ".pq") else "csv"


def dashboard_command(db: str | None, stores: str | None, address: str, port: int | None,
                      headless: bool) -> list[str]:
    """The ``streamlit run`` command line of ``staleflower dashboard`` (the Makefile's ``dashboard`` target)."""
    app = HERE.parent / "dashboard" / "app.py"
    if not app.is_file():
        raise UsageError(f"the dashboard is not installed with this copy of staleflower (no {app})")
    if importlib.util.find_spec("streamlit") is None:
        raise UsageError("the dashboard needs Streamlit: pip install 'staleflower[dashboard]' (or streamlit)")
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", address,
           "--browser.gatherUsageStats", "false", "--server.showEmailPrompt", "false"]
    if port is not None:
        cmd += ["--server.port", str(port)]
    if headless:
        cmd += ["--server.headless", "true"]
    extra = [*(["--db", str(Path(db).expanduser().resolve())] if db else []),
             *(["--stores", str(Path(stores).expanduser().resolve())] if stores else [])]
    return [*cmd, "--", *extra] if extra else cmd


def _dashboard(args: argparse.Namespace) -> int:
    cmd = dashboard_command(args.db, args.stores, args.address, args.port, args.headless)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # Streamlit takes over this process: Ctrl-C and its exit status are its own


def _version() -> str:
    try:
        return metadata.version("staleflower")
    except metadata.PackageNotFoundError:
        return "not installed (run from a source tree)"


def _parser() -> _Parser:
    p = _Parser(prog=PROG, description="Run, compare and inspect staleflower experiments (asynchronous, "
                                       "staleness-aware federated learning on Flower).",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="`staleflower COMMAND --help` for a command's options.")
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.add_parser("run", help="one run in-process (python -m server_app.simulate; the same arguments)",
                   add_help=False)
    sub.add_parser("compare", help="equal-budget tuning and comparison of strategies (python -m "
                                   "server_app.compare; the same arguments)", add_help=False)
    sub.add_parser("presets", help="the presets --run-config takes by name")

    runs_p = sub.add_parser("runs", help="list, show or export the runs of a metrics store")
    runs_sub = runs_p.add_subparsers(dest="runs_command", metavar="list|show|export", parser_class=_Parser,
                                   required=True)
    db_help = "the metrics store (default: $STALEFLOWER_METRICS_DB, else ~/.staleflower/metrics.db)"
    ls = runs_sub.add_parser("list", help="every run, oldest first: id, strategy, status, start, applied updates, "
                                          "final accuracy")
    ls.add_argument("--db", metavar="PATH", help=db_help)
    ls.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    show = runs_sub.add_parser("show", help="one run's summary and config")
    show.add_argument("run_id", metavar="RUN_ID", help="the run's id, or its last digits if only it ends so")
    show.add_argument("--db", metavar="PATH", help=db_help)
    show.add_argument("--json", action="store_true", help="JSON instead of text")
    show.add_argument("--full-config", action="store_true", help="every config key, not only those that differ "
                                                                 "from the defaults")
    export = runs_sub.add_parser("export", help="one run's updates or evaluations as CSV or Parquet")
    export.add_argument("run_id", metavar="RUN_ID", help="the run's id, or its last digits if only it ends so")
    export.add_argument("--table", choices=("updates", "evals"), default="updates",
                        help="updates: one row per task (default); evals: one row per evaluation")
    export.add_argument("--format", choices=("csv", "parquet"),
                        help="default: parquet for an -o ending in .parquet, else csv")
    export.add_argument("-o", "--output", metavar="FILE", help="the file to write (default: CSV on stdout)")
    export.add_argument("--db", metavar="PATH", help=db_help)

    dash = sub.add_parser("dashboard", help="the live Streamlit dashboard (127.0.0.1, no usage statistics)")
    dash.add_argument("--db", metavar="PATH", help="the store to open first (default: the runners' default)")
    dash.add_argument("--stores", metavar="DIR", help="the folder whose stores the page may open (default: the "
                                                      "store's folder)")
    dash.add_argument("--address", default="127.0.0.1", help="default 127.0.0.1 (this machine only); 0.0.0.0 "
                                                              "serves the network, with no login")
    dash.add_argument("--port", type=int, help="default: Streamlit's (8501, or the next free one)")
    dash.add_argument("--headless", action="store_true", help="do not open a browser")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``staleflower`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in PASS_THROUGH:
        return _pass_through(args_list[0], args_list[1:])
    parser = _parser()
    args = parser.parse_args(args_list)
    try:
        if args.command == "presets":
            print(describe_presets())
            return 0
        if args.command == "runs":
            return _runs(args)
        if args.command == "dashboard":
            return _dashboard(args)
    except (UsageError, RunsError) as exc:  # the user's mistake, or a store that cannot be read: one line
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `staleflower runs export ID | head`: the reader has had enough, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 1
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
