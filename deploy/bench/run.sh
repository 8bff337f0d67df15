#!/usr/bin/env bash
# Reproducible benchmark of `reassigned` on this machine.
#
# From the repository root:  deploy/bench/run.sh
#
# Builds the release binary, makes dev certificates and a synthetic register,
# starts its own redis-server (a free port, never 6379; no persistence),
# imports the register, and starts three servers on 127.0.0.1:
#   bare      `reassigned bench-bare`: same TLS acceptor and auth layer,
#             fixed answers, no store (the framework's ceiling)
#   redis     `reassigned serve --redis ...`
#   embedded  `reassigned serve --data-dir ...`
# Then, ROUNDS times, it runs `reassigned bench` against each of them in turn
# (bare, redis, embedded, bare, redis, embedded, ...) so machine noise spreads
# evenly: CheckNumber, BatchCheckNumbers (BATCH_SIZE numbers per call) and
# StreamCheckNumbers (STREAM_SIZE requests per stream), all with the same
# duration, concurrency and queries (HIT_RATIO of them in the register).
# Finally redis-benchmark measures Redis's own GET ceiling on a real bucket,
# and the CPU one lone GET costs redis-server and a minimal C client: the
# floor of a round trip, which bounds the Redis target's ratio (the summary
# says how far, with the round trips per check counted in redis-server).
# It prints a summary table with the ratios to the bare server (calls/s and
# p99 latency).
#
# Tokens are on, as in the product's default: the script makes a token
# issuer key with `reassigned keys generate`, mints a certificate-bound
# token for the bench client with `reassigned token mint`, serves with
# that JWKS, and `reassigned bench` sends the token on every call, to the
# bare server too (which receives it but verifies none: the framework's
# ceiling). SERVE_FLAGS=--no-tokens measures mTLS alone (no token sent).
#
# The defaults are the measurement of issue 8: CheckNumber with 64 calls in
# flight over 4 mTLS connections, 4% of the numbers in the register, three
# alternated rounds of 6 s (RECORDS=10000000 for its 10M-record register).
#
# Everything it starts is stopped on exit. All traffic stays on 127.0.0.1.
# The load generator shares the machine with the servers: the ratios are
# the meaningful figures, the absolute rates depend on the machine.
#
# Settings (environment):
#   RECORDS=1000000   numbers in the snapshot
#   DURATION=6s       measured time of each run
#   WARMUP=2s         unmeasured load before each run
#   CONCURRENCY=64    calls in flight
#   CONNECTIONS=4     HTTP/2 connections of the load generator
#   ROUNDS=3          how many times each run is repeated (alternated)
#   HIT_RATIO=0.04    share of queries that are in the register
#   LONE_GETS=100000  GETs of the round-trip floor at the end (one client)
#   BATCH_SIZE=1000   numbers per batch call
#   STREAM_SIZE=10000 requests per stream call
#   METHODS="check batch stream"
#   TARGETS="bare redis embedded"
#   SEED=1            seed of the data set and of the queries
#   WORK=<new temp>   working directory (kept if KEEP_WORK=1 or given)
#   PIN=0             1: servers and redis-server on CPU 1, the load generator
#                     on CPU 0 (calls/s then follow the server's own cost)
#   SKIP_BUILD=1      use the existing binary (BIN, default target/release/reassigned)
#   SERVE_FLAGS=""    extra flags of both `serve` runs; with `--no-tokens`
#                     no token is minted or sent (mTLS alone)
#   WATCHERS=0        N > 0: the federation configured on both `serve` runs
#                     (operators file, watch key; redis-server with AOF and
#                     appendfsync always, as publications require): before
#                     the rounds, N platforms each load WATCH_NUMBERS numbers
#                     (`bench --method fanout`, which also publishes a few
#                     thousand disconnections, so the overlay is not empty),
#                     and each platform keeps a `reassigned watch` stream
#                     open on each server during the rounds (tokens on only)
#   WATCH_NUMBERS=1000000  numbers on each platform's watch list
#   REDIS_SOCKET=0    1: the Redis server is reached over a Unix socket
#                     (`--redis unix://...`), as a Redis on the same host
#                     would be deployed; the import still uses TCP
#   REDIS_CPU=1       with PIN=1, the CPU redis-server runs on (0: beside
#                     the load generator, as a Redis on its own host would
#                     spend none of the server's CPU)
#   TOGETHER=0        1: each round loads all targets at the same time (one
#                     load generator each) instead of one after the other;
#                     with PIN=1 the servers then share CPU 1 fairly, so the
#                     ratios of calls/s and of CPU per call compare under the
#                     same machine conditions (the rates are each a share of
#                     the machine, and the servers evict each other's caches)
set -euo pipefail
cd "$(dirname "$0")/../.."

