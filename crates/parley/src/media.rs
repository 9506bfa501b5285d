//! The media plane's driver: the one UDP port, the clock and the channels to signaling around
//! the sans-IO [`Sfu`].

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use parley_proto::media::{MediaCommand, MediaEvent};
use parley_sfu::{Sfu, SfuConfig};
use quinn_udp::{RecvMeta, UdpSocketState};
use str0m::net::Protocol;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Handle to a running media plane.
pub struct MediaPlane {
    pub commands: mpsc::UnboundedSender<MediaCommand>,
    pub events: mpsc::UnboundedReceiver<MediaEvent>,
}

/// Binds the media port and starts the media plane on its own thread.
pub fn start(
    bind: SocketAddr,
    public_ips: &[IpAddr],
    metrics: Arc<Metrics>,
) -> anyhow::Result<MediaPlane> {
    let std_sock = std::net::UdpSocket::bind(bind)
        .with_context(|| format!("binding the media port {bind} (UDP)"))?;
    std_sock.set_nonblocking(true)?;
    let local_addr = std_sock.local_addr()?;
    let state = UdpSocketState::new((&std_sock).into()).context("configuring the media socket")?;

    let ips: Vec<IpAddr> = if public_ips.is_empty() {
        host_addresses()
    } else {
        public_ips.to_vec()
    };
    let candidates: Vec<SocketAddr> = ips
        .iter()
        .map(|ip| SocketAddr::new(*ip, local_addr.port()))
        .collect();
    tracing::info!(port = local_addr.port(), ?candidates, "media port ready");

    // ICE-TCP on the same port, for networks that block UDP.
    let tcp_listener =
        std::net::TcpListener::bind(SocketAddr::new(bind.ip(), local_addr.port()))
            .with_context(|| format!("binding the media port {} (TCP)", local_addr.port()))?;
    tcp_listener.set_nonblocking(true)?;

    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let sfu = Sfu::new(SfuConfig {
        candidates: candidates.clone(),
        tcp: true,
    });
    let driver_candidates = candidates;
    std::thread::Builder::new()
        .name("media".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    tracing::error!(%err, "cannot start the media runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let sock = match UdpSocket::from_std(std_sock) {
                    Ok(s) => s,
                    Err(err) => {
                        tracing::error!(%err, "cannot register the media socket");
                        return;
                    }
                };
                let (tcp_tx, tcp_rx) = mpsc::channel(TCP_QUEUE);
                match tokio::net::TcpListener::from_std(tcp_listener) {
                    Ok(l) => {
                        tokio::spawn(tcp::accept(l, tcp_tx));
                    }
                    Err(err) => tracing::error!(%err, "cannot register the media TCP listener"),
                }
                let driver = Driver {
                    sfu,
                    sock,
                    state,
                    local_ips: driver_candidates
                        .iter()
                        .map(|c| c.ip())
                        .filter(|ip| std::net::UdpSocket::bind((*ip, 0)).is_ok())
                        .collect(),
                    candidates: driver_candidates,
                    local_addr,
                    events: ev_tx,
                    metrics,
                    tcp_conns: HashMap::new(),
                };
                driver.run(cmd_rx, tcp_rx).await;
            });
        })
        .context("starting the media thread")?;

    Ok(MediaPlane {
        commands: cmd_tx,
        events: ev_rx,
    })
}

/// The addresses of this host that browsers can reach: the one of the default route, and
/// loopback for clients on this machine.
pub fn host_addresses() -> Vec<IpAddr> {
    let mut ips = Vec::new();
    // Connecting a UDP socket sends nothing; it only asks the kernel for the route's source.
    if let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0")
        && s.connect("192.0.2.1:9").is_ok()
        && let Ok(addr) = s.local_addr()
        && !addr.ip().is_loopback()
        && !addr.ip().is_unspecified()
    {
        ips.push(addr.ip());
    }
    ips.push(IpAddr::from([127, 0, 0, 1]));
    ips
}

struct Driver {
    sfu: Sfu,
    sock: UdpSocket,
    state: UdpSocketState,
    candidates: Vec<SocketAddr>,
    /// Candidate addresses that are this host's own, so replies can be sent from them.
    local_ips: Vec<IpAddr>,
    local_addr: SocketAddr,
    events: mpsc::UnboundedSender<MediaEvent>,
    metrics: Arc<Metrics>,
    /// ICE-TCP connections by the peer's address.
    tcp_conns: HashMap<SocketAddr, tcp::Conn>,
}

/// Frames from ICE-TCP connections waiting for the media loop.
const TCP_QUEUE: usize = 4096;

const BATCH: usize = 32;
const BUF: usize = 2048;

