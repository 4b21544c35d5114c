#!/usr/bin/env bash
# Calls in flight (issue 21): resident memory per in-flight call, CPU per streamed event and
# added first-byte latency, for keygate (every feature on), a bare Pingora passthrough and nginx,
# each holding N calls at once against a slow upstream. Run by hand, not in CI.
#
# The upstream is keygate's mock backend (core 1): a JSON answer after JSON_DELAY_S seconds, and
# an SSE stream of one event every 50 ms for SSE_SECONDS. The load client (examples/hold.rs, core
# 1) opens N connections at once, sends one call on each and holds it to the end. Each proxy runs
# alone on core 0 with one worker thread. Memory per call = (resident memory while all N calls
# are in flight - resident memory before) / N; CPU per event = the proxy's utime+stime over the
# run / the SSE events the client read; added first-byte latency = the client's p50/p99 through
# the proxy minus the same directly against the upstream.
#
# Usage: benches/concurrency.sh [N...]   (default: 1000 4000 8000)
#   JSON_DELAY_S (default 6), SSE_SECONDS (default 30), CASES (default "json sse"),
#   PROXIES (default "keygate passthrough nginx"), KEYGATE_BASE=path: also an older keygate.
#   KEYGATE_BIN / PASS_BIN / HOLD_BIN=path: binaries built before (with SKIP_BUILD=1 nothing is
#   built; a binary given is not rebuilt), so two keygate builds can be compared side by side.
#   KEEP_DIR=path: the working directory (configs, logs, results), kept after the run.
# keygate runs with every feature on: usage log, usage store (SQLite), access log, per-key
# metrics, and keys in an account with rpm/tpm/concurrency limits and a daily budget (none near),
# so each call carries the rate-limit headers and holds a concurrency slot; and alerts.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=${*:-1000 4000 8000}
JSON_DELAY_S=${JSON_DELAY_S:-6}
SSE_SECONDS=${SSE_SECONDS:-30}
CASES=${CASES:-json sse}
PROXIES=${PROXIES:-keygate passthrough nginx}
[ -n "${KEYGATE_BASE:-}" ] && PROXIES+=" keygate_base"

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v taskset >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
./scripts/bootstrap.sh
# SKIP_BUILD=1 with KEYGATE_BIN=path: measure a binary built before (the examples must exist).
build=()
[ -n "${KEYGATE_BIN:-}" ] || build+=(--bin keygate)
[ -n "${PASS_BIN:-}" ] || build+=(--example passthrough)
[ -n "${HOLD_BIN:-}" ] || build+=(--example hold)
if [ "${SKIP_BUILD:-0}" != 1 ] && ((${#build[@]})); then
  cargo build --release "${build[@]}" 2>&1 | tail -1
fi
KEYGATE=${KEYGATE_BIN:-target/release/keygate}
PASS=${PASS_BIN:-target/release/examples/passthrough}
HOLD=${HOLD_BIN:-target/release/examples/hold}
# Two descriptors per proxied call, plus the listener's and the logs'.
ulimit -n "$(ulimit -Hn)"

if [ -n "${KEEP_DIR:-}" ]; then mkdir -p "$KEEP_DIR"; W=$(cd "$KEEP_DIR" && pwd); else W=$(mktemp -d); fi
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP_DIR:-}" ] || rm -rf "$W"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 300); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }
rss_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

U=$(port); P_KG=$(port); P_KG_M=$(port); P_KGB=$(port); P_KGB_M=$(port); P_PASS=$(port); P_NGX=$(port)
taskset -c 1 "$KEYGATE" mock --listen "127.0.0.1:$U" >"$W/mock.out" 2>&1 & PIDS+=($!)

KEY="sk-$(printf '%048d' 7)"
python3 - "$W" <<'PY'
import hashlib, json, sys
w = sys.argv[1]
# Limits and budgets far from reached: every check runs, none refuses.
limits = {"rpm": 10**9, "tpm": 10**9, "concurrency": 10**6}
budget = {"period": "daily", "amount": 10**15, "timezone": "Europe/Berlin"}
keys = []
for i in range(1000):
    h = hashlib.sha256(b"sk-%048d" % i).hexdigest()
    keys.append({"id": i + 1, "name": f"key {i}", "key_sha256": h, "quota": 10**12,
                 "models": ["gpt-4o-mini"], "allow_ips": ["127.0.0.1"], "account": "acme",
                 "limits": limits, "budget": budget})
table = {"revision": 1, "models": {"gpt-4o-mini": {"ratio": 0.075, "completion_ratio": 4}},
         "accounts": {"acme": {"name": "Acme", "quota": 10**15, "limits": limits, "budget": budget}},
         "keys": keys}
open(f"{w}/keys.json", "w").write(json.dumps(table))
PY
kg_conf() { # NAME LISTEN METRICS
  cat >"$W/$1.yaml" <<EOF
listen: "127.0.0.1:$2"
threads: 1
metrics_listen: "127.0.0.1:$3"
sync_file: keys.json
state_dir: var_$1
usage_log: var_$1/usage.jsonl
access_log: true
metrics: { per_key: true }
usage_store: { backend: sqlite }
alerts: { webhook_url: "http://127.0.0.1:$U/alerts" }
grace_period_seconds: 0
upstreams:
  - name: mock
    url: "http://127.0.0.1:$U"
    models: ["*"]
EOF
}
kg_conf keygate "$P_KG" "$P_KG_M"
kg_conf keygate_base "$P_KGB" "$P_KGB_M"
cat >"$W/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid $W/nginx.pid;
error_log $W/nginx.err warn;
events { worker_connections 20000; }
http {
  access_log off;
  upstream up { server 127.0.0.1:$U; keepalive 256; }
  server { listen 127.0.0.1:$P_NGX backlog=16384;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_read_timeout 300s; } }
}
EOF

start() { # NAME -> PID of the process doing the work
  case $1 in
    keygate) RUST_LOG=warn taskset -c 0 "$KEYGATE" run -c "$W/keygate.yaml" >"$W/keygate.out" 2>&1 & PIDS+=($!); echo $! ;;
    keygate_base) RUST_LOG=warn taskset -c 0 "$KEYGATE_BASE" run -c "$W/keygate_base.yaml" >"$W/keygate_base.out" 2>&1 & PIDS+=($!); echo $! ;;
    passthrough) taskset -c 0 "$PASS" "127.0.0.1:$P_PASS" "127.0.0.1:$U" >/dev/null 2>&1 & PIDS+=($!); echo $! ;;
    nginx) taskset -c 0 "$NGINX" -c "$W/nginx.conf" -p "$W" >/dev/null 2>&1 & PIDS+=($!); sleep 0.5; pgrep -P $! | head -1 ;;
  esac
}
addr_of() { case $1 in keygate) echo "127.0.0.1:$P_KG" ;; keygate_base) echo "127.0.0.1:$P_KGB" ;; passthrough) echo "127.0.0.1:$P_PASS" ;; nginx) echo "127.0.0.1:$P_NGX" ;; direct) echo "127.0.0.1:$U" ;; esac; }