RECORDS=${RECORDS:-1000000}
DURATION=${DURATION:-6s}
WARMUP=${WARMUP:-2s}
CONCURRENCY=${CONCURRENCY:-64}
CONNECTIONS=${CONNECTIONS:-4}
ROUNDS=${ROUNDS:-3}
HIT_RATIO=${HIT_RATIO:-0.04}
LONE_GETS=${LONE_GETS:-100000}
BATCH_SIZE=${BATCH_SIZE:-1000}
STREAM_SIZE=${STREAM_SIZE:-10000}
METHODS=${METHODS:-check batch stream}
TARGETS=${TARGETS:-bare redis embedded}
SEED=${SEED:-1}
SERVE_FLAGS=${SERVE_FLAGS:-}
read -r -a SERVE_ARGS <<<"$SERVE_FLAGS"
TOKENS=1
export WATCHERS=${WATCHERS:-0}
export TOGETHER=${TOGETHER:-0}
export WATCH_NUMBERS=${WATCH_NUMBERS:-1000000}
for flag in "${SERVE_ARGS[@]}"; do
  [[ "$flag" == --no-tokens ]] && TOKENS=0
done
if [[ -n "${WORK:-}" ]]; then
  KEEP_WORK=1
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/reassigned-bench.XXXXXX")
fi
KEEP_WORK=${KEEP_WORK:-0}
BIN=${BIN:-target/release/reassigned}

for tool in redis-server redis-cli redis-benchmark python3; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is needed" >&2; exit 2; }
done

# Servers log warnings only: no per-request logging in the measurement.
export REASSIGNED_LOG=${REASSIGNED_LOG:-warn}

# Process list, cleanup, log, free_port, wait_port and the build.
# --- build, certificates, data ------------------------------------------------
# shellcheck source=deploy/bench/lib.sh
source deploy/bench/lib.sh

