#!/usr/bin/env bash
# Run the Flower app with the REAL Flower runtime (`flwr run . --stream`, simulated SuperNodes) and check that the
# run really succeeded.
#
#   scripts/flwr_run.sh [--run-config PRESET.toml|"k=v ..."]... [OTHER FLWR-RUN-ARGS...]
#   scripts/flwr_run.sh --run-config "max-updates=50 lr=0.01"
#   scripts/flwr_run.sh --run-config configs/fedbuff-digits.toml --run-config "max-updates=50"   # a preset, shortened
#
# What it does:
#   0. checks the run config before it starts anything: every --run-config (a TOML preset or "k=v" pairs; several
#      allowed, later ones win, which flwr itself does not allow) is merged and validated by
#      `python -m server_app.simulate --check` (keys with did-you-mean, values, min-nodes against the fleet, data,
#      model); a mistake ends the script with that one-line error and exit code 2. flwr run then gets the merged
#      config as one --run-config string, with `metrics-db` resolved to an absolute path;
#   1. starts its own `flower-superlink --simulation --insecure` on a free loopback port, with its state in a private
#      FLWR_HOME (default: <repo>/.flwr-home, git-ignored), and points $FLWR_HOME/config.toml at it;
#   2. runs `flwr run <repo> <that connection> --stream --federation-config "num-supernodes=N ..." ARGS...` and
#      shows its stream (the ServerApp's progress lines and summary), less Flower's notice that the default
#      federation shrank from 10 to 2 SuperNodes (this script always sets num-supernodes) and its warning that each
#      ClientApp actor is terminated as the run ends;
#   3. checks the run's status with `flwr ls --run-id ID --format json` (`flwr run` exits 0 even when the ServerApp
#      fails) and requires `finished:completed`;
#   4. stops the SuperLink it started, by pid, on success, failure or Ctrl-C (a trap), and prints the metrics store.
#
# Environment knobs:
#   VENV            virtualenv whose bin/ holds flwr, flower-superlink, ... (default <repo>/.venv)
#   FLWR_HOME       Flower's home for this script (default <repo>/.flwr-home)
#   NUM_SUPERNODES  simulated SuperNodes (default 10)
#   CLIENT_CPUS     Ray CPUs per ClientApp actor (default 1: as many actors as cores)
#   RUN_TIMEOUT     seconds to wait for the run to finish after the stream ends (default 120)
#   RAY_ADDRESS     the Ray cluster for the ClientApp actors (head:port), reaching the simulation through the
#                   SuperLink's environment; unset, Ray's own choice: the cluster `ray start` last started on this
#                   machine, else a private local one; `local`: always a private local one (docs/scale-out.md)
#   STALEFLOWER_METRICS_DB  the metrics store when the run config sets no `metrics-db` (default, as for every
#                   runner: ~/.staleflower/metrics.db)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
VENV="$(cd "$VENV" && pwd)"
# flower-superlink spawns flower-superexec / flwr-simulation by name: they must be on PATH.
export PATH="$VENV/bin:$PATH"
PY="$VENV/bin/python"

export FLWR_HOME="${FLWR_HOME:-$ROOT/.flwr-home}"
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="${RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO:-0}"
NUM_SUPERNODES="${NUM_SUPERNODES:-10}"
CLIENT_CPUS="${CLIENT_CPUS:-1}"
RUN_TIMEOUT="${RUN_TIMEOUT:-120}"
CONN="staleflower-sim"

say() { printf '[flwr_run] %s\n' "$*" >&2; }

# Every --run-config is checked and merged here (step 0); the other arguments go to flwr run as they are.
RUN_CONFIGS=()
FLWR_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --run-config|-c)
            if [ $# -lt 2 ]; then say "error: $1 needs a value"; exit 2; fi
            RUN_CONFIGS+=(--run-config "$2")
            shift 2 ;;
        --run-config=*) RUN_CONFIGS+=(--run-config "${1#--run-config=}"); shift ;;
        *) FLWR_ARGS+=("$1"); shift ;;
    esac
