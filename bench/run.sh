#!/usr/bin/env bash
# The benchmark: the same load (`parley lt`, real WebRTC users) against Parley, Janus (Debian's
# package, VideoRoom) and the floor (plain UDP fan-out, no crypto), each on loopback, a fresh
# server process per run, server CPU and memory read from /proc of its PID.
#
#   bench/run.sh [--quick] [--duration S] [--audio-calls C] [--viewers V]
#                [--targets parley,janus,floor] [--scenarios audio,screen,storm]
#                [--rounds R] [--out DIR] [--no-build] [--profile P]
#
# Scenarios:
#   audio   --calls C --users-per-call 10 --unmuted 2             (C = --audio-calls, default 15)
#   screen  --calls 1 --users-per-call V --unmuted 0 --screen-sharing 1   (V = --viewers, default 60:
#           the sharer and 59 viewers)
#   storm   --calls 20 --users-per-call 10 --unmuted 1 --join-duration 10
# The issue asks for as many audio calls and screen viewers as this machine sustains for both
# servers. The defaults are the largest loads, in steps of 5 calls and 30 users, at which Janus
# (the costlier server) forwarded without loss and with a one-way delay p99 under 50 ms in trial
# runs on the 2-core development machine: audio 15 calls (20: p99 84 ms, join p99 0.9 s), screen
# 60 users (90: p99 82 ms; 120: 0.19 % loss, p99 374 ms). See bench/RESULTS.md, seventeenth
# session. Sessions 2-16 ran audio at 10 calls and the screen share at 30 users.
# --quick shrinks every scenario to a few users and seconds: a smoke test that each adapter
# works end to end (well under 2 minutes after the build).
#
# --profile P (default dist, what the container image and the systemd install ship: the release
# build with link-time optimisation; see Cargo.toml) is the cargo profile whose parley and floor
# binaries run, from target/P (the load tester too). --no-build uses them as they are.
#
# --rounds R (default 1) repeats the whole sequence R times, the targets of a scenario one after
# the other in each round. On a shared host whose steal time comes and goes, the medians of R
# rounds, and ratios taken within each round, are steadier than a single pass.
#
# Raw output of each run: DIR/<scenario>-<target>.txt (lt's stdout: table + JSON line; with
# rounds, DIR/<scenario>-<target>.r<K>.txt), its stderr and the server's log next to it as .log
# files (ignored by git). DIR defaults to bench/out/<YYYY-MM-DD>. At the end, one JSON line per
# scenario on stdout (also written to DIR/summary.jsonl):
#   {"scenario":..,"parley_us_per_pkt":..,"janus_us_per_pkt":..,"floor_us_per_pkt":..,
#    "parley_join_ms_p99":..,"janus_join_ms_p99":..,"floor_join_ms_p99":..,
#    "<target>_loss_pct":..,"<target>_rx_pps":..,"<target>_steal_pct":..,
#    "rounds":R,"parley_per_janus":[..],"parley_per_floor":[..],"errors":{"<target>":"..."}}
# With rounds, each figure is the median over the rounds (the worst for loss and join p99),
# and parley_per_janus / parley_per_floor list the ratio of each round. <target>_steal_pct is
# the steal time of the server's CPU while lt ran (from /proc/stat): a figure measured under
# much steal measures the host more than the server.
# A run that fails (no JSON, lt exits non-zero, fewer users connected than asked for, or no
# media received) is recorded with its error and the script goes on; the exit status is then 1. Values of a run whose lt printed JSON but exited non-zero
# (some users failed) are kept, with the error.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

duration=20
audio_calls=15
viewers=60
targets=parley,janus,floor
scenarios=audio,screen,storm
quick=0
rounds=1
build=1
profile=dist
out=""

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
need() { [[ $# -ge 2 && -n $2 ]] || { echo "$1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) quick=1; shift ;;
        --duration) need "$@"; duration=$2; shift 2 ;;
        --audio-calls) need "$@"; audio_calls=$2; shift 2 ;;
        --viewers) need "$@"; viewers=$2; shift 2 ;;
        --targets) need "$@"; targets=$2; shift 2 ;;
        --scenarios) need "$@"; scenarios=$2; shift 2 ;;
        --rounds) need "$@"; rounds=$2; shift 2 ;;
        --out) need "$@"; out=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --profile) need "$@"; profile=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

# With two or more cores, the server runs on CPU 1 and the load tester on CPU 0, so each
# server gets one core to itself and the tester's own work does not blur its figures.
pin_server=()
pin_lt=()
server_cpu=cpu
if command -v taskset >/dev/null && [[ $(nproc) -ge 2 ]]; then
    pin_server=(taskset -c 1)
    pin_lt=(taskset -c 0)
    server_cpu=cpu1
