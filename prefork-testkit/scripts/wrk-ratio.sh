#!/usr/bin/env bash
# The load generator's efficiency bar: against one nginx serving a fixed
# response, prefork-load must reach at least 90% of the requests per second
# that `wrk -H 'Connection: close'` reaches at the same concurrency,
# measured side by side (alternating runs) on this machine.
#
#   prefork-testkit/scripts/wrk-ratio.sh [ROUNDS] [SECONDS] [CONNECTIONS] [NGINX_WORKERS]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-5} secs=${2:-5} conns=${3:-8} nworkers=${4:-1}

command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
bash prefork-testkit/anchors/nginx.sh install
cargo build --release -q -p prefork-testkit
load=target/release/prefork-load

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
bash prefork-testkit/anchors/nginx.sh run "$dir" "$port" "$nworkers" >"$dir/out" 2>&1 &
nginx_pid=$!
trap 'kill "$nginx_pid" 2>/dev/null; wait "$nginx_pid" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 200); do grep -q 'prefork ready' "$dir/out" 2>/dev/null && break; sleep 0.05; done

echo "nginx ($nworkers worker) on 127.0.0.1:$port; $conns connections, 1 thread each, ${secs}s per run, connection per request"
printf '%-6s %12s %14s %8s\n' round wrk prefork-load ratio
ratios=()
for r in $(seq 1 "$rounds"); do
    w=$(wrk -t1 -c"$conns" -d"${secs}s" -H 'Connection: close' "http://127.0.0.1:$port/" | awk '/Requests\/sec/ {print $2}')
    p=$("$load" -t 1 -c "$conns" -d "$secs" --json "127.0.0.1:$port" | awk -F': ' '/"rps"/ {gsub(",", "", $2); print $2}')
    ratio=$(python3 -c "print(f'{$p/$w:.3f}')")
    ratios+=("$ratio")
    printf '%-6s %12.0f %14.0f %8s\n' "$r" "$w" "$p" "$ratio"
done
python3 -c "import statistics,sys; r=[float(x) for x in sys.argv[1:]]; print(f'median ratio {statistics.median(r):.3f} (min {min(r):.3f}, max {max(r):.3f})')" "${ratios[@]}"
