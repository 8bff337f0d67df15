# Shared by the benchmark scripts of deploy/bench (sourced from the
# repository root after the script set WORK, KEEP_WORK and BIN): the process
# list stopped on exit, the working directory removed (unless kept), `log`,
# `free_port`, `wait_port`, and the release build (SKIP_BUILD=1: use BIN as
# it is). BENCH is the script's name in messages.
BENCH=${BENCH:-$(basename "$0")}

PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ "$KEEP_WORK" == 1 ]]; then
    echo "$BENCH: results kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "$BENCH: $*" >&2; }

# A free TCP port on 127.0.0.1 (never Redis's default 6379).
free_port() {
  python3 - <<'EOF'
import socket
while True:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    if port != 6379:
        print(port)
        break
EOF
}

# Waits until 127.0.0.1:$1 accepts connections; fails if process $2 dies.
wait_port() {
  local port=$1 pid=$2 what=$3
  for _ in $(seq 1200); do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$what exited before listening; its log:"
      tail -n 20 "$WORK/$what.log" >&2 || true
      exit 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  log "$what is not listening on $port after 120 s"
  exit 1
}

# --- build ---------------------------------------------------------------------
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  log "cargo build --release"
  cargo build --release
fi
[[ -x "$BIN" ]] || { log "$BIN is missing"; exit 1; }