fi
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "--rounds needs a positive number" >&2; exit 2; }

# The total and steal jiffies of the server's CPU, from /proc/stat.
cpu_jiffies() {
    awk -v cpu="$server_cpu" '$1 == cpu { t = 0; for (i = 2; i <= 9; i++) t += $i; print t, $9 }' /proc/stat
}

out=${out:-bench/out/$(date +%F)}
mkdir -p "$out"
tmp=$(mktemp -d -t parley-bench.XXXXXX)
manifest=$tmp/manifest
: >"$manifest"

server_pid=""
stop_server() {
    [[ -n $server_pid ]] || return 0
    if kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null
        for _ in $(seq 50); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$server_pid" 2>/dev/null
    fi
    wait "$server_pid" 2>/dev/null
    server_pid=""
}
cleanup() {
    stop_server
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "bench: $*" >&2; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until something accepts TCP connections on 127.0.0.1:$1 (or the server died).
wait_tcp() {
    local port=$1 i
    for i in $(seq 200); do
        kill -0 "$server_pid" 2>/dev/null || return 1
        if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close()' "$port" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# Starts the target's server; sets server_pid and url. $1 target, $2 server log file.
start_server() {
    local target=$1 slog=$2 port i
    case $target in
        parley)
            port=$(free_port)
            local rtc
            rtc=$(free_port)
            "${pin_server[@]}" "target/$profile/parley" serve --http "127.0.0.1:$port" --rtc-port "$rtc" \
                --public-ip 127.0.0.1 >"$slog" 2>&1 &
            server_pid=$!
            url="ws://127.0.0.1:$port/ws"
            wait_tcp "$port"
            ;;
        janus)
            port=$(free_port)
            "${pin_server[@]}" bench/janus/start.sh "$port" "$tmp/janus-conf" >"$slog" 2>&1 &
            server_pid=$!
            url="ws://127.0.0.1:$port"
            wait_tcp "$port"
            ;;
        floor)
            port=$(free_port)
            "${pin_server[@]}" "target/$profile/floor" --listen "127.0.0.1:$port" >"$slog" 2>&1 &
            server_pid=$!
            url="udp://127.0.0.1:$port"
            for i in $(seq 100); do
                grep -q "listening on" "$slog" 2>/dev/null && return 0
                kill -0 "$server_pid" 2>/dev/null || return 1
                sleep 0.05
            done
            return 1
            ;;
        *)
            echo "unknown target $target" >"$slog"
            return 1
            ;;
    esac
}

# lt arguments of a scenario.
scenario_args() {
    if [[ $quick == 1 ]]; then
        case $1 in
            audio) echo "--calls 2 --users-per-call 3 --unmuted 2 --duration 3 --join-duration 1" ;;
            screen) echo "--calls 1 --users-per-call 3 --unmuted 0 --screen-sharing 1 --duration 3 --join-duration 1" ;;
            storm) echo "--calls 2 --users-per-call 3 --unmuted 1 --duration 2 --join-duration 2" ;;
        esac
    else
        case $1 in
            audio) echo "--calls $audio_calls --users-per-call 10 --unmuted 2 --duration $duration --join-duration 5" ;;
            screen) echo "--calls 1 --users-per-call $viewers --unmuted 0 --screen-sharing 1 --duration $duration --join-duration 5" ;;
            storm) echo "--calls 20 --users-per-call 10 --unmuted 1 --duration $duration --join-duration 10" ;;
        esac
    fi
}

