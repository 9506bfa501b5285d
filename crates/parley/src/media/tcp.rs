//! ICE-TCP (RFC 6544) on the media port: each connection carries STUN, DTLS and SRTP packets,
//! each preceded by its 16-bit length (RFC 4571).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Largest frame accepted; media packets are about an MTU.
const MAX_FRAME: usize = 8 * 1024;
/// Packets waiting to be written to one connection; more are dropped, as UDP would.
const WRITE_QUEUE: usize = 1024;

pub enum Event {
    Open(SocketAddr, Conn),
    Frame(SocketAddr, Vec<u8>),
    Closed(SocketAddr),
}

/// A media worker's handle to one connection.
#[derive(Clone)]
pub struct Conn {
    pub local: SocketAddr,
    tx: mpsc::Sender<Vec<u8>>,
}

impl Conn {
    pub fn send(&self, packet: &[u8]) {
        let Ok(len) = u16::try_from(packet.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(packet.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(packet);
        if self.tx.try_send(framed).is_err() {
            tracing::trace!("ICE-TCP write queue full; packet dropped");
        }
    }
}

pub async fn accept(listener: TcpListener, events: mpsc::Sender<Event>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(err) => {
                tracing::debug!(%err, "ICE-TCP accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        if events
            .send(Event::Open(peer, Conn { local, tx }))
            .await
            .is_err()
        {
            return;
        }
        tokio::spawn(serve(stream, peer, rx, events.clone()));
    }
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    mut outgoing: mpsc::Receiver<Vec<u8>>,
    events: mpsc::Sender<Event>,
) {
    let (mut reader, mut writer) = stream.into_split();
    let writes = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if writer.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let mut len = [0u8; 2];
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        if reader.read_exact(&mut len).await.is_err() {
            break;
        }
        let n = usize::from(u16::from_be_bytes(len));
        if n == 0 || n > MAX_FRAME {
            tracing::debug!(%peer, n, "ICE-TCP frame of a bad size; closing");
            break;
        }
        if reader.read_exact(&mut buf[..n]).await.is_err() {
            break;
        }
        if events
            .send(Event::Frame(peer, buf[..n].to_vec()))
            .await
            .is_err()
        {
            break;
        }
    }
    writes.abort();
    let _ = events.send(Event::Closed(peer)).await;
}
