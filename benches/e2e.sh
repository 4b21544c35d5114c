#!/usr/bin/env bash
# End-to-end load benchmark on loopback (issue 6). In one run it measures, against the same
# fixed-response upstream (nginx `return 200` with a chat completion that has `usage`):
#   (a) a bare Pingora passthrough (examples/passthrough.rs, same profile and allocator), and
#       the same passthrough built with Cargo's default release settings and the system
#       allocator (the "default-built" baseline for throughput),
#   (b) keygate with 1M keys loaded, the request's key among them with a model list and an IP
#       whitelist, quota reserve and settle, usage parsing, metrics, usage log,
#   (c) nginx as a plain reverse proxy;
# plus a streaming case (SSE, 50 events and a usage chunk, from keygate's mock backend), a
# denial-heavy case (unknown keys), and keygate on the shared ledger (`ledger.backend: redis`,
# a redis-server on core 1): its CPU per request against `backend: local`, and the Redis
# operations it makes per 1,000 calls.
# Method: the proxy alone on core 0 with one worker thread; wrk and the upstream on core 1; a
# warm-up; A/B interleaved repetitions; the median requests/s, p50/p99 latency and the proxy's
# CPU time per request (utime+stime from /proc). Bounded: REPS × cases × DURATION seconds.
#
# Usage: benches/e2e.sh [REPS] [DURATION_SECONDS]      (defaults: 3 reps of 10 s)
# KEYGATE_BASE=path/to/an/older/keygate: the A/B of a change. That binary runs beside this one
# (same config, other ports, same core) and is measured in every repetition right after it, on
# the JSON case; the ratio of CPU per request (new / base) is printed, and each pair's ratio.
# KG_SYNC_LIMITS=1: the measured keygate (not the base, not the Redis one) reads a sync file where
# every key is in an account and key and account both have quota, a daily budget in
# Europe/Berlin, rpm, tpm and concurrency, none of them near (SPEC §7): with KEYGATE_BASE set to
# the same binary, the A/B of limits on against off. KG_SYNC_LIMITS=both: the base reads it too
# (the A/B of a change with limits on). KG_SYNC_LIMITS=base: only the base reads it (the same
# A/B with the order swapped, since the binary measured first in each pair reads a few % off:
# run both orders; the ratio printed is then limits off / on).
# KG_POOL_OF=N: the measured keygate's JSON upstream is a pool of N targets (all the same upstream,
# equal weights) instead of one `url`: with KEYGATE_BASE set to the same binary, what a pool's
# target choice costs on the success path (SPEC §11).
# AB_ONLY=1 (with KEYGATE_BASE): measure only the passthrough, keygate and the base.
# KG_BASE_EXTRA_CONFIG="key: value": config lines for the base only (KEYGATE_BASE may then be the
# same binary: an A/B of one setting).
# With the usage store on, the CPU its writer thread spent per request (part of the whole
# process's, from /proc/PID/task/*/schedstat) is printed for each run.
# THREADS=1: also print each thread's CPU per request (by thread name) for every run.
# PROFILE=1: build with symbols (cargo profile `profiling`: release plus line tables) and, after
# the measured runs, record keygate with perf during one more run and print where its CPU time
# goes (flat self time by function, and rolled up by crate).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-3}
DURATION=${2:-10}
CONNS=32

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v taskset >/dev/null || need+=(util-linux)
command -v redis-server >/dev/null || need+=(redis-server)
if ((${#need[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
./scripts/bootstrap.sh
BUILD=release
[ "${PROFILE:-0}" = 1 ] && BUILD=profiling
# SKIP_BUILD=1 with KEYGATE_BIN=path: measure a binary built before (the examples must exist;
# PASS_BIN=path names the passthrough example, e.g. a default-release one on a fresh checkout).
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --profile "$BUILD" --bin keygate --example passthrough 2>&1 | tail -1
# The same passthrough built as `cargo build --release` would without this repo's profile (no
# LTO, 16 codegen units) and with the system allocator: the "default-built" baseline.
KEYGATE=${KEYGATE_BIN:-target/$BUILD/keygate}
PASS=${PASS_BIN:-target/$BUILD/examples/passthrough}
PASS_DEFAULT=target/default-release/examples/passthrough
if [ "${AB_ONLY:-0}" = 1 ]; then
  PASS_DEFAULT=$PASS # not measured
else
  cargo build --profile default-release --features system-alloc --example passthrough 2>&1 | tail -1
fi

W=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
U_JSON=$(port); U_SSE=$(port); P_PASS=$(port); P_PASS_DEF=$(port); P_PASS_SSE=$(port); P_KG=$(port); P_KG_M=$(port); P_NGX=$(port)
P_KGR=$(port); P_KGR_M=$(port); P_REDIS=$(port); P_KGB=$(port); P_KGB_M=$(port)

# --- the fixed-response upstream (core 1) ---
python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}}
open(f"{w}/chat.json", "w").write(json.dumps(body))
ev = []
for i in range(50):
    ev.append("data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-stream",
              "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}], "usage": None}, separators=(",", ":")) + "\n\n")
ev.append("data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-stream", "choices": [],
          "usage": {"prompt_tokens": 12, "completion_tokens": 50, "total_tokens": 62}}, separators=(",", ":")) + "\n\n")
