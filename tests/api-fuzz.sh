#!/usr/bin/env bash
# API fuzzing: schemathesis (from PyPI) generates requests from the live server's own
# /openapi.json and checks every answer: no 5xx, status codes, content types and bodies as
# documented. Bounded (a fixed seed and example count, a couple of minutes) and loopback only.
#
# Two servers:
#   1. open (no tokens) with the embedded counter store: every operation is reached;
#   2. with tokens configured and a real redis-server: the same with an admin token (the
#      Redis-backed paths), then without any token (every refusal documented and JSON).
#
#   bash tests/api-fuzz.sh [path to the flagstream binary]   (default: a fresh debug build)
set -euo pipefail
cd "$(dirname "$0")/.."
version=4.32.5
if ! schemathesis --version 2>/dev/null | grep -q "$version"; then
  python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "schemathesis==$version" \
    || python3 -m pip install --quiet --disable-pip-version-check "schemathesis==$version"
fi
binary="${1:-}"
if [ -z "$binary" ]; then
  cargo build --locked --bin flagstream
  binary="${CARGO_TARGET_DIR:-target}/debug/flagstream"
fi
binary="$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")"
scratch="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$scratch"
}
trap cleanup EXIT

# Starts the server with extra environment `$@` on a free port; sets `port` and `server`.
start_server() {
  local name=$1
  shift
  port=$((20000 + RANDOM % 20000))
  mkdir -p "$scratch/$name"
  env FLAGSTREAM_TELEMETRY__LOG_FILTER=warn FLAGSTREAM_INGEST__RATE_LIMIT=0 "$@" \
    "$binary" serve --listen "127.0.0.1:$port" --data-dir "$scratch/$name/data" --flags-dir flags \
    > "$scratch/$name/server.log" 2>&1 &
  server=$!
  pids+=("$server")
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/healthz" > /dev/null && return 0
    sleep 0.1
  done
  echo "the $name server did not start:" >&2
  cat "$scratch/$name/server.log" >&2
  return 1
}

# Runs schemathesis against the server on `port` from `$scratch/$name` (it keeps a cache
# where it runs). The WebSocket endpoint is a GET upgrade that a request generator cannot
# drive; its own tests cover it.
fuzz() {
  local name=$1 examples=$2 phases=$3
  shift 3
  (cd "$scratch/$name" && schemathesis run "http://127.0.0.1:$port/openapi.json" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --phases "$phases" --max-examples "$examples" --seed 1 --workers 2 \
    --exclude-path /v1/stream --request-timeout 30 --no-color "$@")
}

echo "== open API, embedded counters"
start_server open
fuzz open 100 examples,coverage,fuzzing,stateful
kill -0 "$server" # the server is still up

echo "== tokens configured, Redis counters"
command -v redis-server > /dev/null || {
  echo "redis-server is needed (bash .ci/test installs it)" >&2
  exit 1
}
redis_port=$((20000 + RANDOM % 20000))
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  > "$scratch/redis.log" 2>&1 &
pids+=("$!")
for _ in $(seq 1 100); do
  redis-cli -p "$redis_port" ping 2> /dev/null | grep -q PONG && break
  sleep 0.1
done
admin_key="fuzz-admin-$RANDOM$RANDOM"
admin_hash="$("$binary" hash-token "$admin_key")"
start_server tokens \
  FLAGSTREAM_REDIS_URL="redis://127.0.0.1:$redis_port" \
  FLAGSTREAM_AUTH__TOKENS="[{name = \"fuzz\", role = \"admin\", sha256 = \"$admin_hash\"}]"
fuzz tokens 50 examples,coverage,fuzzing -H "Authorization: Bearer $admin_key"
# Without a token: every protected operation refuses, as documented.
fuzz tokens 10 examples,coverage
kill -0 "$server"
redis-cli -p "$redis_port" ping | grep -q PONG # Redis served throughout
