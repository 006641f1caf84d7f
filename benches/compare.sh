#!/usr/bin/env bash
# Side-by-side benchmark in one run, on one machine, against one S3 backend:
# direct access, s3-failover-proxy, HAProxy and nginx (Debian packages),
# configured as S3 reverse proxies with keep-alive and no request buffering.
#
#   bash benches/compare.sh [seconds-per-load-run] [large-object-MiB] [held-requests] [outage-requests]
#
# Figures: small-GET requests/s and p50/p99 at 64 and 256 connections (wrk),
# proxy CPU time per request (from /proc), CPU seconds per GiB for 1 MiB GETs
# and for one large GET and one large PUT, peak RSS while streaming them; for
# s3-failover-proxy the RSS per idle connection and per request held on it,
# and its probes per second while they are held; for every ingress the
# backend connection attempts per second during an outage with requests waiting.
# Writes target/bench/compare.json and target/bench/compare.md. Not a test:
# the machines are shared and noisy, read the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-8}
large_mib=${2:-5120}
held=${3:-10000}
outage_held=${4:-1000}
target=${CARGO_TARGET_DIR:-target}
out=target/bench
mkdir -p "$out"
s3s_fs=${S3S_FS_BIN:-$HOME/.cache/s3fp/tools/bin/s3s-fs}
for tool in wrk nginx haproxy curl python3 strace; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install wrk nginx-light haproxy curl strace)" >&2; exit 1; }
done
[ -x "$s3s_fs" ] || { echo "s3s-fs is needed: bash .ci/run or bash demo.sh installs it" >&2; exit 1; }

cargo build --release --quiet --bin s3-failover-proxy
proxy_bin=$target/release/s3-failover-proxy
source benches/ingresses.sh
bench_workspace
wait_http() { for _ in $(seq 1 500); do curl -s -o /dev/null "$1" && return 0; sleep 0.02; done; echo "no answer from $1" >&2; exit 1; }

mkdir -p "$work/data"
start_backend() {
  "$s3s_fs" --host 127.0.0.1 --port "$backend_port" "$work/data" >/dev/null 2>&1 &
  backend_pid=$!
  pids+=($backend_pid)
  wait_http "http://127.0.0.1:$backend_port/"
}
start_backend

start_ingresses
wait_http "http://127.0.0.1:$admin_port/readyz"
wait_http "http://127.0.0.1:$haproxy_port/"
wait_http "http://127.0.0.1:$nginx_port/"

direct=http://127.0.0.1:$backend_port
curl -sf -X PUT "$direct/bench" >/dev/null
head -c 1024 /dev/urandom | curl -sf -X PUT --data-binary @- "$direct/bench/small" >/dev/null
head -c $((1 << 20)) /dev/urandom | curl -sf -X PUT --data-binary @- "$direct/bench/mib" >/dev/null
head -c $((large_mib << 20)) /dev/zero | curl -sf -X PUT -T - "$direct/bench/large" >/dev/null

ticks_per_second=$(getconf CLK_TCK)
# CPU ticks of a process and its children (nginx workers).
cpu_ticks() {
  local total=0 pid
  for pid in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}
rss_kib() {
  local total=0 pid
  for pid in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '/VmRSS/ {print $2}' "/proc/$pid/status")))
  done
  echo "$total"
}

run_wrk() {
  wrk -t2 -c"$2" -d"${seconds}s" --latency "$1" | python3 -c '
import re, sys, json
text = sys.stdin.read()
def ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
total = int(re.search(r"(\d+) requests in", text).group(1))
lat = {p: ms(*re.search(r"^\s+" + p + r"%\s+([\d.]+)(us|ms|s)", text, re.M).groups()) for p in ("50", "99")}
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
print(json.dumps({"rps": rps, "requests": total, "p50_ms": lat["50"], "p99_ms": lat["99"], "non_2xx": int(errors.group(1)) if errors else 0}))
'
}

declare -A url=( [direct]=$direct [proxy]=http://127.0.0.1:$proxy_port [haproxy]=http://127.0.0.1:$haproxy_port [nginx]=http://127.0.0.1:$nginx_port )
declare -A pid=( [proxy]=$proxy_pid [haproxy]=$haproxy_pid [nginx]=$nginx_pid )
targets=(direct proxy haproxy nginx)

measure() { # target, path, connections -> JSON with CPU seconds
  local t=$1 before after result cpu=None
  [ "$t" != direct ] && before=$(cpu_ticks "${pid[$t]}")
  result=$(run_wrk "${url[$t]}$2" "$3")
  if [ "$t" != direct ]; then
    after=$(cpu_ticks "${pid[$t]}")
    cpu=$(python3 -c "print(($after - $before) / $ticks_per_second)")
  fi
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); r['cpu_seconds']=$cpu; print(json.dumps(r))" "$result"
}

