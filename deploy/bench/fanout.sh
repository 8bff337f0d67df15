#!/usr/bin/env bash
# Reproducible fan-out benchmark of the federation (issue 9 §4): PLATFORMS
# platforms watch the same NUMBERS numbers each, follow WatchDisconnections,
# and an operator publishes numbers of that pool; `reassigned bench --method
# fanout` reports events published/s, delivered events/s (all watchers
# together), publish-to-watcher latency percentiles, and missing / duplicate
# events (missing must be 0).
#
# From the repository root:  deploy/bench/fanout.sh
#
# It builds the release binary (SKIP_BUILD=1: use the existing one), makes in a
# temp dir: dev certificates, one client certificate and token (scopes
# watch:write watch:read) per platform (`reassigned certs client`, `token
# mint`), operator-a's token (register:write), an operators file (operator-a
# authoritative for +1) and a watch key; starts redis-server (STORE=redis: AOF
# with appendfsync always, as the README requires for publications; a free
# port, never 6379) and `reassigned serve` with tokens on; loads the watch
# lists once (AddWatches, 10,000 numbers a call), then runs the bench ROUNDS
# times for each rate of RATES (later runs with --skip-load), prints the
# figures and cleans up.
#
# Knobs (environment):
#   STORE=embedded     embedded | redis
#   PLATFORMS=10       watching platforms (one stream each)
#   NUMBERS=1000000    numbers on each platform's list (the same pool)
#   DURATION=20s       measured time of each run
#   WARMUP=3s          unmeasured publishing before each run
#   RATES="10"         publish calls/s per run, space separated (10 calls of
#                      1,000 events to 10 platforms: 100,000 deliveries/s);
#                      "closed" is the closed loop (as fast as acknowledged:
#                      more than delivery keeps up with, so latency grows and
#                      the drain may end first); e.g. RATES="10 15 closed"
#                      (RATE=10 is RATES=10)
#   BATCH_SIZE=1000    events per PublishDisconnections call
#   CONCURRENCY=4      publish calls in flight (open loop: the cap)
#   CONNECTIONS=1      publisher connections
#   ROUNDS=1           repetitions of each rate
#   DRAIN=60s          longest wait for the watchers after the last publication
#   SEED=1             seed of the watched pool and of the publications
#   WORK=<new temp>    working directory (kept if KEEP_WORK=1 or given)
#   SKIP_BUILD=1       use the existing target/release/reassigned
#   BIN=...            the binary (default target/release/reassigned)
#   SERVE_FLAGS=""     extra flags of `serve`
set -euo pipefail
cd "$(dirname "$0")/../.."

STORE=${STORE:-embedded}
PLATFORMS=${PLATFORMS:-10}
NUMBERS=${NUMBERS:-1000000}
DURATION=${DURATION:-20s}
WARMUP=${WARMUP:-3s}
RATES=${RATES:-${RATE:-10}}
BATCH_SIZE=${BATCH_SIZE:-1000}
CONCURRENCY=${CONCURRENCY:-4}
CONNECTIONS=${CONNECTIONS:-1}
ROUNDS=${ROUNDS:-1}
DRAIN=${DRAIN:-60s}
SEED=${SEED:-1}
SERVE_FLAGS=${SERVE_FLAGS:-}
read -r -a SERVE_ARGS <<<"$SERVE_FLAGS"
BIN=${BIN:-target/release/reassigned}
if [[ -n "${WORK:-}" ]]; then
  KEEP_WORK=1
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/reassigned-fanout.XXXXXX")
fi
KEEP_WORK=${KEEP_WORK:-0}
case $STORE in
  embedded | redis) ;;
  *) echo "fanout.sh: STORE must be embedded or redis" >&2; exit 2 ;;
esac
for tool in redis-server redis-cli python3; do
  command -v "$tool" >/dev/null || { echo "fanout.sh: $tool is needed" >&2; exit 2; }
done

