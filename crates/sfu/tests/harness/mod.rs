//! A fake-time world: one [`Sfu`] and str0m client peers exchanging datagrams in memory.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use parley_proto::media::{MediaCommand, MediaEvent, SessionId};
use parley_sfu::{Sfu, SfuConfig};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{
    Direction, Frequency, MediaKind, MediaTime, Mid, Rid, Simulcast, SimulcastLayer,
};
use str0m::net::{Protocol, Receive, Transmit};
use str0m::{Candidate, Event, Input, Output, Rtc};

pub const STEP: Duration = Duration::from_millis(1);

/// Simulcast layers, lowest first, with the width and frame size each sends.
pub const LAYERS: [&str; 3] = ["q", "h", "f"];
const LAYER_WIDTH: [u16; 3] = [320, 640, 1280];
const LAYER_FRAME_BYTES: [usize; 3] = [250, 800, 2500];
/// Where a test frame carries the number of its layer (1, 2, 3; 9 without simulcast).
const MARKER_AT: usize = 10;

pub fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub struct Peer {
    pub session: SessionId,
    pub name: String,
    pub addr: SocketAddr,
    pub rtc: Rtc,
    pub pending: Option<SdpPendingOffer>,
    /// Our own sending tracks.
    pub audio_mid: Option<Mid>,
    pub video_mids: Vec<Mid>,
    /// The video tracks offered as screen shares.
    pub screen_mids: Vec<String>,
    pub connected: bool,
    /// Media received, by the stream id (publisher) and kind of its m-line.
    pub received: HashMap<(String, MediaKind), u64>,
    pub last_offer_id: Option<u64>,
    pub ignored_offers: Vec<u64>,
    pub candidate_after_answer: Option<SocketAddr>,
    pub audio_level: i8,
    pub sending: bool,
    /// Audio packets received that carried a transport-wide sequence number.
    pub audio_with_twcc: u64,
    pub frames_sent: u64,
    pub keyframe_requests: u64,
    pub rejected: Vec<String>,
    pub next_audio: Instant,
    pub next_video: Instant,
    pub audio_frames: u64,
    /// Publish the camera as simulcast layers q, h, f.
    pub simulcast: bool,
    /// Bytes of a delta frame of a video without simulcast (keyframes are three times as big).
    pub frame_bytes: usize,
    /// Bytes of each 20 ms audio packet's payload (Chromium's Opus with RED: about 120).
    pub audio_bytes: usize,
    /// Tracks and layers asked for a keyframe by the SFU (`None`: the single layer).
    pub keyframe_wanted: Vec<(Mid, Option<Rid>)>,
    /// The layer marker of the last video frame received, per publisher stream id.
    pub last_layer: HashMap<String, u8>,
    /// Video frames received per (publisher stream id, layer marker).
    pub layer_frames: HashMap<(String, u8), u64>,
    /// Video frames str0m flagged as not contiguous (a gap in sequence numbers).
    pub gaps: u64,
    /// The SFU → peer link.
    pub down: Link,
    /// The peer → SFU link.
    pub up: Link,
}

/// A simulated one-way network path: a rate limit with a bounded queue, and random loss.
#[derive(Debug)]
pub struct Link {
    /// Bits per second; `None` is unlimited.
    pub rate: Option<u64>,
    /// Fraction of datagrams lost, 0.0 to 1.0.
    pub loss: f64,
    queue: VecDeque<(Instant, Transmit)>,
    busy_until: Option<Instant>,
    rng: u64,
    pub dropped: u64,
    /// Bytes carried, by the first byte's class: [STUN, DTLS, RTP/RTCP].
    pub carried: [u64; 3],
    /// RTP bytes carried by payload type (RTCP under 200..=206 counted as 255).
    pub by_pt: HashMap<u8, u64>,
    /// RTP packets carried by payload type, and of those the ones with each one-byte header
    /// extension id (index 1 to 14) in the clear part of the header.
    pub exts_by_pt: HashMap<u8, [u64; 16]>,
}

