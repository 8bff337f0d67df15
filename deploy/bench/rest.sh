#!/usr/bin/env bash
# REST (CAMARA check, HTTP/1.1 keep-alive) against gRPC CheckNumber on the
# same server and the same store (embedded by default; REDIS=1 for a
# redis-server started here), with tokens on, alternated ROUNDS times:
# prints each pair's calls/s and the REST/gRPC ratio.
#   deploy/bench/rest.sh                          # 1 M records, 64 in flight, 4% hits
#   RECORDS=100000 ROUNDS=5 DURATION=10s deploy/bench/rest.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

RECORDS=${RECORDS:-1000000}
DURATION=${DURATION:-8s}
WARMUP=${WARMUP:-2s}
CONCURRENCY=${CONCURRENCY:-64}
CONNECTIONS=${CONNECTIONS:-4}
ROUNDS=${ROUNDS:-3}
BIN=${BIN:-target/release/reassigned}
[[ -x "$BIN" ]] || { echo "rest.sh: build $BIN first (cargo build --release)" >&2; exit 2; }
export REASSIGNED_LOG=${REASSIGNED_LOG:-warn}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/reassigned-rest-bench.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

read -r GRPC_PORT REST_PORT REDIS_PORT < <(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')

"$BIN" certs dev --out "$WORK/certs" >/dev/null 2>&1
"$BIN" generate --records "$RECORDS" --out "$WORK/register" --seed 1 2>"$WORK/generate.log"
"$BIN" keys generate --out "$WORK/keys" >/dev/null
REASSIGNED_BENCH_TOKEN=$("$BIN" token mint --issuer-key "$WORK/keys/issuer.key" --platform platform-a \
  --cert "$WORK/certs/platform-a.pem" --ttl 2h)
export REASSIGNED_BENCH_TOKEN

STORE=(--data-dir "$WORK/register")
if [[ "${REDIS:-0}" == 1 ]]; then
  redis-server --port "$REDIS_PORT" --save '' --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$BIN" sync --redis "redis://127.0.0.1:$REDIS_PORT" "$WORK/register" 2>"$WORK/sync.log"
  STORE=(--redis "redis://127.0.0.1:$REDIS_PORT")
fi

"$BIN" serve --listen "127.0.0.1:$GRPC_PORT" --rest-listen "127.0.0.1:$REST_PORT" \
  --tls-cert "$WORK/certs/server.pem" --tls-key "$WORK/certs/server.key" --client-ca "$WORK/certs/ca.pem" \
  --jwks "$WORK/keys/jwks.json" --token-issuer reassigned-dev --token-audience reassigned \
  "${STORE[@]}" >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 600); do
  (exec 3<>"/dev/tcp/127.0.0.1/$REST_PORT") 2>/dev/null && break
  sleep 0.1
done

CLIENT=(--ca "$WORK/certs/ca.pem" --cert "$WORK/certs/platform-a.pem" --key "$WORK/certs/platform-a.key"
  --data "$WORK/register" --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup "$WARMUP" --json)
rate() { python3 -c 'import json,sys; r=json.load(sys.stdin); print(round(r["calls_per_sec"]), r["failed_calls"])'; }
echo "round grpc_calls_per_s rest_calls_per_s rest/grpc (failed: grpc rest)"
for round in $(seq "$ROUNDS"); do
  read -r grpc grpc_failed < <("$BIN" bench --target "127.0.0.1:$GRPC_PORT" --connections "$CONNECTIONS" "${CLIENT[@]}" 2>/dev/null | rate)
  read -r rest rest_failed < <("$BIN" bench --rest --target "127.0.0.1:$REST_PORT" "${CLIENT[@]}" 2>/dev/null | rate)
  python3 -c "print($round, $grpc, $rest, f'{$rest/$grpc:.3f}x', '(failed:', $grpc_failed, $rest_failed, ')')"
done