ev.append("data: [DONE]\n\n")
open(f"{w}/stream.sse", "w").write("".join(ev))
PY
# nginx_conf NAME HTTP_BLOCK: a one-worker, foreground nginx config in $W/NAME.conf.
nginx_conf() {
  cat > "$W/$1.conf" <<EOF
worker_processes 1;
daemon off;
pid $W/$1.pid;
error_log $W/$1.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  $2
}
EOF
}
# nginx `return 200` with the body inlined (literal newlines are allowed in quoted strings).
CHAT_BODY=$(cat "$W/chat.json")
nginx_conf upstream "server { listen 127.0.0.1:$U_JSON; location / { default_type application/json; return 200 '$CHAT_BODY'; } }"
taskset -c 1 "$NGINX" -c "$W/upstream.conf" -p "$W" & PIDS+=($!)
# The SSE upstream: nginx cannot inline a 50-event body, so keygate's own mock backend serves it
# (50 events, and the usage chunk when asked for), for the passthrough and keygate alike.
taskset -c 1 "$KEYGATE" mock --listen "127.0.0.1:$U_SSE" >/dev/null & PIDS+=($!)

# The shared ledger's Redis (core 1, with the upstream and wrk), no persistence.
taskset -c 1 redis-server --port "$P_REDIS" --bind 127.0.0.1 --save "" --appendonly no --daemonize no >"$W/redis.log" 2>&1 & PIDS+=($!)