CERTS=$WORK/certs
DATA=$WORK/register
RESULTS=$WORK/results
mkdir -p "$RESULTS" "$WORK/redis"
"$BIN" certs dev --out "$CERTS" >/dev/null 2>&1
log "generating $RECORDS records"
"$BIN" generate --records "$RECORDS" --out "$DATA" --seed "$SEED" 2>"$WORK/generate.log"
TLS_SERVER=(--tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server.key" --client-ca "$CERTS/ca.pem")
TLS_CLIENT=(--ca "$CERTS/ca.pem" --cert "$CERTS/platform-a.pem" --key "$CERTS/platform-a.key")
# Tokens (the product's default): an issuer key, its JWKS for the servers,
# and one token bound to the bench client's certificate, minted with the
# project's own commands. The bench reads it from the environment, so it
# appears in no command line.
TOKEN_SERVER=()
if [[ "$TOKENS" == 1 ]]; then
  "$BIN" keys generate --out "$WORK/keys" >/dev/null
  REASSIGNED_BENCH_TOKEN=$("$BIN" token mint --issuer-key "$WORK/keys/issuer.key" --platform platform-a \
    --cert "$CERTS/platform-a.pem" --ttl 2h)
  export REASSIGNED_BENCH_TOKEN
  TOKEN_SERVER=(--jwks "$WORK/keys/jwks.json" --token-issuer reassigned-dev --token-audience reassigned)
  log "tokens: on (SERVE_FLAGS=--no-tokens for mTLS alone)"
else
  unset REASSIGNED_BENCH_TOKEN
  log "tokens: off"
fi

# CPU ticks (user + system) of the given processes, summed.
FEDERATION_SERVER=()
REDIS_PERSIST=(--appendonly no)
if [[ "$WATCHERS" -gt 0 ]]; then
  [[ "$TOKENS" == 1 ]] || { log "WATCHERS needs tokens on"; exit 2; }
  mkdir -p "$WORK/watchers"
  for i in $(seq "$WATCHERS"); do
    "$BIN" certs client "platform-$i" --ca-cert "$CERTS/ca.pem" --ca-key "$CERTS/ca.key" --out "$WORK/watchers" >/dev/null
    (umask 077; "$BIN" token mint --issuer-key "$WORK/keys/issuer.key" --platform "platform-$i" \
      --cert "$WORK/watchers/platform-$i.pem" --scope "watch:write watch:read" --ttl 2h >"$WORK/watchers/platform-$i.token")
  done
  OPERATOR_TOKEN=$("$BIN" token mint --issuer-key "$WORK/keys/issuer.key" --platform operator-a \
    --cert "$CERTS/operator-a.pem" --scope register:write --ttl 2h)
  printf '[operators."spiffe://dev.reassigned/operator-a"]\nprefixes = ["+1"]\nquarantine_days = 90\n' >"$WORK/operators.toml"
  (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' >"$WORK/watch.key")
  FEDERATION_SERVER=(--operators "$WORK/operators.toml" --watch-key-file "$WORK/watch.key")
  REDIS_PERSIST=(--appendonly yes --appendfsync always)
  log "federation: $WATCHERS watching platforms x $WATCH_NUMBERS numbers on each server"
fi

# Bucket reads redis-server has served so far (GET, HMGET: one per round
# trip of a lookup).
redis_gets() {
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" info commandstats | tr -d '\r' \
    | awk -F'[:=,]' '/^cmdstat_(get|hmget):/ {n += $3} END {print n + 0}'
}
cpu_ticks() {
  local total=0 pid
  for pid in "$@"; do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}
# PIN=1: the servers and redis-server on CPU 1, the load generator on CPU 0,
# so that a server's calls/s follow its own cost per call.
PIN_SERVER=() PIN_BENCH=() PIN_REDIS=()
if [[ "${PIN:-0}" == 1 ]]; then
  PIN_SERVER=(taskset -c 1) PIN_BENCH=(taskset -c 0) PIN_REDIS=(taskset -c "${REDIS_CPU:-1}")
fi

# --- redis --------------------------------------------------------------------
REDIS_PORT=$(free_port)
REDIS_URL=redis://127.0.0.1:$REDIS_PORT
SERVE_REDIS_URL=$REDIS_URL REDIS_UNIX=()
if [[ "${REDIS_SOCKET:-0}" == 1 ]]; then
  REDIS_UNIX=(--unixsocket "$WORK/redis.sock" --unixsocketperm 700)
  SERVE_REDIS_URL=unix://$WORK/redis.sock
fi
"${PIN_REDIS[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" "${REDIS_PERSIST[@]}" "${REDIS_UNIX[@]}" \
  --dir "$WORK/redis" --logfile "$WORK/redis-server.log" --daemonize no &
PIDS+=($!)
REDIS_PID=$!
wait_port "$REDIS_PORT" "${PIDS[-1]}" redis-server
for _ in $(seq 100); do
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
  sleep 0.1
done
log "importing into redis on port $REDIS_PORT"
"$BIN" sync --redis "$REDIS_URL" "$DATA" 2>"$WORK/sync.log"
REDIS_MEMORY=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" info memory | tr -d '\r' | sed -n 's/^used_memory://p')

# --- servers ------------------------------------------------------------------
declare -A PORT SPID
start_server() {
  local name=$1
  shift
  PORT[$name]=$(free_port)
  "${PIN_SERVER[@]}" "$BIN" "$@" --listen "127.0.0.1:${PORT[$name]}" "${TLS_SERVER[@]}" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  SPID[$name]=$!
  wait_port "${PORT[$name]}" "${PIDS[-1]}" "$name"
  log "$name server on port ${PORT[$name]}"
}
for target in $TARGETS; do
  case $target in
    bare) start_server bare bench-bare ;;
    redis)
      # Its store logs at info, so that the run can wait for the membership
      # filter (loaded in the background) before measuring.
      REASSIGNED_LOG="$REASSIGNED_LOG,reassigned::store::redis=info" \
        start_server redis serve --redis "$SERVE_REDIS_URL" "${TOKEN_SERVER[@]}" "${FEDERATION_SERVER[@]}" "${SERVE_ARGS[@]}"
      for _ in $(seq 600); do
        grep -q "membership filter loaded" "$WORK/redis.log" && break
        grep -q "cannot load the membership filter" "$WORK/redis.log" && break
        sleep 0.1
      done
      grep -q "membership filter loaded" "$WORK/redis.log" \
        || log "redis: no membership filter loaded (every check asks redis)"
      ;;
    embedded) start_server embedded serve --data-dir "$DATA" "${TOKEN_SERVER[@]}" "${FEDERATION_SERVER[@]}" "${SERVE_ARGS[@]}" ;;
    *) log "unknown target $target (bare, redis, embedded)"; exit 2 ;;
  esac
