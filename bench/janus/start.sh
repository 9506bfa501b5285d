#!/usr/bin/env bash
# Start Debian's Janus (apt-get install -y janus) for the benchmark, in the foreground:
#
#   bench/janus/start.sh PORT_WS [DIR]
#
# Writes a minimal configuration into DIR (a new temporary directory if omitted): only the
# VideoRoom plugin and the WebSockets transport (ws://127.0.0.1:PORT_WS, no wss, no admin API),
# no event handlers, no external loggers, no STUN/TURN, full ICE (not ICE-Lite), half trickle
# (Janus puts all of its candidates in its SDP), rooms creatable through the API without a key.
# Then execs janus, so `bench/janus/start.sh 8188 & pid=$!` gives Janus's own PID.
#
# ICE: Janus never gathers on loopback interfaces (src/ice.c skips IFF_LOOPBACK), so it is
# restricted to one local address of this machine instead: JANUS_ICE_IP, default the source
# address of the default route. Packets to a local address never leave the kernel (they go
# through `lo`), and a client bound to 127.0.0.1 can talk to it.
#
# Environment: JANUS_ICE_IP, JANUS_RTP_PORTS (default 20000-40000), JANUS_DEBUG_LEVEL (default 3),
# JANUS_EVENT_LOOPS (default unset: Janus's default of one thread per handle),
# JANUS_LIB_DIR (default /usr/lib/x86_64-linux-gnu/janus).
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 PORT_WS [DIR]" >&2
    exit 2
fi
port_ws=$1
dir=${2:-$(mktemp -d -t parley-janus.XXXXXX)}
mkdir -p "$dir"

janus_bin=$(command -v janus || true)
if [[ -z $janus_bin ]]; then
    echo "janus is not installed (apt-get install -y janus)" >&2
    exit 1
fi
lib_dir=${JANUS_LIB_DIR:-/usr/lib/$(uname -m)-linux-gnu/janus}
if [[ ! -d $lib_dir/plugins ]]; then
    echo "no Janus plugins in $lib_dir/plugins (set JANUS_LIB_DIR)" >&2
    exit 1
fi

ice_ip=${JANUS_ICE_IP:-}
if [[ -z $ice_ip ]] && command -v ip >/dev/null; then
    ice_ip=$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n1)
fi
if [[ -z $ice_ip ]]; then
    ice_ip=$(hostname -I 2>/dev/null | tr ' ' '\n' | grep -v -e '^127\.' -e ':' -e '^$' | head -n1 || true)
fi
if [[ -z $ice_ip ]]; then
    echo "no non-loopback IPv4 address found for Janus's ICE candidates: set JANUS_ICE_IP" >&2
    exit 1
fi

# Every .so in a folder except the one kept, as a comma-separated "disable" list.
others() {
    local folder=$1 keep=${2:-} list=() f
    for f in "$folder"/*.so; do
        [[ -e $f ]] || continue
        f=$(basename "$f")
        [[ $f == "$keep" ]] || list+=("$f")
    done
    (IFS=,; echo "${list[*]}")
}

cat >"$dir/janus.jcfg" <<JCFG
general: {
	configs_folder = "$dir"
	plugins_folder = "$lib_dir/plugins"
	transports_folder = "$lib_dir/transports"
	events_folder = "$lib_dir/events"
	loggers_folder = "$lib_dir/loggers"
	debug_level = ${JANUS_DEBUG_LEVEL:-3}
	debug_colors = false
	server_name = "parley-bench"
	session_timeout = 60
	${JANUS_EVENT_LOOPS:+event_loops = $JANUS_EVENT_LOOPS}
}
certificates: {
}
media: {
	rtp_port_range = "${JANUS_RTP_PORTS:-20000-40000}"
	ipv6 = false
}
nat: {
	nice_debug = false
	full_trickle = false
	ignore_mdns = true
	ice_enforce_list = "$ice_ip"
}
plugins: {
	disable = "$(others "$lib_dir/plugins" libjanus_videoroom.so)"
}
transports: {
	disable = "$(others "$lib_dir/transports" libjanus_websockets.so)"
}
loggers: {
	disable = "$(others "$lib_dir/loggers")"
}
events: {
	broadcast = false
	disable = "$(others "$lib_dir/events")"
}
JCFG

cat >"$dir/janus.plugin.videoroom.jcfg" <<JCFG
general: {
	events = false
}
JCFG

cat >"$dir/janus.transport.websockets.jcfg" <<JCFG
general: {
	events = false
	json = "compact"
	ws = true
	ws_port = $port_ws
	ws_ip = "127.0.0.1"
	wss = false
}
admin: {
	admin_ws = false
	admin_wss = false
}
JCFG

echo "janus: config in $dir, ws://127.0.0.1:$port_ws, ICE on $ice_ip" >&2
exec "$janus_bin" -C "$dir/janus.jcfg" -F "$dir" -P "$lib_dir/plugins" -o