# --- nginx as a plain reverse proxy (core 0) ---
nginx_conf proxy "upstream up { server 127.0.0.1:$U_JSON; keepalive 256; }
  server { listen 127.0.0.1:$P_NGX; location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"

# --- 1M keys; the benchmark's keys have a model list and an IP whitelist ---
python3 - "$W" <<'PY'
import hashlib, sys
w = sys.argv[1]
with open(f"{w}/keys.json", "w") as f:
    f.write('{"revision":1,"groups":{"default":{"ratio":1.0,"models":["gpt-*"]}},'
            '"models":{"gpt-4o-mini":{"ratio":0.075,"completion_ratio":4},"gpt-stream":{"ratio":0.075,"completion_ratio":4}},"keys":[')
    for i in range(1_000_000):
        h = hashlib.sha256(b"sk-%048d" % i).hexdigest()
        f.write(('' if i == 0 else ',') +
                f'{{"id":{i+1},"name":"key {i}","key_sha256":"{h}","quota":1000000000000,'
                f'"models":["gpt-4o-mini","gpt-stream"],"allow_ips":["127.0.0.1","10.0.0.0/8"]}}')
    f.write(']}')
PY
if [ "${KG_SYNC_LIMITS:-0}" != 0 ]; then
  python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
limits = {"rpm": 1000000000, "tpm": 1000000000, "concurrency": 1000000}
budget = {"period": "daily", "amount": 10**15, "timezone": "Europe/Berlin"}
extra = ',"account":"acme","limits":%s,"budget":%s}' % (json.dumps(limits), json.dumps(budget))
acct = {"acme": {"name": "Acme", "quota": 10**15, "limits": limits, "budget": budget}}
with open(f"{w}/keys.json") as src, open(f"{w}/keys_limits.json", "w") as dst:
    text = src.read()
    # Every key object ends with its allow_ips list: add the account and limits there.
    text = text.replace('"10.0.0.0/8"]}', '"10.0.0.0/8"]' + extra)
    dst.write(text[:-1] + ',"accounts":' + json.dumps(acct) + '}')
PY
fi
cat > "$W/keygate.yaml" <<EOF
listen: "127.0.0.1:$P_KG"
threads: 1
metrics_listen: "127.0.0.1:$P_KG_M"
sync_file: keys.json
state_dir: var
usage_log: var/usage.jsonl
access_log: false
grace_period_seconds: 0
${KG_EXTRA_CONFIG:-}
upstreams:
  - name: json
    url: "http://127.0.0.1:$U_JSON"
    models: ["gpt-4o-mini"]
  - name: sse
    url: "http://127.0.0.1:$U_SSE"
    models: ["gpt-stream"]
EOF
# keygate on the shared ledger: the same config on other ports, counters in Redis.
sed -e "s/^listen: .*/listen: \"127.0.0.1:$P_KGR\"/" -e "s/^metrics_listen: .*/metrics_listen: \"127.0.0.1:$P_KGR_M\"/" \
  -e "s/^state_dir: var/state_dir: var_redis/" -e "s|^usage_log: .*|usage_log: var_redis/usage.jsonl|" \
  "$W/keygate.yaml" >"$W/keygate_redis.yaml"
printf 'ledger:\n  backend: redis\n  redis_url: "redis://127.0.0.1:%s"\n' "$P_REDIS" >>"$W/keygate_redis.yaml"
# The baseline binary of an A/B: the same config on other ports and its own state.
sed -e "s/^listen: .*/listen: \"127.0.0.1:$P_KGB\"/" -e "s/^metrics_listen: .*/metrics_listen: \"127.0.0.1:$P_KGB_M\"/" \
  -e "s/^state_dir: var/state_dir: var_base/" -e "s|^usage_log: .*|usage_log: var_base/usage.jsonl|" \
  "$W/keygate.yaml" >"$W/keygate_base.yaml"
# KG_BASE_EXTRA_CONFIG: lines for the base's config only (an A/B of a setting on one binary).
printf '%s\n' "${KG_BASE_EXTRA_CONFIG:-}" >>"$W/keygate_base.yaml"
if [ "${KG_SYNC_LIMITS:-0}" != 0 ] && [ "${KG_SYNC_LIMITS:-0}" != base ]; then
  sed -i -e "s/^sync_file: keys.json/sync_file: keys_limits.json/" "$W/keygate.yaml"
fi
if [ "${KG_SYNC_LIMITS:-0}" = both ] || [ "${KG_SYNC_LIMITS:-0}" = base ]; then
  sed -i -e "s/^sync_file: keys.json/sync_file: keys_limits.json/" "$W/keygate_base.yaml"
fi
if [ -n "${KG_POOL_OF:-}" ]; then
  targets=$(for _ in $(seq 1 "$KG_POOL_OF"); do printf '{ url: "http://127.0.0.1:%s" }, ' "$U_JSON"; done)
  sed -i -e "s|^    url: \"http://127.0.0.1:$U_JSON\"|    targets: [ ${targets%, } ]|" "$W/keygate.yaml"
fi

# Resident memory per key: keygate with one key, then with the 1M keys (both after start).
rss_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
measure_rss_per_key() {
  local small; small=$(sed -e "s/^sync_file: keys.json/sync_file: keys1.json/" -e "s/^listen: .*/listen: \"127.0.0.1:0\"/" \
    -e "s/^metrics_listen: .*/metrics_listen: \"127.0.0.1:0\"/" -e "s/^state_dir: var/state_dir: var1/" \
    -e "s/^usage_log: .*//" "$W/keygate.yaml")
  echo "$small" >"$W/keygate1.yaml"
  python3 -c "import json; print(json.dumps({'revision':1,'keys':[{'id':1,'name':'one','key':'sk-one','quota':1}]}))" >"$W/keys1.json"
  "$KEYGATE" run -c "$W/keygate1.yaml" >"$W/keygate1.out" 2>&1 & local pid=$!
  for _ in $(seq 1 100); do grep -q "proxy on" "$W/keygate1.out" 2>/dev/null && break; sleep 0.1; done
  sleep 1
  RSS_ONE=$(rss_kb $pid)
  kill $pid; wait $pid 2>/dev/null || true
}

start_proxies() {
  taskset -c 0 "$PASS" "127.0.0.1:$P_PASS" "127.0.0.1:$U_JSON" >/dev/null & PIDS+=($!); PASS_PID=$!
  taskset -c 0 "$PASS" "127.0.0.1:$P_PASS_SSE" "127.0.0.1:$U_SSE" >/dev/null & PIDS+=($!); PASS_SSE_PID=$!
  taskset -c 0 "$PASS_DEFAULT" "127.0.0.1:$P_PASS_DEF" "127.0.0.1:$U_JSON" >/dev/null & PIDS+=($!); PASS_DEF_PID=$!
  RUST_LOG=warn taskset -c 0 "$KEYGATE" run -c "$W/keygate.yaml" >"$W/keygate.out" 2>&1 & PIDS+=($!); KG_PID=$!
  RUST_LOG=warn taskset -c 0 "$KEYGATE" run -c "$W/keygate_redis.yaml" >"$W/keygate_redis.out" 2>&1 & PIDS+=($!); KGR_PID=$!
  taskset -c 0 "$NGINX" -c "$W/proxy.conf" -p "$W" & PIDS+=($!); NGX_MASTER=$!
  if [ -n "${KEYGATE_BASE:-}" ]; then
    RUST_LOG=warn taskset -c 0 "$KEYGATE_BASE" run -c "$W/keygate_base.yaml" >"$W/keygate_base.out" 2>&1 & PIDS+=($!); KGB_PID=$!
    ALL_PORTS+=" $P_KGB"
  fi
  for p in $ALL_PORTS; do
    for _ in $(seq 1 600); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
  done
  sleep 1
  NGX_PID=$(pgrep -P "$NGX_MASTER" | head -1)
  measure_rss_per_key
  local rss_m; rss_m=$(rss_kb $KG_PID)
  echo "keygate RSS: $((RSS_ONE / 1024)) MB with 1 key, $((rss_m / 1024)) MB with 1M keys: $(( (rss_m - RSS_ONE) * 1024 / 1000000 )) bytes per key"
}

cat > "$W/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-mock-chunks"] = "50"
local model = os.getenv("KG_MODEL") or "gpt-4o-mini"
local stream = os.getenv("KG_STREAM") == "1"
local bad = os.getenv("KG_BADKEY") == "1"
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"Hello there, how are you?"}],"max_tokens":64' .. (stream and ',"stream":true' or '') .. '}'
local i = 0
request = function()
  i = i + 1
  -- 100 active keys spread over the 1M-key table (each key's first call after start waits for
  -- one ledger journal fsync; a run over 1M distinct keys measures that instead).
  local key = string.format("sk-%048d", ((i % 100) * 7919) % 1000000)
  if bad then key = string.format("sk-bad%045d", i) end
  wrk.headers["Authorization"] = "Bearer " .. key
  return wrk.format()
