#!/usr/bin/env python3
"""Smoke check of a Janus started by bench/janus/start.sh (python3 standard library only).

    bench/janus/check.py ws://127.0.0.1:PORT_WS [-v]

Speaks the Janus WebSocket API (subprotocol janus-protocol): creates a session, attaches the
VideoRoom plugin, creates a room, checks the errors the load-test adapter relies on (426 for a
missing room, 427 for a room created twice, 428 for a feed that is not publishing), joins as a
publisher, publishes with an SDP offer (audio + video, all candidates in the SDP,
"trickle": false) and checks that Janus answers with its candidates and end-of-candidates in
the SDP, then runs ICE connectivity checks both ways between a UDP socket of its own (on
CHECK_ICE_IP, default the source address of the default route, like start.sh) and Janus's
candidate. No DTLS, no media. Exits non-zero on any surprise. With -v every message is printed
to stderr. CHECK_ICE_IP=127.0.0.1 shows that Janus does not talk ICE with a 127.0.0.1 peer.
"""

import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import time
import zlib
from urllib.parse import urlparse

VERBOSE = "-v" in sys.argv


class WebSocket:
    """A minimal RFC 6455 client: text frames, masking, ping/pong, no extensions."""

    def __init__(self, url, protocol):
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port or 80), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (
            f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
        )
        self.sock.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise RuntimeError("connection closed during the handshake")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise RuntimeError(f"handshake refused: {head.decode(errors='replace')}")
        if protocol.encode() not in head:
            raise RuntimeError("server did not accept the subprotocol")

    def _read(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise RuntimeError("connection closed")
            buf += chunk
        return buf

    def _send_frame(self, opcode, payload):
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + body)

    def send(self, obj):
        if VERBOSE:
            print(">>", json.dumps(obj)[:300], file=sys.stderr)
        self._send_frame(0x1, json.dumps(obj).encode())

    def recv(self):
        data = b""
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise RuntimeError("server closed the WebSocket")
            data += payload
            if b0 & 0x80:
                msg = json.loads(data)
                if VERBOSE:
                    print("<<", json.dumps(msg)[:300], file=sys.stderr)
                return msg


class Janus:
    def __init__(self, url):
        self.ws = WebSocket(url, "janus-protocol")
        self.n = 0
        self.events = []  # messages that were not the awaited one, in order

    def request(self, msg, until=("success", "error")):
        """Sends msg with a fresh transaction; returns the first reply of that transaction
        whose "janus" is in `until` (an "ack" is skipped unless asked for)."""
        self.n += 1
        tx = f"t{self.n}"
        self.ws.send({**msg, "transaction": tx})
        while True:
            m = self.ws.recv()
            if m.get("transaction") == tx and m.get("janus") in until:
                return m
            self.events.append(m)


def fail(why, msg=None):
    print(f"FAIL: {why}" + (f"\n{json.dumps(msg, indent=1)}" if msg else ""), file=sys.stderr)
    sys.exit(1)


def plugin_data(m):
    return m.get("plugindata", {}).get("data", {})


MY_UFRAG = "abcd"
MY_PWD = "abcdefghijklmnopqrstuvwx"
OFFER_TEMPLATE = "\r\n".join([
    "v=0",
    "o=- 1 1 IN IP4 127.0.0.1",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0 1",
    "a=msid-semantic: WMS",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111",
    "c=IN IP4 127.0.0.1",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=candidate:1 1 udp 2130706431 {ip} {port} typ host",
    "a=end-of-candidates",
    "a=ice-ufrag:" + MY_UFRAG,
    "a=ice-pwd:" + MY_PWD,
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32),
    "a=setup:actpass",
    "a=mid:0",
    "a=sendonly",
    "a=rtcp-mux",
    "a=rtpmap:111 opus/48000/2",
    "a=fmtp:111 minptime=10;useinbandfec=1",
    "a=ssrc:1111 cname:check",
    "m=video 9 UDP/TLS/RTP/SAVPF 96",
    "c=IN IP4 127.0.0.1",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=ice-ufrag:" + MY_UFRAG,
    "a=ice-pwd:" + MY_PWD,
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32),
    "a=setup:actpass",
    "a=mid:1",
    "a=sendonly",
    "a=rtcp-mux",
    "a=rtpmap:96 VP8/90000",
    "a=rtcp-fb:96 nack",
    "a=rtcp-fb:96 nack pli",
    "a=ssrc:2222 cname:check",
    "",
])


def stun_request(username, pwd, tx):
    """A STUN Binding request as an ICE controlling agent would send it (RFC 8445 / 5389)."""
    def attr(t, v):
        return struct.pack("!HH", t, len(v)) + v + b"\0" * (-len(v) % 4)
    attrs = attr(0x0006, username.encode())           # USERNAME
    attrs += attr(0x0024, struct.pack("!I", 1862270719))  # PRIORITY
    attrs += attr(0x802A, os.urandom(8))              # ICE-CONTROLLING
    attrs += attr(0x0025, b"")                        # USE-CANDIDATE
    head = struct.pack("!HHI", 0x0001, len(attrs) + 24, 0x2112A442) + tx
    mac = hmac.new(pwd.encode(), head + attrs, hashlib.sha1).digest()
    attrs += attr(0x0008, mac)                        # MESSAGE-INTEGRITY
    head = struct.pack("!HHI", 0x0001, len(attrs) + 8, 0x2112A442) + tx
    crc = (zlib.crc32(head + attrs) ^ 0x5354554E) & 0xFFFFFFFF
    attrs += attr(0x8028, struct.pack("!I", crc))     # FINGERPRINT
    return head + attrs


