//! A load-test client in Rust: one simulated user that joins a call on a server and exchanges
//! real WebRTC media (ICE, DTLS, SRTP via str0m) over UDP. `parley lt` runs many of them.
//!
//! Adapters speak each server's signaling: Parley's JSON protocol ([`Target::Parley`]), Janus's
//! VideoRoom over its WebSocket API ([`Target::Janus`]), and the plain UDP fan-out floor of
//! `bench/floor` ([`Target::Floor`], no WebRTC at all). Every packet a user sends carries its
//! send time and a counter at the end of the payload (servers forward payloads untouched), so
//! receivers measure one-way delay; loss comes from gaps in the RTP sequence numbers.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::watch;

mod floor;
mod janus;
mod media;
mod parley;

/// Which server the user talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Parley,
    Janus,
    Floor,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "parley" => Ok(Target::Parley),
            "janus" => Ok(Target::Janus),
            "floor" => Ok(Target::Floor),
            other => Err(format!("unknown target {other:?} (parley, janus or floor)")),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Parley => "parley",
            Target::Janus => "janus",
            Target::Floor => "floor",
        })
    }
}

/// One simulated user.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub target: Target,
    /// `ws://host:port/ws` (Parley), `ws://host:port` (Janus), `udp://host:port` (floor).
    pub url: String,
    pub room: String,
    /// Numbered rooms for servers that want numbers (Janus).
    pub room_number: u64,
    pub name: String,
    /// Send audio (an unmuted user): 50 packets per second of Opus-sized payloads.
    pub send_audio: bool,
    /// Send camera video in three simulcast layers (VP8, 30 fps, ~1.8 Mbit/s in all).
    pub send_video: bool,
    /// Share a screen (VP8, ~1.6 Mbit/s, 15 fps, a keyframe every 3 s).
    pub send_screen: bool,
    /// Record per-packet delay (the others only count).
    pub measure: bool,
    /// Packets received, summed over all users as they arrive (for progress and rates).
    pub rx_counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

/// What one user saw.
#[derive(Debug, Clone, Default)]
pub struct ClientStats {
    /// From starting to join until media was connected (ICE and DTLS up).
    pub join: Option<Duration>,
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// Packets missing in the received sequence numbers.
    pub lost: u64,
    /// One-way delays in microseconds (when measuring).
    pub delays_us: Vec<u32>,
}

pub(crate) fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Joins, exchanges media until `stop` turns true, leaves; returns what it measured.
pub async fn run(cfg: ClientConfig, stop: watch::Receiver<bool>) -> anyhow::Result<ClientStats> {
    match cfg.target {
        Target::Parley => parley::run(cfg, stop).await,
        Target::Janus => janus::run(cfg, stop).await,
        Target::Floor => floor::run(cfg, stop).await,
    }
}

/// The host and port of a URL like `ws://host:port/path`.
pub(crate) async fn resolve(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .split_once("://")
        .map_or(url, |(_, r)| r)
        .split('/')
        .next()
        .unwrap_or_default();
    let mut addrs = tokio::net::lookup_host(rest)
        .await
        .with_context(|| format!("resolving {rest}"))?;
    addrs
        .next()
        .with_context(|| format!("no address for {rest}"))
}

/// The local address to bind media to for reaching `server`.
pub(crate) fn bind_ip_towards(server: IpAddr) -> anyhow::Result<IpAddr> {
    if server.is_loopback() {
        return Ok(server);
    }
    // Connecting a UDP socket sends nothing; it only asks the kernel for the route's source.
    let s = std::net::UdpSocket::bind(SocketAddr::new(
        if server.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        },
        0,
    ))?;
    s.connect(SocketAddr::new(server, 9))?;
    Ok(s.local_addr()?.ip())
}
