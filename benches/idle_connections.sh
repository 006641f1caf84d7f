#!/usr/bin/env bash
# What an idle keep-alive connection costs each ingress, side by side: the
# proxy, HAProxy (2 threads) and nginx (2 workers) in front of nginx (one
# worker, a 2-byte file). For each ingress, freshly started, and each count:
# COUNT connections each serve one GET (64 at a time) and then stay open and
# idle; the figure is the growth of the ingress's resident memory (VmRSS of
# its processes) over the same ingress after a warm-up, per connection.
# The proxy runs with `backend.max_connections = 1024` (HAProxy's server
# `maxconn`): an idle client connection keeps no backend connection, so it
# counts one descriptor, and 10000 fit a hard `ulimit -n` of 20000 (without
# the cap each counts two and, with the raw path, a share of pipes: about
# 7600 fit). HAProxy counts two descriptors per connection and has no
# such cap: it gets the largest `maxconn` the limit allows, and counts over
# it are skipped for HAProxy (9900 on such a machine).
#
#   bash benches/idle_connections.sh [proxy-binary[+raw|+hyper]] [counts...]
#
# Needs nginx, haproxy, curl, python3 (Debian: apt-get install nginx-light
# haproxy curl). Everything listens on 127.0.0.1.
set -euo pipefail
. "$(dirname "$0")/common.sh"
proxy_mode "${1:-target/release/s3-failover-proxy}"
shift || true
COUNTS=("${@:-5000 10000}")
# shellcheck disable=SC2206
COUNTS=(${COUNTS[*]})
HERE=$(cd "$(dirname "$0")" && pwd)
# Room for the largest count and the requests that measure it.
MAX_CONNECTIONS=$(( $(printf '%s\n' "${COUNTS[@]}" | sort -n | tail -1) + 64 ))
ulimit -n "$(ulimit -Hn)"
# HAProxy's own sum: two per connection and some for itself.
HAPROXY_MAXCONN=$(( ($(ulimit -n) - 200) / 2 ))
[ "$HAPROXY_MAXCONN" -lt "$MAX_CONNECTIONS" ] || HAPROXY_MAXCONN=$MAX_CONNECTIONS
need_tools nginx haproxy curl python3
bench_dir
printf 'ok' > "$DIR/www/small"
nginx_backend backend 18200 1

start_proxy() {
  cat > "$DIR/proxy.toml" <<EOT
[listener]
address = "127.0.0.1:18201"
max_connections = $MAX_CONNECTIONS
$PROXY_RAW
[admin]
address = "127.0.0.1:18203"
[backend]
address = "127.0.0.1:18200"
max_connections = 1024
EOT
  "$PROXY_BIN" --config "$DIR/proxy.toml" 2>"$DIR/proxy.log" &
  PIDS+=($!)
  echo $! > "$DIR/proxy.pid"
  wait_for http://127.0.0.1:18203/readyz || { echo "the proxy did not start:" >&2; cat "$DIR/proxy.log" >&2; exit 1; }
  PORT=18201 TARGET="$(cat "$DIR/proxy.pid")"
}
start_haproxy() {
  haproxy_ingress 18202 18200 600s "maxconn $HAPROXY_MAXCONN" "maxconn $HAPROXY_MAXCONN
  timeout http-keep-alive 600s"
  PORT=18202 TARGET="$(cat "$DIR/haproxy.pid")"
}
start_nginx() {
  nginx_ingress 18204 18200 64 "worker_rlimit_nofile 20000;
events { worker_connections 30000; }" "keepalive_timeout 600s;"
  sleep 0.2
  PORT=18204 TARGET="$(nginx_workers ingress)"
}
stop() { local pid; pid=$(cat "$DIR/$1.pid"); kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done; }

# Opens COUNT idle connections to PORT; prints KiB of growth of PIDS.
measure() { # port count pids...
  local port=$1 count=$2; shift 2
  local base; base=$(rss_kib "$@")
  coproc CLIENTS { python3 "$HERE/idle_clients.py" 127.0.0.1 "$port" /small "$count"; }
  local line; read -r line <&"${CLIENTS[0]}"
  [ "$line" = "ready $count" ] || { echo "clients: $line" >&2; exit 1; }
  # The proxy frees an idle connection's buffers once it rested 100 ms.
  sleep 3
  local held; held=$(rss_kib "$@")
  exec {CLIENTS[1]}>&-
  wait "$CLIENTS_PID" || true
  echo $((held - base))
}

machine
for ingress in proxy haproxy nginx; do
  for count in "${COUNTS[@]}"; do
    if [ "$ingress" = haproxy ] && [ $((count + 64)) -gt "$HAPROXY_MAXCONN" ]; then
      echo "haproxy: $count idle connections: over its maxconn $HAPROXY_MAXCONN (ulimit -n $(ulimit -n)): skipped"
      continue
    fi
    "start_$ingress"
    # shellcheck disable=SC2086
    measure "$PORT" 200 $TARGET >/dev/null   # warm-up: first allocations, pools
    # shellcheck disable=SC2086
    grown=$(measure "$PORT" "$count" $TARGET)
    python3 -c "print(f'$ingress: {$count} idle connections: {$grown * 1024 / $count:.0f} bytes each')"
    case $ingress in proxy) stop proxy ;; haproxy) stop haproxy ;; nginx) stop ingress ;; esac
  done
done
