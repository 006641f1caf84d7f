#!/usr/bin/env bash
# Proxy overhead against direct access, side by side in one run, on one machine.
#
#   bash benches/overhead.sh [seconds-per-run] [large-object-MiB]
#
# Starts a real S3 backend (s3s-fs, anonymous so wrk can send plain GETs), the
# release build of the proxy in front of it, and measures with wrk (small GETs
# at 64 and 256 connections) and curl (one large object): requests/s, p50/p99
# latency, proxy CPU seconds per request and per GiB, and the proxy's peak RSS.
# Writes target/bench/overhead.json and target/bench/overhead.md. Not a test:
# numbers are noisy on shared machines; compare the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
large_mib=${2:-1024}
target=${CARGO_TARGET_DIR:-target}
out=target/bench
mkdir -p "$out"
s3s_fs=${S3S_FS_BIN:-$HOME/.cache/s3fp/tools/bin/s3s-fs}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
[ -x "$s3s_fs" ] || { echo "s3s-fs is needed: bash .ci/run installs it" >&2; exit 1; }

cargo build --release --quiet
proxy_bin=$target/release/s3-failover-proxy

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
backend_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port)
data=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$data"; }
trap cleanup EXIT

wait_http() { for _ in $(seq 1 500); do curl -s -o /dev/null "$1" && return 0; sleep 0.02; done; echo "no answer from $1" >&2; exit 1; }

"$s3s_fs" --host 127.0.0.1 --port "$backend_port" "$data" >/dev/null 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$backend_port/"
cat >"$data/proxy.toml" <<TOML
[listener]
address = "127.0.0.1:$proxy_port"
[backend]
address = "127.0.0.1:$backend_port"
[admin]
address = "127.0.0.1:$admin_port"
[log]
level = "warn"
TOML
"$proxy_bin" --config "$data/proxy.toml" 2>/dev/null &
proxy_pid=$!
pids+=($proxy_pid)
wait_http "http://127.0.0.1:$admin_port/readyz"

direct=http://127.0.0.1:$backend_port
proxied=http://127.0.0.1:$proxy_port
curl -sf -X PUT "$direct/bench" >/dev/null
head -c 1024 /dev/urandom | curl -sf -X PUT --data-binary @- "$direct/bench/small" >/dev/null
head -c $((large_mib << 20)) /dev/zero | curl -sf -X PUT -T - "$direct/bench/large" >/dev/null

cpu_ticks() { awk '{print $14 + $15}' "/proc/$proxy_pid/stat"; }
ticks_per_second=$(getconf CLK_TCK)

# wrk: requests/s and latency percentiles, as JSON.
run_wrk() {
  local url=$1 connections=$2
  wrk -t2 -c"$connections" -d"${seconds}s" --latency "$url" | python3 -c '
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

results="{"
for connections in 64 256; do
  d=$(run_wrk "$direct/bench/small" "$connections")
  before=$(cpu_ticks)
  p=$(run_wrk "$proxied/bench/small" "$connections")
  after=$(cpu_ticks)
  results+="\"small_get_c$connections\": {\"direct\": $d, \"proxy\": $p, \"proxy_cpu_seconds\": $(python3 -c "print(($after - $before) / $ticks_per_second)")},"
done

download() { curl -s -o /dev/null -w '%{time_total}' "$1"; }
d_time=$(download "$direct/bench/large")
before=$(cpu_ticks)
p_time=$(download "$proxied/bench/large")
after=$(cpu_ticks)
rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$proxy_pid/status")
results+="\"large_get\": {\"mib\": $large_mib, \"direct_seconds\": $d_time, \"proxy_seconds\": $p_time, \"proxy_cpu_seconds\": $(python3 -c "print(($after - $before) / $ticks_per_second)")},"
results+="\"proxy_peak_rss_kib\": $rss_kib,"
results+="\"machine\": \"$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m), $(date -u +%Y-%m-%d)\"}"
echo "$results" | python3 -m json.tool >"$out/overhead.json"

python3 - "$out/overhead.json" >"$out/overhead.md" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"Machine: {r['machine']}\n")
print("| small GET (1 KiB) | direct req/s | proxy req/s | ratio | direct p50/p99 ms | proxy p50/p99 ms | proxy CPU µs/req |")
print("|---|---|---|---|---|---|---|")
for c in (64, 256):
    x = r[f"small_get_c{c}"]; d, p = x["direct"], x["proxy"]
    cpu_us = x["proxy_cpu_seconds"] / max(p["requests"], 1) * 1e6
    print(f"| {c} connections | {d['rps']:.0f} | {p['rps']:.0f} | {p['rps']/d['rps']:.2f} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | {p['p50_ms']:.2f} / {p['p99_ms']:.2f} | {cpu_us:.1f} |")
l = r["large_get"]; gib = l["mib"] / 1024
print(f"\n| large GET ({l['mib']} MiB) | direct | proxy | ratio |\n|---|---|---|---|")
print(f"| MiB/s | {l['mib']/l['direct_seconds']:.0f} | {l['mib']/l['proxy_seconds']:.0f} | {l['direct_seconds']/l['proxy_seconds']:.2f} |")
print(f"\nProxy CPU per GiB streamed: {l['proxy_cpu_seconds']/gib:.2f} s. Proxy peak RSS over the whole run: {r['proxy_peak_rss_kib']/1024:.1f} MiB.")
PY
cat "$out/overhead.md"
