//! `floor --listen ADDR`: the benchmark's plain UDP fan-out forwarder (see the library docs).

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;

use parley_floor::{Action, JOIN, Rooms};

const USAGE: &str = "usage: floor --listen ADDR (like 127.0.0.1:9000)\n\n\
A single-threaded UDP fan-out forwarder, the floor of the benchmark. Datagrams start with \
their type: 0x01 + room name joins (acknowledged with 0x01), 0x02 + payload is forwarded \
unchanged to the other members of the sender's room, 0x03 leaves.";

fn main() -> ExitCode {
    let listen = match parse_args(std::env::args().skip(1)) {
        Ok(Some(listen)) => listen,
        Ok(None) => {
            eprintln!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let socket = match UdpSocket::bind(listen) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("floor: cannot bind {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match socket.local_addr() {
        Ok(addr) => eprintln!("floor: listening on {addr}"),
        Err(e) => eprintln!("floor: listening on {listen} ({e})"),
    }
    let mut rooms = Rooms::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("floor: recv: {e}");
                continue;
            }
        };
        let datagram = &buf[..len];
        match rooms.handle(from, datagram) {
            Action::Nothing => {}
            Action::AckJoin => {
                let _ = socket.send_to(&[JOIN], from);
            }
            Action::Forward(to) => {
                for &addr in to {
                    // A member that went away without leaving is not our problem: UDP.
                    let _ = socket.send_to(datagram, addr);
                }
            }
        }
    }
}

/// The address to listen on, or None when help was asked for.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<SocketAddr>, String> {
    let mut listen = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let v = args.next().ok_or("--listen needs an address")?;
                listen = Some(v.parse().map_err(|e| format!("--listen {v}: {e}"))?);
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    listen
        .map(Some)
        .ok_or_else(|| "--listen is required".into())
}
