#!/usr/bin/env bash
# A/B of two builds of `reassigned` on the same machine, in one run, alternated:
# CheckNumber with certificate-bound tokens on (the product's default), 64 calls
# in flight over 4 mTLS connections, 10 s runs after 2 s of warm-up, on the
# embedded store and on one redis-server (each build with its own key prefix).
#
#   BEFORE=path/to/old/reassigned AFTER=target/release/reassigned deploy/bench/ab.sh
#   (ROUNDS=3 RECORDS=1000000 STORES="embedded redis" DURATION=10s WARMUP=2s
#   CONCURRENCY=64 CONNECTIONS=4 by default)
#
# Prints one line per run: round, store, build, calls/s, p50 and p99 (us).
set -euo pipefail
: "${BEFORE:?set BEFORE to the old binary}" "${AFTER:?set AFTER to the new binary}"
ROUNDS=${ROUNDS:-3}; RECORDS=${RECORDS:-1000000}; STORES=${STORES:-embedded redis}
DURATION=${DURATION:-10s}; WARMUP=${WARMUP:-2s}; CONCURRENCY=${CONCURRENCY:-64}; CONNECTIONS=${CONNECTIONS:-4}
W=$(mktemp -d); PIDS=(); RP=""
cleanup() {
  kill "${PIDS[@]}" 2>/dev/null || true
  [[ -n $RP ]] && redis-cli -p "$RP" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "no server on $1" >&2; exit 1; }

"$AFTER" certs dev --out "$W/certs" >/dev/null 2>&1
"$AFTER" generate --records "$RECORDS" --out "$W/register" --seed 1 2>/dev/null
"$AFTER" keys generate --out "$W/keys" >/dev/null
TOKEN=$("$AFTER" token mint --issuer-key "$W/keys/issuer.key" --platform platform-a --cert "$W/certs/platform-a.pem" --ttl 2h)
TLS=(--tls-cert "$W/certs/server.pem" --tls-key "$W/certs/server.key" --client-ca "$W/certs/ca.pem"
     --jwks "$W/keys/jwks.json" --token-issuer reassigned-dev --token-audience reassigned)
export REASSIGNED_LOG=warn
declare -A PORT
for store in $STORES; do
  if [[ $store == redis ]]; then
    RP=$(port); mkdir -p "$W/redis"
    redis-server --port "$RP" --save "" --appendonly no --dir "$W/redis" --daemonize yes >/dev/null
    wait_port "$RP"
  fi
  for build in before after; do
    bin=$BEFORE; [[ $build == after ]] && bin=$AFTER
    p=$(port); PORT[$store-$build]=$p
    if [[ $store == redis ]]; then
      "$bin" import --redis "redis://127.0.0.1:$RP/" --redis-key-prefix "$build" "$W/register/snapshot-000001.json" 2>/dev/null
      src=(--redis "redis://127.0.0.1:$RP/" --redis-key-prefix "$build")
    else
      src=(--data-dir "$W/register")
    fi
    "$bin" serve "${src[@]}" --listen "127.0.0.1:$p" "${TLS[@]}" >"$W/$store-$build.log" 2>&1 &
    PIDS+=($!)
    wait_port "$p"
  done
done
sleep 3 # membership filters load
cut -d' ' -f1-3 /proc/loadavg
for r in $(seq "$ROUNDS"); do
  for store in $STORES; do
    for build in before after; do
      out="$W/$store-$build-$r.json"
      "$AFTER" bench --target "127.0.0.1:${PORT[$store-$build]}" --ca "$W/certs/ca.pem" --cert "$W/certs/platform-a.pem" \
        --key "$W/certs/platform-a.key" --method check --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" \
        --data "$W/register" --token "$TOKEN" --json >"$out" 2>"$W/bench.err" || { cat "$W/bench.err" >&2; exit 1; }
      python3 -c "import json;d=json.load(open('$out'));print($r,'$store','$build',round(d['calls_per_sec']),'p50',d['latency_us']['p50'],'p99',d['latency_us']['p99'],'failed',d['failed_calls'])"
    done
  done
done
cut -d' ' -f1-3 /proc/loadavg
