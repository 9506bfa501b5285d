//! A Parley client in Rust: joins a room over the WebSocket protocol and exchanges real
//! WebRTC media (ICE, DTLS, SRTP via str0m) over UDP. The load-test tool runs many of them.
//!
//! Audio it sends carries the send time and a counter in the payload (an SFU forwards payloads
//! untouched), so receivers measure one-way delay and loss.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// One simulated user.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `ws://host:port/ws`.
    pub url: String,
    pub room: String,
    pub name: String,
    /// Send audio (an unmuted user): 50 packets per second of Opus-sized payloads.
    pub send_audio: bool,
    /// Record per-packet delay (the others only count packets).
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
    /// Packets missing in the senders' counters, seen by this receiver.
    pub lost: u64,
    /// One-way delays in microseconds (when measuring).
    pub delays_us: Vec<u32>,
}

/// Audio payload size: Opus at ~64 kbit/s in 20 ms frames.
const PAYLOAD: usize = 160;
const FRAME: Duration = Duration::from_millis(20);

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Joins, exchanges media until `stop` turns true, leaves; returns what it measured.
pub async fn run(
    cfg: ClientConfig,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<ClientStats> {
    let started = Instant::now();
    let (mut ws, _) = tokio_tungstenite::connect_async(&cfg.url)
        .await
        .with_context(|| format!("connecting to {}", cfg.url))?;
    let server_ip: IpAddr = host_ip(&cfg.url).await?;
    let bind_ip: IpAddr = if server_ip.is_loopback() {
        server_ip
    } else {
        local_ip_towards(server_ip)?
    };
    let socket = UdpSocket::bind(SocketAddr::new(bind_ip, 0)).await?;
    let local = socket.local_addr()?;

    let mut rtc = Rtc::builder().build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp")?);
    let mut api = rtc.sdp_api();
    let audio_mid = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    let (offer, mut pending): (SdpOffer, Option<SdpPendingOffer>) = match api.apply() {
        Some((o, p)) => (o, Some(p)),
        None => bail!("no offer"),
    };

    let mut seq = 0u64;
    let mut last_in = 0u64;
    let send = |msg: Value, seq: &mut u64, last_in: u64| {
        *seq += 1;
        let mut m = msg;
        m["seq"] = json!(*seq);
        m["ack"] = json!(last_in);
        Message::Text(m.to_string().into())
    };
    ws.send(send(
        json!({"type": "join", "room": cfg.room, "name": cfg.name}),
        &mut seq,
        last_in,
    ))
    .await?;
    ws.send(send(
        json!({"type": "offer", "sdp": offer.to_sdp_string()}),
        &mut seq,
        last_in,
    ))
    .await?;

    let mut stats = ClientStats::default();
    let mut counters: HashMap<Mid, u32> = HashMap::new();
    let mut buf = vec![0u8; 2048];
    let mut next_audio = Instant::now();
    let mut audio_count: u32 = 0;
    let mut connected = false;
    let mut timeout;

    loop {
        // Drain str0m's output.
        loop {
            match rtc.poll_output()? {
                Output::Timeout(t) => {
                    timeout = t;
                    break;
                }
                Output::Transmit(t) => {
                    let _ = socket.send_to(&t.contents, t.destination).await;
                }
                Output::Event(e) => match e {
                    Event::Connected if !connected => {
                        connected = true;
                        stats.join = Some(started.elapsed());
                    }
                    Event::MediaData(d) => {
                        stats.rx_packets += 1;
                        if let Some(c) = &cfg.rx_counter {
                            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        if d.data.len() >= 12 {
                            let sent =
                                u64::from_be_bytes(d.data[0..8].try_into().unwrap_or([0; 8]));
                            let count =
                                u32::from_be_bytes(d.data[8..12].try_into().unwrap_or([0; 4]));
                            if cfg.measure {
                                let delay = unix_micros().saturating_sub(sent);
                                stats.delays_us.push(delay.min(u64::from(u32::MAX)) as u32);
                            }
                            if let Some(prev) = counters.insert(d.mid, count)
                                && count > prev + 1
                            {
                                stats.lost += u64::from(count - prev - 1);
                            }
                        }
                    }
                    _ => {}
                },
            }
        }
        if *stop.borrow() {
            break;
        }
        let wait = timeout
            .min(next_audio)
            .saturating_duration_since(Instant::now());
        tokio::select! {
            _ = stop.changed() => {}
            msg = ws.next() => {
                let Some(Ok(msg)) = msg else { bail!("signaling connection closed") };
                let Message::Text(text) = msg else { continue };
                let v: Value = serde_json::from_str(&text)?;
                if let Some(s) = v["seq"].as_u64() {
                    last_in = last_in.max(s);
                }
                match v["type"].as_str() {
                    Some("answer") => {
                        if let (Some(p), Some(sdp)) = (pending.take(), v["sdp"].as_str()) {
                            rtc.sdp_api().accept_answer(p, SdpAnswer::from_sdp_string(sdp)?)?;
                        }
                    }
                    Some("offer") => {
                        let sdp = v["sdp"].as_str().unwrap_or_default();
                        let answer = rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(sdp)?)?;
                        let reply = json!({"type": "answer", "id": v["id"], "sdp": answer.to_sdp_string()});
                        ws.send(send(reply, &mut seq, last_in)).await?;
                    }
                    Some("error") => bail!("Parley refused: {}", v["message"]),
                    _ => {}
                }
                if v["seq"].is_u64() {
                    ws.send(Message::Text(json!({"type": "ack", "ack": last_in}).to_string().into())).await?;
                }
            }
            r = socket.recv_from(&mut buf) => {
                let (n, source) = r?;
                if let Ok(contents) = buf[..n].try_into() {
                    let input = Input::Receive(Instant::now(), Receive {
                        proto: Protocol::Udp, source, destination: local, contents,
                    });
                    rtc.handle_input(input)?;
                }
            }
            _ = tokio::time::sleep(wait) => {
                let now = Instant::now();
                if now >= next_audio {
                    next_audio = now + FRAME;
                    if connected && cfg.send_audio {
                        audio_count += 1;
                        if let Some(w) = rtc.writer(audio_mid) {
                            let pt = w.payload_params().find(|p| p.spec().codec == Codec::Opus).map(|p| p.pt());
                            if let Some(pt) = pt {
                                let mut payload = vec![0u8; PAYLOAD];
                                payload[0..8].copy_from_slice(&unix_micros().to_be_bytes());
                                payload[8..12].copy_from_slice(&audio_count.to_be_bytes());
                                let t = MediaTime::new(u64::from(audio_count) * 960, str0m::media::Frequency::FORTY_EIGHT_KHZ);
                                if w.write(pt, now, t, payload).is_ok() {
                                    stats.tx_packets += 1;
                                }
                            }
                        }
                    }
                }
                rtc.handle_input(Input::Timeout(now))?;
            }
        }
    }
    let _ = ws
        .send(send(json!({"type": "leave"}), &mut seq, last_in))
        .await;
    let _ = ws.close(None).await;
    Ok(stats)
}

async fn host_ip(url: &str) -> anyhow::Result<IpAddr> {
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
        .map(|a| a.ip())
        .with_context(|| format!("no address for {rest}"))
}

/// The local address the kernel uses to reach `ip` (connecting a UDP socket sends nothing).
fn local_ip_towards(ip: IpAddr) -> anyhow::Result<IpAddr> {
    let s = std::net::UdpSocket::bind(SocketAddr::new(
        if ip.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        },
        0,
    ))?;
    s.connect(SocketAddr::new(ip, 9))?;
    Ok(s.local_addr()?.ip())
}
