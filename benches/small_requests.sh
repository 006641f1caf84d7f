#!/usr/bin/env bash
# Small-request CPU, side by side in one run, against a backend that is never
# the bottleneck: nginx (one worker) serving a 2-byte file, reached directly,
# through s3-failover-proxy and through HAProxy (2 threads).
#
#   bash benches/small_requests.sh [proxy-binary[,proxy-binary...]] [connections] [seconds] [repetitions]
#
# Several proxy binaries, comma-separated, are measured side by side in the
# same repetitions (a change against its baseline: the machine's noise falls
# on both alike); each line names the binary's position in the list. A
# binary written `path+raw` runs with `listener.raw_http1 = true` (a build
# from before it was the default), `path+hyper` with it false.
#
# Each repetition runs wrk -t1 against the three in turn (interleaved, so the
# machine's noise falls on all of them); the figure is CPU time per request of
# the ingress process alone (utime + stime from /proc, over wrk's request
# count, also shown split into user and system time), the context switches
# of its threads per request (voluntary: it slept for want of work), and requests per
# second. Needs wrk, nginx and haproxy (Debian:
# apt-get install wrk nginx-light haproxy). Everything listens on 127.0.0.1.
set -euo pipefail
PROXY=${1:-target/release/s3-failover-proxy}
CONNS=${2:-64}
SECONDS_PER_RUN=${3:-10}
REPS=${4:-3}
for tool in wrk nginx haproxy curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install wrk nginx-light haproxy curl)" >&2; exit 1; }
done
DIR=$(mktemp -d)
PIDS=()
cleanup() {
  # The proxy drains for shutdown.drain_delay (5 s) after SIGTERM, still
  # listening: wait for it, so a run started next can bind the same ports.
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -f "$DIR/haproxy.pid" ] && kill "$(cat "$DIR/haproxy.pid")" 2>/dev/null || true
  [ -f "$DIR/nginx.pid" ] && kill "$(cat "$DIR/nginx.pid")" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

mkdir -p "$DIR/www" "$DIR/tmp"
# mktemp's 0700 would keep nginx's worker (user nobody) out: 403, not the file.
chmod 755 "$DIR" "$DIR/www"
printf 'ok' > "$DIR/www/small"
cat > "$DIR/nginx.conf" <<EOT
worker_processes 1; pid $DIR/nginx.pid; error_log $DIR/tmp/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $DIR/tmp; proxy_temp_path $DIR/tmp; fastcgi_temp_path $DIR/tmp;
  uwsgi_temp_path $DIR/tmp; scgi_temp_path $DIR/tmp;
  server { listen 127.0.0.1:18100; root $DIR/www; location / { } } }
EOT
nginx -c "$DIR/nginx.conf" -p "$DIR"
cat > "$DIR/haproxy.cfg" <<EOT
global
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend f
  bind 127.0.0.1:18102
  default_backend b
backend b
  http-reuse always
  server s 127.0.0.1:18100
EOT
haproxy -f "$DIR/haproxy.cfg" -D -p "$DIR/haproxy.pid"
cat > "$DIR/proxy.toml" <<EOT
[listener]
address = "127.0.0.1:18101"
[admin]
address = "127.0.0.1:18103"
[backend]
address = "127.0.0.1:18100"
EOT
IFS=, read -r -a PROXY_BINS <<< "$PROXY"
PROXY_PIDS=()
for i in "${!PROXY_BINS[@]}"; do
  port=$((18110 + 2 * i)); admin=$((18111 + 2 * i))
  sed -e "s/18101/$port/" -e "s/18103/$admin/" "$DIR/proxy.toml" > "$DIR/proxy$i.toml"
  binary=${PROXY_BINS[$i]}
  if [[ $binary == *+raw ]]; then
    # `binary+raw`: the same binary with the raw HTTP/1.1 path on.
    binary=${binary%+raw}
    sed -i '/^\[listener\]/a raw_http1 = true' "$DIR/proxy$i.toml"
  fi
  if [[ $binary == *+hyper ]]; then
    # `binary+hyper`: the same binary with the raw HTTP/1.1 path off.
    binary=${binary%+hyper}
    sed -i '/^\[listener\]/a raw_http1 = false' "$DIR/proxy$i.toml"
  fi
  "$binary" --config "$DIR/proxy$i.toml" 2>"$DIR/proxy$i.log" &
  PIDS+=($!)
  PROXY_PIDS+=($!)
  for _ in $(seq 1 200); do curl -s -o /dev/null "http://127.0.0.1:$admin/readyz" && break; sleep 0.05; done
  echo "proxy[$i]: ${PROXY_BINS[$i]}"
