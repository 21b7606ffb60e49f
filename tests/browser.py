"""A headless Chromium driven over the DevTools protocol, for the dashboard's browser test.

No Selenium, no Playwright: Debian's ``chromium`` package, started with ``--remote-debugging-port=0`` (it writes
the port it chose to ``DevToolsActivePort`` in its profile directory), and the ``websockets`` package (pinned in
requirements.txt; Streamlit depends on it too) for the protocol's JSON messages. Every process started here is
stopped by its pid.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The Chromium binary on PATH, if any."""
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def ensure_chromium() -> tuple[str | None, str]:
    """Chromium's path, installing Debian's ``chromium`` with apt-get when root; else ``(None, why)``."""
    found = find_chromium()
    if found:
        return found, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "chromium is not installed and this user cannot apt-get install it (run as root, or install " \
                     "Debian's `chromium` package)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if res.returncode != 0:  # stale package lists: refresh them once
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600, check=False)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    found = find_chromium()
    return (found, "") if found else (None, f"apt-get install chromium failed: {res.stderr[-1500:]}")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop one process we started, by its pid: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200 (and fail early if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.2)


class Chromium:
    """One headless Chromium and a DevTools session on its first page."""

    def __init__(self, binary: str, profile: Path, width: int = 1400, height: int = 1000) -> None:
        self.profile = profile
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "DevToolsActivePort").unlink(missing_ok=True)  # a stale one names a dead port
        self.log = (profile / "chromium.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self._ids = itertools.count(1)
        self.ws: ClientConnection | None = None
        self._stack = contextlib.ExitStack()
        try:
            port = self._port(timeout=30)
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5).read())
            page = next(t for t in targets if t.get("type") == "page")
            self.ws = self._stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None,
                                                        open_timeout=10))
        except Exception:
            self.close()
            raise

    def _port(self, timeout: float) -> int:
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: "
                                   f"{(self.profile / 'chromium.log').read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(marker.read_text().split()[0])
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its DevTools port")

    def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events that arrive meanwhile are skipped)."""
        assert self.ws is not None
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JavaScript error: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def goto(self, url: str, width: int, height: int) -> None:
        """Open ``url`` in a ``width`` x ``height`` viewport."""
        self.resize(width, height)
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def resize(self, width: int, height: int) -> None:
        """Set the viewport size."""
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def wait_for(self, expression: str, timeout: float, interval: float = 0.25) -> Any:
        """Poll a JavaScript expression until it is truthy; its last value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                value = self.evaluate(expression)
                if value:
                    return value
            time.sleep(interval)
        raise TimeoutError(f"still false after {timeout:.0f} s: {expression} (last value {value!r})")

    def screenshot(self, path: Path) -> None:
        """Save the viewport as a PNG."""
        data = self.send("Page.captureScreenshot", format="png", timeout=60)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """Close the session and stop Chromium by its pid."""
        with contextlib.suppress(Exception):
            self._stack.close()
        stop(self.proc)
        self.log.close()
