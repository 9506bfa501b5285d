//! The media plane's driver: the one UDP port, the clock and the channels to signaling around
//! the sans-IO [`Sfu`].

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

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

    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let sfu = Sfu::new(SfuConfig {
        candidates: candidates.clone(),
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
                };
                driver.run(cmd_rx).await;
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
fn host_addresses() -> Vec<IpAddr> {
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
}

const BATCH: usize = 32;
const BUF: usize = 2048;

impl Driver {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<MediaCommand>) {
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

    async fn flush(&mut self) {
        while let Some(t) = self.sfu.poll_transmit() {
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
