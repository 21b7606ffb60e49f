#!/usr/bin/env python3
"""A throw-away local deployment of staleflower on Flower's real runtime: TLS, SuperNode authentication, N nodes.

    python scripts/deploy_local.py [--nodes 3] [--run-config FILE | --run-config 'k=v ...'] [--links wifi,4g,3g]
    make deploy-local [NODES=3] [CONFIG=configs/X.toml] [RUN_ARGS="--run-config 'max-updates=20'"]

What it does, in a fresh work directory (default ``<repo>/.flwr-deploy``, git-ignored):

1. creates a throw-away CA and a server certificate for the SuperLink's address (the ``cryptography`` package that
   Flower already depends on: no ``openssl`` binary needed), and one ECDSA P-384 key pair per SuperNode (OpenSSH
   format, as ``ssh-keygen -t ecdsa -b 384`` writes it);
2. starts ``flower-superlink`` with TLS and ``--enable-supernode-auth`` on a free port, with a private
   ``FLWR_HOME`` whose ``config.toml`` names it as the connection ``deploy-local``;
3. registers every node's public key with ``flwr supernode register`` and starts ``flower-supernode`` with its
   private key, the CA certificate and ``--node-config 'partition-id=i num-partitions=N'``;
4. runs ``flwr run <repo> deploy-local --stream`` with ``clock = "wall"`` and the metrics store under the work
   directory (or the run config's own ``metrics-db``), then checks the run's status with ``flwr ls``
   (``flwr run`` exits 0 even when the ServerApp fails) and requires ``finished:completed``;
5. stops everything it started, by the process-group id it recorded, on success, failure, Ctrl-C or SIGTERM.

``--links wifi,4g,3g`` (root, Linux) puts each SuperNode in its own network namespace behind a veth pair whose
two directions are limited with ``tc ... tbf`` to the named link's downlink and uplink rates (the names of
``LINKS``, or ``DOWN/UP`` such as ``1mbit/256kbit``), cycling through the list; the SuperLink then listens on
the host side of the first veth. The namespaces and veths are removed at the end.

The module is also the library the deployment tests use (``LocalDeployment``). It needs only the standard
library, ``cryptography`` and the virtualenv's Flower executables.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import random
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONN = "deploy-local"
HEALTH_TIMEOUT_S = 60.0
ONLINE_TIMEOUT_S = 60.0

# Shaped links: (downlink, uplink) as tc rates. The first three are the network profiles of
# server_app/profiles.py (Ookla / Ofcom figures cited there); "edge" is a poor 2G/EDGE or congested cellular
# link, slow enough for a small model's transfer to dominate a task on loopback.
LINKS: dict[str, tuple[str, str]] = {
    "ethernet": ("1gbit", "1gbit"),
    "wifi": ("80mbit", "35mbit"),
    "5g": ("130mbit", "15mbit"),
    "4g": ("30mbit", "7500kbit"),
    "3g": ("6mbit", "2mbit"),
    "edge": ("400kbit", "200kbit"),
}
# What `make deploy-local` runs when given no run config: a short FedBuff run (a few minutes on 2 cores; every task
# on the real runtime costs a ClientApp process start and the SuperNode's 3 s idle poll).
DEMO_CONFIG = "strategy='fedbuff' max-updates=24 buffer-size=3 eval-every=6 task-ttl=120"
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")  # flwr.common.config.parse_config_args's pattern
_RATE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit)$")


class DeployError(RuntimeError):
    """A step of the deployment failed; the message says which, with the relevant log tail."""


class NamespacesUnavailable(DeployError):
    """Network namespaces, veths or tc are not permitted here; ``command`` is the one that failed."""

    def __init__(self, command: str, detail: str) -> None:
        super().__init__(f"`{command}` failed: {detail.strip()}")
        self.command = command


# ------------------------------------------------------------------------------------------------ processes
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _procs() -> dict[int, tuple[int, int, str]]:
    """Every process: pid -> (parent pid, process-group id, state), from /proc."""
    out: dict[int, tuple[int, int, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
            out[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0])
        except (OSError, IndexError, ValueError):
            continue
    return out


def _group_alive(pgid: int) -> bool:
    return any(g == pgid and st != "Z" for _, g, st in _procs().values())


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, whatever their group or session (superexec starts sessions of its own)."""
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in _procs().items():
        children.setdefault(ppid, []).append(p)
    found, todo = [], [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            found.append(kid)
            todo.append(kid)
    return found


def tail(path: Path, n: int = 3000) -> str:
    """The last ``n`` characters of a log file ("" if unreadable)."""
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@dataclass
class Proc:
    """A process this module started in its own session: its group id is its pid, and the group is what stops."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        """The process id (also its process-group id)."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the process itself still runs."""
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
        """Signal the process's group and every process it spawned, wait up to ``grace_s``, then KILL the rest.

        Flower's ``flower-superexec`` runs in a session of its own, and so do the ServerApp and ClientApp processes
        it starts: the group alone would leave them behind, so the descendants found now are signalled by pid.
        """
        kids = _descendants(self.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        for kid in kids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(kid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self.popen.poll()
            if not _group_alive(self.pid) and not any(_alive(k) for k in kids):
                break
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for kid in kids:
            if _alive(kid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(kid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


# --------------------------------------------------------------------------------------------- certificates
def make_ca_and_server_cert(out: Path, hosts: Sequence[str]) -> tuple[Path, Path, Path]:
    """A throw-away CA (``ca.crt``) and a server key and certificate for ``hosts`` (IPs or DNS names).

    Equivalent to the ``openssl`` commands of docs/deploy.md; returns ``(ca.crt, server.pem, server.key)``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "staleflower deploy-local CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])).issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = out / "ca.crt", out / "server.pem", out / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


def make_node_key(path: Path) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (``ssh-keygen -t ecdsa -b 384 -N '' -f path``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return path, pub


# ------------------------------------------------------------------------------------------- shaped links
def parse_link(spec: str) -> tuple[str, str, str]:
    """``wifi`` or ``DOWN/UP`` (tc rates) -> ``(name, down, up)``."""
    if spec in LINKS:
        return (spec, *LINKS[spec])
    down, sep, up = spec.partition("/")
    if not sep or not _RATE.match(down) or not _RATE.match(up):
        raise ValueError(f"unknown link {spec!r}: use one of {', '.join(LINKS)} or DOWN/UP rates like 1mbit/256kbit")
    return spec, down, up


@dataclass
class Namespaces:
    """One network namespace per node, each behind its own shaped veth pair to the host.

    Node ``i`` lives in namespace ``<tag>n<i>`` at ``10.77.<b+i>.2/30``; the host side of its veth is
    ``10.77.<b+i>.1`` and is its default gateway. The SuperLink listens on ``10.77.<b>.1`` (node 0's gateway),
    which the other namespaces reach through their own gateway: the host accepts packets for any of its
    addresses on any interface. ``tc qdisc ... tbf`` on the host side limits the downlink (host to node), on
    the namespace side the uplink.
    """

    links: list[tuple[str, str, str]]
    tag: str = field(default_factory=lambda: f"sf{os.getpid() % 100000}")
    base: int = 0
    created_ns: list[str] = field(default_factory=list)
    created_links: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.base:
            used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=False).stdout
            free = [b for b in range(10, 250 - len(self.links)) if not any(
                f"10.77.{b + i}." in used for i in range(len(self.links)))]
            if not free:
                raise NamespacesUnavailable("ip -o -4 addr", "no free 10.77.x.0/30 subnets")
            self.base = random.choice(free)

    @property
    def host(self) -> str:
        """The address the SuperLink listens on."""
        return f"10.77.{self.base}.1"

    def ns(self, i: int) -> str:
        """Namespace name of node ``i``."""
        return f"{self.tag}n{i}"

    def _sh(self, *cmd: str) -> None:
        res = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise NamespacesUnavailable(" ".join(cmd), res.stderr or res.stdout or f"exit code {res.returncode}")

    def create(self) -> None:
        """Create every namespace, veth, address, route and tbf qdisc (undo with ``destroy``)."""
        for i, (_, down, up) in enumerate(self.links):
            ns, host_if, node_if = self.ns(i), f"{self.tag}h{i}", f"{self.tag}v{i}"
            net = f"10.77.{self.base + i}"
            self._sh("ip", "netns", "add", ns)
            self.created_ns.append(ns)
            self._sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", node_if)
            self.created_links.append(host_if)
            self._sh("ip", "link", "set", node_if, "netns", ns)
            self._sh("ip", "addr", "add", f"{net}.1/30", "dev", host_if)
            self._sh("ip", "link", "set", host_if, "up")
            self._sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{net}.2/30", "dev", node_if)
            self._sh("ip", "netns", "exec", ns, "ip", "link", "set", node_if, "up")
            self._sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            self._sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", f"{net}.1")
            # tbf: rate = the link's rate; burst 32 kbit (4 KB) keeps it smooth; latency bounds the queue.
            self._sh("tc", "qdisc", "add", "dev", host_if, "root", "tbf", "rate", down, "burst", "32kbit",
                     "latency", "400ms")
            self._sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", node_if, "root", "tbf", "rate", up,
                     "burst", "32kbit", "latency", "400ms")

    def destroy(self) -> None:
        """Remove what ``create`` made (deleting a namespace deletes its veth end, and so the pair)."""
        for cmd in [["ip", "netns", "del", ns] for ns in self.created_ns] + [
                ["ip", "link", "del", link] for link in self.created_links]:
            with contextlib.suppress(OSError):
                subprocess.run(cmd, capture_output=True, check=False)
        self.created_ns.clear()
        self.created_links.clear()


def probe_namespaces() -> str:
    """Try one namespace with a shaped veth; return "" if it works, else the failing command and its error."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    probe: Namespaces | None = None
    try:
        probe = Namespaces([("probe", "1mbit", "1mbit")], tag=f"sfp{os.getpid() % 100000}")
        probe.create()
    except NamespacesUnavailable as exc:
        return str(exc)
    except OSError as exc:  # ip/tc not installed
        return f"{exc.filename or 'ip'}: {exc.strerror}"
    finally:
        if probe is not None:
            probe.destroy()
    return ""


# ----------------------------------------------------------------------------------------------- deployment
def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _json(text: str) -> dict:
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        return {}


def toml_value(v: object) -> str:
    """A run-config value in the TOML syntax ``flwr run --run-config 'k=v'`` expects."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def run_config_args(overrides: Sequence[str], defaults: dict[str, object]) -> list[str]:
    """``--run-config`` arguments: ``defaults`` first, then each override (a ``.toml`` file or ``k=v ...``).

    Flower does not mix a TOML file with ``k=v`` pairs, so a file is read here and passed as pairs.
    """
    pairs = [f"{k}={toml_value(v)}" for k, v in defaults.items()]
    for o in overrides:
        if o.endswith(".toml"):
            with open(o, "rb") as f:
                pairs += [f"{k}={toml_value(v)}" for k, v in tomllib.load(f).items()]
        else:
            pairs.append(o)
    out: list[str] = []
    for p in pairs:
        out += ["--run-config", p]
    return out


#: What the ServerApp and the ClientApp import (pyproject.toml's [tool.flwr.app.components]); the installable
#: package also ships the dashboard and the presets, which a SuperNode never needs.
APP_PACKAGES = ("server_app", "client_app", "strategies")


def stage_app(dest: Path, src: Path = ROOT) -> Path:
    """A slim copy of the Flower app: ``pyproject.toml`` and the packages its two apps import, nothing else.

    ``flwr run`` sends the app (FAB) to every SuperNode, once per app version. Built from the repository root it
    also carries benchmarks, results and docs (about 1.3 MB today); this copy is about 0.3 MB, which matters on a
    cellular link. Runs that name modules outside these packages (``strategy = "mypkg.mod:Class"``) need the
    repository itself as the app.
    """
    import shutil

    packages = APP_PACKAGES
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(src / "pyproject.toml", dest / "pyproject.toml")
    for pkg in packages:
        shutil.copytree(src / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@dataclass
class Node:
    """A SuperNode: its index, key, Flower node id (once registered) and process."""

    index: int
    key: Path
    pub: Path
    node_id: int | None = None
    proc: Proc | None = None
    link: tuple[str, str, str] | None = None


class LocalDeployment:
    """A SuperLink with TLS and SuperNode authentication plus SuperNodes, all on this machine.

    Use as a context manager: everything started is stopped by process group on exit, whatever happened.
    """

    def __init__(self, workdir: Path, *, num_nodes: int = 3, links: Sequence[str] = (), app: Path = ROOT,
                 bin_dir: Path | None = None, log=print) -> None:
        self.workdir = Path(workdir).resolve()
        self.num_nodes = num_nodes
        self.app = Path(app).resolve()
        self.bin = Path(bin_dir or Path(sys.executable).parent).resolve()
        self.log = log
        self.links = [parse_link(s) for s in links]
        self.netns = Namespaces([self.links[i % len(self.links)] for i in range(num_nodes)]) if links else None
        self.host = self.netns.host if self.netns else "127.0.0.1"
        self.port = 0
        self.procs: list[Proc] = []
        self.nodes: list[Node] = []
        self.home = self.workdir / "flwr-home"
        self.pki = self.workdir / "pki"
        self.superlink: Proc | None = None
        self.closed = False
        self._lock = threading.Lock()
        self.env = dict(os.environ)
        self.env.update(
            # flower-superlink / flower-supernode spawn flower-superexec, flwr-serverapp, flwr-clientapp by name.
            PATH=f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}",
            FLWR_HOME=str(self.home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_DISABLE_UPDATE_CHECK="1",
            STALEFLOWER_METRICS_DB=str(self.workdir / "metrics.db"),
            PYTHONUNBUFFERED="1",
        )

    # ---------------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process started (SuperNodes first, then the SuperLink), then remove the namespaces.

        Safe to call twice and from another thread: once closed, the deployment starts nothing more.
        """
        with self._lock:
            self.closed = True
            for p in reversed(self.procs):
                if p.alive() or _group_alive(p.pid):
                    self.log(f"[deploy] stopping {p.name} (pid {p.pid})")
                p.stop()
            self.procs.clear()
            if self.netns is not None:
                self.netns.destroy()

    def start(self) -> None:
        """Certificates, keys, SuperLink, registration and SuperNodes; returns once all nodes are online."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.netns is not None:
            with self._lock:
                if self.closed:
                    raise DeployError("deployment closed")
                self.netns.create()
        self.start_superlink()
        for i in range(self.num_nodes):
            node = self.new_node(i)
            self.register(node)
            self.start_node(node)
        self.wait_online(len(self.nodes))

    def _spawn(self, name: str, cmd: list[str], netns: str | None = None, home: Path | None = None) -> Proc:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        if netns is not None:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        env = self.env
        if home is not None:  # a SuperNode's own Flower home, as on a device: where it installs the app
            home.mkdir(parents=True, exist_ok=True)
            env = {**env, "FLWR_HOME": str(home)}
        with self._lock, log.open("ab") as out:
            if self.closed:
                raise DeployError(f"deployment closed: not starting {name}")
            popen = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            proc = Proc(name, popen, log)
            self.procs.append(proc)
        return proc

    def start_superlink(self) -> None:
        """Start ``flower-superlink`` with TLS and SuperNode authentication; wait until it is healthy."""
        hosts = [self.host] if self.host == "127.0.0.1" else [self.host, "127.0.0.1"]
        self.ca, cert, key = make_ca_and_server_cert(self.pki, [*hosts, "localhost"])
        self.port = _free_port(self.host)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'# Written by scripts/deploy_local.py\n[superlink]\ndefault = "{CONN}"\n\n[superlink.{CONN}]\n'
            f'address = "{self.host}:{self.port}"\nroot-certificates = "{self.ca}"\n'
        )
        state = self.workdir / "state.db"
        for suffix in ("", "-shm", "-wal"):
            Path(f"{state}{suffix}").unlink(missing_ok=True)
        self.log(f"[deploy] starting flower-superlink (TLS, SuperNode auth) on {self.host}:{self.port}")
        self.superlink = self._spawn("superlink", [
            str(self.bin / "flower-superlink"), "--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(cert),
            "--ssl-keyfile", str(key), "--enable-supernode-auth", "--host", self.host, "--port", str(self.port),
            "--database", str(state), "--disable-runtime-dependency-installation",
        ])
        ctx = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            if not self.superlink.alive():
                raise DeployError(f"flower-superlink exited ({self.superlink.popen.returncode}):\n"
                                  f"{tail(self.superlink.log)}")
            try:
                with urllib.request.urlopen(f"https://{self.host}:{self.port}/health", timeout=2, context=ctx) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise DeployError(f"flower-superlink not healthy after {HEALTH_TIMEOUT_S:.0f} s:\n"
                                  f"{tail(self.superlink.log)}")
            time.sleep(0.2)

    def new_node(self, index: int) -> Node:
        """A key pair for node ``index`` (not registered, not started)."""
        key, pub = make_node_key(self.pki / f"node{index}")
        node = Node(index, key, pub, link=self.netns.links[index] if self.netns else None)
        self.nodes.append(node)
        return node

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment (its FLWR_HOME, its connection)."""
        return subprocess.run([str(self.bin / "flwr"), *args], cwd=self.app, env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def register(self, node: Node) -> int:
        """``flwr supernode register`` the node's public key; returns the node id the SuperLink assigned."""
        res = self.flwr("supernode", "register", str(node.pub), CONN, "--name", f"node{node.index}", "--format",
                        "json")
        data = _json(res.stdout)
        if res.returncode != 0 or not data.get("success", True) or "node-id" not in data:
            raise DeployError(f"flwr supernode register failed (rc {res.returncode}):\n{res.stdout}{res.stderr}")
        node.node_id = int(data["node-id"])
        return node.node_id

    def start_node(self, node: Node, *, key: Path | None = None) -> Proc:
        """Start ``flower-supernode`` for ``node`` (in its namespace when links are shaped)."""
        parts = f"partition-id={node.index} num-partitions={self.num_nodes}"
        ns = self.netns.ns(node.index) if self.netns else None
        cmd = [
            str(self.bin / "flower-supernode"), "--root-certificates", str(self.ca),
            "--superlink", f"{self.host}:{self.port}", "--auth-supernode-private-key", str(key or node.key),
            "--node-config", parts,
            # The node's own Runtime API (its ClientApp processes talk to it): loopback, unique per host.
            "--port", str(9094 if ns else _free_port()),
        ]
        link = f" behind {node.link[0]} ({node.link[1]} down, {node.link[2]} up)" if node.link else ""
        self.log(f"[deploy] starting flower-supernode {node.index} ({parts}){link}")
        node.proc = self._spawn(f"supernode{node.index}", cmd, netns=ns,
                                home=self.workdir / f"supernode{node.index}")
        return node.proc

    def supernodes(self) -> list[dict]:
        """``flwr supernode ls --format json``'s nodes."""
        res = self.flwr("supernode", "ls", CONN, "--format", "json", timeout=60)
        return list(_json(res.stdout).get("nodes", []))

    def wait_online(self, count: int, timeout: float = ONLINE_TIMEOUT_S) -> None:
        """Wait until ``count`` SuperNodes are online."""
        deadline = time.monotonic() + timeout
        while True:
            online = [n for n in self.supernodes() if str(n.get("status", "")).startswith("online")]
            if len(online) >= count:
                self.log(f"[deploy] {len(online)} SuperNode(s) online")
                return
            dead = [n for n in self.nodes if n.proc is not None and not n.proc.alive()]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.proc.name} ---\n{tail(n.proc.log, 1500)}" for n in self.nodes if n.proc)
                raise DeployError(f"{len(online)}/{count} SuperNodes online after {timeout:.0f} s:\n{logs}")
            time.sleep(1.0)

    # --------------------------------------------------------------------------------------------------- runs
    def start_run(self, run_config: Sequence[str] = (), *, metrics_db: Path | None = None) -> tuple[Proc, Path]:
        """Start ``flwr run <app> deploy-local --stream`` on the wall clock in the background.

        Returns the ``flwr`` process (its output goes to ``logs/run.log``) and the metrics store the run writes.
        """
        db = Path(metrics_db or self.workdir / "metrics.db").resolve()
        args = run_config_args(run_config, {"metrics-db": str(db)})
        for pair in args[1::2]:  # the run config's own metrics-db wins (flwr's own k=v pattern)
            for key, value in _PAIR.findall(pair):
                if key == "metrics-db":
                    db = Path(tomllib.loads(f"v = {value}")["v"]).resolve()
        args += ["--run-config", 'clock="wall"']  # always: a deployment runs on real time
        self.log(f"[deploy] flwr run {self.app} {CONN} --stream {' '.join(args)}")
        run_log = self.workdir / "logs" / "run.log"
        run_log.unlink(missing_ok=True)
        proc = self._spawn("run", [str(self.bin / "flwr"), "run", str(self.app), CONN, "--stream", *args])
        return proc, db

    def run_id(self, run_proc: Proc, timeout: float = 120.0) -> str:
        """The id ``flwr run`` reports once it has started the run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.findall(r"Successfully started run (\d+)", tail(run_proc.log, 100000))
            if found:
                return found[-1]
            if not run_proc.alive():
                break
            time.sleep(0.2)
        raise DeployError(f"flwr run started no run:\n{tail(run_proc.log)}")

    def status(self, run_id: str) -> dict:
        """``flwr ls --run-id ID --format json``'s entry for the run ({} if unknown)."""
        res = self.flwr("ls", CONN, "--run-id", run_id, "--format", "json", timeout=60)
        runs = _json(res.stdout).get("runs", [])
        return dict(runs[0]) if runs else {}

    def wait_run(self, run_proc: Proc, run_id: str, timeout: float) -> dict:
        """Wait for ``flwr run --stream`` to end, then poll ``flwr ls`` until the run is finished."""
        deadline = time.monotonic() + timeout
        while run_proc.alive() and time.monotonic() < deadline:
            if self.superlink is not None and not self.superlink.alive():
                raise DeployError(f"the SuperLink died:\n{tail(self.superlink.log)}")
            time.sleep(0.5)
        while True:
            run = self.status(run_id)
            if str(run.get("status", "")).startswith("finished"):
                return run
            if time.monotonic() > deadline:
                raise DeployError(f"run {run_id} not finished after {timeout:.0f} s: {run}\n{tail(run_proc.log)}")
            time.sleep(2.0)

    def logs(self, run_id: str) -> str:
        """The ServerApp's log (``flwr log ID --show``)."""
        res = self.flwr("log", run_id, CONN, "--show", timeout=60)
        return res.stdout[-6000:] + res.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------- CLI
def summarize(db: Path, run_id: str) -> str:
    """Per-node task counts and mean staleness from the metrics store."""
    if not db.exists():
        return f"no metrics store at {db}"
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT n.partition_id, u.status, COUNT(*), AVG(u.staleness) FROM updates u "
            "LEFT JOIN nodes n ON n.run_id = u.run_id AND n.node_id = u.node_id WHERE u.run_id = ? "
            "GROUP BY n.partition_id, u.status ORDER BY n.partition_id, u.status", (run_id,)).fetchall()
    finally:
        con.close()
    lines = [f"  partition {p}: {n} {s}" + (f" (mean staleness {st:.2f})" if st is not None else "")
             for p, s, n, st in rows]
    return "\n".join(lines) or "  (no task rows)"


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Ctrl-C and SIGTERM unwind through ``finally`` blocks (SIGTERM as SystemExit(143))."""
    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    old_hup = signal.signal(signal.SIGHUP, on_term)
    # Ctrl-C is KeyboardInterrupt even where the shell started us with SIGINT ignored (a background job).
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGHUP, old_hup)
        signal.signal(signal.SIGINT, old_int)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3, help="SuperNodes to start (default 3)")
    ap.add_argument("--run-config", action="append", default=[],
                    help="a preset .toml or 'k=v ...' (repeatable); clock='wall' is set for you; "
                    f"default: {DEMO_CONFIG}")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".flwr-deploy",
                    help="where certificates, keys, logs, Flower's home and the metrics store go")
    ap.add_argument("--links", default="", help="comma-separated links per node, cycling: "
                    f"{', '.join(LINKS)} or DOWN/UP tc rates (root; network namespaces)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds the run may take (default 1800)")
    ap.add_argument("--app", type=Path, default=ROOT,
                    help="the Flower app directory for `flwr run` (default: the repository)")
    ap.add_argument("--slim", action="store_true", help="run a slim copy of the app (pyproject.toml and the "
                    "packages only: about 0.3 MB instead of 1.3 MB for every SuperNode to download)")
    args = ap.parse_args(argv)
    if args.nodes < 1:
        ap.error("--nodes must be >= 1")
    links = [s.strip() for s in args.links.split(",") if s.strip()]
    try:
        for s in links:
            parse_link(s)
    except ValueError as exc:
        ap.error(str(exc))

    t0 = time.monotonic()
    app = stage_app(args.workdir.resolve() / "app", args.app.resolve()) if args.slim else args.app
    with _signals_raise(), LocalDeployment(args.workdir, num_nodes=args.nodes, links=links, app=app) as dep:
        try:
            dep.start()
            proc, db = dep.start_run(args.run_config or [DEMO_CONFIG])
            run_id = dep.run_id(proc)
            dep.log(f"[deploy] run {run_id} started; streaming its log to {proc.log}")
            run = dep.wait_run(proc, run_id, args.timeout)
        except KeyboardInterrupt:
            dep.log("[deploy] interrupted: stopping everything")
            return 130
        except DeployError as exc:
            dep.log(f"[deploy] error: {exc}")
            return 1
        status = run.get("status", "unknown")
        dep.log(tail(proc.log, 4000))
        if status != "finished:completed":
            dep.log(f"[deploy] run {run_id} ended with status {status!r}: {run.get('status-details', '')}")
            dep.log(f"[deploy] logs under {dep.workdir / 'logs'}; ServerApp log:\n{dep.logs(run_id)}")
            return 1
        dep.log(f"[deploy] run {run_id} finished:completed in {time.monotonic() - t0:.0f} s")
        dep.log(f"[deploy] metrics store {db} (run_id '{run_id}'):\n{summarize(db, run_id)}")
        dep.log(f"[deploy] view with: make dashboard DB={db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
