#!/usr/bin/env bash
# API fuzzing: schemathesis (from PyPI) generates requests from the live server's own
# /openapi.json and checks every answer: no 5xx, status codes, content types and bodies as
# documented. Bounded (a fixed seed and example count, about a minute) and loopback only.
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
data="$(mktemp -d)"
port=$((20000 + RANDOM % 20000))
FLAGSTREAM_TELEMETRY__LOG_FILTER=warn FLAGSTREAM_INGEST__RATE_LIMIT=0 \
  "$binary" serve --listen "127.0.0.1:$port" --data-dir "$data" --flags-dir flags > "$data/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/healthz" > /dev/null && break
  sleep 0.1
done
# The WebSocket endpoint is a GET upgrade that a request generator cannot drive; its own
# tests cover it.
# Run from the scratch dir: schemathesis keeps a cache where it runs.
(cd "$data" && schemathesis run "http://127.0.0.1:$port/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --phases examples,coverage,fuzzing,stateful --max-examples 100 --seed 1 --workers 2 \
  --exclude-path /v1/stream --request-timeout 30 --no-color)
kill -0 "$server" # the server is still up
