"""Only the Fleet API is on the network: the deployment kit's SuperLink and Fleet proxy, seen from another host.

Flower 1.41's Control API (``flwr run``, ``flwr ls``) has no user accounts, and whoever reaches it runs code on the
server and on every SuperNode. The kit (docs/deploy.md, section 3) therefore starts the SuperLink on 127.0.0.1:9093
(``deploy/systemd/staleflower-superlink.service``) and publishes port 9092 through nginx
(``deploy/nginx/staleflower-fleet.conf``), which forwards the Fleet API's paths and refuses everything else.

This test (marker ``deployment``: ``make test-deployment``; root, ``ip netns`` and nginx, else skipped with the
reason) runs both shipped files as they are (only the certificate and state paths are replaced) in a "server"
network namespace, joined by a veth pair to a "network" namespace that plays a device or an attacker elsewhere:

- from the network, a registered SuperNode comes online through the proxy (its signed requests reach the
  SuperLink, which checks them), and an unsigned Fleet request gets the SuperLink's own 401;
- from the network, ``flwr ls`` fails, every Control, Runtime or documentation path (also through ``..`` and
  %-escapes) gets nginx's 404 without reaching the SuperLink, and the SuperLink's own port is closed;
- on the server's loopback, ``flwr ls`` works.

Both namespaces (and with them the veth pair) are removed at the end, and every process is stopped by its pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from deploy_local import Proc, make_ca_and_server_cert, make_node_key, tail  # noqa: E402

pytestmark = pytest.mark.deployment

BIN = Path(sys.executable).parent
SITE = ROOT / "deploy" / "nginx" / "staleflower-fleet.conf"
UNIT = ROOT / "deploy" / "systemd" / "staleflower-superlink.service"
PUBLIC_PORT = 9092   # the proxy (the shipped site's `listen`)
LINK_PORT = 9093     # the SuperLink, loopback only (the shipped unit's `--port`)
START_TIMEOUT_S = 40.0

# Run inside a namespace: one HTTPS request per (method, path, port[, size]), raw path as given (no client-side
# normalisation), each answered by {"status", "body"} or {"error"}. A POST's body is a valid protobuf message:
# empty, or one unknown bytes field (number 15) of ``size`` bytes, which any request type parses and ignores.
PROBE = r"""
import http.client, json, ssl, sys
host, cafile, reqs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ctx = ssl.create_default_context(cafile=cafile)
out = []

def varint(n):
    b = b""
    while n > 0x7F:
        b, n = b + bytes([n & 0x7F | 0x80]), n >> 7
    return b + bytes([n])

for method, path, port, *size in reqs:
    body = None if method != "POST" else b"\x7a" + varint(size[0]) + bytes(size[0]) if size else b""
    try:
        c = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
        c.request(method, path, body=body,
                  headers={"content-type": "application/protobuf", "accept": "application/protobuf"})
        r = c.getresponse()
        out.append({"status": r.status, "body": r.read(4000).decode("utf-8", "replace")})
        c.close()
    except OSError as e:
        out.append({"error": f"{type(e).__name__}: {e}"})
print(json.dumps(out))
"""


def _sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


@dataclass
class Fenced:
    """The server namespace (SuperLink + proxy), the network namespace, and how to act from either side."""

    tmp: Path
    server_ns: str
    net_ns: str
    public_ip: str
    ca: Path
    env: dict[str, str] = field(repr=False)
    procs: list[Proc] = field(default_factory=list)
    node_id: int = 0

    def spawn(self, name: str, ns: str, cmd: list[str], home: Path | None = None) -> Proc:
        log = self.tmp / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        env = self.env if home is None else {**self.env, "FLWR_HOME": str(home)}
        with log.open("ab") as out:
            popen = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], cwd=self.tmp, env=env,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def flwr(self, ns: str, conn: str, *args: str) -> subprocess.CompletedProcess[str]:
        """The ``flwr`` CLI in namespace ``ns`` with the Flower home that names connection ``conn``."""
        return subprocess.run(["ip", "netns", "exec", ns, str(BIN / "flwr"), *args], cwd=self.tmp,
                              env={**self.env, "FLWR_HOME": str(self.tmp / f"flwr-{conn}")}, capture_output=True,
                              text=True, timeout=60, check=False)

    def probe(self, ns: str, host: str, *reqs: tuple) -> list[dict]:
        res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-I", "-c", PROBE, host, str(self.ca),
                              json.dumps(reqs)], capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{tail(p.log, 2500)}" for p in self.procs)


def _unit_command(etc: Path, state: Path) -> list[str]:
    """The shipped unit's ExecStart, with this machine's virtualenv and the test's certificates and state."""
    text = re.sub(r"\\\n\s*", " ", UNIT.read_text())
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", text, flags=re.M)
    return [arg.replace("/opt/staleflower/venv/bin/", f"{BIN}/").replace("/etc/staleflower/", f"{etc}/")
            .replace("/var/lib/staleflower/", f"{state}/") for arg in exec_start.split()]


