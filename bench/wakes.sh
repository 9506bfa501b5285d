#!/usr/bin/env bash
# How often the media worker wakes, and how many session timeouts it runs, under the screen
# share (one share to 29 viewers) or another `parley lt` load: the server runs with one media
# worker, and over an 8-second window (from 12 s after the load starts) the script reads the
# worker thread's voluntary context switches and CPU ticks from /proc and the session counters
# from /metrics. Prints one line per binary and round, alternating:
#   BINARY wakes/s cpu-ticks/s session-timeouts/s session-polls/s server-us/pkt
#
#   bench/wakes.sh ROUNDS BINARY...            (the load tester is target/release/parley)
#   LT_ARGS="--calls 2 --users-per-call 10 --unmuted 2" bench/wakes.sh 3 BINARY...
#
# Ports 18181 (HTTP) and 18544 (media) must be free.
set -uo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
rounds=$1; shift
read -r -a args <<<"${LT_ARGS:---calls 1 --users-per-call 30 --unmuted 0 --screen-sharing 1}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
worker() { # wakes and ticks of the media-0 thread
    for t in /proc/"$1"/task/*; do
        [[ $(cat "$t/comm" 2>/dev/null) == media-0 ]] || continue
        echo "$(awk '/^voluntary_ctxt_switches/ { print $2 }' "$t/status") $(awk '{ print $14 + $15 }' "$t/stat")"
    done
}
counter() { awk -v k="$1" '$1 == k { print $2 }' "$2"; }
for _ in $(seq 1 "$rounds"); do
    for bin in "$@"; do
        "$bin" serve --http 127.0.0.1:18181 --rtc-port 18544 --public-ip 127.0.0.1 \
            --media-workers 1 >"$out/server.log" 2>&1 &
        spid=$!
        sleep 2
        target/release/parley lt "${args[@]}" --duration 25 --join-duration 5 \
            --url ws://127.0.0.1:18181/ws --server-pid "$spid" >"$out/lt.txt" 2>"$out/lt.err" &
        lpid=$!
        sleep 12
        read -r w0 c0 < <(worker "$spid")
        curl -s 127.0.0.1:18181/metrics >"$out/m0"
        sleep 8
        read -r w1 c1 < <(worker "$spid")
        curl -s 127.0.0.1:18181/metrics >"$out/m1"
        wait "$lpid"
        kill -INT "$spid"
        wait "$spid" 2>/dev/null
        t=parley_media_session_timeouts_total p=parley_media_session_polls_total
        us=$(grep -o '"server_cpu_us_per_pkt":[0-9.]*' "$out/lt.txt" | cut -d: -f2)
        awk -v b="$(basename "$bin")" -v w=$((w1 - w0)) -v c=$((c1 - c0)) \
            -v t=$(($(counter $t "$out/m1") - $(counter $t "$out/m0"))) \
            -v p=$(($(counter $p "$out/m1") - $(counter $p "$out/m0"))) -v us="$us" \
            'BEGIN { printf "%s %.0f %.1f %.0f %.0f %s\n", b, w / 8, c / 8, t / 8, p / 8, us }'
    done
done
