#!/usr/bin/env bash
# Instructions the media thread spends in a fixed 10-second window of a small audio call, by
# callgrind (counts are steady on a noisy machine, unlike CPU time). The server runs under
# valgrind with one media worker; `parley lt --calls 2 --users-per-call 5 --unmuted 2` joins,
# and after 12 s instrumentation is switched on for 10 s. Prints the load tester's packet
# counts and the window's total; the profile is left in OUT for callgrind_annotate.
#
#   bench/callgrind.sh [OUT] [BINARY]      (OUT: /tmp/parley-callgrind.out,
#                                           BINARY: target/release/parley)
#
# Ports 18181 (HTTP) and 18544 (media) must be free; needs valgrind.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/parley-callgrind.out}
bin=${2:-target/release/parley}
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    "$bin" serve --http 127.0.0.1:18181 --rtc-port 18544 --public-ip 127.0.0.1 \
    --media-workers 1 >"$log/server.log" 2>&1 &
spid=$!
sleep 6
target/release/parley lt --calls 2 --users-per-call 5 --unmuted 2 --duration 25 \
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
callgrind_annotate "$out" 2>/dev/null | grep "PROGRAM TOTALS"