end
EOF

ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# "comm ns" for every thread of process $1: its CPU nanoseconds (threads of one name summed).
threads_ns() {
  local f
  for f in /proc/"$1"/task/*; do
    printf '%s %s\n' "$(tr ' ' _ 2>/dev/null <"$f/comm")" "$(awk '{print $1}' "$f/schedstat" 2>/dev/null)"
  done | awk '$2 != "" {a[$1]+=$2} END {for (n in a) print n, a[n]}'
}
# CPU nanoseconds of the usage store's writer thread of process $1 (0 when it has none).
writer_ns() { threads_ns "$1" | awk '$1 == "keygate-usage-s" {n = $2} END {print n + 0}'; }
# The shared ledger's Redis calls so far (keygate_ledger_backend_operations_total).
ledger_ops() { curl -s "http://127.0.0.1:$P_KGR_M/metrics" | awk '/^keygate_ledger_backend_operations_total/{print $2}'; }
HZ=$(getconf CLK_TCK)

# run NAME PID PORT [env...] -> appends "name rps p50_ms p99_ms cpu_us_per_req non2xx
# ledger_ops_per_1000" to results (the last is 0 but for keygate on Redis)
run() {
  local name=$1 pid=$2 port=$3; shift 3
  local t0 t1 out ops0=0 ops1=0
  [ "$pid" = "$KGR_PID" ] && ops0=$(ledger_ops)
  t0=$(ticks "$pid")
  local w0; w0=$(writer_ns "$pid")
  [ "${THREADS:-0}" = 1 ] && threads_ns "$pid" >"$W/threads0"
  out=$(env "$@" taskset -c 1 wrk -t1 -c$CONNS -d${DURATION}s --latency -s "$W/post.lua" "http://127.0.0.1:$port/v1/chat/completions")
  t1=$(ticks "$pid")
  local w1; w1=$(writer_ns "$pid")
  [ "${THREADS:-0}" = 1 ] && threads_ns "$pid" >"$W/threads1"
  [ "$pid" = "$KGR_PID" ] && ops1=$(ledger_ops)
  local rps total p50 p99
  rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
  total=$(awk '/requests in/{print $1}' <<<"$out")
  p50=$(awk '$1=="50%"{print $2}' <<<"$out")
  p99=$(awk '$1=="99%"{print $2}' <<<"$out")
  local non2xx; non2xx=$(awk '/Non-2xx/{print $NF}' <<<"$out")
  local cpu_us; cpu_us=$(python3 -c "print(round(($t1-$t0)/$HZ*1e6/max($total,1),2))")
  local ops; ops=$(python3 -c "print(round(($ops1-$ops0)*1000/max($total,1),3))")
  echo "$name $rps $(tomillis "$p50") $(tomillis "$p99") $cpu_us ${non2xx:-0} $ops" >>"$W/results"
  # The usage store's writer thread: its part of the CPU per request (included in the above).
  [ "$w1" = 0 ] || echo "$name $(python3 -c "print(round(($w1-$w0)/1000/max($total,1),2))")" >>"$W/writer"
  if [ "${THREADS:-0}" = 1 ]; then
    awk -v name="$name" -v total="$total" 'NR==FNR {a[$1]=$2; next}
      {d=($2-a[$1])/1000/(total>0?total:1); if (d >= 0.05) printf "%s %s %.2f\n", name, $1, d}' \
      "$W/threads0" "$W/threads1" >>"$W/threads"
  fi
}
tomillis() { python3 -c "
v='$1'
for u,m in (('us',1e-3),('ms',1.0),('s',1e3)):
    if v.endswith(u): print(round(float(v[:-len(u)])*m,3)); break
else: print(v)"; }

ALL_PORTS="$P_PASS $P_PASS_DEF $P_PASS_SSE $P_KG $P_KGR $P_NGX"
start_proxies
# Sanity: every path answers 200 before anything is measured.
for p in ${ALL_PORTS/$P_PASS_SSE/}; do
  code=$(curl -s -o "$W/sample.$p" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
    -H "Authorization: Bearer sk-$(printf '%048d' 7919)" \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":64}' \
    "http://127.0.0.1:$p/v1/chat/completions")
  echo "sanity: port $p answered $code: $(head -c 200 "$W/sample.$p")"
  [ "$code" = 200 ] || { echo "a proxy does not answer 200; see above" >&2; cat "$W"/*.err "$W/keygate.out" >&2; exit 1; }
done
echo "warm-up"
for p in ${ALL_PORTS/$P_PASS_SSE/}; do taskset -c 1 wrk -t1 -c$CONNS -d3s -s "$W/post.lua" "http://127.0.0.1:$p/v1/chat/completions" >/dev/null; done
: >"$W/results"
for r in $(seq 1 "$REPS"); do
  echo "repetition $r/$REPS"
  run passthrough "$PASS_PID" "$P_PASS"
  [ "${AB_ONLY:-0}" = 1 ] || run passthrough_default "$PASS_DEF_PID" "$P_PASS_DEF"
  run keygate "$KG_PID" "$P_KG"
  [ -n "${KEYGATE_BASE:-}" ] && run keygate_base "$KGB_PID" "$P_KGB"
  [ "${AB_ONLY:-0}" = 1 ] && continue
  run keygate_redis "$KGR_PID" "$P_KGR"
  run nginx "$NGX_PID" "$P_NGX"
  run passthrough_sse "$PASS_SSE_PID" "$P_PASS_SSE" KG_MODEL=gpt-stream KG_STREAM=1
  run keygate_sse "$KG_PID" "$P_KG" KG_MODEL=gpt-stream KG_STREAM=1
  run keygate_denied "$KG_PID" "$P_KG" KG_BADKEY=1
done

cat "$W/results"
if [ -s "$W/writer" ]; then
  echo "usage store writer thread, CPU us/request (part of the above), each run:"
  awk '{a[$1]=a[$1]" "$2} END {for (n in a) print "  " n ":" a[n]}' "$W/writer"
fi
if [ -s "$W/threads" ]; then
  echo "CPU us/request by thread (THREADS=1; threads above 0.05), each run:"
  awk '{k=$1" "$2; a[k]=a[k]" "$3} END {for (k in a) print "  " k ":" a[k]}' "$W/threads" | sort
fi
python3 - "$W/results" <<'PY'
import statistics, sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, rps, p50, p99, cpu, non2xx, ops = line.split()
    rows[name].append((float(rps), float(p50), float(p99), float(cpu), int(non2xx), float(ops)))
med = {n: tuple(statistics.median(x[i] for x in v) for i in range(4)) + (sum(x[4] for x in v), statistics.median(x[5] for x in v)) for n, v in rows.items()}
print(f"\n{'case':18} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11} {'non-2xx':>8}")
for n in ["passthrough", "passthrough_default", "keygate", "keygate_base", "keygate_redis", "nginx", "passthrough_sse", "keygate_sse", "keygate_denied"]:
    if n in med:
        r = med[n]
        print(f"{n:18} {r[0]:9.0f} {r[1]:8.3f} {r[2]:8.3f} {r[3]:11.2f} {r[4]:8d}")
def ratio(a, b, i, label):
    if a in med and b in med and med[b][i]:
        print(f"{label:44} {med[a][i] / med[b][i]:.3f}")
print()
ratio("keygate", "passthrough", 3, "CPU/request keygate / passthrough")
ratio("keygate", "passthrough", 0, "req/s keygate / passthrough")
ratio("keygate", "passthrough_default", 0, "req/s keygate / default-built passthrough")
ratio("passthrough", "passthrough_default", 0, "req/s passthrough / default-built passthrough")
ratio("nginx", "passthrough", 0, "req/s nginx / passthrough")
ratio("keygate_sse", "passthrough_sse", 3, "CPU/request keygate / passthrough (SSE)")
ratio("keygate_sse", "passthrough_sse", 0, "req/s keygate / passthrough (SSE)")
ratio("keygate_denied", "passthrough", 3, "CPU/request keygate denying / passthrough")
ratio("keygate_redis", "keygate", 3, "CPU/request keygate on Redis / on local ledger")
ratio("keygate_redis", "keygate", 0, "req/s keygate on Redis / on local ledger")
ratio("keygate", "keygate_base", 3, "A/B: CPU/request keygate / keygate_base")
ratio("keygate", "keygate_base", 0, "A/B: req/s keygate / keygate_base")
if "keygate_base" in rows:
    pairs = [a[3] / b[3] for a, b in zip(rows["keygate"], rows["keygate_base"]) if b[3]]
    print(f"{'A/B: CPU/request ratio of each pair':44} " + " ".join(f"{x:.3f}" for x in pairs))
if "keygate_redis" in med:
    print(f"{'Redis operations per 1,000 calls':44} {med['keygate_redis'][5]:.2f}")
PY

if [ "${PROFILE:-0}" = 1 ]; then
  command -v perf >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null; }
  echo
  echo "perf: keygate (JSON case) and the passthrough, ${DURATION}s each"
  for target in "keygate $KG_PID $P_KG" "passthrough $PASS_PID $P_PASS"; do
    set -- $target
    perf record -F 1999 -o "$W/$1.perf" -p "$2" -- sleep "$DURATION" >/dev/null 2>&1 &
    rec=$!
    taskset -c 1 wrk -t1 -c$CONNS -d${DURATION}s -s "$W/post.lua" "http://127.0.0.1:$3/v1/chat/completions" >/dev/null
    wait $rec || true
    perf report -i "$W/$1.perf" --stdio --no-children --sort symbol 2>/dev/null >"$W/$1.report" || true
    python3 - "$W/$1.report" "$1" <<'PY'
import re, sys, collections
rows = []
for line in open(sys.argv[1]):
    m = re.match(r"\s*([\d.]+)%\s+\[(.)\]\s+(.*)", line)
    if m:
        rows.append((float(m.group(1)), m.group(2), m.group(3).strip()))
def crate(kind, sym):
    if kind == "k":
        return "kernel"
    s = sym.lstrip("<").replace("_<", "")
    for c in ("keygate", "pingora", "tokio", "h2", "hyper", "http", "httparse", "mimalloc", "prometheus",
              "serde_json", "sha2", "dashmap", "arc_swap", "bytes", "core", "alloc", "std"):
        if s.startswith(c + "::") or s.startswith(c + "_"):
            return c
    if s.startswith("mi_") or s.startswith("_mi_"):
        return "mimalloc"
    if s.startswith("__memcpy") or s.startswith("__memmove") or s.startswith("__mem") or "libc" in s:
        return "libc"
    return "other"
roll = collections.Counter()
for pct, kind, sym in rows:
    roll[crate(kind, sym)] += pct
print(f"\n{sys.argv[2]}: self time by crate (% of its samples)")
for c, pct in roll.most_common():
    if pct >= 0.5:
        print(f"  {c:12} {pct:6.1f}")
print(f"{sys.argv[2]}: top functions")
for pct, kind, sym in rows[:25]:
    print(f"  {pct:5.2f}% [{kind}] {sym[:110]}")
PY
  done
fi
