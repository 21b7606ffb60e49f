"""Hardened defaults: the systemd units of deploy/systemd/ and the dashboard's documented commands and config.

The units are checked by parsing them (whatever the machine) and, where ``systemd-analyze`` is installed, by
``systemd-analyze verify`` (no warning at all) and ``systemd-analyze security --offline`` (exposure at most 3.5).
The dashboard's commands are every ``streamlit run`` line of the docs, the Makefile and the scripts; its
``.streamlit/config.toml`` is read by Streamlit itself, from another working directory, as ``streamlit run`` does.
The page's own defences (stores under one folder, Markdown shown as text) are tested in tests/test_dashboard.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "deploy" / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))
GPU_DROPIN = UNITS / "staleflower-supernode-gpu.conf"
STATE = "/var/lib/staleflower"


def _parse(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections -> key -> every value (keys may repeat), with continuation lines joined."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    text = re.sub(r"\\\n\s*", " ", text)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def _bytes(value: str) -> int:
    num, unit = re.fullmatch(r"(\d+)([KMG]?)", value).groups()
    return int(num) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]


def test_units_are_shipped() -> None:
    assert {p.name for p in SERVICES} == {"staleflower-supernode.service", "staleflower-superlink.service"}
    assert GPU_DROPIN.exists()


@pytest.mark.parametrize("unit", SERVICES, ids=lambda p: p.name)
def test_unit_is_sandboxed(unit: Path) -> None:
    svc = _parse(unit.read_text())["Service"]

    def one(key: str) -> str:
        assert key in svc, f"{unit.name}: {key}= missing"
        return svc[key][-1]

    assert one("User") == one("Group") == "staleflower" and "DynamicUser" not in svc
    assert one("NoNewPrivileges") == "yes"
    assert one("CapabilityBoundingSet") == "" and one("AmbientCapabilities") == ""
    assert one("ProtectSystem") == "strict"
    assert svc["ReadWritePaths"] == [STATE] and one("StateDirectory") == "staleflower"  # exactly the state dir
    assert one("ProtectHome") == "yes" and one("PrivateTmp") == "yes" and one("PrivateDevices") == "yes"
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert 1 << 30 <= _bytes(one("MemoryMax")) <= 8 << 30
    assert _bytes(one("MemoryHigh")) < _bytes(one("MemoryMax"))
    assert one("Restart") == "on-failure"
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups", "RestrictNamespaces",
                "RestrictSUIDSGID", "LockPersonality"):
        assert one(key) == "yes", key
    # everything it runs and reads is outside the hidden homes and inside what the sandbox shows
    exec_start = one("ExecStart")
    assert exec_start.startswith("/opt/staleflower/venv/bin/flower-") and "/home" not in unit.read_text()
    assert f"FLWR_HOME={STATE}/flwr" in svc["Environment"] and f"HOME={STATE}" in svc["Environment"]
    for path in re.findall(r"(?<=\s)(/\S+)", exec_start):
        assert path.startswith(("/etc/staleflower/", f"{STATE}/")), path


def test_gpu_dropin_opens_only_the_gpu() -> None:
    svc = _parse(GPU_DROPIN.read_text())["Service"]
    assert svc["PrivateDevices"] == ["no"] and svc["DevicePolicy"] == ["closed"]
    assert all(d.startswith(("/dev/nvidia", "char-nv")) and d.endswith(" rw") for d in svc["DeviceAllow"])


def test_docs_show_the_supernode_unit_as_shipped() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```ini\n(.*?)```\n", doc, flags=re.S)
    assert (UNITS / "staleflower-supernode.service").read_text() in blocks
    assert "Restart=always" not in doc and "## 9. Hardening" in doc


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd); the unit files are "
                    "still parsed by test_unit_is_sandboxed")
    return exe


def _staged(tmp_path: Path) -> list[Path]:
    """The units with their ExecStart pointed at stub executables (verify checks that the binary exists)."""
    stub = tmp_path / "bin"
    stub.mkdir()
    for name in ("flower-supernode", "flower-superlink"):
        (stub / name).write_text("#!/bin/sh\n")
        (stub / name).chmod(0o755)
    staged = []
    for unit in SERVICES:
        dest = tmp_path / unit.name
        dest.write_text(unit.read_text().replace("/opt/staleflower/venv/bin/", f"{stub}/"))
        staged.append(dest)
    dropins = tmp_path / "staleflower-supernode.service.d"
    dropins.mkdir()
    shutil.copy(GPU_DROPIN, dropins / "gpu.conf")
    return staged


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = _systemd_analyze()
    staged = _staged(tmp_path)
    out = subprocess.run([exe, "verify", *map(str, staged)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values and only prints them: any output is a failure
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


def test_systemd_analyze_security(tmp_path: Path) -> None:
    exe = _systemd_analyze()
    for unit in _staged(tmp_path):
        out = subprocess.run([exe, "security", "--offline=yes", str(unit)], capture_output=True, text=True,
                             timeout=60)
        if "offline" in out.stderr and "unrecognized" in out.stderr:
            pytest.skip(f"this systemd-analyze has no --offline: {out.stderr.strip()}")
        level = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout)
        assert level, out.stdout[-2000:] + out.stderr
        assert float(level.group(1)) <= 3.5, out.stdout


# ------------------------------------------------------------------------------------------------ dashboard
DOCUMENTED = [ROOT / "Makefile", *ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md"), *(ROOT / "dashboard").rglob("*"),
              *(ROOT / "scripts").rglob("*"), *(ROOT / ".ci").rglob("*")]


def _streamlit_lines() -> list[tuple[str, str]]:
    out = []
    for f in DOCUMENTED:
        if not f.is_file() or "__pycache__" in f.parts:
            continue
        for line in f.read_text(errors="replace").splitlines():
            if "streamlit run" in line:
                out.append((str(f.relative_to(ROOT)), line))
    return out


def test_every_documented_streamlit_command_is_loopback_and_quiet() -> None:
    lines = _streamlit_lines()
    assert {f for f, _ in lines} >= {"Makefile", "README.md", "dashboard/README.md", "dashboard/app.py"}
    make_default = re.search(r"^DASHBOARD_ADDRESS \?= (\S+)", (ROOT / "Makefile").read_text(), flags=re.M)
    assert make_default and make_default.group(1) == "127.0.0.1"
    for f, line in lines:
        address = re.search(r"--server\.address[ =](\S+)", line)
        assert address and address.group(1) in ("127.0.0.1", "$(DASHBOARD_ADDRESS)"), f"{f}: {line}"
        assert re.search(r"--browser\.gatherUsageStats[ =]false\b", line), f"{f}: {line}"


def test_streamlit_config_sets_the_same_defaults(tmp_path: Path) -> None:
    """Streamlit itself reads dashboard/.streamlit/config.toml for dashboard/app.py, from any working directory."""
    config = tomllib.loads((ROOT / "dashboard" / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1" and config["browser"]["gatherUsageStats"] is False
    probe = ("import sys\nfrom streamlit import config\nconfig._main_script_path = sys.argv[1]\n"
             "config.get_config_options(force_reparse=True)\n"
             "print(config.get_option('server.address'), config.get_option('browser.gatherUsageStats'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")} | {"HOME": str(tmp_path)}
    other = tmp_path / "elsewhere"
    other.mkdir()

    def read(script: Path) -> str:
        out = subprocess.run([sys.executable, "-c", probe, str(script)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert read(ROOT / "dashboard" / "app.py") == "127.0.0.1 False"
    assert read(other / "app.py") == "None True"  # Streamlit's own defaults: the file is what makes the difference