done
T0=$(date +%s)
# PYTHONPATH, not cd: a preset's path is the caller's, relative to where the script was started.
if ! RUN_CONFIG="$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m server_app.simulate --check --print-run-config --nodes "$NUM_SUPERNODES" \
        ${RUN_CONFIGS[@]+"${RUN_CONFIGS[@]}"})"; then
    say "the run config is not valid (above); nothing was started"
    exit 2
fi
say "run config checked in $(($(date +%s) - T0)) s: $RUN_CONFIG"

mkdir -p "$FLWR_HOME"
FLWR_HOME="$(cd "$FLWR_HOME" && pwd)"
SL_DIR="$FLWR_HOME/superlink"
SL_PIDFILE="$SL_DIR/pid"
SL_LOG="$SL_DIR/superlink.log"
RUN_LOG="$SL_DIR/run.log"
mkdir -p "$SL_DIR"

# The pids of a process's descendants (children first, recursively), from /proc via ps.
descendants() {
    local kid
    for kid in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$kid"
        descendants "$kid"
    done
}

# Stop one SuperLink by pid, and whatever it spawned (superexec, flwr-simulation, Ray) that outlives it.
stop_superlink() {
    local pid="$1" kids i
    kill -0 "$pid" 2>/dev/null || return 0
    kids="$(descendants "$pid" | tr '\n' ' ')"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    # superexec watches its parent and exits on its own; give the tree a few seconds, then insist.
    for i in $(seq 25); do
        local alive=""
        for k in $kids; do kill -0 "$k" 2>/dev/null && alive="$alive $k"; done
        [ -z "$alive" ] && break
        sleep 0.2
    done
    for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
}

SL_PID=""
FLWR_PID=""
TAIL_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$FLWR_PID" ]; then
        kill -TERM "$FLWR_PID" 2>/dev/null || true
    fi
    if [ -n "$TAIL_PID" ]; then
        kill -TERM "$TAIL_PID" 2>/dev/null || true
    fi
    if [ -n "$SL_PID" ]; then
        say "stopping SuperLink (pid $SL_PID)"
        stop_superlink "$SL_PID"
        rm -f "$SL_PIDFILE"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A SuperLink left behind by an earlier run of this script with the same FLWR_HOME (e.g. after kill -9): stop it,
# but only if that pid really is a flower-superlink of this FLWR_HOME.
if [ -f "$SL_PIDFILE" ]; then
    old="$(cat "$SL_PIDFILE" 2>/dev/null || true)"
    if [ -n "$old" ] && tr '\0' ' ' <"/proc/$old/cmdline" 2>/dev/null | grep -q "flower-superlink.*$SL_DIR/"; then
        say "stopping a stale SuperLink of this FLWR_HOME (pid $old)"
        stop_superlink "$old"
    fi
    rm -f "$SL_PIDFILE"
fi

PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat >"$FLWR_HOME/config.toml" <<EOF
# Written by scripts/flwr_run.sh: the SuperLink it starts for each run.
[superlink]
default = "$CONN"

[superlink.$CONN]
address = "127.0.0.1:$PORT"
insecure = true
EOF

# A fresh SuperLink state per invocation: the only run in it is ours.
rm -f "$SL_DIR/state.db" "$SL_DIR/state.db-shm" "$SL_DIR/state.db-wal"
say "starting flower-superlink --simulation on 127.0.0.1:$PORT (FLWR_HOME=$FLWR_HOME, log $SL_LOG)"
# In its own session (setsid, then exec in place: $! is the SuperLink's pid), so that a Ctrl-C in the terminal
# reaches only this script, whose trap then stops the SuperLink in order.
"$PY" -c 'import os, sys
try:
    os.setsid()
except OSError:
    pass
os.execvp(sys.argv[1], sys.argv[1:])' flower-superlink --insecure --simulation --host 127.0.0.1 --port "$PORT" \
    --database "$SL_DIR/state.db" --disable-runtime-dependency-installation >"$SL_LOG" 2>&1 </dev/null &
SL_PID=$!
echo "$SL_PID" >"$SL_PIDFILE"

