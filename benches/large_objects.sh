#!/usr/bin/env bash
# Large-object streaming, side by side in one run, against a backend that is
# never the bottleneck: nginx (one worker) sending a file with sendfile for
# GETs and storing PUTs in memory (WebDAV PUT into /dev/shm), reached
# directly, through s3-failover-proxy, through HAProxy (2 threads) and
# through nginx as an ingress (2 workers, no buffering either way).
#
#   bash benches/large_objects.sh [proxy-binary] [large-MiB] [seconds] [repetitions]
#
# `proxy-binary+raw` runs the binary with `listener.raw_http1 = true` (a
# build from before it was the default), `proxy-binary+hyper` with it false.
#
# Per ingress: CPU seconds per GiB streamed (utime + stime of the ingress
# processes from /proc, over the bytes moved) for 1 MiB GETs (wrk -t1 -c16),
# for one GET and one PUT of LARGE MiB (curl, to /dev/null and from a sparse
# file), and the peak resident memory while the large object streams
# (sampled every 100 ms). Not a test: the machines are shared and noisy,
# read the ratios. Needs wrk, nginx, haproxy, curl (Debian: apt-get install
# wrk nginx-light haproxy curl). Everything listens on 127.0.0.1:18300-18304.
set -euo pipefail
. "$(dirname "$0")/common.sh"
proxy_mode "${1:-target/release/s3-failover-proxy}"
LARGE_MIB=${2:-5120}
SECONDS_PER_RUN=${3:-10}
REPS=${4:-2}
need_tools wrk nginx haproxy curl python3
bench_dir
# Uploads land in memory, so the backend's disk is never the bottleneck.
SHM=$(mktemp -d -p /dev/shm)
CLEANUP_PATHS+=("$SHM")
mkdir -p "$SHM/put" "$SHM/tmp"
chmod 777 "$SHM" "$SHM/put" "$SHM/tmp"
head -c $((1 << 20)) /dev/urandom > "$DIR/www/1m"
truncate -s "${LARGE_MIB}M" "$DIR/www/large"
nginx_backend backend 18300 1 "sendfile on; client_max_body_size 0;" \
  "location /put/ { root $SHM; dav_methods PUT; client_body_temp_path $SHM/tmp; client_body_buffer_size 1m; }"
cat > "$DIR/proxy.toml" <<EOT
[listener]
address = "127.0.0.1:18301"
$PROXY_RAW
[admin]
address = "127.0.0.1:18304"
[backend]
address = "127.0.0.1:18300"
EOT
"$PROXY_BIN" --config "$DIR/proxy.toml" 2>"$DIR/proxy.log" &
PIDS+=($!)
PROXY_PID=$!
wait_for http://127.0.0.1:18304/readyz
haproxy_ingress 18302 18300 600s
nginx_ingress 18303 18300 64 "" "client_max_body_size 0;" "proxy_buffering off; proxy_request_buffering off;"
sleep 0.2
truncate -s "${LARGE_MIB}M" "$DIR/upload"

HZ=$(getconf CLK_TCK)
# Runs "$@" while sampling the RSS of PIDS every 100 ms; prints the peak KiB.
peak_while() {
  local peak=0 rss
  "$@" &
  local job=$!
  while kill -0 "$job" 2>/dev/null; do
    rss=$(rss_kib $PIDS_UNDER_TEST)
    [ "$rss" -gt "$peak" ] && peak=$rss
    sleep 0.1
  done
  wait "$job"
  echo "$peak"
}
measure() { # name port pids...
  local name=$1 port=$2; shift 2
  PIDS_UNDER_TEST="$*"
  local before after out requests
  before=$(ticks "$@")
  out=$(wrk -t1 -c16 -d"${SECONDS_PER_RUN}s" "http://127.0.0.1:$port/1m")
  after=$(ticks "$@")
  requests=$(echo "$out" | awk '/requests in/ {print $1}')
  local small_cpu=$(( after - before )) small_gib
  small_gib=$(python3 -c "print($requests / 1024)")
  before=$(ticks "$@")
  local t0 t1 get_peak put_peak
  t0=$(date +%s.%N)
  get_peak=$(peak_while curl -sf -o /dev/null "http://127.0.0.1:$port/large")
  t1=$(date +%s.%N)
  after=$(ticks "$@")
  local get_cpu=$(( after - before )) get_s
  get_s=$(python3 -c "print($t1 - $t0)")
  before=$(ticks "$@")
  t0=$(date +%s.%N)
  put_peak=$(peak_while curl -sf -o /dev/null -T "$DIR/upload" "http://127.0.0.1:$port/put/large")
  t1=$(date +%s.%N)
  after=$(ticks "$@")
  local put_cpu=$(( after - before )) put_s
  put_s=$(python3 -c "print($t1 - $t0)")
  python3 - <<EOP
gib = $LARGE_MIB / 1024
hz = $HZ
direct = "$name" == "direct"
def cpu(t, g):
    return "-" if direct else f"{t / hz / g:.2f}"
def rss(k):
    return "-" if direct else f"{k / 1024:.1f}"
print(f"| $name | {cpu($small_cpu, $small_gib)} | {$LARGE_MIB / $get_s:.0f} | {cpu($get_cpu, gib)} | {rss($get_peak)} | {$LARGE_MIB / $put_s:.0f} | {cpu($put_cpu, gib)} | {rss($put_peak)} |")
EOP
}
echo "$(machine); large object ${LARGE_MIB} MiB"
for rep in $(seq 1 "$REPS"); do
  echo "repetition $rep"
  echo "| ingress | 1 MiB GETs: CPU s/GiB | large GET: MiB/s | CPU s/GiB | peak RSS MiB | large PUT: MiB/s | CPU s/GiB | peak RSS MiB |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  # shellcheck disable=SC2046
  measure direct 18300 $(nginx_workers backend)
  measure s3-failover-proxy 18301 "$PROXY_PID"
  measure HAProxy 18302 "$(cat "$DIR/haproxy.pid")"
  # shellcheck disable=SC2046
  measure nginx 18303 $(nginx_workers ingress)
done
