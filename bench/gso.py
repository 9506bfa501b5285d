#!/usr/bin/env python3
"""The kernel's cost of sending a video frame's packets to many viewers on loopback: one
datagram per sendto, against one message of segments per viewer (UDP GSO, as Parley's media
driver sends a frame's packets to one viewer). Prints the system CPU time per datagram of each,
alternating, from getrusage; the receivers are plain sockets (no GRO) drained in between, as
Parley's viewers are.

    python3 bench/gso.py [--viewers 29] [--segments 13] [--size 1100] [--frames 2000]
"""
import argparse
import resource
import socket
import struct

UDP_SEGMENT = 103  # linux/udp.h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--viewers", type=int, default=29)
    ap.add_argument("--segments", type=int, default=13, help="packets per frame")
    ap.add_argument("--size", type=int, default=1100, help="bytes per packet")
    ap.add_argument("--frames", type=int, default=2000)
    args = ap.parse_args()

    rx = []
    for _ in range(args.viewers):
        r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r.bind(("127.0.0.1", 0))
        r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        r.setblocking(False)
        rx.append(r)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    addrs = [r.getsockname() for r in rx]
    payload = b"x" * args.size
    control = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("H", args.size))]

    def drain():
        for r in rx:
            try:
                while True:
                    r.recv(65536)
            except BlockingIOError:
                pass

    def run(gso):
        drain()
        sys_time = 0.0
        for f in range(args.frames):
            t0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
            for a in addrs:
                if gso:
                    tx.sendmsg([payload] * args.segments, control, 0, a)
                else:
                    for _ in range(args.segments):
                        tx.sendto(payload, a)
            sys_time += resource.getrusage(resource.RUSAGE_SELF).ru_stime - t0
            if f % 10 == 9:
                drain()
        drain()
        return sys_time / (args.frames * args.viewers * args.segments) * 1e6

    results = {"plain": [], "gso": []}
    for gso in (False, True, False, True):
        results["gso" if gso else "plain"].append(run(gso))
    for name, values in results.items():
        print(f"{name:5} sys µs per datagram: " + ", ".join(f"{v:.2f}" for v in values))
    plain = sum(results["plain"]) / 2
    gso = sum(results["gso"]) / 2
    print(f"gso / plain: {gso / plain:.2f}")


if __name__ == "__main__":
    main()
