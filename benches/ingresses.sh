# Sourced by the benchmark scripts: a scratch workspace with free loopback
# ports, and s3-failover-proxy, HAProxy and nginx started in front of
# 127.0.0.1:$backend_port, configured the same way for every benchmark.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Sets $work (removed on exit), the pids array (killed on exit) and a free
# port for the backend, the proxy and its admin listener, HAProxy and nginx.
bench_workspace() {
  work=$(mktemp -d)
  pids=()
  trap 'for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"' EXIT
  backend_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port)
  haproxy_port=$(free_port); nginx_port=$(free_port)
}

# Needs $proxy_bin and bench_workspace; sets proxy_pid, haproxy_pid, nginx_pid.

start_ingresses() {
  cat >"$work/proxy.toml" <<TOML
[listener]
address = "127.0.0.1:$proxy_port"
[backend]
address = "127.0.0.1:$backend_port"
[admin]
address = "127.0.0.1:$admin_port"
[hold]
max_requests = 100000
timeout = "120s"
[log]
level = "warn"
TOML
  "$proxy_bin" --config "$work/proxy.toml" 2>/dev/null &
  proxy_pid=$!
  pids+=($proxy_pid)

  # The tuned HAProxy of the study: no health checks, retries 10.
  cat >"$work/haproxy.cfg" <<CFG
global
  nbthread 2
  maxconn 9000
defaults
  mode http
  timeout connect 2s
  timeout client 120s
  timeout server 120s
  retries 10
frontend s3
  bind 127.0.0.1:$haproxy_port
  default_backend s3gw
backend s3gw
  http-reuse always
  server s3gw 127.0.0.1:$backend_port
CFG
  haproxy -f "$work/haproxy.cfg" -db >/dev/null 2>&1 &
  haproxy_pid=$!
  pids+=($haproxy_pid)

  mkdir -p "$work/nginx"
  cat >"$work/nginx.conf" <<CONF
worker_processes 2;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  upstream s3gw { server 127.0.0.1:$backend_port; keepalive 256; }
  server {
    listen 127.0.0.1:$nginx_port;
    client_max_body_size 0;
    location / {
      proxy_pass http://s3gw;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      proxy_request_buffering off;
      proxy_buffering off;
    }
  }
}
CONF
  nginx -c "$work/nginx.conf" >/dev/null 2>&1 &
  nginx_pid=$!
  pids+=($nginx_pid)
}
