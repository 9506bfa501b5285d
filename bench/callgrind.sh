#!/usr/bin/env bash
# Instructions the media thread spends in a fixed 10-second window, by callgrind (counts are
# steady on a noisy machine, unlike CPU time). The server runs under valgrind with one media
# worker; `parley lt` joins, and after 12 s instrumentation is switched on for 10 s. Prints the
# load tester's packet counts, the window's total and its instructions per forwarded packet
# (the load tester's receive rate times the window); the profile is left in OUT for
# callgrind_annotate.
#
#   bench/callgrind.sh [OUT] [BINARY] [SCENARIO]   (OUT: /tmp/parley-callgrind.out,
#                                                   BINARY: target/release/parley,
#                                                   SCENARIO: audio or screen)
#
# audio: `--calls 2 --users-per-call 5 --unmuted 2`; screen: one share to 3 viewers (valgrind
# keeps up with no more). Ports 18181 (HTTP) and 18544 (media) must be free; needs valgrind.
#
# LT_ARGS="..." replaces the scenario's load (e.g. `--calls 4 --users-per-call 10 --unmuted 2`,
# about the most audio valgrind keeps up with); CACHE_SIM=1 adds callgrind's cache simulation
# (32 KB first-level caches and a 1 MB last level, the size of this machine's L2), whose miss
# counts per function `callgrind_annotate` then shows.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/parley-callgrind.out}
bin=${2:-target/release/parley}
case ${3:-audio} in
    audio) args=(--calls 2 --users-per-call 5 --unmuted 2) ;;
    screen) args=(--calls 1 --users-per-call 4 --unmuted 0 --screen-sharing 1) ;;
    *) echo "unknown scenario $3" >&2; exit 2 ;;
esac
[[ -n ${LT_ARGS:-} ]] && read -r -a args <<<"$LT_ARGS"
cache=()
[[ ${CACHE_SIM:-0} == 1 ]] && cache=(--cache-sim=yes --LL=1048576,16,64)
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
valgrind --tool=callgrind "${cache[@]}" --instr-atstart=no --callgrind-out-file="$out" \
    "$bin" serve --http 127.0.0.1:18181 --rtc-port 18544 --public-ip 127.0.0.1 \
    --media-workers 1 >"$log/server.log" 2>&1 &
spid=$!
sleep 6
target/release/parley lt "${args[@]}" --duration 25 \
    --join-duration 2 --url ws://127.0.0.1:18181/ws >"$log/lt.txt" 2>"$log/lt.err" &
lpid=$!
sleep 12
callgrind_control -i on "$spid" >/dev/null
sleep 10
callgrind_control -i off "$spid" >/dev/null
wait "$lpid"
kill -INT "$spid"
wait "$spid" 2>/dev/null
grep -E "received|loss" "$log/lt.txt" | head -2
total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
# The packets forwarded in the window, from the load tester's steady receive rate (the
# server's /metrics are exported once a second, too coarse for a 10 s window).
packets=$(awk '/^received/ { print $2 * 10; exit }' "$log/lt.txt")
echo "window: $total instructions, $packets packets forwarded," \
    "$((total / (packets > 0 ? packets : 1))) instructions per packet"
