# Setup shared by the scripts in benches/: sourced, not run.
#
#   . "$(dirname "$0")/common.sh"
#
# Everything it starts listens on 127.0.0.1 and is ended when the script
# exits.

# Stops the script unless every named tool is installed.
need_tools() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || {
      echo "$tool is needed (Debian: apt-get install wrk nginx-light haproxy curl python3)" >&2
      exit 1
    }
  done
}

# Makes DIR, a fresh directory with www/ (served by nginx) and tmp/, and
# PIDS, the processes to end at exit; also ends every daemon whose pid file
# is DIR/*.pid and removes DIR and the paths in CLEANUP_PATHS.
bench_dir() {
  DIR=$(mktemp -d)
  PIDS=()
  CLEANUP_PATHS=()
  trap bench_cleanup EXIT
  mkdir -p "$DIR/www" "$DIR/tmp"
  # mktemp's 0700 would keep nginx's worker (user nobody) out: 403, not the file.
  chmod 755 "$DIR" "$DIR/www"
  TEMP_PATHS="client_body_temp_path $DIR/tmp; proxy_temp_path $DIR/tmp; fastcgi_temp_path $DIR/tmp; uwsgi_temp_path $DIR/tmp; scgi_temp_path $DIR/tmp;"
}

bench_cleanup() {
  # The proxy drains for shutdown.drain_delay (5 s) after SIGTERM, still
  # listening: wait for it, so a run started next can bind the same ports.
  local pid pidfile
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for pidfile in "$DIR"/*.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  rm -rf "$DIR" "${CLEANUP_PATHS[@]}"
}

# Starts nginx as a backend serving DIR/www on 127.0.0.1:PORT with WORKERS
# worker processes; HTTP_EXTRA goes into its http block, SERVER_EXTRA into
# its server block. Its pid file is DIR/NAME.pid.
#   nginx_backend NAME PORT WORKERS [HTTP_EXTRA] [SERVER_EXTRA]
nginx_backend() {
  local name=$1 port=$2 workers=$3 http_extra=${4:-} server_extra=${5:-}
  cat > "$DIR/$name.conf" <<EOT
worker_processes $workers; pid $DIR/$name.pid; error_log $DIR/tmp/$name-error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; $TEMP_PATHS $http_extra
  server { listen 127.0.0.1:$port; root $DIR/www; location / { } $server_extra } }
EOT
  nginx -c "$DIR/$name.conf" -p "$DIR"
}

# Starts HAProxy (2 threads, `http-reuse always`) on 127.0.0.1:PORT in front
# of 127.0.0.1:BACKEND_PORT, client and server timeouts TIMEOUT; GLOBAL_EXTRA
# and DEFAULTS_EXTRA are lines for its global and defaults sections. Its pid
# file is DIR/haproxy.pid.
#   haproxy_ingress PORT BACKEND_PORT [TIMEOUT] [GLOBAL_EXTRA] [DEFAULTS_EXTRA]
haproxy_ingress() {
  local port=$1 backend_port=$2 timeout=${3:-60s} global_extra=${4:-} defaults_extra=${5:-}
  cat > "$DIR/haproxy.cfg" <<EOT
global
  nbthread 2
  $global_extra
defaults
  mode http
  timeout connect 5s
  timeout client $timeout
  timeout server $timeout
  $defaults_extra
frontend f
  bind 127.0.0.1:$port
  default_backend b
backend b
  http-reuse always
  server s 127.0.0.1:$backend_port
EOT
  haproxy -f "$DIR/haproxy.cfg" -D -p "$DIR/haproxy.pid"
}

# Starts nginx (2 workers) as an ingress on 127.0.0.1:PORT in front of
# 127.0.0.1:BACKEND_PORT, keeping up to KEEPALIVE idle backend connections
# per worker; MAIN_EXTRA, HTTP_EXTRA and LOCATION_EXTRA go into its main,
# http and location blocks. Its pid file is DIR/ingress.pid.
#   nginx_ingress PORT BACKEND_PORT KEEPALIVE [MAIN_EXTRA] [HTTP_EXTRA] [LOCATION_EXTRA]
nginx_ingress() {
  local port=$1 backend_port=$2 keepalive=$3
  local main_extra=${4:-"events { worker_connections 4096; }"} http_extra=${5:-} location_extra=${6:-}
  cat > "$DIR/ingress.conf" <<EOT
worker_processes 2; pid $DIR/ingress.pid; error_log $DIR/tmp/ingress-error.log;
$main_extra
http { access_log off; keepalive_requests 1000000; $TEMP_PATHS $http_extra
  upstream b { server 127.0.0.1:$backend_port; keepalive $keepalive; }
  server { listen 127.0.0.1:$port; location / { proxy_pass http://b; proxy_http_version 1.1;
    proxy_set_header Connection ""; $location_extra } } }
EOT
  nginx -c "$DIR/ingress.conf" -p "$DIR"
}

# Splits a proxy argument `binary[+raw|+hyper]` into PROXY_BIN and
# PROXY_RAW, the `listener.raw_http1` line it asks for (none, `true`: a
# build from before it was the default, `false`: the hyper path alone).
proxy_mode() {
  PROXY_BIN=$1
  PROXY_RAW=""
  case $PROXY_BIN in
    *+raw) PROXY_BIN=${PROXY_BIN%+raw}; PROXY_RAW="raw_http1 = true" ;;
    *+hyper) PROXY_BIN=${PROXY_BIN%+hyper}; PROXY_RAW="raw_http1 = false" ;;
  esac
}

# Waits up to 10 s for URL to answer.
wait_for() {
  local _
  for _ in $(seq 1 200); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done
  return 1
}

# User and system CPU ticks, summed over the given processes: "user system".
cpu_ticks() {
  local user=0 system=0 pid u s
  for pid in "$@"; do
    read -r u s < <(awk '{print $14, $15}' "/proc/$pid/stat")
    user=$((user + u)); system=$((system + s))
  done
  echo "$user $system"
}

# User plus system CPU ticks, summed over the given processes.
ticks() {
  local user system
  read -r user system < <(cpu_ticks "$@")
  echo $((user + system))
}

# Resident memory in KiB, summed over the given processes.
rss_kib() {
  local total=0 pid
  for pid in "$@"; do total=$((total + $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status"))); done
  echo "$total"
}

# The worker processes of the nginx whose pid file is DIR/NAME.pid.
nginx_workers() { pgrep -f "nginx: worker" -P "$(cat "$DIR/$1.pid")" | tr '\n' ' '; }

# A line naming the machine a run was made on.
machine() { echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"; }

# Starts one proxy per comma-separated `binary[+raw|+hyper]` in LIST, the
# i-th listening on 127.0.0.1:BASE_PORT+2i (its admin API on the port after)
# in front of 127.0.0.1:BACKEND_PORT; their pids go to PROXY_PIDS, the list
# to PROXY_BINS.
#   start_proxies LIST BASE_PORT BACKEND_PORT
start_proxies() {
  local list=$1 base=$2 backend_port=$3 i port admin
  IFS=, read -r -a PROXY_BINS <<< "$list"
  PROXY_PIDS=()
  for i in "${!PROXY_BINS[@]}"; do
    port=$((base + 2 * i)); admin=$((base + 1 + 2 * i))
    proxy_mode "${PROXY_BINS[$i]}"
    cat > "$DIR/proxy$i.toml" <<EOT
[listener]
address = "127.0.0.1:$port"
$PROXY_RAW
[admin]
address = "127.0.0.1:$admin"
[backend]
address = "127.0.0.1:$backend_port"
EOT
    "$PROXY_BIN" --config "$DIR/proxy$i.toml" 2>"$DIR/proxy$i.log" &
    PIDS+=($!)
    PROXY_PIDS+=($!)
    wait_for "http://127.0.0.1:$admin/readyz" || {
      echo "proxy[$i] did not start:" >&2
      cat "$DIR/proxy$i.log" >&2
      exit 1
    }
    echo "proxy[$i]: ${PROXY_BINS[$i]}"
  done
}
