#!/usr/bin/env bash
# The study's outage experiment through each ingress in turn, same backend,
# same restarts: direct, s3-failover-proxy, HAProxy (tuned: no health checks,
# `retries 10`) and nginx. PutObject every 100 ms, SDK retries off, the backend
# SIGKILLed every few seconds and restarted after `downtime`. Reports failures,
# the extra wait after frontend-up, and the TCP connection attempts the whole
# machine made per second of outage (/proc/net/snmp ActiveOpens: the ingress's
# retries or probes against the dead backend dominate it).
#
#   bash benches/outage_compare.sh [duration] [restart-every] [downtime]
#
# Writes target/bench/outage_<target>_{stats.json,rtt.svg,percentiles.svg} and
# target/bench/outage_compare.md. Not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-20s}
every=${2:-5s}
downtime=${3:-2s}
target=${CARGO_TARGET_DIR:-target}
out=target/bench
mkdir -p "$out"
s3s_fs=${S3S_FS_BIN:-$HOME/.cache/s3fp/tools/bin/s3s-fs}
for tool in nginx haproxy curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done
cargo build --release --quiet --bin s3-failover-proxy -p s3-failover-proxy
cargo build --release --quiet -p s3-outage-experiment
experiment=$target/release/s3-outage-experiment
source benches/ingresses.sh
bench_workspace
wait_port() { for _ in $(seq 1 500); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.02; done; echo "port $1 not open" >&2; exit 1; }
key=bench-key; secret=bench-secret-0123456789

proxy_bin=${proxy_bin:-$target/release/s3-failover-proxy}
start_ingresses
wait_port "$proxy_port"; wait_port "$haproxy_port"; wait_port "$nginx_port"

active_opens() { awk '/^Tcp:/ { if (++n == 2) print $6 }' /proc/net/snmp; }
declare -A endpoint=( [direct]=$backend_port [proxy]=$proxy_port [haproxy]=$haproxy_port [nginx]=$nginx_port )
summary="| ingress | requests | failed | longest ms | extra wait after frontend-up p50 / p99 ms | TCP connects per outage second |\n|---|---|---|---|---|---|\n"
for t in direct proxy haproxy nginx; do
  mkdir -p "$work/data-$t"
  before=$(active_opens)
  "$experiment" run --endpoint "http://127.0.0.1:${endpoint[$t]}" --bucket "outage-$t" --create-bucket \
    --access-key "$key" --secret-key "$secret" --duration "$duration" \
    --restart-every "$every" --downtime "$downtime" \
    --backend-command "$s3s_fs --host 127.0.0.1 --port $backend_port --access-key $key --secret-key $secret $work/data-$t" \
    --probe-address "127.0.0.1:$backend_port" --label "$t" --out "$out/outage_$t" | tail -2
  after=$(active_opens)
  summary+=$(python3 - "$out/outage_${t}_stats.json" "$before" "$after" "$t" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
down_s = sum((o["to_frontend_up_ms"] or 0) for o in s["outages"]) / 1000
extra = s["extra_wait_after_frontend_up_ms"]
wait = f"{extra['p50']:.0f} / {extra['p99']:.0f}" if extra else "-"
# The workload's own connections are few (keep-alive); outages dominate.
rate = (int(sys.argv[3]) - int(sys.argv[2])) / down_s if down_s else 0
print(f"| {sys.argv[4]} | {s['requests']} | {s['failed']} | {s['longest_rtt_ms']:.0f} | {wait} | {rate:.0f} |")
PY
)"\n"
done
printf "Machine: %s cores, %s, %s. Backend SIGKILLed every %s, restarted after %s; run of %s each.\n\n%b" \
  "$(nproc)" "$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)" "$(date -u +%Y-%m-%d)" \
  "$every" "$downtime" "$duration" "$summary" >"$out/outage_compare.md"
cat "$out/outage_compare.md"