echo '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello there, how are you?"}],"max_tokens":16}' >"$W/json.body"
echo '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello there, how are you?"}],"max_tokens":16,"stream":true}' >"$W/sse.body"
case_headers() { # CASE
  if [ "$1" = json ]; then echo "x-mock-delay-ms: $((JSON_DELAY_S * 1000))"; else echo "x-mock-delay-ms: 50"; echo "x-mock-chunks: $((SSE_SECONDS * 20))"; fi
}
hold_s() { [ "$1" = json ] && echo "$JSON_DELAY_S" || echo "$SSE_SECONDS"; }

# measure PROXY CASE N -> one result line
measure() {
  local proxy=$1 case=$2 n=$3 pid="" rss0=0 rss_max=0 t0=0 t1=0
  local addr; addr=$(addr_of "$proxy")
  mapfile -t hdrs < <(case_headers "$case")
  if [ "$proxy" != direct ]; then
    pid=$(start "$proxy")
    wait_port "${addr##*:}"
    # One call first, so lazily built state (pools, tables) is not counted per call.
    "$HOLD" "$addr" 1 "$W/json.body" "Authorization: Bearer $KEY" >/dev/null
    sleep 1
    rss0=$(rss_kb "$pid"); t0=$(ticks "$pid")
  fi
  taskset -c 1 "$HOLD" "$addr" "$n" "$W/$case.body" "Authorization: Bearer $KEY" "${hdrs[@]}" >"$W/hold.out" & local hp=$!
  # Sample resident memory while the calls are held (every 200 ms; the maximum is kept).
  local deadline=$(( $(date +%s) + $(hold_s "$case") + 120 ))
  while kill -0 $hp 2>/dev/null && [ "$(date +%s)" -lt $deadline ]; do
    if [ -n "$pid" ]; then local r; r=$(rss_kb "$pid" 2>/dev/null || echo 0); [ "$r" -gt "$rss_max" ] && rss_max=$r; fi
    sleep 0.2
  done
  wait $hp || true
  local out; out=$(cat "$W/hold.out")
  if [ -n "$pid" ]; then t1=$(ticks "$pid"); kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; [ "$proxy" = nginx ] && pkill -f "$W/nginx.conf" || true; sleep 0.5; fi
  python3 - "$proxy" "$case" "$n" "$rss0" "$rss_max" "$((t1 - t0))" "$HZ" "$out" >>"$W/results" <<'PY'
import json, sys
proxy, case, n, rss0, rss_max, ticks, hz, out = sys.argv[1:]
o = json.loads(out)
n, rss0, rss_max, ticks, hz = int(n), int(rss0), int(rss_max), int(ticks), int(hz)
per_call_kb = (rss_max - rss0) / n if rss_max else 0
cpu_us_per_event = ticks / hz * 1e6 / o["events"] if o["events"] else 0
print(proxy, case, n, round(per_call_kb, 1), rss0 // 1024, rss_max // 1024, round(cpu_us_per_event, 2),
      o["first_byte_p50_ms"], o["first_byte_p99_ms"], o["errors"], o["ok"])
PY
  tail -1 "$W/results"
}

: >"$W/results"
for case in $CASES; do
  for n in $COUNTS; do
    measure direct "$case" "$n"
    for proxy in $PROXIES; do measure "$proxy" "$case" "$n"; done
  done
done

python3 - "$W/results" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
direct = {(r[1], r[2]): (float(r[7]), float(r[8])) for r in rows if r[0] == "direct"}
print(f"\n{'proxy':13} {'case':5} {'calls':>6} {'KB/call':>8} {'RSS MB':>11} {'CPU us/event':>13} {'+p50 ms':>8} {'+p99 ms':>8} {'errors':>7}")
for r in rows:
    if r[0] == "direct":
        continue
    d50, d99 = direct.get((r[1], r[2]), (0.0, 0.0))
    ev = r[6] if r[1] == "sse" else "-"
    print(f"{r[0]:13} {r[1]:5} {r[2]:>6} {r[3]:>8} {r[4]+'->'+r[5]:>11} {ev:>13} {float(r[7]) - d50:8.1f} {float(r[8]) - d99:8.1f} {r[9]:>7}")
PY
