//! The WebRTC side of a simulated user, whatever server it talks to: str0m peers in RTP mode
//! on one UDP socket, synthetic senders (audio, simulcast camera, screen share) that stamp the
//! send time into every packet, and receivers that check sequence continuity and delay.
//!
//! The signaling adapters (Parley, Janus) run beside it and talk to it through [`SigEvent`]
//! and [`SigCmd`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequest, MediaKind, Mid, Rid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{RtpWrite, Ssrc};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::{ClientConfig, ClientStats, unix_micros};

/// Signaling → media.
#[derive(Debug)]
pub(crate) enum SigEvent {
    /// The server's answer to our offer on `peer`.
    Answer { peer: usize, sdp: String },
    /// The server offers on `peer` (a new peer is created for it if needed); `tag` comes back
    /// with the answer.
    Offer {
        peer: usize,
        sdp: String,
        tag: Value,
    },
    /// The server refused us.
    Fatal(String),
}

/// Media → signaling.
#[derive(Debug)]
pub(crate) enum SigCmd {
    /// Our offer for `peer`; `screen_mid` is the screen share's mid, if any.
    Offer {
        peer: usize,
        sdp: String,
        screen_mid: Option<String>,
    },
    Answer {
        peer: usize,
        sdp: String,
        tag: Value,
    },
}

/// Bytes at the end of every payload: send time (µs since the epoch) and a counter.
pub(crate) const STAMP: usize = 12;
/// Audio payload size: Opus at ~64 kbit/s in 20 ms frames.
const AUDIO_PAYLOAD: usize = 160;
const AUDIO_FRAME: Duration = Duration::from_millis(20);
/// Video packets carry at most this much payload.
const VIDEO_MTU: usize = 1100;

/// Simulcast layers of a camera: rid, width, height, bits per second (30 fps each).
const CAMERA_LAYERS: [(&str, u16, u16, u32); 3] = [
    ("q", 320, 180, 150_000),
    ("h", 640, 360, 450_000),
    ("f", 1280, 720, 1_200_000),
];
/// A screen share: 1920×1080 at ~1.6 Mbit/s, 15 fps, a keyframe every 3 s.
const SCREEN: (u16, u16, u32) = (1920, 1080, 1_600_000);
const SCREEN_FPS: u32 = 15;
const SCREEN_KEYFRAME_EVERY: Duration = Duration::from_secs(3);
const CAMERA_FPS: u32 = 30;
/// Keyframes asked for by the server come at most this often per stream.
const KEYFRAME_THROTTLE: Duration = Duration::from_millis(300);

/// One synthetic outgoing stream.
struct Sender {
    peer: usize,
    mid: Mid,
    rid: Option<Rid>,
    kind: MediaKind,
    /// Bytes per frame (video) or per packet (audio).
    frame_bytes: usize,
    interval: Duration,
    width: u16,
    height: u16,
    periodic_keyframe: Option<Duration>,
    next: Instant,
    seq: u64,
    frames: u32,
    picture_id: u16,
    keyframe_wanted: bool,
    last_keyframe: Option<Instant>,
}

impl Sender {
    fn audio(peer: usize, mid: Mid, now: Instant) -> Self {
        Sender {
            peer,
            mid,
            rid: None,
            kind: MediaKind::Audio,
            frame_bytes: AUDIO_PAYLOAD,
            interval: AUDIO_FRAME,
            width: 0,
            height: 0,
            periodic_keyframe: None,
            next: now,
            seq: 1,
            frames: 0,
            picture_id: 0,
            keyframe_wanted: false,
            last_keyframe: None,
        }
    }

    fn video(
        peer: usize,
        mid: Mid,
        rid: Option<Rid>,
        (width, height, bps): (u16, u16, u32),
        fps: u32,
        now: Instant,
    ) -> Self {
        Sender {
            peer,
            mid,
            rid,
            kind: MediaKind::Video,
            frame_bytes: (bps / 8 / fps) as usize,
            interval: Duration::from_secs(1) / fps,
            width,
            height,
            periodic_keyframe: None,
            next: now,
            seq: 1,
            frames: 0,
            picture_id: 0,
            keyframe_wanted: true,
            last_keyframe: None,
        }
    }

