#!/usr/bin/env bash
# Anchor for prefork-bench: nginx serving the same fixed response as the
# prefork `http` app, with its files in a private directory.
#
#   anchors/nginx.sh install          install nginx (Debian package) if missing
#   anchors/nginx.sh run DIR PORT N [ROOT]
#                                     run nginx in the foreground, N workers,
#                                     on 127.0.0.1:PORT, config and logs in DIR;
#                                     with ROOT, it serves the files under ROOT
#                                     instead of the fixed response
set -euo pipefail

case "${1:-}" in
install)
    if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq nginx-light >/dev/null
    fi
    ;;
run)
    dir=$2 port=$3 workers=$4 root=${5:-}
    mkdir -p "$dir"
    location='add_header X-Worker "0/0";
            default_type text/plain;
            return 200 "Hello from prefork\n";'
    [ -n "$root" ] && location="root $root;"

    user_line=""
    [ "$(id -u)" = 0 ] && user_line="user root;"
    cat >"$dir/nginx.conf" <<CONF
$user_line
worker_processes $workers;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_timeout 5;
    server {
        listen 127.0.0.1:$port backlog=1024 deferred;
        location / {
            $location
        }
    }
}
CONF
    nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
    # The ready line the testkit reads, printed once nginx accepts.
    (
        for _ in $(seq 1 200); do
            if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
                echo "prefork ready pid=$$ strategy=nginx workers=$workers listen=127.0.0.1:$port"
                exit 0
            fi
            sleep 0.025
        done
    ) &
    exec "$nginx_bin" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
    ;;
*)
    echo "usage: $0 install | run DIR PORT WORKERS" >&2
    exit 2
    ;;
esac