/// The one-byte header extension ids in an RTP packet (RFC 8285), as a bit set.
fn extension_ids(p: &[u8]) -> u16 {
    let Some(&b0) = p.first() else {
        return 0;
    };
    let at = 12 + 4 * (b0 & 0x0f) as usize;
    if b0 & 0x10 == 0 || p.get(at..at + 2) != Some(&[0xbe, 0xde]) {
        return 0;
    }
    let Some(words) = p.get(at + 2..at + 4) else {
        return 0;
    };
    let end = (at + 4 + 4 * u16::from_be_bytes([words[0], words[1]]) as usize).min(p.len());
    let (mut i, mut ids) = (at + 4, 0u16);
    while i < end {
        let id = p[i] >> 4;
        if id == 0 {
            i += 1;
            continue;
        }
        if id == 15 {
            break;
        }
        ids |= 1 << id;
        i += 2 + (p[i] & 0x0f) as usize;
    }
    ids
}

/// A queue longer than this drops datagrams (a router's buffer).
const MAX_QUEUE_DELAY: Duration = Duration::from_millis(400);

impl Link {
    pub fn new(seed: u64) -> Self {
        Link {
            rate: None,
            loss: 0.0,
            queue: VecDeque::new(),
            busy_until: None,
            rng: seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1),
            dropped: 0,
            carried: [0; 3],
            by_pt: HashMap::new(),
            exts_by_pt: HashMap::new(),
        }
    }

    fn random(&mut self) -> f64 {
        // xorshift64*: deterministic, good enough for loss patterns.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn send(&mut self, now: Instant, t: Transmit) {
        if self.loss > 0.0 && self.random() < self.loss {
            self.dropped += 1;
            return;
        }
        let at = match self.rate {
            None => now,
            Some(rate) => {
                let start = self.busy_until.map_or(now, |b| b.max(now));
                if start.saturating_duration_since(now) > MAX_QUEUE_DELAY {
                    self.dropped += 1;
                    return;
                }
                let bits = (t.contents.len() as u64 + 28) * 8;
                let done = start + Duration::from_secs_f64(bits as f64 / rate as f64);
                self.busy_until = Some(done);
                done
            }
        };
        let len = t.contents.len() as u64;
        match t.contents.first() {
            Some(b) if *b < 4 => self.carried[0] += len,
            Some(b) if (20..64).contains(b) => self.carried[1] += len,
            Some(_) => {
                self.carried[2] += len;
                let pt = t.contents.get(1).copied().unwrap_or(0);
                let key = if (200..=206).contains(&pt) {
                    255
                } else {
                    pt & 0x7f
                };
                *self.by_pt.entry(key).or_default() += len;
                if key != 255 {
                    let ids = extension_ids(&t.contents);
                    let counts = self.exts_by_pt.entry(key).or_default();
                    counts[0] += 1;
                    for (id, n) in counts.iter_mut().enumerate().skip(1) {
                        *n += u64::from(ids >> id & 1);
                    }
                }
            }
            None => {}
        }
        self.queue.push_back((at, t));
    }

    fn due(&mut self, now: Instant) -> Vec<Transmit> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, t)) = self.queue.pop_front() {
                out.push(t);
            }
        }
        out
    }
}

pub struct World {
    pub now: Instant,
    pub start: Instant,
    pub sfu: Sfu,
    pub sfu_addr: SocketAddr,
    pub peers: Vec<Peer>,
    pub events: Vec<MediaEvent>,
    /// While set, signaling messages from the SFU to this session wait (in order) in `held`.
    pub hold_signal: Option<SessionId>,
    pub held: Vec<MediaEvent>,
    /// Addresses that no longer work (datagrams from or to them are lost).
    pub dead: Vec<SocketAddr>,
    /// The next client joins with only Opus, with RED or not.
    red: Option<bool>,
    next_session: u64,
}

