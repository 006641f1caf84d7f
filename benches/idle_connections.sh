#!/usr/bin/env bash
# What an idle keep-alive connection costs each ingress, side by side: the
# proxy, HAProxy (2 threads) and nginx (2 workers) in front of nginx (one
# worker, a 2-byte file). For each ingress, freshly started, and each count:
# COUNT connections each serve one GET (64 at a time) and then stay open and
# idle; the figure is the growth of the ingress's resident memory (VmRSS of
# its processes) over the same ingress after a warm-up, per connection.
# Counts up to 7000 on a machine whose hard `ulimit -n` is 20000: the proxy
# counts two descriptors per connection and, with the raw path (the
# default), a pipe of two per four connections (9000 with `+hyper`).
#
#   bash benches/idle_connections.sh [proxy-binary[+raw|+hyper]] [counts...]
#
# Needs nginx, haproxy, curl, python3 (Debian: apt-get install nginx-light
# haproxy curl). Everything listens on 127.0.0.1.
set -euo pipefail
PROXY=${1:-target/release/s3-failover-proxy}
shift || true
# `binary+raw` runs the binary with `listener.raw_http1 = true` (a build
# from before it was the default), `binary+hyper` with it false.
RAW=""
if [[ $PROXY == *+raw ]]; then PROXY=${PROXY%+raw}; RAW="raw_http1 = true"; fi
if [[ $PROXY == *+hyper ]]; then PROXY=${PROXY%+hyper}; RAW="raw_http1 = false"; fi
COUNTS=("${@:-5000 7000}")
# shellcheck disable=SC2206
COUNTS=(${COUNTS[*]})
HERE=$(cd "$(dirname "$0")" && pwd)
# Room for the largest count and the requests that measure it.
MAX_CONNECTIONS=$(( $(printf '%s\n' "${COUNTS[@]}" | sort -n | tail -1) + 64 ))
ulimit -n "$(ulimit -Hn)"
DIR=$(mktemp -d)
PIDS=()
cleanup() {
  # The proxy drains for shutdown.drain_delay (5 s) after SIGTERM, still
  # listening: wait for it, so a run started next can bind the same ports.
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for f in "$DIR"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT
mkdir -p "$DIR/www" "$DIR/tmp"
chmod 755 "$DIR" "$DIR/www"
printf 'ok' > "$DIR/www/small"
temp_paths="client_body_temp_path $DIR/tmp; proxy_temp_path $DIR/tmp; fastcgi_temp_path $DIR/tmp; uwsgi_temp_path $DIR/tmp; scgi_temp_path $DIR/tmp;"
cat > "$DIR/backend.conf" <<EOT
worker_processes 1; pid $DIR/backend.pid; error_log $DIR/tmp/backend-error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; $temp_paths
  server { listen 127.0.0.1:18200; root $DIR/www; location / { } } }
EOT
nginx -c "$DIR/backend.conf" -p "$DIR"

rss_kib() { local total=0; for pid in "$@"; do total=$((total + $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status"))); done; echo "$total"; }

start_proxy() {
  cat > "$DIR/proxy.toml" <<EOT
[listener]
address = "127.0.0.1:18201"
max_connections = $MAX_CONNECTIONS
$RAW
[admin]
address = "127.0.0.1:18203"
[backend]
address = "127.0.0.1:18200"
EOT
  "$PROXY" --config "$DIR/proxy.toml" 2>"$DIR/proxy.log" &
  PIDS+=($!)
  echo $! > "$DIR/proxy.pid"
  for _ in $(seq 1 200); do curl -s -o /dev/null http://127.0.0.1:18203/readyz && break; sleep 0.05; done
  curl -s -o /dev/null http://127.0.0.1:18203/readyz || { echo "the proxy did not start:" >&2; cat "$DIR/proxy.log" >&2; exit 1; }
  PORT=18201 TARGET="$(cat "$DIR/proxy.pid")"
}
start_haproxy() {
  cat > "$DIR/haproxy.cfg" <<EOT
global
  nbthread 2
  maxconn 9500
defaults
  mode http
  maxconn 9500
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  timeout http-keep-alive 600s
frontend f
  bind 127.0.0.1:18202
  default_backend b
backend b
  http-reuse always
  server s 127.0.0.1:18200
EOT
  haproxy -f "$DIR/haproxy.cfg" -D -p "$DIR/haproxy.pid"
  PORT=18202 TARGET="$(cat "$DIR/haproxy.pid")"
}
start_nginx() {
  cat > "$DIR/ingress.conf" <<EOT
worker_processes 2; pid $DIR/ingress.pid; error_log $DIR/tmp/ingress-error.log;
worker_rlimit_nofile 20000;
events { worker_connections 30000; }
http { access_log off; keepalive_timeout 600s; keepalive_requests 1000000; $temp_paths
  upstream b { server 127.0.0.1:18200; keepalive 64; }
  server { listen 127.0.0.1:18204; location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOT
  nginx -c "$DIR/ingress.conf" -p "$DIR"
  sleep 0.2
  PORT=18204 TARGET="$(pgrep -f "nginx: worker process" -P "$(cat "$DIR/ingress.pid")" | tr '\n' ' ')"
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

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"
for ingress in proxy haproxy nginx; do
  for count in "${COUNTS[@]}"; do
    "start_$ingress"
    # shellcheck disable=SC2086
    measure "$PORT" 200 $TARGET >/dev/null   # warm-up: first allocations, pools
    # shellcheck disable=SC2086
    grown=$(measure "$PORT" "$count" $TARGET)
    python3 -c "print(f'$ingress: {$count} idle connections: {$grown * 1024 / $count:.0f} bytes each')"
    case $ingress in proxy) stop proxy ;; haproxy) stop haproxy ;; nginx) stop ingress ;; esac
  done
done