results="{"
for connections in 64 256; do
  results+="\"small_get_c$connections\": {"
  for t in "${targets[@]}"; do results+="\"$t\": $(measure "$t" /bench/small "$connections"),"; done
  results="${results%,}},"
done
results+="\"mib_get_c16\": {"
for t in "${targets[@]}"; do results+="\"$t\": $(measure "$t" /bench/mib 16),"; done
results="${results%,}},"

# One large transfer through $1 (curl arguments follow): seconds, and for an
# ingress its CPU seconds and peak RSS while streaming.
measure_stream() {
  local t=$1 before=0 peak=0 cpu=null r curl_pid
  shift
  [ "$t" != direct ] && before=$(cpu_ticks "${pid[$t]}")
  curl -sf -o /dev/null -w '%{time_total}' "$@" >"$work/time" &
  curl_pid=$!
  while kill -0 "$curl_pid" 2>/dev/null; do
    if [ "$t" != direct ]; then r=$(rss_kib "${pid[$t]}"); [ "$r" -gt "$peak" ] && peak=$r; fi
    sleep 0.2
  done
  wait "$curl_pid"
  [ "$t" != direct ] && cpu=$(python3 -c "print(($(cpu_ticks "${pid[$t]}") - $before) / $ticks_per_second)")
  echo "{\"seconds\": $(cat "$work/time"), \"cpu_seconds\": $cpu, \"peak_rss_kib\": $peak}"
}
results+="\"large_get\": {\"mib\": $large_mib,"
for t in "${targets[@]}"; do results+="\"$t\": $(measure_stream "$t" "${url[$t]}/bench/large"),"; done
results="${results%,}},"
# The same size uploaded (a sparse file: curl sends its length, the disk
# reads cost nothing), each ingress to its own key.
truncate -s "${large_mib}M" "$work/large.bin"
results+="\"large_put\": {\"mib\": $large_mib,"
for t in "${targets[@]}"; do
  results+="\"$t\": $(measure_stream "$t" -X PUT -T "$work/large.bin" "${url[$t]}/bench/large-put-$t"),"
  curl -sf -X DELETE "$direct/bench/large-put-$t" >/dev/null
done
results="${results%,}},"