for s in ${scenarios//,/ }; do
    if [[ -z $(scenario_args "$s") ]]; then
        echo "unknown scenario $s (audio, screen, storm)" >&2
        exit 2
    fi
done

if [[ $build == 1 ]]; then
    log "cargo build --profile $profile -p parley -p parley-floor"
    cargo build --profile "$profile" -p parley -p parley-floor || { log "build failed"; exit 1; }
fi

for round in $(seq "$rounds"); do
for s in ${scenarios//,/ }; do
    read -r -a args <<<"$(scenario_args "$s")"
    for t in ${targets//,/ }; do
        name=$s-$t
        [[ $rounds == 1 ]] || name=$s-$t.r$round
        txt=$out/$name.txt
        errf=$out/$name.stderr.log
        slog=$out/$name.server.log
        rc=0
        url=""
        steal=""
        log "round $round/$rounds, $s / $t: starting the server"
        if ! start_server "$t" "$slog"; then
            log "$s / $t: the server did not start (see $slog)"
            echo "server did not start: $(tail -n 3 "$slog" 2>/dev/null | tr '\n' ' ')" >"$errf"
            : >"$txt"
            rc=99
        else
            log "$s / $t: parley lt ${args[*]} --target $t --url $url --server-pid $server_pid"
            read -r total0 steal0 < <(cpu_jiffies)
            # Generous limit: joins + steady window + shutdown.
            timeout 600 "${pin_lt[@]}" "target/$profile/parley" lt "${args[@]}" --target "$t" --url "$url" \
                --server-pid "$server_pid" >"$txt" 2>"$errf"
            rc=$?
            read -r total1 steal1 < <(cpu_jiffies)
            if [[ $total1 -gt $total0 ]]; then
                steal=$(( (steal1 - steal0) * 100 / (total1 - total0) ))
            fi
            if ! kill -0 "$server_pid" 2>/dev/null; then
                echo "the server exited during the run (see $slog)" >>"$errf"
                [[ $rc == 0 ]] && rc=98
            fi
        fi
        stop_server
        [[ $rc == 0 ]] || log "$s / $t: failed (exit $rc), see $errf"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$t" "$rc" "$txt" "$errf" "$round" "$steal" >>"$manifest"
    done
done
done

python3 - "$manifest" "$out/summary.jsonl" "$targets" <<'PY'
import json, re, statistics, sys

manifest, summary_path, targets = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
# runs[scenario][target] = [(round, result, error, steal_pct), ...]
runs = {}
order = []
failed = False
for line in open(manifest):
    scenario, target, rc, txt, errf, rnd, steal = line.rstrip("\n").split("\t")
    if scenario not in runs:
        runs[scenario] = {}
        order.append(scenario)
    result, error = None, None
    try:
        for l in reversed(open(txt, errors="replace").read().splitlines()):
            if l.startswith("{"):
                result = json.loads(l)
                break
    except (OSError, ValueError) as e:
        error = f"unreadable output: {e}"
    # A run can exit 0 and still have measured nothing: users that never connected, no media.
    if result is not None and error is None:
        m = re.search(r"users connected\s+(\d+) of (\d+)", open(txt, errors="replace").read())
        if m and int(m.group(1)) < int(m.group(2)):
            error = f"only {m.group(1)} of {m.group(2)} users connected"
        elif not result.get("rx_pps"):
            error = "no media received"
        if error:
            failed = True
    if rc != "0" or result is None:
        failed = True
        try:
            text = open(errf, errors="replace").read()
        except OSError:
            text = ""
        # lt redraws its progress line with \r: keep what follows the last \r of each line.
        lines = [l.split("\r")[-1].strip() for l in text.splitlines()]
        lines = [l for l in lines if l]
        why = lines[-1] if lines else "no output"
        error = error or (f"exit {rc}: {why}" if rc != "0" else f"no JSON line: {why}")
    runs[scenario].setdefault(target, []).append(
        (int(rnd), result or {}, error, int(steal) if steal else None)
    )


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def worst(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def per_round(scenario, a, b):
    """The ratio a/b of CPU per packet within each round where both measured."""
    by_round = {}
    for t in (a, b):
        for rnd, r, _, _ in runs[scenario].get(t, []):
            by_round.setdefault(rnd, {})[t] = r.get("server_cpu_us_per_pkt")
    return [
        round(v[a] / v[b], 3)
        for _, v in sorted(by_round.items())
        if v.get(a) and v.get(b)
    ]


rounds = max(rnd for s in runs.values() for t in s.values() for rnd, *_ in t)
with open(summary_path, "w") as out:
    for scenario in order:
        row = {"scenario": scenario}
        errors = {}
        for t in dict.fromkeys(["parley", "janus", "floor"] + targets):
            results = runs[scenario].get(t, [])
            rs = [r for _, r, _, _ in results]
            row[f"{t}_us_per_pkt"] = median(r.get("server_cpu_us_per_pkt") for r in rs)
            row[f"{t}_join_ms_p99"] = worst(r.get("join_ms_p99") for r in rs)
            row[f"{t}_loss_pct"] = worst(r.get("loss_pct") for r in rs)
            row[f"{t}_rx_pps"] = median(r.get("rx_pps") for r in rs)
            row[f"{t}_rss_mb"] = median(r.get("server_rss_mb") for r in rs)
            row[f"{t}_steal_pct"] = median(st for *_, st in results)
            errs = [f"round {rnd}: {e}" if rounds > 1 else e for rnd, _, e, _ in results if e]
            if errs:
                errors[t] = "; ".join(errs)
        row["rounds"] = rounds
        row["parley_per_janus"] = per_round(scenario, "parley", "janus")
        row["parley_per_floor"] = per_round(scenario, "parley", "floor")
        row["errors"] = errors
        line = json.dumps(row)
        print(line)
        out.write(line + "\n")
sys.exit(1 if failed else 0)
PY
status=$?
log "raw outputs in $out"
exit $status