# The server logs warnings only.
export REASSIGNED_LOG=${REASSIGNED_LOG:-warn}

# Process list, cleanup, log, free_port, wait_port and the build.
# shellcheck source=deploy/bench/lib.sh
source deploy/bench/lib.sh

CERTS=$WORK/certs
WATCHERS=$WORK/watchers
RESULTS=$WORK/results
mkdir -p "$WATCHERS" "$RESULTS" "$WORK/redis" "$WORK/data"
"$BIN" certs dev --out "$CERTS" >/dev/null 2>&1
"$BIN" keys generate --out "$WORK/keys" >/dev/null 2>&1
mint() { # NAME CERT SCOPE
  "$BIN" token mint --issuer-key "$WORK/keys/issuer.key" --platform "$1" --cert "$2" --scope "$3" --ttl 12h
}
for i in $(seq "$PLATFORMS"); do
  name=platform-$i
  "$BIN" certs client "$name" --ca-cert "$CERTS/ca.pem" --ca-key "$CERTS/ca.key" --out "$WATCHERS" >/dev/null
  (umask 077; mint "$name" "$WATCHERS/$name.pem" "watch:write watch:read" >"$WATCHERS/$name.token")
done
# The operator's token goes through the environment: it appears in no
# command line.
REASSIGNED_BENCH_TOKEN=$(mint operator-a "$CERTS/operator-a.pem" register:write)
export REASSIGNED_BENCH_TOKEN
cat >"$WORK/operators.toml" <<'EOF'
[operators."spiffe://dev.reassigned/operator-a"]
prefixes = ["+1"]
quarantine_days = 90
EOF
(umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' >"$WORK/watch.key")

# --- redis, server ---------------------------------------------------------------
STORE_ARGS=(--data-dir "$WORK/data")
REDIS_PORT=
if [[ $STORE == redis ]]; then
  REDIS_PORT=$(free_port)
  # Publications need AOF; Redis 7.0 has no WAITAOF, so appendfsync always.
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync always \
    --dir "$WORK/redis" --logfile "$WORK/redis-server.log" --daemonize no &
  PIDS+=($!)
  wait_port "$REDIS_PORT" "${PIDS[-1]}" redis-server
  for _ in $(seq 100); do
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  STORE_ARGS=(--redis "redis://127.0.0.1:$REDIS_PORT")
fi
PORT=$(free_port)
"$BIN" serve --listen "127.0.0.1:$PORT" "${STORE_ARGS[@]}" \
  --tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server.key" --client-ca "$CERTS/ca.pem" \
  --jwks "$WORK/keys/jwks.json" --token-issuer reassigned-dev --token-audience reassigned \
  --operators "$WORK/operators.toml" --watch-key-file "$WORK/watch.key" \
  "${SERVE_ARGS[@]}" >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
SERVER_PID=$!
wait_port "$PORT" "$SERVER_PID" serve
log "$STORE server on port $PORT; $PLATFORMS platforms x $NUMBERS numbers"

# --- the runs ----------------------------------------------------------------------
cut -d' ' -f1-3 /proc/loadavg >"$WORK/loadavg-before"
loaded=0
for round in $(seq "$ROUNDS"); do
  for rate in $RATES; do
    rate_args=()
    [[ $rate != closed ]] && rate_args=(--rate "$rate")
    skip=()
    [[ $loaded == 1 ]] && skip=(--skip-load)
    out=$RESULTS/fanout-$rate-$round
    cut -d' ' -f1-3 /proc/loadavg >"$out.load"
    "$BIN" bench --method fanout --target "127.0.0.1:$PORT" --ca "$CERTS/ca.pem" \
      --cert "$CERTS/operator-a.pem" --key "$CERTS/operator-a.key" \
      --watchers "$WATCHERS" --watch-numbers "$NUMBERS" "${skip[@]}" --seed "$SEED" \
      --batch-size "$BATCH_SIZE" --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" \
      --duration "$DURATION" --warmup "$WARMUP" --drain "$DRAIN" "${rate_args[@]}" --json \
      >"$out.json" 2>"$out.log" || {
      log "bench (rate $rate, round $round) failed:"
      tail -n 20 "$out.log" >&2
      exit 1
    }
    loaded=1
    cut -d' ' -f1-3 /proc/loadavg >>"$out.load"
    python3 - "$out.json" "$round" "$rate" <<'EOF' >&2