impl World {
    pub fn new() -> Self {
        init_log();
        let now = Instant::now();
        let sfu_addr: SocketAddr = (Ipv4Addr::new(10, 0, 0, 1), 8443).into();
        World {
            now,
            start: now,
            sfu: Sfu::new(SfuConfig {
                candidates: vec![sfu_addr],
                tcp: false,
            }),
            sfu_addr,
            peers: Vec::new(),
            events: Vec::new(),
            hold_signal: None,
            held: Vec::new(),
            dead: Vec::new(),
            red: None,
            next_session: 1,
        }
    }

    pub fn peer(&self, name: &str) -> usize {
        self.peers
            .iter()
            .position(|p| p.name == name)
            .expect("peer exists")
    }

    /// A client that joins `room` sending one audio and one video track.
    pub fn join(&mut self, name: &str, room: &str) -> usize {
        self.join_with(name, room, false, true)
    }

    /// A client that joins sending audio and a camera in three simulcast layers.
    pub fn join_simulcast(&mut self, name: &str, room: &str) -> usize {
        self.join_with(name, room, true, true)
    }

    /// A client whose only audio codec is Opus, with or without RED (redundant audio).
    pub fn join_opus(&mut self, name: &str, room: &str, red: bool) -> usize {
        self.red = Some(red);
        let idx = self.join_with(name, room, false, true);
        self.red = None;
        idx
    }

    /// A client that joins `room` with a microphone and no camera.
    pub fn join_audio_only(&mut self, name: &str, room: &str) -> usize {
        self.join_with(name, room, false, false)
    }