done

# --- the runs, alternated -----------------------------------------------------
# The load average before and after: other work on the machine shows here.
if [[ "$WATCHERS" -gt 0 ]]; then
  for target in $TARGETS; do
    [[ $target == bare ]] && continue
    log "$target: loading $WATCHERS watch lists and publishing"
    REASSIGNED_BENCH_TOKEN=$OPERATOR_TOKEN "$BIN" bench --method fanout --target "127.0.0.1:${PORT[$target]}" \
      --ca "$CERTS/ca.pem" --cert "$CERTS/operator-a.pem" --key "$CERTS/operator-a.key" \
      --watchers "$WORK/watchers" --watch-numbers "$WATCH_NUMBERS" --rate 2 --duration 2s --warmup 0s \
      --seed "$SEED" --json >"$WORK/fanout-setup-$target.json" 2>"$WORK/fanout-setup-$target.log" || {
      log "loading the watch lists of $target failed:"
      tail -n 20 "$WORK/fanout-setup-$target.log" >&2
      exit 1
    }
    for i in $(seq "$WATCHERS"); do
      REASSIGNED_TOKEN=$(cat "$WORK/watchers/platform-$i.token") "$BIN" watch --target "127.0.0.1:${PORT[$target]}" \
        --ca "$CERTS/ca.pem" --cert "$WORK/watchers/platform-$i.pem" --key "$WORK/watchers/platform-$i.key" \
        --cursor-file "$WORK/watchers/$target-$i.cursor" >/dev/null 2>"$WORK/watch-$target-$i.log" &
      PIDS+=($!)
    done
  done
fi

# New watchers start from the oldest event still held (a missing cursor
# file), so each first walks the retained log (the register delta's events
# and the publications above): minutes of server CPU with 10 platforms, and
# redis-server may still be rewriting its AOF after the watch-list load. The
# rounds measure the steady state with the streams open, so wait until the
# servers and redis-server are idle again (under 5% of a core for 3 s in a
# row) and no AOF rewrite is running.
if [[ "$WATCHERS" -gt 0 ]]; then
  settle_pids=("$REDIS_PID")
  for target in $TARGETS; do settle_pids+=("${SPID[$target]}"); done
  settled=0 quiet=0 hz=$(getconf CLK_TCK)
  for _ in $(seq 600); do
    before=$(cpu_ticks "${settle_pids[@]}")
    sleep 1
    settled=$((settled + 1))
    busy=$(($(cpu_ticks "${settle_pids[@]}") - before))
    rewriting=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" info persistence | tr -d '\r' \
      | awk -F: '/^(aof_rewrite_in_progress|aof_rewrite_scheduled|rdb_bgsave_in_progress):/ {n += $2} END {print n + 0}')
    if ((busy * 20 < hz && rewriting == 0)); then
      quiet=$((quiet + 1))
      ((quiet >= 3)) && break
    else
      quiet=0
    fi
  done
  ((quiet >= 3)) || log "the servers are still busy after $settled s: measuring anyway"
  log "settled after $settled s (the watchers caught up with the retained log)"
  echo "$settled" >"$WORK/settle-secs"
fi

