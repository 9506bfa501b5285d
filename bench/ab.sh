#!/usr/bin/env bash
# Alternating runs of one `parley lt` scenario against several Parley server binaries, to
# compare builds on a noisy machine: each round runs every binary once, each on a fresh server
# pinned to CPU 1 (the load tester on CPU 0), and prints one line per run:
#   SCENARIO BINARY us/pkt loss% delay-p99-ms rx-pkt/s [user-us kernel-us]
#
#   bench/ab.sh SCENARIO ROUNDS BINARY...      (SCENARIO: audio, screen or storm)
#
# The loads are `bench/run.sh`'s defaults (audio 15 calls, a share to 59 viewers). The load
# tester is target/release/parley; build it first. Ports 18181 (HTTP) and 18544
# (media) must be free.
#
# PERF=1 also samples the server with `perf record -e cpu-clock` (Debian's linux-perf) over 8 s
# of the steady window (from 12 s in) and adds two columns, the server's user and kernel CPU
# per forwarded packet from the samples (user: all outside the kernel); a user-space change shows
# in the first even when the kernel's share, which varies with the host, drowns it in us/pkt.
set -uo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 3 ]] || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
scenario=$1; rounds=$2; shift 2
case $scenario in
    audio) args=(--calls 15 --users-per-call 10 --unmuted 2 --duration 20 --join-duration 5) ;;
    screen) args=(--calls 1 --users-per-call 60 --unmuted 0 --screen-sharing 1 --duration 20 --join-duration 5) ;;
    storm) args=(--calls 20 --users-per-call 10 --unmuted 1 --duration 20 --join-duration 10) ;;
    *) echo "unknown scenario $scenario" >&2; exit 2 ;;
esac
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for _ in $(seq 1 "$rounds"); do
    for bin in "$@"; do
        taskset -c 1 "$bin" serve --http 127.0.0.1:18181 --rtc-port 18544 --public-ip 127.0.0.1 \
            >"$out/server.log" 2>&1 &
        spid=$!
        sleep 1
        taskset -c 0 target/release/parley lt "${args[@]}" --url ws://127.0.0.1:18181/ws \
            --server-pid "$spid" >"$out/lt.txt" 2>"$out/lt.err" &
        lpid=$!
        samples=""
        if [[ ${PERF:-0} == 1 ]]; then
            sleep 12
            perf record -e cpu-clock -F 2000 -p "$spid" -o "$out/perf.data" -- sleep 8 \
                >/dev/null 2>&1
            samples=$(perf report -i "$out/perf.data" --sort dso -g none -n 2>/dev/null |
                awk '!/^#/ && NF >= 3 { if ($3 ~ /kernel/) k += $2; else u += $2 }
                     END { print u + 0, k + 0 }')
        fi
        wait "$lpid"
        kill -9 "$spid" 2>/dev/null
        wait "$spid" 2>/dev/null
        echo "$scenario $(basename "$bin") $(tail -1 "$out/lt.txt" | SAMPLES=$samples python3 -c '
import json, os, sys
d = json.load(sys.stdin)
cpu = d["server_cpu_us_per_pkt"]
row = [round(cpu, 2) if cpu is not None else "none", d["loss_pct"], d["delay_ms_p99"],
       round(d["rx_pps"])]
if os.environ["SAMPLES"]:
    # 2000 samples a second, 500 us each, over the 8 s window.
    packets = d["rx_pps"] * 8
    row += [round(int(n) * 500 / packets, 2) for n in os.environ["SAMPLES"].split()]
print(*row)')"
    done
done