impl Driver {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<MediaCommand>,
        mut tcp_events: mpsc::Receiver<tcp::Event>,
    ) {
        let mut bufs = vec![[0u8; BUF]; BATCH];
        let mut metas = vec![RecvMeta::default(); BATCH];
        let mut export = tokio::time::interval(Duration::from_secs(1));
        loop {
            let timeout = self
                .sfu
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    self.sfu.handle_command(cmd, Instant::now());
                }
                ready = self.sock.readable() => {
                    if let Err(err) = ready {
                        tracing::error!(%err, "media socket failed");
                        break;
                    }
                    self.receive(&mut bufs, &mut metas);
                }
                _ = tokio::time::sleep_until(timeout.into()) => {
                    self.sfu.handle_timeout(Instant::now());
                }
                Some(ev) = tcp_events.recv() => self.tcp_event(ev),
                _ = export.tick() => {
                    let samples = self.sfu.drain_samples();
                    self.metrics
                        .export_media(self.sfu.session_count(), self.sfu.stats(), &samples);
                }
            }
            self.flush().await;
        }
        tracing::info!("media plane stopped");
    }

    fn receive(&mut self, bufs: &mut [[u8; BUF]], metas: &mut [RecvMeta]) {
        loop {
            let mut slices: Vec<IoSliceMut<'_>> = bufs
                .iter_mut()
                .map(|b| IoSliceMut::new(&mut b[..]))
                .collect();
            let res = self.sock.try_io(Interest::READABLE, || {
                self.state.recv((&self.sock).into(), &mut slices, metas)
            });
            let n = match res {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) => {
                    // ICMP errors and the like surface here; they concern one peer only.
                    tracing::debug!(%err, "media recv error");
                    return;
                }
            };
            let now = Instant::now();
            for (meta, buf) in metas.iter().zip(slices.iter()).take(n) {
                let destination = self.destination(meta.dst_ip);
                let stride = meta.stride.max(1);
                for chunk in buf[..meta.len].chunks(stride) {
                    self.sfu
                        .handle_datagram(now, Protocol::Udp, meta.addr, destination, chunk);
                }
            }
        }
    }

    /// The candidate address a datagram was sent to.
    fn destination(&self, dst_ip: Option<IpAddr>) -> SocketAddr {
        if let Some(ip) = dst_ip
            && let Some(c) = self.candidates.iter().find(|c| c.ip() == ip)
        {
            return *c;
        }
        // Behind a 1:1 NAT the packet's destination is a private address: use the public one.
        self.candidates.first().copied().unwrap_or(self.local_addr)
    }

    fn tcp_event(&mut self, ev: tcp::Event) {
        match ev {
            tcp::Event::Open(peer, conn) => {
                tracing::debug!(%peer, "ICE-TCP connection");
                self.tcp_conns.insert(peer, conn);
            }
            tcp::Event::Frame(peer, frame) => {
                let Some(local_ip) = self.tcp_conns.get(&peer).map(|c| c.local.ip()) else {
                    return;
                };
                let destination = self.destination(Some(local_ip));
                self.sfu
                    .handle_datagram(Instant::now(), Protocol::Tcp, peer, destination, &frame);
            }
            tcp::Event::Closed(peer) => {
                self.tcp_conns.remove(&peer);
            }
        }
    }

    async fn flush(&mut self) {
        while let Some(t) = self.sfu.poll_transmit() {
            if t.proto == Protocol::Tcp {
                match self.tcp_conns.get(&t.destination) {
                    Some(conn) => conn.send(&t.contents),
                    None => tracing::trace!(dest = %t.destination, "no ICE-TCP connection"),
                }
                continue;
            }
            // Reply from the address the peer sent to: a browser matches responses by it.
            let src_ip = Some(t.source.ip()).filter(|ip| self.local_ips.contains(ip));
            let transmit = quinn_udp::Transmit {
                destination: t.destination,
                ecn: None,
                contents: &t.contents,
                segment_size: None,
                src_ip,
            };
            loop {
                let res = self.sock.try_io(Interest::WRITABLE, || {
                    self.state.try_send((&self.sock).into(), &transmit)
                });
                match res {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if self.sock.writable().await.is_err() {
                            break;
                        }
                    }
                    Err(err) => {
                        tracing::debug!(%err, dest = %t.destination, "media send error");
                        break;
                    }
                }
            }
        }
        while let Some(ev) = self.sfu.poll_event() {
            if self.events.send(ev).is_err() {
                return;
            }
        }
    }
}

/// ICE-TCP (RFC 6544) on the media port: each connection carries STUN, DTLS and SRTP packets,
/// each preceded by its 16-bit length (RFC 4571).
mod tcp {
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

    /// The media loop's handle to one connection.
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
}
