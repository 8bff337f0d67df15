#!/usr/bin/env bash
# Interop test: the real server (dev certificates, a `generate --sandbox` data
# set, a token issuer key, `serve`) and the example clients in Python, Node,
# Go and Java against it over mTLS with a bearer token. Each client prints
# JSON lines; examples/interop_check.py compares them with the data set's
# sandbox.csv and manifest. Any client that fails to install, build, run or
# answer right fails the run: none is skipped.
#
# usage: examples/interop.sh [--install | --install-only] [python] [node] [go] [java]
#   --install  install the toolchains first (apt: Go, Java and their gRPC
#              packages; pip into examples/python/.venv; npm into
#              examples/node/node_modules)
#   --install-only  install them and stop (.ci/run does this in the
#              background while Rust compiles, then runs without --install)
#   default: all four clients. REASSIGNED_BIN: the binary (default: cargo
#   build's target/debug/reassigned).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
ex=$root/examples

install=false
install_only=false
clients=()
for arg in "$@"; do
  case $arg in
    --install) install=true ;;
    --install-only) install=true install_only=true ;;
    python | node | go | java) clients+=("$arg") ;;
    *) echo "interop: unknown argument $arg" >&2; exit 2 ;;
  esac
done
[ ${#clients[@]} -gt 0 ] || clients=(python node go java)

# Debian packages of the Go and Java clients (offline-capable: no module proxy,
# no Maven Central).
go_debs=(golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev
  golang-github-golang-protobuf-1-5-dev golang-google-genproto-dev)
java_debs=(openjdk-17-jdk-headless protobuf-compiler protobuf-compiler-grpc-java-plugin libgrpc-java
  libprotobuf-java libnetty-java libnetty-tcnative-java libperfmark-java libgoogle-gson-java
  libnetty-tcnative-jni libgeronimo-annotation-1.3-spec-java libguava-java libgoogle-common-protos-java)

apt_install() {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

install_client() {
  case $1 in
    python)
      python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
      [ -x "$ex/python/.venv/bin/python" ] || python3 -m venv "$ex/python/.venv"
      "$ex/python/.venv/bin/pip" install -q --disable-pip-version-check -r "$ex/python/requirements.txt" ;;
    node)
      command -v npm >/dev/null || apt_install nodejs npm
      npm ci --prefix "$ex/node" --no-audit --no-fund --loglevel=error >/dev/null ;;
    go | java)
      local -n debs=${1}_debs
      local missing=()
      for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
      [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}" ;;
  esac
}

# Builds the client if it needs building; prints the command that runs it.
build_client() {
  case $1 in
    python) echo "$ex/python/.venv/bin/python $ex/python/client.py" ;;
    node) echo "node $ex/node/client.js" ;;
    go) "$ex/go/build.sh" >&2 && echo "$ex/go/build/reassigned-client" ;;
    java) "$ex/java/build.sh" >&2 && echo "$ex/java/run.sh" ;;
  esac
}

if $install; then
  for c in "${clients[@]}"; do
    started=$SECONDS
    install_client "$c"
    echo "interop: installed the $c toolchain in $((SECONDS - started)) s"
  done
fi
$install_only && exit 0

bin=${REASSIGNED_BIN:-}
if [ -z "$bin" ]; then
  cargo build --locked -q --bin reassigned
  bin=$root/target/debug/reassigned
fi

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" certs dev --out "$work/certs" 2>/dev/null
"$bin" generate --sandbox --out "$work/register" 2>/dev/null
"$bin" keys generate --out "$work/keys" >/dev/null 2>&1
# platform-a may check 500 numbers a day: each client's normal calls use 18,
# and its batch of 1,000 is refused (RESOURCE_EXHAUSTED with RetryInfo).
cat >"$work/serve.toml" <<TOML
[quotas."spiffe://dev.reassigned/platform-a"]
numbers_per_day = 500
TOML
REASSIGNED_LOG=info "$bin" --log-format json serve --config "$work/serve.toml" --listen 127.0.0.1:0 \
  --tls-cert "$work/certs/server.pem" --tls-key "$work/certs/server.key" --client-ca "$work/certs/ca.pem" \
  --data-dir "$work/register" --jwks "$work/keys/jwks.json" \
  --token-issuer reassigned-dev --token-audience reassigned 2>"$work/serve.log" &
server_pid=$!

# The bound port, from the "listening" log line.
port=
for _ in $(seq 1 300); do
  port=$(sed -n 's/.*"addr":"127\.0\.0\.1:\([0-9]*\)".*"listening".*/\1/p; s/.*"listening".*"addr":"127\.0\.0\.1:\([0-9]*\)".*/\1/p' "$work/serve.log" | head -1)
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || { echo "interop: the server exited:" >&2; cat "$work/serve.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "interop: the server did not listen within 30 s:" >&2; cat "$work/serve.log" >&2; exit 1; }

export REASSIGNED_TARGET=localhost:$port
export REASSIGNED_CA=$work/certs/ca.pem REASSIGNED_CERT=$work/certs/platform-a.pem REASSIGNED_KEY=$work/certs/platform-a.key
TOKEN=$("$bin" token mint --issuer-key "$work/keys/issuer.key" --platform platform-a \
  --cert "$work/certs/platform-a.pem" --scope "numbers:check numbers:batch mirror:read" 2>/dev/null)
export TOKEN

passed=0
failed=0
for c in "${clients[@]}"; do
  started=$SECONDS
  if run=$(build_client "$c") && $run >"$work/$c.jsonl" 2>"$work/$c.err" \
    && python3 "$ex/interop_check.py" "$c" "$work/$c.jsonl" "$work/register"; then
    passed=$((passed + 1))
    echo "interop $c: built and ran in $((SECONDS - started)) s"
  else
    failed=$((failed + 1))
    echo "interop $c: FAILED; its output:" >&2
    cat "$work/$c.jsonl" "$work/$c.err" >&2 2>/dev/null || true
  fi
done
echo "interop: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
