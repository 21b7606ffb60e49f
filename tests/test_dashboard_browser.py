"""The dashboard in a real browser while a simulation writes (slow: about 40 s on 2 cores).

Two in-process runs write one metrics store: a short FedAsync run that finishes, and a long FedBuff + top-k run
that is still training while the page is open. Streamlit serves ``dashboard/app.py`` on a free loopback port;
headless Chromium (Debian's ``chromium``, apt-get installed by the set-up when root) opens the page with both runs
overlaid, waits until the charts are drawn, checks the DOM for them and for no error, checks that the page
follows the running run (its stored-task count grows without a reload), and saves a screenshot: under the test's
temporary directory, or, with ``STALEFLOWER_SCREENSHOT=1``, as ``results/dashboard.png`` (the README's picture), so
that a test run leaves the checkout as it found it. Every process is stopped by its pid.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.browser import Chromium, ensure_chromium, free_port, stop, wait_http

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README_SCREENSHOT = ROOT / "results" / "dashboard.png"
WIDTH = 1400
CHARTS = 11  # vega-lite charts drawn for runs with tasks and evaluations (no consensus distance)


def _simulate(db: Path, log: Path, *sets: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "server_app.simulate", "--quiet", "--nodes", "6", "--workers", "1",
            "--set", f"metrics-db='{db}'", "--set", "seed=1"]
    for s in sets:
        args += ["--set", s]
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def _runs(db: Path) -> list[tuple[str, str]]:
    try:
        with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5) as con:
            return [(str(r), s) for r, s in con.execute("SELECT run_id, status FROM runs ORDER BY started_at")]
    except sqlite3.Error:
        return []


def _wait(cond, timeout: float, what: str, *procs: subprocess.Popen, logs: tuple[Path, ...] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        for p in procs:
            if p.poll() not in (None, 0):
                tails = "\n".join(f"--- {lg.name}\n{lg.read_text(errors='replace')[-3000:]}" for lg in logs)
                pytest.fail(f"process {p.pid} exited with {p.returncode} while waiting for {what}\n{tails}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def test_dashboard_in_chromium_while_a_run_writes(tmp_path: Path) -> None:
    chromium, why = ensure_chromium()
    if chromium is None:
        pytest.skip(why)
    t0 = time.monotonic()
    db = tmp_path / "metrics.db"
    logs = (tmp_path / "finished.log", tmp_path / "live.log", tmp_path / "streamlit.log")
    procs: list[subprocess.Popen] = []
    browser: Chromium | None = None
    try:
        finished = _simulate(db, logs[0], "strategy='fedasync'", "max-updates=120", "eval-every=10")
        procs.append(finished)
        port = free_port()
        env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
        with logs[2].open("wb") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.address", "127.0.0.1",
                 "--server.port", str(port), "--server.headless", "true", "--server.fileWatcherType", "none",
                 "--browser.gatherUsageStats", "false", "--", "--db", str(db)],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))
        # The live run starts as soon as the finished one has registered (so it is the second run of the store),
        # not after it ended: the two interpreters' start-ups overlap.
        _wait(lambda: len(_runs(db)) == 1, 60, "the first run to register", *procs, logs=logs)
        live = _simulate(db, logs[1], "strategy='fedbuff'", "codec='topk'", "max-updates=100000", "eval-every=10")
        procs.append(live)
        assert finished.wait(timeout=60) == 0, logs[0].read_text(errors="replace")[-3000:]
        runs = _wait(lambda: len(_runs(db)) == 2 and _runs(db), 30, "the live run to register", *procs, logs=logs)
        assert runs[0][1] == "completed"
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", 30, procs[1])

        browser = Chromium(chromium, tmp_path / "chromium")
        query = "&".join(f"run={run_id}" for run_id, _ in runs)
        browser.goto(f"http://127.0.0.1:{port}/?{query}", WIDTH, 1000)
        charts = ('[...document.querySelectorAll(\'[data-testid="stVegaLiteChart"]\')]'
                  '.filter(e => e.querySelector("canvas, svg")).length')
        drawn = browser.wait_for(f"{charts} >= {CHARTS} && {charts}", timeout=45)
        assert drawn >= CHARTS
        text = browser.evaluate("document.body.innerText")
        for heading in ("Accuracy and loss", "Staleness", "Bandwidth", "Per node", "Timeline", "Config",
                        "time to", "bytes to", "compression"):
            assert heading in text, f"{heading!r} missing from the page"
        assert "fedasync" in text and "fedbuff + topk" in text
        assert browser.evaluate('document.querySelectorAll(\'[data-testid="stException"]\').length') == 0
        assert "Traceback" not in text

        # Live: the stored-task count in the page grows while the run writes, without a reload.
        def tasks() -> int:
            found = re.search(r"([\d,]+) tasks stored", browser.evaluate("document.body.innerText") or "")
            return int(found.group(1).replace(",", "")) if found else 0

        first = tasks()
        assert first > 0
        _wait(lambda: tasks() > first, 15, "the page to show new tasks of the running run", *procs, logs=logs)
        assert _runs(db)[1][1] == "running"

        height = browser.evaluate('Math.max(...[...document.querySelectorAll(\'[data-testid="stMain"], '
                                  '[data-testid="stAppViewContainer"], [data-testid="stMainBlockContainer"]\')]'
                                  '.map(e => e.scrollHeight), document.body.scrollHeight)')
        browser.resize(WIDTH, min(int(height) + 40, 6000))
        browser.wait_for(f"{charts} >= {CHARTS}", timeout=20)
        time.sleep(1.5)  # let the charts settle at the new size
        shot = README_SCREENSHOT if os.environ.get("STALEFLOWER_SCREENSHOT") == "1" else tmp_path / "dashboard.png"
        browser.screenshot(shot)
        assert shot.stat().st_size > 50_000
    finally:
        if browser is not None:
            browser.close()
        for p in reversed(procs):
            stop(p)
    assert time.monotonic() - t0 < 90, f"the browser test took {time.monotonic() - t0:.0f} s (budget 90 s)"