    /// Writes one frame if it is due, counting its packets in `stats`.
    fn tick(&mut self, rtc: &mut Rtc, now: Instant, stats: &mut ClientStats) {
        if now < self.next {
            return;
        }
        self.next += self.interval;
        if self.next < now {
            // Fell behind (a busy machine): skip rather than burst.
            self.next = now + self.interval;
        }
        self.frames += 1;
        let codec = if self.kind == MediaKind::Audio {
            Codec::Opus
        } else {
            Codec::Vp8
        };
        let Some(pt) = rtc
            .codec_config()
            .iter()
            .find(|p| p.spec().codec == codec)
            .map(|p| p.pt())
        else {
            return;
        };
        let stamp_count = self.frames;
        let mut api = rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(self.mid, self.rid) else {
            return;
        };
        if self.kind == MediaKind::Audio {
            let mut payload = vec![0u8; self.frame_bytes];
            stamp(&mut payload, stamp_count);
            let time = self.frames.wrapping_mul(960);
            tx.write_rtp(RtpWrite::new(pt, self.seq.into(), time, now, payload).marker(false));
            self.seq += 1;
            stats.tx_packets += 1;
            return;
        }
        let periodic = self
            .periodic_keyframe
            .is_some_and(|every| self.last_keyframe.is_none_or(|t| now - t >= every));
        let keyframe = self.keyframe_wanted || periodic;
        if keyframe {
            self.keyframe_wanted = false;
            self.last_keyframe = Some(now);
        }
        let size = if keyframe {
            self.frame_bytes * 3
        } else {
            self.frame_bytes
        };
        // The VP8 frame: a frame tag (bit 0 clear for a keyframe, show_frame set), and for a
        // keyframe the start code and the picture size; the rest is filler.
        let mut frame = vec![0u8; size.max(16)];
        frame[0] = if keyframe { 0x10 } else { 0x11 };
        if keyframe {
            frame[3..6].copy_from_slice(&[0x9d, 0x01, 0x2a]);
            frame[6..8].copy_from_slice(&self.width.to_le_bytes());
            frame[8..10].copy_from_slice(&self.height.to_le_bytes());
        }
        let step = (90_000.0 * self.interval.as_secs_f64()) as u32;
        let time = self.frames.wrapping_mul(step);
        let chunk = VIDEO_MTU - 4 - STAMP;
        let parts = frame.len().div_ceil(chunk);
        self.picture_id = (self.picture_id + 1) & 0x7fff;
        for (i, part) in frame.chunks(chunk).enumerate() {
            // RFC 7741 descriptor: X and S (first packet), I with a 15-bit picture id.
            let mut payload = Vec::with_capacity(4 + part.len() + STAMP);
            payload.push(if i == 0 { 0x90 } else { 0x80 });
            payload.push(0x80);
            payload.extend_from_slice(&(0x8000 | self.picture_id).to_be_bytes());
            payload.extend_from_slice(part);
            payload.resize(payload.len() + STAMP, 0);
            stamp(&mut payload, stamp_count);
            let write = RtpWrite::new(pt, self.seq.into(), time, now, payload)
                .marker(i + 1 == parts)
                .nackable(true);
            tx.write_rtp(write);
            self.seq += 1;
            stats.tx_packets += 1;
        }
    }

    fn keyframe_request(&mut self, req: &KeyframeRequest, now: Instant) {
        if req.mid == self.mid
            && req.rid == self.rid
            && self
                .last_keyframe
                .is_none_or(|t| now - t >= KEYFRAME_THROTTLE)
        {
            self.keyframe_wanted = true;
        }
    }
}

fn stamp(payload: &mut [u8], count: u32) {
    let at = payload.len() - STAMP;
    payload[at..at + 8].copy_from_slice(&unix_micros().to_be_bytes());
    payload[at + 8..].copy_from_slice(&count.to_be_bytes());
}

/// What a receiver knows of one incoming stream.
#[derive(Default)]
struct RxStream {
    max_seq: Option<u64>,
}

/// One PeerConnection.
struct Peer {
    rtc: Rtc,
    pending: Option<SdpPendingOffer>,
    connected: bool,
    rx: HashMap<Ssrc, RxStream>,
}

impl Peer {
    fn new(local: SocketAddr) -> anyhow::Result<Peer> {
        let mut rtc = Rtc::builder().set_rtp_mode(true).build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp")?);
        Ok(Peer {
            rtc,
            pending: None,
            connected: false,
            rx: HashMap::new(),
        })
    }
}

