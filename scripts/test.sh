#!/usr/bin/env bash
# The whole test suite, as a newcomer and CI run it: formatting, lints,
# every target built (the examples too), every test.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# libfaketime for the wall-clock-jump test (L10); without it that one test
# says it is skipped.
if [ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime) \
        >/dev/null 2>&1 || echo "note: could not install faketime; the L10 test will be skipped"
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