if ! "$PY" - "$PORT" "$SL_PID" <<'EOF'; then
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:  # gone, or a zombie not yet reaped by this script
        with open(f"/proc/{pid}/stat") as f:
            dead = f.read().rsplit(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        dead = True
    if dead:
        sys.exit("flower-superlink exited during start-up")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit("flower-superlink not healthy after 60 s")
EOF
    say "SuperLink did not start; its log ($SL_LOG):"
    tail -n 30 "$SL_LOG" >&2 || true
    exit 1
fi
say "SuperLink healthy after $(($(date +%s) - T0)) s"
if [ -n "${RAY_ADDRESS:-}" ]; then
    say "ClientApps on the Ray cluster RAY_ADDRESS=$RAY_ADDRESS (docs/scale-out.md)"
fi

say "flwr run $ROOT $CONN --stream --federation-config 'num-supernodes=$NUM_SUPERNODES client-resources-num-cpus=$CLIENT_CPUS' --run-config \"$RUN_CONFIG\" ${FLWR_ARGS[*]:-}"
# In the background + `wait`, so that Ctrl-C / TERM run the trap at once (bash defers traps until a foreground
# command returns); `tail --pid` shows the stream live and ends when flwr does.
: >"$RUN_LOG"
flwr run "$ROOT" "$CONN" --stream \
    --federation-config "num-supernodes=$NUM_SUPERNODES client-resources-num-cpus=$CLIENT_CPUS" \
    --run-config "$RUN_CONFIG" ${FLWR_ARGS[@]+"${FLWR_ARGS[@]}"} >"$RUN_LOG" 2>&1 </dev/null &
FLWR_PID=$!
# Left out of what is shown (run.log keeps all): Flower's notice of its new default federation size and how to
# change it (num-supernodes is always set here), and the warning each ClientApp actor gives as the run ends normally.
tail -n +1 -f --pid="$FLWR_PID" "$RUN_LOG" | grep --line-buffered -v -e "default simulated SuperNodes changed" \
    -e "To change federation size" -e "flwr federation simulation-config" -e "Manually terminating ClientAppActor" &
TAIL_PID=$!
FLWR_RC=0
wait "$FLWR_PID" || FLWR_RC=$?
FLWR_PID=""
wait "$TAIL_PID" || true
TAIL_PID=""

RUN_ID="$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' "$RUN_LOG" | tail -n 1)"
if [ -z "$RUN_ID" ]; then
    say "flwr run (exit code $FLWR_RC) started no run"
    exit 1
fi

# `flwr run --stream` exits 0 even when the ServerApp fails: the run's status is the truth.
STATUS="$("$PY" - "$RUN_ID" "$CONN" "$RUN_TIMEOUT" <<'EOF'
import json, subprocess, sys, time
run_id, conn, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + timeout
status = "unknown"
while True:
    out = subprocess.run(["flwr", "ls", conn, "--run-id", run_id, "--format", "json"],
                         capture_output=True, text=True, check=False).stdout
    try:
        runs = json.loads(out).get("runs", [])
        status = runs[0]["status"] if runs else "unknown"
    except (ValueError, KeyError, IndexError):
        status = "unknown"
    if status.startswith("finished") or time.monotonic() > deadline:
        break
    time.sleep(1)
print(status)
EOF
)"

# Where the results went: the ServerApp prints it in its summary; otherwise the metrics-db the check pinned.
DB="$(sed -n 's/.*metrics store: \(.*\)$/\1/p' "$RUN_LOG" | tail -n 1)"
DB="${DB:-$(printf '%s' "$RUN_CONFIG" | sed -n "s/.*metrics-db='\([^']*\)'.*/\1/p")}"

if [ "$STATUS" != "finished:completed" ]; then
    say "run $RUN_ID ended with status '$STATUS' (flwr run exit code $FLWR_RC)"
    say "logs: $RUN_LOG (the run), $SL_LOG (the SuperLink)"
    exit 1
fi
say "run $RUN_ID finished:completed in $(($(date +%s) - T0)) s"
say "results: metrics store $DB (run_id '$RUN_ID'); view with: make dashboard DB=$DB"
