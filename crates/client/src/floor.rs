//! The floor: `bench/floor`'s plain UDP fan-out, no ICE, no DTLS, no SRTP. Datagrams start
//! with a type byte: `0x01` + room joins (answered by `0x01`), `0x02` is media (forwarded
//! unchanged to the room's other members), `0x03` leaves.
//!
//! Media datagrams: type, sender (u32), stream (u8), counter (u32), then the payload whose
//! last bytes are the send time and counter, as the WebRTC senders stamp them.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::{ClientConfig, ClientStats, unix_micros};

const JOIN: u8 = 0x01;
const MEDIA: u8 = 0x02;
const LEAVE: u8 = 0x03;
const HEADER: usize = 10;
const STAMP: usize = crate::media::STAMP;

/// A stream this user sends: packets of `size` bytes, `per_tick` of them every `interval`.
struct Stream {
    id: u8,
    size: usize,
    per_tick: usize,
    interval: Duration,
    next: Instant,
    counter: u32,
}

pub(crate) async fn run(
    cfg: ClientConfig,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<ClientStats> {
    let started = Instant::now();
    let server: SocketAddr = crate::resolve(&cfg.url).await?;
    let sock = UdpSocket::bind(SocketAddr::new(crate::bind_ip_towards(server.ip())?, 0)).await?;
    sock.connect(server).await?;
    let sender = {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        cfg.name.hash(&mut h);
        h.finish() as u32
    };
    let mut stats = ClientStats::default();
    let mut join = vec![JOIN];
    join.extend_from_slice(cfg.room.as_bytes());
    let mut buf = vec![0u8; 2048];
    // Join (datagrams may be lost: retry until the forwarder acknowledges).
    let deadline = started + Duration::from_secs(10);
    while stats.join.is_none() {
        sock.send(&join).await?;
        match tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await {
            Ok(Ok(n)) if n >= 1 && buf[0] == JOIN => stats.join = Some(started.elapsed()),
            Ok(Err(e)) => return Err(e).context("joining the floor forwarder"),
            _ if Instant::now() > deadline => bail!("the floor forwarder did not answer"),
            _ => {}
        }
    }
    let now = Instant::now();
    let stream = |id, size, per_tick, per_second| Stream {
        id,
        size,
        per_tick,
        interval: Duration::from_secs(1) / per_second,
        next: now,
        counter: 0,
    };
    let mut streams = Vec::new();
    if cfg.send_audio {
        streams.push(stream(0, 160, 1, 50));
    }
    if cfg.send_video {
        // The top camera layer only: the floor forwards everything it gets.
        streams.push(stream(1, 1100, 5, 30));
    }
    if cfg.send_screen {
        streams.push(stream(2, 1100, 12, 15));
    }
    let mut last: HashMap<(u32, u8), u32> = HashMap::new();
    loop {
        if *stop.borrow() {
            break;
        }
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(1);
        for s in &mut streams {
            if now >= s.next {
                s.next += s.interval;
                if s.next < now {
                    s.next = now + s.interval;
                }
                for _ in 0..s.per_tick {
                    s.counter += 1;
                    let mut pkt = vec![0u8; HEADER + s.size];
                    pkt[0] = MEDIA;
                    pkt[1..5].copy_from_slice(&sender.to_be_bytes());
                    pkt[5] = s.id;
                    pkt[6..10].copy_from_slice(&s.counter.to_be_bytes());
                    let at = pkt.len() - STAMP;
                    pkt[at..at + 8].copy_from_slice(&unix_micros().to_be_bytes());
                    pkt[at + 8..].copy_from_slice(&s.counter.to_be_bytes());
                    if sock.send(&pkt).await.is_ok() {
                        stats.tx_packets += 1;
                    }
                }
            }
            wake = wake.min(s.next);
        }
        tokio::select! {
            _ = stop.changed() => {}
            r = sock.recv(&mut buf) => {
                let n = r?;
                if n < HEADER + STAMP || buf[0] != MEDIA {
                    continue;
                }
                stats.rx_packets += 1;
                if let Some(c) = &cfg.rx_counter {
                    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let from = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
                let counter = u32::from_be_bytes([buf[6], buf[7], buf[8], buf[9]]);
                if let Some(prev) = last.insert((from, buf[5]), counter)
                    && counter > prev + 1
                {
                    stats.lost += u64::from(counter - prev - 1);
                }
                if cfg.measure {
                    let at = n - STAMP;
                    let sent = u64::from_be_bytes(buf[at..at + 8].try_into().unwrap_or([0; 8]));
                    let delay = unix_micros().saturating_sub(sent);
                    stats.delays_us.push(delay.min(u64::from(u32::MAX)) as u32);
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    let _ = sock.send(&[LEAVE]).await;
    Ok(stats)
}