cut -d' ' -f1-3 /proc/loadavg >"$WORK/loadavg-before" 2>/dev/null || true
# One bench run of $1 (method) with batch size $2 against $3 (target) in
# round $4; its results in $RESULTS.
run_one() {
  local method=$1 size=$2 target=$3 round=$4 out cpu_pids cpu_before gets_before=0
  out=$RESULTS/$method-$target-$round
  # CPU time of the server (and of redis-server for the Redis target)
  # over the run, warmup included: CPU per call is steadier than calls/s
  # when the load generator shares the cores.
  cpu_pids=("${SPID[$target]}")
  [[ $target == redis ]] && cpu_pids+=("$REDIS_PID")
  cpu_before=$(cpu_ticks "${cpu_pids[@]}")
  [[ $target == redis ]] && gets_before=$(redis_gets)
  "${PIN_BENCH[@]}" "$BIN" bench --target "127.0.0.1:${PORT[$target]}" "${TLS_CLIENT[@]}" \
    --method "$method" --batch-size "$size" --concurrency "$CONCURRENCY" \
    --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" \
    --data "$DATA" --hit-ratio "$HIT_RATIO" --seed "$SEED" --json \
    >"$out.json" 2>"$out.log" || {
    log "bench $method against $target failed:"
    tail -n 20 "$out.log" >&2
    return 1
  }
  echo "$(($(cpu_ticks "${cpu_pids[@]}") - cpu_before)) $(getconf CLK_TCK)" >"$out.cpu"
  # The round trips the run made: GETs (layout 3) or HMGETs (layout 2)
  # that redis-server served meanwhile.
  [[ $target == redis ]] && echo "$(($(redis_gets) - gets_before))" >"$out.gets"
  python3 - "$out.json" "$round" "$target" <<'EOF' >&2
import json, sys
r = json.load(open(sys.argv[1]))
print(f"run.sh: round {sys.argv[2]} {r['method']:<6} {sys.argv[3]:<9}"
      f"{r['calls_per_sec']:>10.0f} calls/s {r['numbers_per_sec']:>11.0f} numbers/s "
      f"p99 {r['latency_us']['p99'] / 1000:.3f} ms  failed {r['failed_calls']}")
EOF
}

for round in $(seq "$ROUNDS"); do
  for method in $METHODS; do
    case $method in
      check) size=1 ;;
      batch) size=$BATCH_SIZE ;;
      stream) size=$STREAM_SIZE ;;
      *) log "unknown method $method (check, batch, stream)"; exit 2 ;;
    esac
    if [[ "$TOGETHER" == 1 ]]; then
      # All targets at once: they share the machine's moment, so their CPU
      # per call compares without the drift between alternated runs.
      together=()
      for target in $TARGETS; do
        run_one "$method" "$size" "$target" "$round" &
        together+=($!)
      done
      for pid in "${together[@]}"; do
        wait "$pid" || exit 1
      done
    else
      for target in $TARGETS; do
        run_one "$method" "$size" "$target" "$round" || exit 1
      done
    fi
  done
done

cut -d' ' -f1-3 /proc/loadavg >"$WORK/loadavg-after" 2>/dev/null || true