/// The media side of one simulated user.
pub(crate) struct MediaUser {
    sock: UdpSocket,
    local: SocketAddr,
    peers: Vec<Option<Peer>>,
    senders: Vec<Sender>,
    started: Instant,
    stats: ClientStats,
}

impl MediaUser {
    pub(crate) async fn bind(ip: IpAddr, started: Instant) -> anyhow::Result<MediaUser> {
        let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let local = sock.local_addr()?;
        Ok(MediaUser {
            sock,
            local,
            peers: Vec::new(),
            senders: Vec::new(),
            started,
            stats: ClientStats::default(),
        })
    }

    /// Creates `peer` with the tracks this user sends (a send-only audio track even when muted
    /// if `always_audio`), and returns its offer.
    fn publish(
        &mut self,
        peer: usize,
        cfg: &ClientConfig,
        always_audio: bool,
    ) -> anyhow::Result<SigCmd> {
        let now = Instant::now();
        let mut p = Peer::new(self.local)?;
        let mut api = p.rtc.sdp_api();
        let mut senders = Vec::new();
        let mut screen_mid = None;
        if cfg.send_audio || always_audio {
            let mid = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
            if cfg.send_audio {
                senders.push(Sender::audio(peer, mid, now));
            }
        }
        if cfg.send_video {
            let mut layers = Simulcast::new();
            for (rid, ..) in CAMERA_LAYERS {
                layers.add_send_layer(SimulcastLayer::new(rid));
            }
            let mid = api.add_media(
                MediaKind::Video,
                Direction::SendOnly,
                None,
                None,
                Some(layers),
            );
            for (rid, w, h, bps) in CAMERA_LAYERS {
                senders.push(Sender::video(
                    peer,
                    mid,
                    Some(rid.into()),
                    (w, h, bps),
                    CAMERA_FPS,
                    now,
                ));
            }
        }
        if cfg.send_screen {
            let mid = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
            let mut s = Sender::video(peer, mid, None, SCREEN, SCREEN_FPS, now);
            s.periodic_keyframe = Some(SCREEN_KEYFRAME_EVERY);
            senders.push(s);
            screen_mid = Some(mid.to_string());
        }
        let Some((offer, pending)) = api.apply() else {
            bail!("nothing to offer");
        };
        p.pending = Some(pending);
        self.set_peer(peer, p);
        self.senders.extend(senders);
        Ok(SigCmd::Offer {
            peer,
            sdp: offer.to_sdp_string(),
            screen_mid,
        })
    }

    fn set_peer(&mut self, idx: usize, peer: Peer) {
        if self.peers.len() <= idx {
            self.peers.resize_with(idx + 1, || None);
        }
        self.peers[idx] = Some(peer);
    }

    fn on_signal(&mut self, ev: SigEvent) -> anyhow::Result<Option<SigCmd>> {
        match ev {
            SigEvent::Answer { peer, sdp } => {
                let p = self
                    .peers
                    .get_mut(peer)
                    .and_then(Option::as_mut)
                    .with_context(|| format!("an answer for unknown peer {peer}"))?;
                if let Some(pending) = p.pending.take() {
                    p.rtc
                        .sdp_api()
                        .accept_answer(pending, SdpAnswer::from_sdp_string(&sdp)?)?;
                }
                Ok(None)
            }
            SigEvent::Offer { peer, sdp, tag } => {
                if self.peers.get(peer).is_none_or(Option::is_none) {
                    let p = Peer::new(self.local)?;
                    self.set_peer(peer, p);
                }
                let Some(Some(p)) = self.peers.get_mut(peer) else {
                    bail!("peer {peer} vanished");
                };
                let answer = p
                    .rtc
                    .sdp_api()
                    .accept_offer(SdpOffer::from_sdp_string(&sdp)?)?;
                Ok(Some(SigCmd::Answer {
                    peer,
                    sdp: answer.to_sdp_string(),
                    tag,
                }))
            }
            SigEvent::Fatal(why) => bail!("{why}"),
        }
    }

