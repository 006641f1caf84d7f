#!/usr/bin/env bash
# Small-request CPU of each ingress measured at the same time, under the same
# load: s3-failover-proxy, HAProxy (2 threads) and nginx (2 workers) in front
# of one nginx backend serving a 2-byte file, each ingress driven by its own
# `wrk -t1` started together with the others.
#
#   bash benches/small_requests_together.sh [proxy-binary[+raw|+hyper][,...]] [connections] [seconds] [repetitions] [no-nginx]
#
# benches/small_requests.sh runs the ingresses in turn: on a shared machine
# the noise of one turn (other tenants, frequency) does not fall on the next,
# and a repetition's ratio moved by +-15 % between runs. Here every ingress
# shares the same seconds, so the noise falls on all alike and the ratio to
# HAProxy moves by a few per cent; the price is an overloaded machine (every
# wrk, ingress and the backend share its cores), so absolute figures are
# higher than in the turn-by-turn script, and only the ratios compare. Two
# copies of the same binary give the method's own spread (A/A). `no-nginx`
# leaves nginx as an ingress out: one proxy binary and HAProxy alone share
# the machine, head to head (each then gets about half of it).
#
# Per ingress and repetition: CPU time per request of the ingress's
# processes (utime + stime from /proc over wrk's request count) and
# requests per second, then each proxy's ratio to HAProxy. Needs wrk, nginx,
# haproxy, curl, python3 (Debian: apt-get install wrk nginx-light haproxy
# curl). Everything listens on 127.0.0.1.
set -euo pipefail
. "$(dirname "$0")/common.sh"
PROXY=${1:-target/release/s3-failover-proxy}
CONNS=${2:-64}
SECONDS_PER_RUN=${3:-8}
REPS=${4:-5}
WITH_NGINX=yes
[ "${5:-}" = no-nginx ] && WITH_NGINX=no
need_tools wrk nginx haproxy curl python3
bench_dir
printf 'ok' > "$DIR/www/small"
# The backend: two workers, as it serves every ingress's load at once.
nginx_backend backend 18400 2
haproxy_ingress 18402 18400
[ $WITH_NGINX = yes ] && nginx_ingress 18404 18400 256

start_proxies "$PROXY" 18410 18400
wait_for http://127.0.0.1:18402/small
[ $WITH_NGINX = yes ] && wait_for http://127.0.0.1:18404/small

NAMES=(); URLS=(); GROUPS_OF_PIDS=()
for i in "${!PROXY_BINS[@]}"; do
  NAMES+=("s3-failover-proxy[$i]"); URLS+=("http://127.0.0.1:$((18410 + 2 * i))/small")
  GROUPS_OF_PIDS+=("${PROXY_PIDS[$i]}")
done
NAMES+=("HAProxy"); URLS+=("http://127.0.0.1:18402/small"); GROUPS_OF_PIDS+=("$(cat "$DIR/haproxy.pid")")
HAPROXY=$((${#NAMES[@]} - 1))
if [ $WITH_NGINX = yes ]; then
  NAMES+=("nginx"); URLS+=("http://127.0.0.1:18404/small"); GROUPS_OF_PIDS+=("$(nginx_workers ingress)")
fi
hz=$(getconf CLK_TCK)

echo "$(machine); $CONNS connections per ingress, ${SECONDS_PER_RUN}s runs, all ingresses at once"
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