# --- redis-benchmark: Redis's own HGET ceiling on a real bucket ----------------
BUCKET=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --scan --pattern 'rn:g*' | head -n 1 || true)
if [[ -n "$BUCKET" ]]; then
  # Layout 3 buckets are strings (one GET per lookup); layout 2 were hashes.
  if [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" type "$BUCKET") == string ]]; then
    REDIS_CMD=(get "$BUCKET")
  else
    REDIS_CMD=(hget "$BUCKET" "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" hrandfield "$BUCKET" | head -n 1)")
  fi
  for pipeline in 16 1; do
    redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -n 500000 -c 64 -P "$pipeline" --csv \
      "${REDIS_CMD[@]}" >"$RESULTS/redis-benchmark-P$pipeline.csv" 2>/dev/null || true
  done
  echo "${REDIS_CMD[0]}" >"$RESULTS/redis-benchmark-command"
  # The floor of one round trip: one client, so each GET is a lone
  # request as a lookup's is (redis-server wakes for it alone), sent by
  # redis-benchmark's C client. The CPU it costs redis-server (its ticks)
  # and the client (`times`: the subshell's children) per request.
  lone_before=$(cpu_ticks "$REDIS_PID")
  lone_client=$( (redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -n "$LONE_GETS" -c 1 -P 1 \
    "${REDIS_CMD[@]}" >/dev/null 2>&1 || true; times) | tail -n 1)
  echo "$LONE_GETS $(($(cpu_ticks "$REDIS_PID") - lone_before)) $(getconf CLK_TCK) $lone_client" \
    >"$RESULTS/redis-benchmark-lone"
else
  log "no bucket key found in redis: skipping redis-benchmark"
fi

# --- summary ------------------------------------------------------------------
python3 - "$RESULTS" "$RECORDS" "$REDIS_MEMORY" "$WORK" "$TOKENS" <<'EOF' | tee "$WORK/summary.txt"
import csv, glob, json, os, re, statistics, sys

results, records, redis_memory, work = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
tokens = "on" if sys.argv[5] == "1" else "off"
runs = {}
for path in sorted(glob.glob(os.path.join(results, "*.json"))):
    method, target, rnd = os.path.basename(path)[:-5].rsplit("-", 2)
    run = json.load(open(path))
    # Calls over the whole run, warmup included (as the CPU and the round
    # trips counted beside it).
    run["calls"] = calls = run["calls_per_sec"] * (run["duration_secs"] + run["warmup_secs"])
    try:
        ticks, hz = open(path[:-5] + ".cpu").read().split()
        run["cpu_us_per_call"] = int(ticks) / int(hz) * 1e6 / calls if calls else None
    except (OSError, ValueError):
        run["cpu_us_per_call"] = None
    runs.setdefault((method, target), {})[int(rnd)] = run

first = next(iter(next(iter(runs.values())).values()))
print(f"\nreassigned benchmark: {os.cpu_count()} cores, {records} records, tokens {tokens}, "
      f"{first['concurrency']} in flight, {first['connections']} connection(s), "
      f"{first['duration_secs']:g}s per run after {first['warmup_secs']:g}s warmup, "
      f"hit ratio {first['hit_ratio']}")
def loadavg(name):
    try:
        return open(os.path.join(work, name)).read().strip()
    except OSError:
        return "?"
watchers = int(os.environ.get("WATCHERS", "0") or 0)
if watchers:
    print(f"federation on: {watchers} platforms x {os.environ.get('WATCH_NUMBERS')} watched numbers per server, "
          f"each with a WatchDisconnections stream open, publications in the overlay; "
          f"the rounds began once the watchers had caught up ({loadavg('settle-secs')} s)")
if os.environ.get("TOGETHER") == "1":
    print("targets loaded together (TOGETHER=1): each rate is a share of the machine; "
          "compare the ratios and the CPU per call")
print(f"load average (1, 5, 15 min) before the runs: {loadavg('loadavg-before')}, "
      f"after: {loadavg('loadavg-after')} (the load generator and the servers add about 2)")
if redis_memory:
    print(f"redis used_memory after import: {int(redis_memory) / 2**20:.1f} MiB "
          f"({int(redis_memory) / max(records, 1):.1f} bytes per record)")
print()
header = (f"{'method':<7}{'target':<10}{'per call':>9}{'calls/s':>11}{'numbers/s':>12}"
          f"{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'failed':>8}{'vs bare':>9}{'p99 vs':>8}"
          f"{'cpu us':>8}{'cpu vs':>8}  per-round ratios (calls/s) and medians")
print(header)
print("-" * len(header))
def mean_cpu(rounds):
    """The mean CPU per call of a target's rounds (None if none was read)."""
    cpus = [r["cpu_us_per_call"] for r in rounds.values() if r.get("cpu_us_per_call")]
    return statistics.mean(cpus) if cpus else None

def bare_cpu(method):
    return mean_cpu(runs.get((method, "bare"), {}))

methods = ["check", "batch", "stream"]
targets = ["bare", "redis", "embedded"]
for method in methods:
    for target in targets:
        rounds = runs.get((method, target))
        if not rounds:
            continue
        rs = list(rounds.values())
        rate = statistics.mean(r["calls_per_sec"] for r in rs)
        numbers = statistics.mean(r["numbers_per_sec"] for r in rs)
        p50 = statistics.mean(r["latency_us"]["p50"] for r in rs) / 1000
        p99 = statistics.mean(r["latency_us"]["p99"] for r in rs) / 1000
        p999 = statistics.mean(r["latency_us"]["p999"] for r in rs) / 1000
        failed = sum(r["failed_calls"] for r in rs)
        cpu = mean_cpu(rounds)
        ratio, p99_ratio, per_round, cpu_ratio = "", "", "", ""
        bare = runs.get((method, "bare"))
        if bare and target != "bare":
            bare_rate = statistics.mean(r["calls_per_sec"] for r in bare.values())
            bare_p99 = statistics.mean(r["latency_us"]["p99"] for r in bare.values()) / 1000
            ratio = f"{rate / bare_rate:.3f}x" if bare_rate else ""
            p99_ratio = f"{p99 / bare_p99:.2f}x" if bare_p99 else ""
            if cpu and bare_cpu(method):
                cpu_ratio = f"{cpu / bare_cpu(method):.2f}x"
            ratios = [rounds[k]["calls_per_sec"] / bare[k]["calls_per_sec"]
                      for k in sorted(rounds) if k in bare and bare[k]["calls_per_sec"]]
            p99s = [rounds[k]["latency_us"]["p99"] / bare[k]["latency_us"]["p99"]
                    for k in sorted(rounds) if k in bare and bare[k]["latency_us"]["p99"]]
            # The medians of the per-round ratios: one round disturbed by
            # the machine moves them less than the means.
            per_round = " ".join(f"{r:.2f}" for r in ratios)
            if ratios:
                per_round += f"  (median {statistics.median(ratios):.3f}x"
                if p99s:
                    per_round += f", p99 median {statistics.median(p99s):.2f}x"
                per_round += ")"
        print(f"{method:<7}{target:<10}{rs[0]['numbers_per_call']:>9}{rate:>11.0f}{numbers:>12.0f}"
              f"{p50:>9.3f}{p99:>9.3f}{p999:>10.3f}{failed:>8}{ratio:>9}{p99_ratio:>8}"
              f"{(f'{cpu:.1f}' if cpu else ''):>8}{cpu_ratio:>8}  {per_round}")

# Round trips per call of the Redis target's CheckNumber runs: bucket reads
# redis-server served during them (warmup included, as the CPU per call).
# Only CheckNumber: its reads go one per round trip, a batch's are pipelined.
trips = {}
for (method, target), rounds in runs.items():
    if (method, target) != ("check", "redis"):
        continue
    shares = []
    for k, r in rounds.items():
        try:
            gets = int(open(os.path.join(results, f"{method}-redis-{k}.gets")).read())
        except (OSError, ValueError):
            continue
        if r["calls"]:
            shares.append(gets / r["calls"])
    if shares:
        trips[method] = statistics.mean(shares)
mix = runs.get(("check", "redis")) or runs.get(("check", "embedded"))
if mix:
    s = next(iter(mix.values()))["statuses"]
    total = sum(s.values()) or 1
    print("\nanswer mix (check, " + ("redis" if ("check", "redis") in runs else "embedded") + "): "
          + ", ".join(f"{k} {100 * v / total:.2f}%" for k, v in s.items() if v))

for pipeline in (16, 1):
    path = os.path.join(results, f"redis-benchmark-P{pipeline}.csv")
    if os.path.exists(path):
        rows = list(csv.DictReader(open(path)))
        if rows:
            row = rows[-1]
            command = open(os.path.join(results, "redis-benchmark-command")).read().strip().upper()
            print(f"redis-benchmark {command} on one bucket, 64 clients, pipeline {pipeline:>2}: "
                  f"{float(row['rps']):>10.0f} requests/s (p50 {row.get('p50_latency_ms', '?')} ms, "
                  f"p99 {row.get('p99_latency_ms', '?')} ms)")

for method, share in trips.items():
    print(f"round trips to redis per {method} call: {share:.4f} (bucket reads counted by redis-server)")

# The floor of a round trip and the bound it sets: a Redis target that
# spent, beyond the bare server's CPU per call, only the CPU of its round
# trips at this floor would reach 1 / (1 + trips x floor / bare) of the bare
# server's calls/s (calls/s follow CPU per call when the machine is busy).
path = os.path.join(results, "redis-benchmark-lone")
if os.path.exists(path):
    fields = open(path).read().split()
    n, ticks, hz = int(fields[0]), int(fields[1]), int(fields[2])
    client = sum(int(m) * 60 + float(sec) for m, sec in re.findall(r"(\d+)m([\d.]+)s", " ".join(fields[3:])))
    server_us, client_us = ticks / hz * 1e6 / n, client * 1e6 / n
    floor = server_us + client_us
    print(f"one lone GET of a bucket (redis-benchmark -c 1 -P 1, {n} requests): {floor:.1f} us of CPU "
          f"(redis-server {server_us:.1f} us, the C client {client_us:.1f} us)")
    for method, share in trips.items():
        bare = bare_cpu(method)
        if bare:
            bound = 1 / (1 + share * floor / bare)
            print(f"  = {floor / bare:.2f} bare {method} calls of CPU ({bare:.1f} us); at {share:.4f} round trips "
                  f"per call, a Redis target costing nothing but those round trips beyond the bare server "
                  f"reaches at most {bound:.3f}x of bare")
EOF
