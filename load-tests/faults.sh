#!/usr/bin/env bash
# Fault injection under load: runs flagstream-load against a real flagstream and a real
# redis-server on loopback, injects one fault per phase, and verifies after each that every
# acknowledged event is stored exactly once, that the counters equal an exact recount, and that
# flags were served. Bounded in time (about 5 minutes on 2 cores); everything it starts it stops.
#
#   bash load-tests/faults.sh [FLAGSTREAM_BIN] [LOAD_BIN]
#
# Binaries default to target/release (then target/debug) under $CARGO_TARGET_DIR or ./target.
# FAULTS_RATE sets the offered load (operations per second, default 400); FAULTS_PHASES picks
# phases (default: "kill-9 redis-sigstop redis-kill broken-flags reverify disk-full wal-corrupt");
# FAULTS_KEEP=1 keeps the work directory. The disk-full phase mounts a tmpfs and needs root; without it that phase
# is skipped (and the script fails when CI is set).
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"
pick() {
    for profile in release debug; do
        if [[ -x "$target_dir/$profile/$1" ]]; then
            echo "$target_dir/$profile/$1"
            return
        fi
    done
    echo "$1 not built: cargo build --release -p flagstream -p flagstream-load" >&2
    exit 2
}
server_bin="${1:-$(pick flagstream)}"
load_bin="${2:-$(pick flagstream-load)}"
rate="${FAULTS_RATE:-400}"
phases="${FAULTS_PHASES:-kill-9 redis-sigstop redis-kill broken-flags reverify disk-full wal-corrupt}"
work="$(mktemp -d /tmp/flagstream-faults.XXXXXX)"
results="$work/results.tsv"
: >"$results"
started=$SECONDS

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
log() { echo "== [$((SECONDS - started))s] $*"; }

redis_port=$(free_port)
port=$(free_port)
addr="127.0.0.1:$port"
server_pid=""
redis_pid=""
mounted=""