def ice_check(udp, answer):
    """Both directions of ICE between our socket and Janus's candidate: Janus's own
    connectivity checks must reach us, and our Binding request must get a success."""
    lines = answer.split("\r\n")
    ufrag = next(l[len("a=ice-ufrag:"):] for l in lines if l.startswith("a=ice-ufrag:"))
    pwd = next(l[len("a=ice-pwd:"):] for l in lines if l.startswith("a=ice-pwd:"))
    c = next(l for l in lines if l.startswith("a=candidate:")).split()
    janus_addr = (c[4], int(c[5]))
    tx = os.urandom(12)
    udp.settimeout(0.2)
    got_check = got_response = False
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (got_check and got_response):
        if not got_response:
            udp.sendto(stun_request(f"{ufrag}:{MY_UFRAG}", pwd, tx), janus_addr)
        try:
            data, src = udp.recvfrom(2048)
        except socket.timeout:
            continue
        if len(data) < 20:
            continue
        kind, = struct.unpack("!H", data[:2])
        if VERBOSE:
            print(f"<< udp {kind:#06x} from {src}", file=sys.stderr)
        if kind == 0x0001 and src == janus_addr:
            got_check = True   # Janus's check (we do not answer it; its integrity is ours)
        elif kind == 0x0101 and data[8:20] == tx:
            got_response = True
    if not got_check:
        fail(f"no ICE connectivity check from Janus's {janus_addr} reached {udp.getsockname()}")
    if not got_response:
        fail(f"no STUN success response from Janus's {janus_addr} to {udp.getsockname()}")
    return janus_addr


def default_route_ip():
    """The source address of the default route, as start.sh picks for Janus (nothing is sent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("1.1.1.1", 9))
    return s.getsockname()[0]


def main():
    args = [a for a in sys.argv[1:] if a != "-v"]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    j = Janus(args[0])
    t0 = time.monotonic()

    m = j.request({"janus": "create"})
    if m["janus"] != "success":
        fail("create session", m)
    session = m["data"]["id"]

    m = j.request({"janus": "attach", "session_id": session, "plugin": "janus.plugin.videoroom"})
    if m["janus"] != "success":
        fail("attach videoroom", m)
    handle = m["data"]["id"]

    def msg(body, jsep=None, until=("success", "error", "event")):
        req = {"janus": "message", "session_id": session, "handle_id": handle, "body": body}
        if jsep:
            req["jsep"] = jsep
        return j.request(req, until)

    room = 4_000_000 + os.getpid()

    # Asynchronous request ("join"): an "ack", then an "event" with the same transaction.
    m = msg({"request": "join", "ptype": "publisher", "room": room, "display": "check"})
    if plugin_data(m).get("error_code") != 426:
        fail("join of a missing room should fail with 426", m)

    # Synchronous request ("create"): a "success" carrying plugindata.
    m = msg({"request": "create", "room": room, "publishers": 100, "description": "check"})
    if plugin_data(m).get("videoroom") != "created":
        fail("create room", m)
    m = msg({"request": "create", "room": room, "publishers": 100})
    if m["janus"] != "success" or plugin_data(m).get("error_code") != 427:
        fail("second create of the same room should be a success with error_code 427", m)

    m = msg({"request": "join", "ptype": "publisher", "room": room, "display": "check"})
    d = plugin_data(m)
    if m["janus"] != "event" or d.get("videoroom") != "joined":
        fail("join as publisher", m)
    my_id = d["id"]

    m = msg({"request": "listparticipants", "room": room})
    if plugin_data(m).get("videoroom") != "participants":
        fail("listparticipants", m)

    # Subscribing to a feed that has no PeerConnection yet fails with 428.
    m = j.request({"janus": "attach", "session_id": session, "plugin": "janus.plugin.videoroom"})
    sub_handle = m["data"]["id"]
    m = j.request({"janus": "message", "session_id": session, "handle_id": sub_handle,
                   "body": {"request": "join", "ptype": "subscriber", "room": room,
                            "streams": [{"feed": my_id}]}}, ("event", "error"))
    if plugin_data(m).get("error_code") != 428:
        fail("subscribing to a feed that is not publishing should fail with 428", m)

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((os.environ.get("CHECK_ICE_IP") or default_route_ip(), 0))
    offer = OFFER_TEMPLATE.replace("{port}", str(udp.getsockname()[1])).replace("{ip}", udp.getsockname()[0])
    m = msg({"request": "publish"}, {"type": "offer", "sdp": offer, "trickle": False})
    d = plugin_data(m)
    if m["janus"] != "event" or d.get("configured") != "ok" or "jsep" not in m:
        fail("publish with an offer", m)
    answer = m["jsep"]["sdp"]
    cands = [line for line in answer.split("\r\n") if line.startswith("a=candidate:")]
    if m["jsep"]["type"] != "answer" or not cands or "a=end-of-candidates" not in answer:
        fail("the answer should carry Janus's candidates and end-of-candidates", m)

    janus_addr = ice_check(udp, answer)

    m = j.request({"janus": "keepalive", "session_id": session}, ("ack", "error"))
    if m["janus"] != "ack":
        fail("keepalive", m)

    m = msg({"request": "destroy", "room": room})
    if plugin_data(m).get("videoroom") != "destroyed":
        fail("destroy room", m)
    m = j.request({"janus": "destroy", "session_id": session})
    if m["janus"] != "success":
        fail("destroy session", m)

    print(f"ok: create/attach/create room/join/publish/ICE in "
          f"{(time.monotonic() - t0) * 1000:.0f} ms; ICE checks both ways between "
          f"{udp.getsockname()[0]}:{udp.getsockname()[1]} and Janus's candidate {janus_addr[0]}:{janus_addr[1]}")


if __name__ == "__main__":
    main()
