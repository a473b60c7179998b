#!/usr/bin/env bash
# `--app static` against nginx serving the same small file, side by side:
# both with the same number of workers, the same file (19 bytes), measured
# with prefork-load in turns (prefork, nginx, prefork, nginx, ...), so that
# the noise of a shared machine falls on both alike.
#
#   scripts/static-vs-nginx.sh [WORKERS] [SECONDS] [ROUNDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:-2} secs=${2:-5} rounds=${3:-3} conns=${4:-32}

bash prefork-testkit/anchors/nginx.sh install
cargo build --release -q -p prefork-cli -p prefork-testkit
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/root"
printf 'Hello from prefork\n' > "$work/root/hello.txt"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

p_port=$(free_port)
./target/release/prefork --app static --root "$work/root" --workers "$workers" \
    --bind "127.0.0.1:$p_port" --log-level warn >/dev/null &
n_port=$(free_port)
bash prefork-testkit/anchors/nginx.sh run "$work/nginx" "$n_port" "$workers" "$work/root" >/dev/null &
wait_port "$p_port" && wait_port "$n_port"

rps() { ./target/release/prefork-load "127.0.0.1:$1" --path /hello.txt --keepalive \
        -c "$conns" -d "$secs" --json 2>/dev/null \
        | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["rps"]))'; }
echo "| round | prefork static req/s | nginx req/s | ratio |"
echo "|--:|--:|--:|--:|"
for r in $(seq 1 "$rounds"); do
    p=$(rps "$p_port"); n=$(rps "$n_port")
    echo "| $r | $p | $n | $(python3 -c "print(f'{$p/$n:.2f}')") |"
done