cleanup() {
    {
        [[ -n "$server_pid" ]] && kill -9 "$server_pid" && wait "$server_pid"
        [[ -n "$redis_pid" ]] && kill -CONT "$redis_pid"
        [[ -n "$redis_pid" ]] && kill -9 "$redis_pid" && wait "$redis_pid"
    } 2>/dev/null || true
    [[ -n "$mounted" ]] && umount "$mounted" 2>/dev/null || true
    if [[ "${FAULTS_KEEP:-}" != 1 ]]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT

start_redis() {
    # Durable like a production Redis should be: every write in the append-only file.
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly yes \
        --appendfsync always --dir "$work/redis" >>"$work/redis.log" 2>&1 &
    redis_pid=$!
    for _ in $(seq 50); do
        redis-cli -p "$redis_port" ping >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "redis-server did not start" >&2
    exit 1
}

# start_server DATA_DIR [extra env assignments...]
start_server() {
    local data="$1"
    shift
    env FLAGSTREAM_TELEMETRY__LOG_FILTER=warn FLAGSTREAM_INGEST__RATE_LIMIT=0 \
        FLAGSTREAM_FLAGS__RELOAD_INTERVAL=200ms "$@" \
        "$server_bin" serve --listen "$addr" --data-dir "$data" --flags-dir "$work/flags" \
        >>"$work/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 300); do
        if curl -sf "http://$addr/healthz" >/dev/null 2>&1; then return; fi
        if ! kill -0 "$server_pid" 2>/dev/null; then
            echo "flagstream exited at start; its log:" >&2
            tail -20 "$work/server.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "flagstream did not answer in 30 s" >&2
    exit 1
}

stop_server() {
    [[ -z "$server_pid" ]] && return
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}

kill9_server() {
    kill -9 "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}

# The flags served right now: the number of flags in an app-launch answer (0 when none).
flags_served() {
    curl -sf "http://$addr/v1/config?targetingKey=child-1&platform=ios" 2>/dev/null |
        python3 -c 'import json, sys; print(len(json.load(sys.stdin)["flags"]))' 2>/dev/null || echo 0
}

# metric PREFIX: the sum of the samples whose line starts with PREFIX (0 when none).
metric() {
    curl -sf "http://$addr/metrics" | awk -v name="$1" 'index($0, name) == 1 {sum += $NF} END {print sum + 0}'
}

# load PHASE SECONDS [extra flagstream-load options...]: runs a school morning in the
# background, recording its ledger; the report lands in $work/PHASE.json.
load() {
    local phase="$1" seconds="$2"
    shift 2
    "$load_bin" mixed --target "$addr" --rate "$rate" --connections 40 --seconds "$seconds" \
        --tag "faults-$phase-$$" --record "$work/$phase.ledger" --verify --verify-timeout 90 \
        --report "$work/$phase.json" --json "$@" >/dev/null 2>"$work/$phase.progress" &
    load_pid=$!
    # A phase that expects the load generator to meet errors says so; any other phase fails
    # on a single one.
    case " $* " in
        *" --allow-errors "*) touch "$work/$phase.errors-allowed" ;;
    esac
}

# What a phase must at least have done for its verdict to mean anything.
min_acknowledged=1000
min_windows=1

# judge PHASE INJECTED FLAGS_RULE: reads the phase's report and appends a line to the results.
# FLAGS_RULE is "none" (no failed launch at all) or "restarts" (launches failed only while the
# process was down: connection errors, never an error answer).
judge() {
    local phase="$1" injected="$2" rule="$3"
    python3 - "$work/$phase.json" "$phase" "$injected" "$rule" "$min_acknowledged" "$min_windows" \
        "$work/$phase.errors-allowed" >>"$results" <<'EOF'
import json, os, sys
path, phase, injected, rule = sys.argv[1:5]
min_acknowledged, min_windows = int(sys.argv[5]), int(sys.argv[6])
errors_allowed = os.path.exists(sys.argv[7])
report = json.load(open(path))
v = report.get("verify") or {}
problems = list(v.get("problems", []))
# A phase that acknowledged almost nothing, or compared no counter window, proves nothing.
if v.get("acknowledged", 0) < min_acknowledged:
    problems.insert(0, "only %s events acknowledged (at least %d)" % (v.get("acknowledged", 0), min_acknowledged))
if v.get("windows", 0) < min_windows:
    problems.insert(0, "only %s counter windows compared (at least %d)" % (v.get("windows", 0), min_windows))
if not errors_allowed and report["errors"]:
    problems.insert(0, "%s load errors in a phase that expects none" % report["errors"])
enough = (v.get("acknowledged", 0) >= min_acknowledged and v.get("windows", 0) >= min_windows
          and (errors_allowed or not report["errors"]))
launch = report["operations"].get("launch", {"errors": {}, "ok": 0})
failed = launch["errors"]
if rule == "none":
    flags_ok = not failed
else:
    flags_ok = all(cause in ("connect", "io", "timeout", "closed") for cause in failed)
flags_ok = flags_ok and launch["ok"] > 0
passed = bool(v.get("passed")) and flags_ok and enough
print("\t".join(str(x) for x in [
    phase, injected, v.get("acknowledged", 0), v.get("stored", 0), v.get("missing", "?"),
    v.get("duplicates", "?"), "yes" if v.get("counters_match") else "NO",
    "yes" if flags_ok else "NO (%s)" % failed, report["errors"], "PASS" if passed else "FAIL",
    "; ".join(problems)[:300]]))
EOF
}

mkdir -p "$work/redis" "$work/flags"
cp load-tests/flags/*.json "$work/flags/"
start_redis
export FLAGSTREAM_COUNTERS__REDIS_URL="redis://127.0.0.1:$redis_port"
data="$work/data"
start_server "$data"
log "flagstream $server_bin on $addr, redis-server on $redis_port, $rate operations/s"

# 1. kill -9 of the service, 10 times at random moments.
phase_kill_9() {
    log "phase kill-9: 10 kills at random moments"
    load kill-9 50 --allow-errors --drain 40
    for i in $(seq 10); do
        sleep "$(python3 -c 'import random; print(round(random.uniform(1.5, 3.5), 2))')"
        kill9_server
        sleep "$(python3 -c 'import random; print(round(random.uniform(0.2, 1.0), 2))')"
        start_server "$data"
        served=$(flags_served)
        if [[ "$served" -eq 0 ]]; then
            echo "flags not served after restart $i" >&2
            echo -e "kill-9\trestart $i\t-\t-\t-\t-\t-\tNO\t-\tFAIL\tno flags after restart" >>"$results"
        fi
    done
    wait "$load_pid" || true
    judge kill-9 "kill -9 x10" restarts
}

# 2. Redis stopped (SIGSTOP) for 30 s: ingest and flags go on, counters catch up.
phase_redis_sigstop() {
    log "phase redis-sigstop: Redis stopped for 30 s"
    load redis-sigstop 40
    sleep 5
    kill -STOP "$redis_pid"
    sleep 30
    kill -CONT "$redis_pid"
    wait "$load_pid" || true
    judge redis-sigstop "Redis SIGSTOP 30 s" none
}

# 3. Redis killed and down for 30 s, then restarted from its append-only file.
phase_redis_kill() {
    log "phase redis-kill: Redis killed, down for 30 s"
    load redis-kill 40
    sleep 5
    kill -9 "$redis_pid"
    wait "$redis_pid" 2>/dev/null || true
    sleep 30
    start_redis
    wait "$load_pid" || true
    judge redis-kill "Redis kill -9, 30 s down" none
}

# 4. A broken flag file reloaded: the last good snapshot keeps serving.
phase_broken_flags() {
    log "phase broken-flags: a broken flag file"
    local served_before served_broken problems_broken problems_after
    served_before=$(flags_served)
    load broken-flags 20
    sleep 5
    cp "$work/flags/launch-20.json" "$work/launch-20.good"
    printf '{"flags": {"rollout-0": {"state": "ENABLED", "variants": ' >"$work/flags/launch-20.json"
    sleep 2
    served_broken=$(flags_served)
    problems_broken=$(metric flagstream_flag_problems)
    sleep 5
    cp "$work/launch-20.good" "$work/flags/launch-20.json"
    sleep 1
    problems_after=$(metric flagstream_flag_problems)
    wait "$load_pid" || true
    judge broken-flags "broken flag file for 7 s" none
    # The broken file is refused visibly (flagstream_flag_problems) while the last good version of
    # its flags keeps serving, and the problem clears once the file is fixed.
    if [[ "$served_broken" -ne "$served_before" ]] || [[ "$problems_broken" == 0 ]] || [[ "$problems_after" != 0 ]]; then
        echo -e "broken-flags\tflags served $served_before -> $served_broken, problems $problems_broken -> $problems_after\t-\t-\t-\t-\t-\tNO\t-\tFAIL\tthe broken file was not refused visibly" >>"$results"
    else
        echo -e "broken-flags\t$served_broken flags kept, $problems_broken problem reported, cleared after the fix\t-\t-\t-\t-\t-\tyes\t-\tPASS\t" >>"$results"
    fi
}

# 5. Every run again, after one more clean restart: acknowledged is still a subset of stored.
phase_reverify() {
    log "re-verifying every run after a restart"
    stop_server
    start_server "$data"
    local phase
    for phase in kill-9 redis-sigstop redis-kill broken-flags; do
        [[ -f "$work/$phase.ledger" ]] || continue
        if "$load_bin" verify --target "$addr" --ledger "$work/$phase.ledger" --verify-timeout 90 \
            >"$work/$phase.reverify" 2>&1; then
            echo -e "$phase (again)\trestart\t-\t-\t-\t-\t-\t-\t-\tPASS\t" >>"$results"
        else
            echo -e "$phase (again)\trestart\t-\t-\t-\t-\t-\t-\t-\tFAIL\t$(tr '\n' ' ' <"$work/$phase.reverify")" >>"$results"
        fi
    done
}

# 6. The data dir's disk full (a 256 MiB tmpfs filled by a ballast file): 503s, no false acknowledgement, recovery.
phase_disk_full() {
    stop_server
    if [[ $EUID -eq 0 ]]; then
        log "phase disk-full: the data dir's file system fills up"
        mkdir -p "$work/small"
        mount -t tmpfs -o size=256m tmpfs "$work/small"
        mounted="$work/small"
        unset FLAGSTREAM_COUNTERS__REDIS_URL
        start_server "$work/small/data" FLAGSTREAM_INGEST__WAL_SEGMENT_SIZE=4MiB
        load disk-full 30 --allow-errors
        sleep 6
        dd if=/dev/zero of="$work/small/ballast" bs=1M 2>/dev/null || true
        sleep 8
        refused=$(metric 'flagstream_wal_errors_total')
        rm -f "$work/small/ballast"
        wait "$load_pid" || true
        judge disk-full "disk full for 8 s ($refused WAL write errors)" none
        stop_server
        umount "$work/small"
        mounted=""
        export FLAGSTREAM_COUNTERS__REDIS_URL="redis://127.0.0.1:$redis_port"
    elif [[ -n "${CI:-}" ]]; then
        echo -e "disk-full\tnot run: needs root for a tmpfs\t-\t-\t-\t-\t-\t-\t-\tFAIL\t" >>"$results"
    else
        echo -e "disk-full\tskipped: needs root\t-\t-\t-\t-\t-\t-\t-\tSKIP\t" >>"$results"
    fi
}

# 7. A write-ahead log segment corrupted in the middle (embedded counters, rebuilt from the
# log): the damage is found and reported, the service starts and serves, and only what the
# damaged bytes held is lost.
phase_wal_corrupt() {
    stop_server
    log "phase wal-corrupt: a segment corrupted mid-file"
    local redis_url="$FLAGSTREAM_COUNTERS__REDIS_URL"
    unset FLAGSTREAM_COUNTERS__REDIS_URL
    corrupt_data="$work/corrupt"
    start_server "$corrupt_data"
    local served_before
    served_before=$(flags_served)
    load wal-corrupt 10
    wait "$load_pid" || true
    stop_server
    segment=$(ls -S "$corrupt_data"/wal/*.wal 2>/dev/null | head -1 || true)
    if [[ -z "$segment" ]]; then
        echo -e "wal-corrupt\tno segment found\t-\t-\t-\t-\t-\t-\t-\tFAIL\t" >>"$results"
    else
        size=$(stat -c %s "$segment")
        python3 - "$segment" "$size" <<'EOF'
import sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    f.seek(size // 2)
    f.write(bytes((i * 37 + 11) % 256 for i in range(64)))
EOF
        start_server "$corrupt_data"
        damaged=$(metric flagstream_wal_corrupt_records_total)
        served=$(flags_served)
        "$load_bin" verify --target "$addr" --ledger "$work/wal-corrupt.ledger" --verify-timeout 30 \
            --json >"$work/wal-corrupt.after.json" 2>/dev/null || true
        load wal-corrupt-after 5
        wait "$load_pid" || true
        python3 - "$work/wal-corrupt.after.json" "$damaged" "$served" "$work/wal-corrupt-after.json" \
            "$served_before" >>"$results" <<'EOF'
import json, sys
after, damaged, served, fresh, before = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
v = json.load(open(after))
new = json.load(open(fresh)).get("verify") or {}
# The damage is reported, nothing is duplicated or invented, the loss stays local (one record
# of a group commit, far less than the run), the counters (rebuilt from the same log) equal
# the recount, and the service goes on taking events and serving flags.
local_loss = v["missing"] < max(1, v["acknowledged"] // 10)
passed = (damaged >= 1 and v["duplicates"] == 0 and v["unexpected"] == 0 and local_loss
          and v["counters_match"] and served == before > 0 and new.get("passed")
          and v["acknowledged"] >= 1000 and v.get("windows", 0) >= 1)
print("\t".join(str(x) for x in [
    "wal-corrupt", "64 bytes overwritten mid-segment (%d damaged records reported)" % damaged,
    v["acknowledged"], v["stored"], "%d (in the damaged record)" % v["missing"], v["duplicates"],
    "yes" if v["counters_match"] else "NO", "yes" if served == before > 0 else "NO", "-",
    "PASS" if passed else "FAIL", "; ".join(v.get("problems", []))[:300]]))
EOF
    fi
    stop_server
    export FLAGSTREAM_COUNTERS__REDIS_URL="$redis_url"
}

for phase in $phases; do
    if [[ -z "$server_pid" ]]; then start_server "$data"; fi
    "phase_${phase//-/_}"
done

log "results"
{
    echo -e "phase\tinjected\tacknowledged\tstored\tmissing\tduplicates\tcounters = recount\tflags served\tload errors\tresult\tnotes"
    cat "$results"
} | column -t -s $'\t'
if grep -q $'\tFAIL\t' "$results"; then
    echo "FAILED: see above; the server log is $work/server.log (FAULTS_KEEP=1 keeps it)"
    exit 1
fi
echo "all phases passed in $((SECONDS - started)) s"
