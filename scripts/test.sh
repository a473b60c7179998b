#!/usr/bin/env bash
# The whole test suite, as a newcomer and CI run it: formatting, lints,
# every target built (the examples too), every test.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# What some tests need, installed when missing: libfaketime (the
# wall-clock-jump test, L10), promtool (the prometheus package: a live
# scrape checked), systemd-analyze (the shipped units verified), haproxy
# (the fleet test, in network namespaces). Without
# one, the test that needs it says SKIPPED at the end.
need=()
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || need+=(faketime)
command -v promtool >/dev/null || need+=(prometheus)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v haproxy >/dev/null || need+=(haproxy)
if [ "${#need[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${need[@]}") >/dev/null 2>&1 \
        || echo "note: could not install ${need[*]}; the tests that need them will say SKIPPED"
    # The packages may start their servers; the tests need only the programs.
    pkill -x prometheus 2>/dev/null || true
    pkill -x haproxy 2>/dev/null || true
fi
# Tests that cannot run on this machine write a line here; it is printed
# at the end, pass or fail, so that CI's log shows what did not run.
export PREFORK_SKIP_LOG="$PWD/target/skipped.txt"
mkdir -p target
: > "$PREFORK_SKIP_LOG"
report_skipped() {
    if [ -s "$PREFORK_SKIP_LOG" ]; then
        echo "=== tests SKIPPED on this machine ==="
        sort -u "$PREFORK_SKIP_LOG"
    else
        echo "=== no test skipped ==="
    fi
}
trap report_skipped EXIT

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
