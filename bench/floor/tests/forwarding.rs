//! The real `floor` binary on loopback: join, fan-out, leave, as the load tester uses it.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running floor, killed on drop.
struct Floor {
    child: Child,
    addr: SocketAddr,
}

impl Floor {
    fn start() -> Floor {
        let mut child = Command::new(env!("CARGO_BIN_EXE_floor"))
            .args(["--listen", "127.0.0.1:0"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start floor");
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut line = String::new();
        BufReader::new(stderr)
            .read_line(&mut line)
            .expect("read floor's first line");
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Floor { child, addr }
    }

    fn client(&self) -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind client");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("set timeout");
        s.connect(self.addr).expect("connect");
        s
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn recv(s: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

fn join(s: &UdpSocket, room: &str) {
    let mut msg = vec![0x01];
    msg.extend_from_slice(room.as_bytes());
    s.send(&msg).expect("send join");
    assert_eq!(recv(s).as_deref(), Some(&[0x01][..]), "join acknowledged");
}

#[test]
fn media_reaches_every_other_member_of_the_room_unchanged() {
    let floor = Floor::start();
    let (a, b, c, other) = (
        floor.client(),
        floor.client(),
        floor.client(),
        floor.client(),
    );
    for s in [&a, &b, &c] {
        join(s, "lt-0");
    }
    join(&other, "lt-1");
    join(&a, "lt-0"); // idempotent

    let media = [0x02, 0x80, 0x6f, 0x00, 0x01, 0xde, 0xad, 0xbe, 0xef];
    a.send(&media).expect("send media");
    assert_eq!(recv(&b).as_deref(), Some(&media[..]));
    assert_eq!(recv(&c).as_deref(), Some(&media[..]));
    assert_eq!(recv(&a), None, "the sender gets nothing back");
    assert_eq!(recv(&other), None, "another room gets nothing");

    c.send(&[0x03]).expect("send leave");
    b.send(&[0x02, 7]).expect("send media");
    assert_eq!(recv(&a).as_deref(), Some(&[0x02, 7][..]));
    assert_eq!(recv(&c), None, "a member who left gets nothing");

    // Junk and media from outside any room are ignored, and the floor keeps serving.
    c.send(&[0x02, 9]).expect("send");
    c.send(&[0x7f]).expect("send");
    c.send(&[]).expect("send");
    assert_eq!(recv(&a), None);
    assert_eq!(recv(&b), None);
    join(&c, "lt-1");
    other.send(&[0x02, 1]).expect("send");
    assert_eq!(recv(&c).as_deref(), Some(&[0x02, 1][..]));
}