done

# User and system CPU ticks, summed over the given processes: "user system".
ticks() {
  local user=0 system=0
  for pid in "$@"; do
    read -r u s < <(awk '{print $14, $15}' "/proc/$pid/stat")
    user=$((user + u)); system=$((system + s))
  done
  echo "$user $system"
}
# Context switches, summed over the given processes' threads: "voluntary
# involuntary". A voluntary one is a thread that found nothing to do and
# slept (in epoll_wait) until the kernel woke it.
switches() {
  local voluntary=0 involuntary=0 v i
  for pid in "$@"; do
    for status in /proc/"$pid"/task/*/status; do
      read -r v i < <(awk '/^voluntary_ctxt/ {v=$2} /^nonvoluntary_ctxt/ {i=$2} END {print v, i}' "$status")
      voluntary=$((voluntary + v)); involuntary=$((involuntary + i))
    done
  done
  echo "$voluntary $involuntary"
}
nginx_workers() { pgrep -f "nginx: worker" -P "$(cat "$DIR/nginx.pid")" | tr '\n' ' '; }
run() { # name url pids...
  local name=$1 url=$2; shift 2
  local user0 system0 user1 system1
  local voluntary0 involuntary0 voluntary1 involuntary1
  read -r user0 system0 < <(ticks "$@")
  read -r voluntary0 involuntary0 < <(switches "$@")
  local out; out=$(wrk -t1 -c"$CONNS" -d"${SECONDS_PER_RUN}s" "$url")
  read -r user1 system1 < <(ticks "$@")
  read -r voluntary1 involuntary1 < <(switches "$@")
  local requests; requests=$(echo "$out" | awk '/requests in/ {print $1}')
  local rps; rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  local hz; hz=$(getconf CLK_TCK)
  # The split shows where a difference is: the kernel's share (system: the
  # same socket calls for every ingress) or the ingress's own code (user).
  python3 -c "u=($user1-$user0)/$hz*1e6/$requests; s=($system1-$system0)/$hz*1e6/$requests; v=($voluntary1-$voluntary0)/$requests; i=($involuntary1-$involuntary0)/$requests; print(f'$name: {float($rps):.0f} req/s, {u+s:.1f} us CPU per request (user {u:.1f}, system {s:.1f}), context switches per request {v:.3f} voluntary, {i:.3f} involuntary')"
  LAST_RPS=$rps
  LAST_US=$(python3 -c "print(($user1-$user0+$system1-$system0)/$hz*1e6/$requests)")
}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $CONNS connections, ${SECONDS_PER_RUN}s runs"
for rep in $(seq 1 "$REPS"); do
  echo "repetition $rep"
  # shellcheck disable=SC2046
  run "  nginx direct" http://127.0.0.1:18100/small $(nginx_workers)
  RESULTS=()
  # The binaries take turns going first, so none always runs after HAProxy.
  n=${#PROXY_BINS[@]}
  for k in $(seq 0 $((n - 1))); do
    i=$(((k + rep) % n))
    run "  s3-failover-proxy[$i]" "http://127.0.0.1:$((18110 + 2 * i))/small" "${PROXY_PIDS[$i]}"
    RESULTS[i]="$LAST_RPS $LAST_US"
  done
  run "  HAProxy" http://127.0.0.1:18102/small "$(cat "$DIR/haproxy.pid")"
  for i in "${!RESULTS[@]}"; do
    read -r rps us <<< "${RESULTS[$i]}"
    python3 -c "print(f'  proxy[$i] / HAProxy: {$us/$LAST_US:.2f}x CPU per request, {$rps/$LAST_RPS:.2f}x req/s')"
  done
done