# Clients that open connections (warm: one GET answered on each first, as
# an S3 client's keep-alive pool has), then on a signal send one GET on each,
# and keep them open until killed. Files in $work say how far they got.
hold_clients() { # port, count, name, warm|cold
  python3 - "$1" "$2" "$work/$3" "$4" <<'PY' &
import os, socket, sys, time
port, count, stem, warm = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "warm"
def get(s, i):
    s.sendall(f"GET /bench/small?n={i} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
def read_response(s):
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += s.recv(65536)
socks = []
for first in range(0, count, 200):
    batch = [socket.create_connection(("127.0.0.1", port)) for _ in range(first, min(first + 200, count))]
    if warm:
        for i, s in enumerate(batch):
            get(s, first + i)
        for s in batch:
            read_response(s)
    socks += batch
open(stem + ".open", "w").close()
while not os.path.exists(stem + ".send"):
    time.sleep(0.02)
for i, s in enumerate(socks):
    get(s, i)
open(stem + ".sent", "w").close()
time.sleep(600)
PY
  clients_pid=$!
}
wait_file() { for _ in $(seq 1 3000); do [ -e "$1" ] && return 0; sleep 0.02; done; echo "timed out waiting for $1" >&2; exit 1; }
held_now() { curl -s "http://127.0.0.1:$admin_port/admin/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["held"])'; }
metric() { curl -s "http://127.0.0.1:$admin_port/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
# Backend connection attempts of a process and its children (nginx workers)
# over some seconds: each attempt, refused or not, opens a new socket, so
# strace counts socket() calls (HAProxy calls connect() twice per attempt).
connection_attempts() { # seconds, pid
  local args=() p
  for p in "$2" $(pgrep -P "$2" || true); do args+=(-p "$p"); done
  timeout -s INT "$1" strace -f -qq -c -e trace=socket -o "$work/strace.txt" "${args[@]}" 2>/dev/null || true
  awk '$NF == "socket" {n = $4} END {print n + 0}' "$work/strace.txt"
}

# s3-failover-proxy: memory per idle keep-alive connection (hyper's buffers
# are allocated by a connection's first request), then per request held on
# those same connections, with $held of them.
rss_before=$(rss_kib "$proxy_pid")
hold_clients "$proxy_port" "$held" memory warm
wait_file "$work/memory.open"
sleep 1
rss_idle=$(rss_kib "$proxy_pid")
kill "$backend_pid"; wait "$backend_pid" 2>/dev/null || true
for _ in $(seq 1 250); do [ "$(metric 's3fp_gate_state{state="down"}')" = 1 ] && break; sleep 0.02; done
rss_down=$(rss_kib "$proxy_pid")
touch "$work/memory.send"
wait_file "$work/memory.sent"
for _ in $(seq 1 500); do [ "$(held_now)" -ge "$held" ] && break; sleep 0.05; done
sleep 1
rss_held=$(rss_kib "$proxy_pid")
held_seen=$(held_now)
probes_before=$(metric 's3fp_probes_total{result="not_serving"}')
sleep 3
probes_after=$(metric 's3fp_probes_total{result="not_serving"}')
kill "$clients_pid"; wait "$clients_pid" 2>/dev/null || true
results+="\"proxy_memory\": {\"connections\": $held, \"held_seen\": $held_seen, \"rss_kib_before\": $rss_before, \"rss_kib_idle\": $rss_idle, \"rss_kib_backend_down\": $rss_down, \"rss_kib_held\": $rss_held,"
results+="\"probes_per_second_while_held\": $(python3 -c "print(round(($probes_after - $probes_before) / 3, 1))")},"

# Every ingress, backend still down: connection attempts per second to the
# backend while $outage_held requests wait on it.
results+="\"outage_connects\": {\"requests\": $outage_held,"
for t in proxy haproxy nginx; do
  rm -f "$work/outage.open" "$work/outage.send" "$work/outage.sent"
  port=${url[$t]##*:}
  hold_clients "$port" "$outage_held" outage cold
  wait_file "$work/outage.open"
  touch "$work/outage.send"
  wait_file "$work/outage.sent"
  sleep 0.5
  calls=$(connection_attempts 3 "${pid[$t]}")
  kill "$clients_pid"; wait "$clients_pid" 2>/dev/null || true
  results+="\"$t\": $(python3 -c "print(round($calls / 3, 1))"),"
done
results="${results%,}},"
start_backend
results+="\"machine\": \"$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m), $(date -u +%Y-%m-%d)\"}"
echo "$results" | python3 -m json.tool >"$out/compare.json"

python3 - "$out/compare.json" >"$out/compare.md" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
names = {"direct": "direct", "proxy": "s3-failover-proxy", "haproxy": "HAProxy", "nginx": "nginx"}
print(f"Machine: {r['machine']}; client, proxies and backend share it.\n")
for key, title in (("small_get_c64", "1 KiB GET, 64 connections"), ("small_get_c256", "1 KiB GET, 256 connections"), ("mib_get_c16", "1 MiB GET, 16 connections")):
    print(f"| {title} | req/s | p50 ms | p99 ms | CPU µs/req | vs HAProxy CPU |")
    print("|---|---|---|---|---|---|")
    row = r[key]
    base = row["haproxy"]["cpu_seconds"] / max(row["haproxy"]["requests"], 1)
    for t in ("direct", "proxy", "haproxy", "nginx"):
        x = row[t]
        cpu = "" if x["cpu_seconds"] is None else f"{x['cpu_seconds'] / max(x['requests'], 1) * 1e6:.0f}"
        ratio = "" if x["cpu_seconds"] is None else f"{(x['cpu_seconds'] / max(x['requests'], 1)) / base:.2f}x"
        print(f"| {names[t]} | {x['rps']:.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {cpu} | {ratio} |")
    print()
mib = r["mib_get_c16"]
large = {"GET": r["large_get"], "PUT": r["large_put"]}
size = r["large_get"]["mib"]
print(f"| streaming | 1 MiB GETs: CPU s/GiB | {size} MiB GET: MiB/s | CPU s/GiB | peak RSS MiB | {size} MiB PUT: MiB/s | CPU s/GiB | peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|")
for t in ("direct", "proxy", "haproxy", "nginx"):
    x = mib[t]
    cells = ["" if x["cpu_seconds"] is None else f"{x['cpu_seconds'] / (x['requests'] / 1024):.2f}"]
    for way in ("GET", "PUT"):
        y = large[way][t]
        cells.append(f"{size / y['seconds']:.0f}")
        cells.append("" if y["cpu_seconds"] is None else f"{y['cpu_seconds'] / (size / 1024):.2f}")
        cells.append("" if t == "direct" else f"{y['peak_rss_kib'] / 1024:.1f}")
    print(f"| {names[t]} | " + " | ".join(cells) + " |")
m = r["proxy_memory"]
n = m["connections"]
print()
print(f"s3-failover-proxy with {n} keep-alive connections: {(m['rss_kib_idle'] - m['rss_kib_before']) * 1024 / n:.0f} bytes per idle connection (one request served on each); "
      f"then one request held on each ({m['held_seen']} held): {(m['rss_kib_held'] - m['rss_kib_backend_down']) * 1024 / n:.0f} bytes per held request; "
      f"{m['probes_per_second_while_held']} probes/s while they were held.")
o = r["outage_connects"]
print()
print(f"| backend down, {o['requests']} requests waiting | connection attempts to the backend per second |")
print("|---|---|")
for t in ("proxy", "haproxy", "nginx"):
    print(f"| {names[t]} | {o[t]} |")
PY
cat "$out/compare.md"
