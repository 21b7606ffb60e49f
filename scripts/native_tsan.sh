#!/usr/bin/env bash
# The native executor under ThreadSanitizer: an instrumented build of client_app/native/executors.cpp in its own
# cache folder, then tests/test_native.py (and, with STRESS=1, its stress runs) with libtsan preloaded into Python.
#   bash scripts/native_tsan.sh            # about 4 minutes to build on 2 busy cores, 1-2 minutes of tests
#   STRESS=1 bash scripts/native_tsan.sh   # the 8-thread stress runs too (much longer under TSan)
# Exit status: pytest's, or 1 when ThreadSanitizer reported anything (the reports are printed).
#
# What it can see: every access our C++ makes itself (the pool's atomic words, the latest-pointer CAS, the slot
# bookkeeping, the counters) and every pthread/std::thread synchronisation. What it cannot: tensor memory read and
# written inside libtorch's kernels, which are not instrumented. The reclaimed-vector checks of the tests (NaN
# poisoning, checksums) cover that memory instead; the negative control that breaks the protocol on purpose is
# caught by them, not by ThreadSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/staleflower-tsan.XXXXXX")
export STALEFLOWER_NATIVE_DIR=${STALEFLOWER_NATIVE_DIR:-$HOME/.cache/staleflower/native-tsan}
export STALEFLOWER_NATIVE_CFLAGS="-fsanitize=thread -g -O1"
export STALEFLOWER_NATIVE_LDFLAGS="-fsanitize=thread"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1
LIBTSAN=$(${CXX:-g++} -print-file-name=libtsan.so)
if [ ! -e "$LIBTSAN" ]; then
    echo "error: no libtsan.so for ${CXX:-g++} (install the compiler's ThreadSanitizer runtime, e.g. libtsan2)" >&2
    exit 2
fi
# Build without the runtime preloaded (the compiler must not run instrumented); the import here fails, as expected.
"$PY" -m client_app.native >/dev/null 2>&1 || true
status=0
LD_PRELOAD=$LIBTSAN TSAN_OPTIONS="halt_on_error=0 report_signal_unsafe=0 log_path=$OUT/report" \
    STALEFLOWER_STRESS=${STRESS:-} STALEFLOWER_REQUIRE_NATIVE=1 \
    "$PY" -m pytest -q -p no:xdist -p no:cacheprovider tests/test_native.py || status=$?
if compgen -G "$OUT/report*" >/dev/null; then
    cat "$OUT"/report*
    echo "ThreadSanitizer reported the above (reports in $OUT)" >&2
    exit 1
fi
echo "ThreadSanitizer: no report (tests exit status $status)"
exit "$status"