def _nginx_conf(tmp: Path, etc: Path) -> Path:
    """A main nginx.conf for the test (its own pid, logs and temp paths) that includes the shipped site."""
    site = SITE.read_text().replace("/etc/staleflower/", f"{etc}/")
    if not Path("/proc/sys/net/ipv6").exists():  # a kernel without IPv6: the site's [::] listen cannot bind
        site = re.sub(r"^\s*listen \[::\].*$", "", site, flags=re.M)
    (tmp / "nginx").mkdir()
    (tmp / "nginx" / "staleflower-fleet.conf").write_text(site)
    temps = "\n".join(f"    {k}_temp_path {tmp}/nginx/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                       "scgi"))
    conf = tmp / "nginx" / "nginx.conf"
    # Workers as root: the test's temp paths are under pytest's private tmp (a real server uses the distro's
    # nginx.conf: workers as www-data, the master reads the root-only key).
    conf.write_text(f"""daemon off;
user root root;
worker_processes 1;
pid {tmp}/nginx/nginx.pid;
error_log {tmp}/nginx/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {tmp}/nginx/access.log;
{temps}
    include {tmp}/nginx/staleflower-fleet.conf;
}}
""")
    return conf


def _netns_pair(tag: str, server_ns: str, net_ns: str, subnet: str) -> str:
    """Two namespaces joined by a veth pair (server .1, network .2); returns "" or the command that failed."""
    steps = [
        ["ip", "netns", "add", server_ns],
        ["ip", "netns", "add", net_ns],
        ["ip", "link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b"],
        ["ip", "link", "set", f"{tag}a", "netns", server_ns],
        ["ip", "link", "set", f"{tag}b", "netns", net_ns],
        ["ip", "-n", server_ns, "addr", "add", f"{subnet}.1/24", "dev", f"{tag}a"],
        ["ip", "-n", net_ns, "addr", "add", f"{subnet}.2/24", "dev", f"{tag}b"],
        ["ip", "-n", server_ns, "link", "set", f"{tag}a", "up"],
        ["ip", "-n", net_ns, "link", "set", f"{tag}b", "up"],
        ["ip", "-n", server_ns, "link", "set", "lo", "up"],
        ["ip", "-n", net_ns, "link", "set", "lo", "up"],
    ]
    for cmd in steps:
        res = _sh(*cmd)
        if res.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {res.stderr.strip()}"
    return ""


def _wait(what: str, fenced: Fenced, check, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not check():
        if proc is not None and not proc.alive():
            pytest.fail(f"{proc.name} exited ({proc.popen.returncode}) before {what}\n{fenced.logs()}")
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {START_TIMEOUT_S:.0f} s\n{fenced.logs()}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def fenced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fenced]:
    if os.geteuid() != 0:
        pytest.skip(f"network namespaces need root (running as uid {os.geteuid()})")
    if shutil.which("ip") is None:
        pytest.skip("`ip` (iproute2) is not installed")
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if nginx is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx; .ci/run installs it)")
    tag = f"sfa{os.getpid() % 10**7}"
    server_ns, net_ns = f"{tag}srv", f"{tag}net"
    subnet = f"10.200.{os.getpid() % 250 + 1}"
    tmp = tmp_path_factory.mktemp("access")
    try:
        why = _netns_pair(tag, server_ns, net_ns, subnet)
        if why:
            pytest.skip(f"network namespaces with a veth pair are not permitted here: {why}")
        yield from _start(tmp, nginx, server_ns, net_ns, subnet)
    finally:
        for ns in (server_ns, net_ns):  # deleting a namespace deletes its end of the veth, and so the pair
            _sh("ip", "netns", "del", ns)
        _sh("ip", "link", "del", f"{tag}a")  # only if it never left the host's namespace


def _start(tmp: Path, nginx: str, server_ns: str, net_ns: str, subnet: str) -> Iterator[Fenced]:
    public_ip = f"{subnet}.1"
    etc, state = tmp / "etc", tmp / "state"
    state.mkdir()
    # The server certificate names the public address (devices) and localhost / 127.0.0.1 (the proxy's upstream,
    # the operator's flwr CLI and the SuperLink's own ServerApp on loopback), as docs/deploy.md's openssl command.
    ca, _, _ = make_ca_and_server_cert(etc, [public_ip, "127.0.0.1", "localhost"])
    env = dict(os.environ)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1",
               PYTHONUNBUFFERED="1")
    for conn, address in (("loopback", f"127.0.0.1:{LINK_PORT}"), ("network", f"{public_ip}:{PUBLIC_PORT}")):
        home = tmp / f"flwr-{conn}"
        home.mkdir()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{conn}"\n\n[superlink.{conn}]\n'
                                          f'address = "{address}"\nroot-certificates = "{ca}"\n')
    env["FLWR_HOME"] = str(tmp / "flwr-loopback")
    f = Fenced(tmp, server_ns, net_ns, public_ip, ca, env)
    try:
        superlink = f.spawn("superlink", server_ns, _unit_command(etc, state))
        proxy = f.spawn("nginx", server_ns, [nginx, "-e", str(tmp / "nginx-startup.log"), "-p", f"{tmp}/",
                                             "-c", str(_nginx_conf(tmp, etc))])

        def healthy() -> bool:
            link, edge = f.probe(server_ns, "127.0.0.1", ("GET", "/health", LINK_PORT),
                                 ("POST", "/v1/fleet/get-run", PUBLIC_PORT))
            return link.get("status") == 200 and "status" in edge

        _wait("healthy (the SuperLink on loopback, the proxy on the public port)", f, healthy, superlink)
        assert proxy.alive(), f.logs()

        # A device: its key registered by the operator on the server's loopback, its SuperNode on the network.
        key, pub = make_node_key(tmp / "device" / "node-key")
        res = f.flwr(server_ns, "loopback", "supernode", "register", str(pub), "loopback", "--format", "json")
        data = json.loads(res.stdout[res.stdout.find("{"):] or "{}")
        assert res.returncode == 0 and "node-id" in data, f"{res.stdout}{res.stderr}"
        f.node_id = int(data["node-id"])
        f.spawn("supernode", net_ns, [
            str(BIN / "flower-supernode"), "--superlink", f"{public_ip}:{PUBLIC_PORT}", "--root-certificates",
            str(ca), "--auth-supernode-private-key", str(key), "--node-config", "partition-id=0 num-partitions=1",
        ], home=tmp / "device" / "flwr")
        yield f
    finally:
        for p in reversed(f.procs):
            p.stop(grace_s=10.0)