    fn join_with(&mut self, name: &str, room: &str, simulcast: bool, video: bool) -> usize {
        let idx = self.peers.len();
        let addr: SocketAddr = (Ipv4Addr::new(10, 0, 1, idx as u8 + 1), 5000).into();
        let builder = match self.red {
            Some(red) => Rtc::builder()
                .clear_codecs()
                .enable_opus(true, red)
                .enable_vp8(true),
            None => Rtc::builder(),
        };
        let mut rtc = builder.build(self.now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").expect("host candidate"));
        let mut api = rtc.sdp_api();
        let audio = api.add_media(
            MediaKind::Audio,
            Direction::SendOnly,
            Some(name.into()),
            None,
            None,
        );
        let layers = simulcast.then(|| {
            let mut s = Simulcast::new();
            for rid in LAYERS {
                s.add_send_layer(SimulcastLayer::new(rid));
            }
            s
        });
        let video = video.then(|| {
            api.add_media(
                MediaKind::Video,
                Direction::SendOnly,
                Some(name.into()),
                None,
                layers,
            )
        });
        let (offer, pending) = api.apply().expect("changes");
        let session = SessionId(self.next_session);
        self.next_session += 1;
        self.peers.push(Peer {
            session,
            name: name.into(),
            addr,
            rtc,
            pending: Some(pending),
            audio_mid: Some(audio),
            video_mids: video.into_iter().collect(),
            screen_mids: Vec::new(),
            connected: false,
            received: HashMap::new(),
            last_offer_id: None,
            ignored_offers: Vec::new(),
            candidate_after_answer: None,
            audio_level: -127,
            sending: true,
            audio_with_twcc: 0,
            frames_sent: 0,
            keyframe_requests: 0,
            rejected: Vec::new(),
            next_audio: self.now,
            next_video: self.now,
            audio_frames: 0,
            simulcast,
            frame_bytes: 600,
            audio_bytes: 20,
            keyframe_wanted: Vec::new(),
            last_layer: HashMap::new(),
            layer_frames: HashMap::new(),
            gaps: 0,
            down: Link::new(idx as u64 * 2 + 1),
            up: Link::new(idx as u64 * 2 + 2),
        });
        self.sfu.handle_command(
            MediaCommand::Offer {
                session,
                room: room.into(),
                stream_id: name.into(),
                sdp: offer.to_sdp_string(),
                screen_mids: vec![],
                can_publish: true,
                can_subscribe: true,
            },
            self.now,
        );
        idx
    }

    /// The peer adds one more video track and offers it.
    pub fn add_video(&mut self, idx: usize) -> Mid {
        self.add_video_track(idx, false)
    }

    /// The peer starts sharing its screen: one more video track, offered as a screen share.
    pub fn add_screen(&mut self, idx: usize) -> Mid {
        self.add_video_track(idx, true)
    }

    fn add_video_track(&mut self, idx: usize, screen: bool) -> Mid {
        let p = &mut self.peers[idx];
        let mut api = p.rtc.sdp_api();
        let mid = api.add_media(
            MediaKind::Video,
            Direction::SendOnly,
            Some(p.name.clone()),
            None,
            None,
        );
        let (offer, pending) = api.apply().expect("changes");
        p.video_mids.push(mid);
        if screen {
            p.screen_mids.push(mid.to_string());
        }
        self.offer(idx, offer, pending);
        mid
    }

    /// Sends a peer's renegotiation offer to the SFU.
    fn offer(&mut self, idx: usize, offer: SdpOffer, pending: SdpPendingOffer) {
        let p = &mut self.peers[idx];
        p.pending = Some(pending);
        let cmd = MediaCommand::Offer {
            session: p.session,
            room: String::new(),
            stream_id: p.name.clone(),
            sdp: offer.to_sdp_string(),
            screen_mids: p.screen_mids.clone(),
            can_publish: true,
            can_subscribe: true,
        };
        self.sfu.handle_command(cmd, self.now);
    }

    /// The peer moves to a new address (like a network change) and restarts ICE.
    pub fn ice_restart(&mut self, idx: usize, new_port: u16) {
        let p = &mut self.peers[idx];
        self.dead.push(p.addr);
        p.addr.set_port(new_port);
        let mut api = p.rtc.sdp_api();
        api.ice_restart(false);
        let (offer, pending) = api.apply().expect("ice restart offer");
        // The restart drops the old candidates when the answer arrives; add the new one then.
        p.candidate_after_answer = Some(p.addr);
        self.offer(idx, offer, pending);
    }

    pub fn leave(&mut self, idx: usize) {
        let session = self.peers[idx].session;
        self.sfu
            .handle_command(MediaCommand::Close { session }, self.now);
        self.peers[idx].sending = false;
        self.peers[idx].rtc.disconnect();
    }

    /// Delivers signaling events from the SFU to the peers (as the signaling plane would).
    fn signal(&mut self) {
        let mut queue: Vec<MediaEvent> = Vec::new();
        if self.hold_signal.is_none() {
            queue.append(&mut self.held);
        }
        while let Some(ev) = self.sfu.poll_event() {
            self.events.push(ev.clone());
            queue.push(ev);
        }
        for ev in queue {
            if self.hold_signal == Some(ev.session()) {
                self.held.push(ev);
                continue;
            }
            self.deliver(ev);
        }
    }

    fn deliver(&mut self, ev: MediaEvent) {
        {
            let Some(p) = self.peers.iter_mut().find(|p| p.session == ev.session()) else {
                return;
            };
            match ev {
                MediaEvent::Answer { sdp, .. } => {
                    let answer = SdpAnswer::from_sdp_string(&sdp).expect("valid answer");
                    if let Some(pending) = p.pending.take() {
                        p.rtc
                            .sdp_api()
                            .accept_answer(pending, answer)
                            .expect("answer accepted");
                    }
                    if let Some(addr) = p.candidate_after_answer.take() {
                        p.rtc.add_local_candidate(
                            Candidate::host(addr, "udp").expect("host candidate"),
                        );
                    }
                }
                MediaEvent::Offer { id, sdp, .. } => {
                    if p.pending.is_some() {
                        // Impolite client: ignore the server's offer while ours is outstanding.
                        p.ignored_offers.push(id);
                        return;
                    }
                    let offer = SdpOffer::from_sdp_string(&sdp).expect("valid offer");
                    let answer = p.rtc.sdp_api().accept_offer(offer).expect("offer accepted");
                    p.last_offer_id = Some(id);
                    let cmd = MediaCommand::Answer {
                        session: p.session,
                        id,
                        sdp: answer.to_sdp_string(),
                    };
                    self.sfu.handle_command(cmd, self.now);
                }
                MediaEvent::SdpRejected { reason, .. } => p.rejected.push(reason),
                _ => {}
            }
        }
    }

    /// One step of fake time: media generation, datagrams both ways, timers.
    pub fn step(&mut self) {
        self.signal();
        let now = self.now;
        for p in &mut self.peers {
            p.send_media(now);
        }
        // Peers → their uplinks.
        for p in &mut self.peers {
            loop {
                if !p.rtc.is_alive() {
                    break;
                }
                match p.rtc.poll_output().expect("peer poll") {
                    Output::Timeout(_) => break,
                    Output::Transmit(t) if self.dead.contains(&t.source) => {}
                    Output::Transmit(t) => p.up.send(now, t),
                    Output::Event(e) => p.handle_event(e),
                }
            }
        }
        // Uplinks → SFU.
        let mut received = false;
        for i in 0..self.peers.len() {
            for t in self.peers[i].up.due(now) {
                self.sfu
                    .handle_datagram(now, Protocol::Udp, t.source, t.destination, &t.contents);
                str0m::net::recycle(t.contents.into());
                received = true;
            }
        }
        if received {
            // As the server's media loop does: timeouts that may run late run with datagrams.
            self.sfu.handle_timeout(now);
        }
        // SFU → downlinks. Each peer has its own IP; any of its ports is reachable.
        while let Some(t) = self.sfu.poll_transmit() {
            if self.dead.contains(&t.destination) {
                continue;
            }
            if let Some(p) = self
                .peers
                .iter_mut()
                .find(|p| p.addr.ip() == t.destination.ip())
            {
                p.down.send(now, t);
            }
        }
        // Downlinks → peers.
        for p in &mut self.peers {
            for t in p.down.due(now) {
                if !p.rtc.is_alive() {
                    continue;
                }
                let data: &[u8] = &t.contents;
                let Ok(contents) = data.try_into() else {
                    continue;
                };
                let input = Input::Receive(
                    now,
                    Receive {
                        proto: Protocol::Udp,
                        source: t.source,
                        destination: t.destination,
                        contents,
                    },
                );
                let _ = p.rtc.handle_input(input);
                // As the server's media loop does: the buffers of delivered datagrams go back
                // to str0m for the packets it encrypts next.
                str0m::net::recycle(t.contents.into());
            }
        }
        self.signal();
        self.now += STEP;
        let now = self.now;
        for p in &mut self.peers {
            if p.rtc.is_alive() {
                let _ = p.rtc.handle_input(Input::Timeout(now));
            }
        }
        if self.sfu.poll_timeout().is_some_and(|t| t <= now) {
            self.sfu.handle_timeout(now);
        }
    }

    pub fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    /// Steps until `f` holds, failing after `limit` of fake time.
    pub fn run_until(
        &mut self,
        limit: Duration,
        what: &str,
        mut f: impl FnMut(&World) -> bool,
    ) -> Duration {
        let start = self.now;
        while !f(self) {
            assert!(
                self.now - start < limit,
                "timed out after {limit:?} waiting for: {what}"
            );
            self.step();
        }
        self.now - start
    }

    pub fn received(&self, idx: usize, from: &str, kind: MediaKind) -> u64 {
        self.peers[idx]
            .received
            .get(&(from.to_string(), kind))
            .copied()
            .unwrap_or(0)
    }
}

impl Peer {
    fn send_media(&mut self, now: Instant) {
        if !self.connected || !self.sending {
            return;
        }
        if now >= self.next_audio {
            self.next_audio = now + Duration::from_millis(20);
            self.audio_frames += 1;
            if let Some(mid) = self.audio_mid
                && let Some(w) = self.rtc.writer(mid)
            {
                let pt = w
                    .payload_params()
                    .find(|p| p.spec().codec == Codec::Opus)
                    .map(|p| p.pt());
                if let Some(pt) = pt {
                    let t = MediaTime::new(self.audio_frames * 960, Frequency::FORTY_EIGHT_KHZ);
                    let _ = w.audio_level(self.audio_level, true).write(
                        pt,
                        now,
                        t,
                        vec![0x55u8; self.audio_bytes],
                    );
                }
            }
        }
        if now >= self.next_video {
            self.next_video = now + Duration::from_millis(33);
            self.frames_sent += 1;
            let t = MediaTime::new(self.frames_sent * 3000, Frequency::NINETY_KHZ);
            let periodic = self.frames_sent % 60 == 1;
            for (n, mid) in self.video_mids.clone().into_iter().enumerate() {
                let simulcast = self.simulcast && n == 0;
                let layers: Vec<Option<Rid>> = if simulcast {
                    LAYERS.iter().map(|r| Some(Rid::from(*r))).collect()
                } else {
                    vec![None]
                };
                for (i, rid) in layers.into_iter().enumerate() {
                    let wanted = self.keyframe_wanted.contains(&(mid, rid));
                    let key = periodic || wanted;
                    let (width, bytes, marker) = if simulcast {
                        (LAYER_WIDTH[i], LAYER_FRAME_BYTES[i], i as u8 + 1)
                    } else {
                        (640, self.frame_bytes, 9)
                    };
                    let Some(w) = self.rtc.writer(mid) else {
                        continue;
                    };
                    let Some(pt) = w
                        .payload_params()
                        .find(|p| p.spec().codec == Codec::Vp8)
                        .map(|p| p.pt())
                    else {
                        continue;
                    };
                    let w = match rid {
                        Some(r) => w.rid(r),
                        None => w,
                    };
                    let [wl, wh] = width.to_le_bytes();
                    // A VP8 frame tag (keyframe bit), start code, size; then the layer marker.
                    let mut frame = vec![
                        if key { 0x50 } else { 0x51 },
                        0x2a,
                        0x00,
                        0x9d,
                        0x01,
                        0x2a,
                        wl,
                        wh,
                        0x68,
                        0x01,
                        marker,
                    ];
                    frame.resize(if key { bytes * 3 } else { bytes }, 0x11);
                    if w.write(pt, now, t, frame).is_ok() && wanted {
                        self.keyframe_wanted.retain(|k| *k != (mid, rid));
                    }
                }
            }
        }
    }