    /// Polls every peer's output; returns the earliest timeout.
    async fn drain(&mut self, cfg: &ClientConfig) -> anyhow::Result<Instant> {
        let mut earliest = Instant::now() + Duration::from_secs(1);
        let now = Instant::now();
        for s in &mut self.senders {
            if let Some(Some(p)) = self.peers.get_mut(s.peer)
                && p.connected
            {
                s.tick(&mut p.rtc, now, &mut self.stats);
                earliest = earliest.min(s.next);
            }
        }
        for (idx, slot) in self.peers.iter_mut().enumerate() {
            let Some(p) = slot else { continue };
            loop {
                match p.rtc.poll_output()? {
                    Output::Timeout(t) => {
                        earliest = earliest.min(t);
                        break;
                    }
                    Output::Transmit(t) => {
                        let _ = self.sock.send_to(&t.contents, t.destination).await;
                    }
                    Output::Event(e) => match e {
                        Event::Connected if !p.connected => {
                            p.connected = true;
                            if self.stats.join.is_none() {
                                self.stats.join = Some(self.started.elapsed());
                            }
                            earliest = now;
                        }
                        Event::KeyframeRequest(req) => {
                            for s in self.senders.iter_mut().filter(|s| s.peer == idx) {
                                s.keyframe_request(&req, now);
                            }
                        }
                        Event::RtpPacket(pkt) => {
                            self.stats.rx_packets += 1;
                            if let Some(c) = &cfg.rx_counter {
                                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            let rx = p.rx.entry(pkt.header.ssrc).or_default();
                            let seq = *pkt.seq_no;
                            match rx.max_seq {
                                Some(max) if seq > max => {
                                    self.stats.lost += seq - max - 1;
                                    rx.max_seq = Some(seq);
                                }
                                // A retransmission filling a gap counted before.
                                Some(_) => self.stats.lost = self.stats.lost.saturating_sub(1),
                                None => rx.max_seq = Some(seq),
                            }
                            if cfg.measure && pkt.payload.len() >= STAMP {
                                let at = pkt.payload.len() - STAMP;
                                let sent = u64::from_be_bytes(
                                    pkt.payload[at..at + 8].try_into().unwrap_or([0; 8]),
                                );
                                let delay = unix_micros().saturating_sub(sent);
                                self.stats
                                    .delays_us
                                    .push(delay.min(u64::from(u32::MAX)) as u32);
                            }
                        }
                        _ => {}
                    },
                }
            }
        }
        Ok(earliest)
    }

    fn receive(&mut self, n: usize, source: SocketAddr, buf: &[u8]) -> anyhow::Result<()> {
        let Ok(contents) = buf[..n].try_into() else {
            return Ok(());
        };
        let input = Input::Receive(
            Instant::now(),
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local,
                contents,
            },
        );
        if let Some(p) = self
            .peers
            .iter_mut()
            .flatten()
            .find(|p| p.rtc.accepts(&input))
        {
            p.rtc.handle_input(input)?;
        }
        Ok(())
    }

    fn timeout(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        for p in self.peers.iter_mut().flatten() {
            p.rtc.handle_input(Input::Timeout(now))?;
        }
        Ok(())
    }

    /// Runs until `stop`: creates the publishing peer 0 first if `publish` (with a muted audio
    /// track when `always_audio`), then follows the signaling adapter.
    pub(crate) async fn run(
        mut self,
        cfg: &ClientConfig,
        publish: bool,
        always_audio: bool,
        mut events: mpsc::Receiver<SigEvent>,
        cmds: mpsc::Sender<SigCmd>,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<ClientStats> {
        if publish {
            let offer = self.publish(0, cfg, always_audio)?;
            cmds.send(offer).await.context("signaling stopped")?;
        }
        let mut buf = vec![0u8; 2048];
        loop {
            let wake = self.drain(cfg).await?;
            if *stop.borrow() {
                break;
            }
            let wait = wake.saturating_duration_since(Instant::now());
            tokio::select! {
                _ = stop.changed() => {}
                ev = events.recv() => {
                    // Signaling ending while we stop (the server closing busy connections
                    // as everyone leaves) is no failure.
                    if *stop.borrow() {
                        break;
                    }
                    let Some(ev) = ev else { bail!("signaling connection closed") };
                    if let Some(reply) = self.on_signal(ev)? {
                        cmds.send(reply).await.context("signaling stopped")?;
                    }
                }
                r = self.sock.recv_from(&mut buf) => {
                    let (n, source) = r?;
                    self.receive(n, source, &buf)?;
                }
                _ = tokio::time::sleep(wait) => self.timeout()?,
            }
        }
        Ok(self.stats)
    }
}