def _online(f: Fenced) -> set[int]:
    res = f.flwr(f.server_ns, "loopback", "supernode", "ls", "loopback", "--format", "json")
    nodes = json.loads(res.stdout[res.stdout.find("{"):] or "{}").get("nodes", []) if res.returncode == 0 else []
    return {int(n["node-id"]) for n in nodes if str(n.get("status", "")).startswith("online")}


def test_supernode_on_the_network_comes_online_through_the_proxy(fenced: Fenced) -> None:
    f = fenced
    node = next(p for p in f.procs if p.name == "supernode")
    _wait("the SuperNode online", f, lambda: f.node_id in _online(f), node)
    # Its requests went through the proxy (the SuperLink's own port is closed to the network: next test).
    access = (f.tmp / "nginx" / "access.log").read_text()
    assert re.search(r'"POST /v1/fleet/activate-node HTTP/1\.1" 200 ', access), access[-3000:]
    # An unsigned Fleet request reaches the SuperLink, which refuses it itself: authentication is end to end.
    # So does a 6 MB object (an array chunk is at most 5 MB), buffered by nginx; 17 MB is refused by nginx (413).
    unsigned, chunk, huge = f.probe(f.net_ns, f.public_ip, ("POST", "/v1/fleet/send-node-heartbeat", PUBLIC_PORT),
                                    ("POST", "/v1/fleet/push-object", PUBLIC_PORT, 6 << 20),
                                    ("POST", "/v1/fleet/push-object", PUBLIC_PORT, 17 << 20))
    for answer in (unsigned, chunk):
        assert answer.get("status") == 401 and "Invalid SuperNode authentication" in answer["body"], answer
    assert huge.get("status") == 413 and "nginx" in huge["body"], huge


def test_control_api_is_closed_to_the_network(fenced: Fenced) -> None:
    f = fenced
    res = f.flwr(f.net_ns, "network", "ls", "network", "--format", "json")
    # flwr ls --format json exits 0 whatever happened: its JSON says whether it listed runs.
    data = json.loads(res.stdout[res.stdout.find("{"):] or "{}")
    assert data.get("success") is False and "runs" not in data, f"flwr ls from the network:\n{res.stdout}{res.stderr}"
    assert "404 Not Found" in data.get("error-message", ""), data
    refused = ["/v1/control/list-runs", "/v1/control/start-run", "/v1/control/list-nodes",
               "/v1/runtime/list-nodes", "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
               "/v1/fleet/..%2Fcontrol/list-runs", "/health", "/openapi.json", "/docs", "/"]
    answers = f.probe(f.net_ns, f.public_ip, *[("POST", p, PUBLIC_PORT) for p in refused],
                      ("GET", "/openapi.json", PUBLIC_PORT), ("GET", "/v1/fleet/get-run", PUBLIC_PORT),
                      ("POST", "/v1/control/list-runs", LINK_PORT))
    paths = [*refused, "GET /openapi.json", "GET /v1/fleet/get-run", f"port {LINK_PORT}"]
    got = dict(zip(paths, answers, strict=True))
    for path in [*refused, "GET /openapi.json"]:
        assert got[path].get("status") == 404 and "nginx" in got[path]["body"], (path, got[path])
    assert got["GET /v1/fleet/get-run"].get("status") == 403, got  # the Fleet API is POST only
    link = got[f"port {LINK_PORT}"]
    assert "Connection refused" in link.get("error", ""), f"the SuperLink's own port answers the network: {link}"


def test_control_api_works_on_the_servers_loopback(fenced: Fenced) -> None:
    res = fenced.flwr(fenced.server_ns, "loopback", "ls", "loopback", "--format", "json")
    data = json.loads(res.stdout[res.stdout.find("{"):] or "{}")
    assert res.returncode == 0 and data.get("success") is True and data.get("runs") == [], res.stdout + res.stderr