    fn handle_event(&mut self, e: Event) {
        tracing::debug!(peer = %self.name, "event {:?}", e);
        match e {
            Event::Connected => self.connected = true,
            Event::MediaData(d) => {
                let Some(media) = self.rtc.media(d.mid) else {
                    return;
                };
                let stream = media.stream_id().to_string();
                if media.kind() == MediaKind::Video {
                    if !d.contiguous
                        && self
                            .received
                            .contains_key(&(stream.clone(), MediaKind::Video))
                    {
                        self.gaps += 1;
                    }
                    if let Some(marker) = d.data.get(MARKER_AT) {
                        self.last_layer.insert(stream.clone(), *marker);
                        *self
                            .layer_frames
                            .entry((stream.clone(), *marker))
                            .or_default() += 1;
                    }
                }
                if media.kind() == MediaKind::Audio && d.ext_vals.transport_cc.is_some() {
                    self.audio_with_twcc += 1;
                }
                *self.received.entry((stream, media.kind())).or_default() += 1;
            }
            Event::KeyframeRequest(req) => {
                self.keyframe_requests += 1;
                if !self.keyframe_wanted.contains(&(req.mid, req.rid)) {
                    self.keyframe_wanted.push((req.mid, req.rid));
                }
            }
            _ => {}
        }
    }
}