import json, sys
r = json.load(open(sys.argv[1]))
f = r["fanout"]
print(f"fanout.sh: round {sys.argv[2]} rate {sys.argv[3]:<7} published {f['published_per_sec']:>9.0f}/s "
      f"delivered {f['delivered_per_sec']:>9.0f}/s  p99 {f['latency_us']['p99'] / 1000:.1f} ms  "
      f"missing {f['missing']}  duplicates {f['duplicates']}")
EOF
  done
done
cut -d' ' -f1-3 /proc/loadavg >"$WORK/loadavg-after"
REDIS_MEMORY=
if [[ -n "$REDIS_PORT" ]]; then
  REDIS_MEMORY=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" info memory | tr -d '\r' | sed -n 's/^used_memory://p')
fi
SERVER_RSS=$(awk '/^VmRSS/ {print $2}' "/proc/$SERVER_PID/status" 2>/dev/null || true)

# --- summary -----------------------------------------------------------------------
python3 - "$RESULTS" "$WORK" "$STORE" "$REDIS_MEMORY" "$SERVER_RSS" <<'EOF' | tee "$WORK/summary.txt"
import glob, json, os, sys

results, work, store, redis_memory, rss = sys.argv[1:6]
runs = sorted(glob.glob(os.path.join(results, "*.json")), key=os.path.getmtime)
def read(path):
    try:
        return open(path).read().split()
    except OSError:
        return []
first = json.load(open(runs[0]))
f0 = first["fanout"]
print(f"\nreassigned fan-out benchmark: {os.cpu_count()} cores, store {store}, {f0['platforms']} platforms "
      f"x {f0['watch_numbers']} watched numbers, {first['numbers_per_call']} events per publish call, "
      f"{first['concurrency']} in flight, {first['duration_secs']:g}s per run after {first['warmup_secs']:g}s warmup")
if f0.get("load"):
    l = f0["load"]
    print(f"watch lists loaded: {l['numbers']} numbers in {l['secs']:.1f}s ({l['numbers_per_sec']:.0f} numbers/s)")
print(f"load average (1, 5, 15 min) before: {' '.join(read(os.path.join(work, 'loadavg-before')))}, "
      f"after: {' '.join(read(os.path.join(work, 'loadavg-after')))}")
if redis_memory:
    print(f"redis used_memory at the end: {int(redis_memory) / 2**20:.1f} MiB")
if rss:
    print(f"server RSS at the end: {int(rss) / 1024:.1f} MiB")
print()
header = (f"{'run':<14}{'publish/s':>11}{'delivered/s':>13}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
          f"{'max ms':>9}{'missing':>9}{'dups':>6}{'failed':>8}{'drained':>9}  load 1-min before/after")
print(header)
print("-" * len(header))
for path in runs:
    r = json.load(open(path))
    f = r["fanout"]
    name = os.path.basename(path)[len("fanout-"):-5]
    l = f["latency_us"]
    load = read(path[:-5] + ".load")
    load = f"{load[0]}/{load[3]}" if len(load) >= 4 else "?"
    print(f"{name:<14}{f['published_per_sec']:>11.0f}{f['delivered_per_sec']:>13.0f}{l['p50'] / 1000:>9.1f}"
          f"{l['p90'] / 1000:>9.1f}{l['p99'] / 1000:>9.1f}{l['max'] / 1000:>9.1f}{f['missing']:>9}"
          f"{f['duplicates']:>6}{r['failed_calls']:>8}{('no' if f['drain_timed_out'] else 'yes'):>9}  {load}")
EOF
