import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
# Checkpoints are on by default and sealed with a per-user key (server_app/checkpoint.py): the suite makes its own
# in a temporary directory, never the user's ~/.config/staleflower/checkpoint.key; subprocesses inherit it.
if "STALEFLOWER_CHECKPOINT_KEY" not in os.environ:
    _key_dir = tempfile.mkdtemp(prefix="staleflower-key-")
    atexit.register(shutil.rmtree, _key_dir, ignore_errors=True)
    os.environ["STALEFLOWER_CHECKPOINT_KEY"] = os.path.join(_key_dir, "checkpoint.key")

pytest_plugins = ["server_app.testing"]

# In-process runs execute their clients on worker threads; give torch one intra-op thread, as
# `python -m server_app.simulate` does, so that they do not oversubscribe the cores (about 15 % faster runs on
# 2 cores; results do not depend on it beyond the last bits of the weights).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """``simulate`` for runs that several tests only read: the first call runs it, later calls with the same
    arguments get the same ``SimRun`` (its own store in a session directory). Never write to what it returns."""
    from server_app.testing import simulate  # imported by pytest_plugins first (assertion rewriting)

    runs: dict[tuple, Any] = {}

    def run(strategy: str, **settings: Any) -> Any:
        key = (strategy, tuple(sorted(settings.items())))
        if key not in runs:
            db = tmp_path_factory.mktemp("shared") / "metrics.db"
            runs[key] = simulate(strategy, db=db, **settings)
        return runs[key]

    return run


@pytest.fixture(scope="session")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One ``flower-superlink --simulation`` for every real ``flwr run`` test of the session (one start-up, not
    one per module); see tests/flwr_superlink.py."""
    from tests.flwr_superlink import start_superlink

    yield from start_superlink(tmp_path_factory)


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`): most of the slow tests wait on
# real processes (SuperLinks, SuperNodes, Chromium), so two workers overlap that waiting even on 2 cores. Each
# file is one group, so its module fixtures are built once; the files on the session's SuperLink share one group.
# The longest groups go first, so that they overlap the rest of the suite.
SHARED_GROUPS = {"test_flwr_run.py": "flower-runtime"}  # test_flwr_scale.py starts its own Ray cluster and SuperLink
LONGEST_FIRST = ("test_deployment.py", "test_flwr_run.py", "test_flwr_scale.py", "test_dashboard_browser.py",
                 "test_checkpoint.py", "test_bench_smoke.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the tests by file for xdist, and put the longest files first."""
    for item in items:
        name = item.path.name
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(SHARED_GROUPS.get(name, name)))

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
