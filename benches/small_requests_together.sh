#!/usr/bin/env bash
# Small-request CPU of each ingress measured at the same time, under the same
# load: s3-failover-proxy, HAProxy (2 threads) and nginx (2 workers) in front
# of one nginx backend serving a 2-byte file, each ingress driven by its own
# `wrk -t1` started together with the others.
#
#   bash benches/small_requests_together.sh [proxy-binary[,proxy-binary...]] [connections] [seconds] [repetitions]
#
# benches/small_requests.sh runs the ingresses in turn: on a shared machine
# the noise of one turn (other tenants, frequency) does not fall on the next,
# and a repetition's ratio moved by +-15 % between runs. Here every ingress
# shares the same seconds, so the noise falls on all alike and the ratio to
# HAProxy moves by a few per cent; the price is an overloaded machine (every
# wrk, ingress and the backend share its cores), so absolute figures are
# higher than in the turn-by-turn script, and only the ratios compare. Two
# copies of the same binary give the method's own spread (A/A).
#
# Per ingress and repetition: CPU time per request of the ingress's
# processes (utime + stime from /proc over wrk's request count) and
# requests per second, then each proxy's ratio to HAProxy. Needs wrk, nginx,
# haproxy, curl, python3 (Debian: apt-get install wrk nginx-light haproxy
# curl). Everything listens on 127.0.0.1.
set -euo pipefail
PROXY=${1:-target/release/s3-failover-proxy}
CONNS=${2:-64}
SECONDS_PER_RUN=${3:-8}
REPS=${4:-5}
for tool in wrk nginx haproxy curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install wrk nginx-light haproxy curl)" >&2; exit 1; }
done
DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for pidfile in "$DIR"/*.pid; do [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT

mkdir -p "$DIR/www" "$DIR/tmp"
# mktemp's 0700 would keep nginx's worker (user nobody) out: 403, not the file.
chmod 755 "$DIR" "$DIR/www"
printf 'ok' > "$DIR/www/small"
temp_paths="client_body_temp_path $DIR/tmp; proxy_temp_path $DIR/tmp; fastcgi_temp_path $DIR/tmp; uwsgi_temp_path $DIR/tmp; scgi_temp_path $DIR/tmp;"
# The backend: two workers, as it serves every ingress's load at once.
cat > "$DIR/backend.conf" <<EOT
worker_processes 2; pid $DIR/backend.pid; error_log $DIR/tmp/backend.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; $temp_paths
  server { listen 127.0.0.1:18400; root $DIR/www; location / { } } }
EOT
nginx -c "$DIR/backend.conf" -p "$DIR"
cat > "$DIR/haproxy.cfg" <<EOT
global
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend f
  bind 127.0.0.1:18402
  default_backend b
backend b
  http-reuse always
  server s 127.0.0.1:18400
EOT
haproxy -f "$DIR/haproxy.cfg" -D -p "$DIR/haproxy.pid"
cat > "$DIR/ingress.conf" <<EOT
worker_processes 2; pid $DIR/ingress.pid; error_log $DIR/tmp/ingress.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; $temp_paths
  upstream b { server 127.0.0.1:18400; keepalive 256; }
  server { listen 127.0.0.1:18404; location / { proxy_pass http://b; proxy_http_version 1.1;
    proxy_set_header Connection ""; } } }
EOT
nginx -c "$DIR/ingress.conf" -p "$DIR"

IFS=, read -r -a PROXY_BINS <<< "$PROXY"
PROXY_PIDS=()
for i in "${!PROXY_BINS[@]}"; do
  port=$((18410 + 2 * i)); admin=$((18411 + 2 * i))
  cat > "$DIR/proxy$i.toml" <<EOT
[listener]
address = "127.0.0.1:$port"
[admin]
address = "127.0.0.1:$admin"
[backend]
address = "127.0.0.1:18400"
EOT
  "${PROXY_BINS[$i]}" --config "$DIR/proxy$i.toml" 2>"$DIR/proxy$i.log" &
  PIDS+=($!)
  PROXY_PIDS+=($!)
  for _ in $(seq 1 200); do curl -s -o /dev/null "http://127.0.0.1:$admin/readyz" && break; sleep 0.05; done
  echo "proxy[$i]: ${PROXY_BINS[$i]}"
done
for port in 18402 18404; do
  for _ in $(seq 1 200); do curl -s -o /dev/null "http://127.0.0.1:$port/small" && break; sleep 0.05; done
done

# CPU ticks (user + system) summed over the given processes.
ticks() {
  local total=0 u s
  for pid in "$@"; do
    read -r u s < <(awk '{print $14, $15}' "/proc/$pid/stat")
    total=$((total + u + s))
  done
  echo "$total"
}
workers() { pgrep -f "nginx: worker" -P "$(cat "$DIR/$1.pid")" | tr '\n' ' '; }

NAMES=(); URLS=(); GROUPS_OF_PIDS=()
for i in "${!PROXY_BINS[@]}"; do
  NAMES+=("s3-failover-proxy[$i]"); URLS+=("http://127.0.0.1:$((18410 + 2 * i))/small")
  GROUPS_OF_PIDS+=("${PROXY_PIDS[$i]}")
done
NAMES+=("HAProxy"); URLS+=("http://127.0.0.1:18402/small"); GROUPS_OF_PIDS+=("$(cat "$DIR/haproxy.pid")")
NAMES+=("nginx"); URLS+=("http://127.0.0.1:18404/small"); GROUPS_OF_PIDS+=("$(workers ingress)")
HAPROXY=$((${#NAMES[@]} - 2))
hz=$(getconf CLK_TCK)

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $CONNS connections per ingress, ${SECONDS_PER_RUN}s runs, all ingresses at once"
for rep in $(seq 1 "$REPS"); do
  echo "repetition $rep"
  BEFORE=(); WRKS=()
  for k in "${!NAMES[@]}"; do
    # shellcheck disable=SC2086
    BEFORE[k]=$(ticks ${GROUPS_OF_PIDS[$k]})
  done
  for k in "${!NAMES[@]}"; do
    wrk -t1 -c"$CONNS" -d"${SECONDS_PER_RUN}s" "${URLS[$k]}" > "$DIR/wrk$k.txt" &
    WRKS+=($!)
  done
  wait "${WRKS[@]}"
  US=(); RPS=()
  for k in "${!NAMES[@]}"; do
    # shellcheck disable=SC2086
    after=$(ticks ${GROUPS_OF_PIDS[$k]})
    requests=$(awk '/requests in/ {print $1}' "$DIR/wrk$k.txt")
    RPS[k]=$(awk '/Requests\/sec/ {print $2}' "$DIR/wrk$k.txt")
    US[k]=$(python3 -c "print(($after - ${BEFORE[$k]}) / $hz * 1e6 / $requests)")
    python3 -c "print(f'  ${NAMES[$k]}: {float(${RPS[$k]}):.0f} req/s, {${US[$k]}:.1f} us CPU per request')"
  done
  for i in "${!PROXY_BINS[@]}"; do
    python3 -c "print(f'  proxy[$i] / HAProxy: {${US[$i]}/${US[$HAPROXY]}:.3f}x CPU per request, {${RPS[$i]}/${RPS[$HAPROXY]}:.3f}x req/s')"
  done
done
