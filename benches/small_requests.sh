#!/usr/bin/env bash
# Small-request CPU, side by side in one run, against a backend that is never
# the bottleneck: nginx (one worker) serving a 2-byte file, reached directly,
# through s3-failover-proxy, through HAProxy (2 threads) and through nginx
# (2 workers) as an ingress.
#
#   bash benches/small_requests.sh [proxy-binary[,proxy-binary...]] [connections] [seconds] [repetitions]
#
# Several proxy binaries, comma-separated, are measured side by side in the
# same repetitions (a change against its baseline: the machine's noise falls
# on both alike); each line names the binary's position in the list. A
# binary written `path+raw` runs with `listener.raw_http1 = true` (a build
# from before it was the default), `path+hyper` with it false.
#
# Each repetition runs wrk -t1 against each in turn (interleaved, so the
# machine's noise falls on all of them); the figure is CPU time per request of
# the ingress process alone (utime + stime from /proc, over wrk's request
# count, also shown split into user and system time), the context switches
# of its threads per request (voluntary: it slept for want of work), and requests per
# second. Needs wrk, nginx and haproxy (Debian:
# apt-get install wrk nginx-light haproxy). Everything listens on 127.0.0.1.
set -euo pipefail
. "$(dirname "$0")/common.sh"
PROXY=${1:-target/release/s3-failover-proxy}
CONNS=${2:-64}
SECONDS_PER_RUN=${3:-10}
REPS=${4:-3}
need_tools wrk nginx haproxy curl python3
bench_dir
printf 'ok' > "$DIR/www/small"
nginx_backend nginx 18100 1
haproxy_ingress 18102 18100
nginx_ingress 18104 18100 256
start_proxies "$PROXY" 18110 18100

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
run() { # name url pids...
  local name=$1 url=$2; shift 2
  local user0 system0 user1 system1
  local voluntary0 involuntary0 voluntary1 involuntary1
  read -r user0 system0 < <(cpu_ticks "$@")
  read -r voluntary0 involuntary0 < <(switches "$@")
  local out; out=$(wrk -t1 -c"$CONNS" -d"${SECONDS_PER_RUN}s" "$url")
  read -r user1 system1 < <(cpu_ticks "$@")
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
echo "$(machine); $CONNS connections, ${SECONDS_PER_RUN}s runs"
for rep in $(seq 1 "$REPS"); do
  echo "repetition $rep"
  # shellcheck disable=SC2046
  run "  nginx direct" http://127.0.0.1:18100/small $(nginx_workers nginx)
  RESULTS=()
  # The binaries take turns going first, so none always runs after HAProxy.
  n=${#PROXY_BINS[@]}
  for k in $(seq 0 $((n - 1))); do
    i=$(((k + rep) % n))
    run "  s3-failover-proxy[$i]" "http://127.0.0.1:$((18110 + 2 * i))/small" "${PROXY_PIDS[$i]}"
    RESULTS[i]="$LAST_RPS $LAST_US"
  done
  # shellcheck disable=SC2046
  run "  nginx ingress" http://127.0.0.1:18104/small $(nginx_workers ingress)
  NGINX_US=$LAST_US NGINX_RPS=$LAST_RPS
  run "  HAProxy" http://127.0.0.1:18102/small "$(cat "$DIR/haproxy.pid")"
  for i in "${!RESULTS[@]}"; do
    read -r rps us <<< "${RESULTS[$i]}"
    python3 -c "print(f'  proxy[$i] / HAProxy: {$us/$LAST_US:.2f}x CPU per request, {$rps/$LAST_RPS:.2f}x req/s')"
  done
  python3 -c "print(f'  nginx ingress / HAProxy: {$NGINX_US/$LAST_US:.2f}x CPU per request, {$NGINX_RPS/$LAST_RPS:.2f}x req/s')"
done
