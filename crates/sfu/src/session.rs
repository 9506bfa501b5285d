//! One participant's PeerConnection on the media plane.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_proto::media::{MediaEvent, SessionId, TrackSource};
use rustc_hash::FxHashMap;
use str0m::bwe::{Bitrate, BweKind};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::crypto::dtls::DtlsCert;
use str0m::format::PayloadParams;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Pt, Rid};
use str0m::rtp::{ExtensionValues, RedDecoder, RtpPacket, RtpWrite, Vp8Descriptor};
use str0m::{Event, IceConnectionState, Input, Output, Reason, Rtc};

use crate::Transmit;
use crate::alloc::Want;
use crate::munger::Munger;
use crate::speaking::SpeakingDetector;
use crate::stats::{AUDIO, ICE_STATES, Sample, SfuStats, VIDEO};

/// Video waiting longer than this in a subscriber's send queue means its link is overloaded.
const MAX_BACKLOG: Duration = Duration::from_millis(300);
/// Immediate timeouts handled inside one poll before deferring to the timer heap.
const MAX_IMMEDIATE: u32 = 8;
/// How old a packet may be and still be resent on a NACK.
pub(crate) const RTX_MAX_AGE: Duration = Duration::from_millis(1500);
/// Payload types a forwarded track remembers the mapping of.
const PT_MAP_LEN: usize = 4;
/// The stages of `Session::prefetch_write` (those of str0m's `Rtc::send_path`).
pub(crate) const PREFETCH_STAGES: usize = 4;

pub(crate) struct Session {
    pub id: SessionId,
    pub room: String,
    /// Labels this participant's tracks for the others (`msid` stream id).
    pub stream_id: String,
    pub rtc: Rtc,
    pub next_timeout: Instant,
    /// When the bandwidth estimator's delay-control turn is due, if before `next_timeout`: in
    /// the SFU's heap of timers that may run late.
    pub estimator_timeout: Option<Instant>,
    /// Waiting in the SFU's queue of sessions to poll.
    pub queued: bool,
    /// Whether str0m's bandwidth estimator is paused (no video to this participant).
    estimator_paused: bool,
    /// Tracks this participant publishes.
    pub tracks_in: Vec<TrackIn>,
    /// Other participants' tracks forwarded to this one. Added to with `add_track_out` and
    /// removed from with `retain_tracks_out` only, which keep `out_index` right.
    pub tracks_out: Vec<TrackOut>,
    /// The position in `tracks_out` of each (publisher, publisher's mid), the first if there
    /// are two: a forwarded packet finds its track without a scan of `tracks_out`.
    out_index: FxHashMap<(SessionId, Mid), usize>,
    /// Mids the participant declared as screen shares.
    pub screen_mids: Vec<Mid>,
    /// What the participant shows, once it told us (`None`: everything at best quality).
    pub view: Option<Vec<(SessionId, TrackSource, u32)>>,
    /// The latest bandwidth estimate towards this participant.
    pub estimate: Option<Bitrate>,
    /// Smoothed audio level (0 silent .. 1 loud) for dominant speaker detection.
    pub loudness: f32,
    /// Our outstanding offer and its id.
    pending: Option<(u64, SdpPendingOffer)>,
    last_offer_id: u64,
    /// The first offer/answer exchange is done; only then do we offer changes ourselves.
    negotiated: bool,
    pub connected: bool,
    speaking: SpeakingDetector,
    /// Keyframes this subscriber needs from publishers: (publisher, mid, rid).
    pub keyframes_wanted: Vec<(SessionId, Mid, Option<Rid>)>,
    /// The participant may send media to the others / receive theirs.
    pub can_publish: bool,
    pub can_subscribe: bool,
    /// The padding floor and probing goal last given to the bandwidth estimator.
    pub bwe_asked: Option<(u64, u64)>,
    /// While a video is paused for bandwidth: when the estimator was last asked to probe for
    /// more, the estimate then (bits/s), and the wait before the next probe.
    pub last_probe: Option<Instant>,
    pub probe_from: u64,
    pub probe_every: Duration,
}

pub(crate) struct TrackIn {
    pub mid: Mid,
    pub kind: MediaKind,
    pub source: TrackSource,
    /// Simulcast layers, lowest first; a single `None` rid without simulcast.
    pub layers: Vec<LayerIn>,
    /// The rids last asked of the publisher (dynacast).
    pub active_sent: Option<Vec<Rid>>,
    received_any: bool,
    /// Offered to the others: from the track's first packet, or when the participant says it
    /// unmuted it. A track that never carries media (the microphone of a participant who
    /// joined muted and never spoke) would cost each of them a media section, a renegotiation
    /// and a send stream.
    pub offered: bool,
}

pub(crate) struct LayerIn {
    pub rid: Option<Rid>,
    /// From the layer's latest keyframe.
    pub width: u32,
    pub bitrate: u64,
    window_bytes: u64,
    window_start: Option<Instant>,
    pub last_packet: Option<Instant>,
    last_keyframe_request: Option<Instant>,
    /// A keyframe request that came within the throttle interval, sent when it ends.
    deferred_keyframe: Option<KeyframeRequestKind>,
}

impl LayerIn {
    fn new(rid: Option<Rid>) -> Self {
        LayerIn {
            rid,
            width: 0,
            bitrate: 0,
            window_bytes: 0,
            window_start: None,
            last_packet: None,
            last_keyframe_request: None,
            deferred_keyframe: None,
        }
    }

    fn count(&mut self, bytes: usize, now: Instant) {
        self.last_packet = Some(now);
        let start = *self.window_start.get_or_insert(now);
        self.window_bytes += bytes as u64;
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= Duration::from_millis(500) {
            let rate = self.window_bytes * 8 * 1000 / elapsed.as_millis().max(1) as u64;
            // Smooth, but follow a big change quickly.
            self.bitrate = if self.bitrate == 0 {
                rate
            } else {
                (self.bitrate + rate) / 2
            };
            self.window_bytes = 0;
            self.window_start = Some(now);
        }
    }
}

/// Rank of a simulcast rid from its name, lowest first (ours are q/h/f).
fn rid_rank(rid: &Option<Rid>) -> u8 {
    match rid.as_ref().map(|r| r.to_string()) {
        None => 1,
        Some(r) => match r.as_str() {
            "q" | "l" | "0" | "low" => 0,
            "h" | "m" | "1" | "mid" => 1,
            _ => 2,
        },
    }
}

impl TrackIn {
    fn new(mid: Mid, kind: MediaKind, source: TrackSource) -> Self {
        TrackIn {
            mid,
            kind,
            source,
            layers: Vec::new(),
            active_sent: None,
            received_any: false,
            offered: false,
        }
    }

    fn layer_mut(&mut self, rid: Option<Rid>) -> &mut LayerIn {
        let pos = match self.layers.iter().position(|l| l.rid == rid) {
            Some(p) => p,
            None => {
                self.layers.push(LayerIn::new(rid));
                self.layers.sort_by_key(|l| rid_rank(&l.rid));
                self.layers
                    .iter()
                    .position(|l| l.rid == rid)
                    .unwrap_or(self.layers.len() - 1)
            }
        };
        &mut self.layers[pos]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrackState {
    /// Waiting for the next offer we make.
    ToOpen,
    /// In our outstanding offer.
    Negotiating(Mid),
    Open(Mid),
    /// To be stopped in the next offer we make.
    ToStop(Mid),
    /// Stopped in our outstanding offer.
    NegotiatingStop(Mid),
}

/// Why a subscriber gets no video of a track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pause {
    Hidden,
    Bandwidth,
}

pub(crate) struct TrackOut {
    pub publisher: SessionId,
    pub publisher_mid: Mid,
    pub kind: MediaKind,
    pub source: TrackSource,
    stream_id: String,
    state: TrackState,
    /// The publisher left while this track was being negotiated.
    publisher_gone: bool,
    /// Incoming payload type → ours, and whether RED must be unwrapped, learnt on first use.
    /// Kept in the track itself (a publisher sends a track on one or two payload types), not
    /// on the heap: one cache line fewer to fetch per forwarded packet.
    pt_map: [Option<(Pt, Pt, bool)>; PT_MAP_LEN],
    munger: Munger,
    /// The layer being forwarded.
    pub current: Option<Option<Rid>>,
    /// The layer to switch to at its next keyframe; `None` while paused.
    pub target: Option<Option<Rid>>,
    pub paused: Option<Pause>,
}

impl TrackOut {
    pub fn new(
        publisher: SessionId,
        publisher_mid: Mid,
        kind: MediaKind,
        source: TrackSource,
        stream_id: &str,
    ) -> Self {
        let stream_id = match source {
            TrackSource::Screen => format!("{stream_id}.screen"),
            _ => stream_id.to_string(),
        };
        TrackOut {
            publisher,
            publisher_mid,
            kind,
            source,
            stream_id,
            state: TrackState::ToOpen,
            publisher_gone: false,
            pt_map: [None; PT_MAP_LEN],
            munger: Munger::default(),
            current: None,
            // Audio and single-layer video start at once; simulcast waits for a choice.
            target: Some(None),
            paused: None,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, TrackState::Open(_))
    }

    /// The subscriber-side mid, once negotiated.
    pub fn open_mid(&self) -> Option<Mid> {
        match self.state {
            TrackState::Open(m) => Some(m),
            _ => None,
        }
    }

    /// How this subscriber wants the video, from its view.
    pub fn want(&self, view: &Option<Vec<(SessionId, TrackSource, u32)>>) -> Want {
        match view {
            None => Want::Best,
            Some(tiles) => tiles
                .iter()
                .find(|(p, s, _)| *p == self.publisher && *s == self.source)
                .map_or(Want::Hidden, |(_, _, w)| Want::Width(*w)),
        }
    }
}

/// What one round of polling a session produced that concerns other sessions.
pub(crate) struct PollOut {
    pub timeout: Instant,
    /// The bandwidth estimator's delay-control turn, when it comes before `timeout`: it may
    /// run late.
    pub estimator: Option<Instant>,
    /// Tracks whose first packet arrived: to be offered to the room.
    pub tracks_added: Vec<(Mid, MediaKind)>,
    pub tracks_removed: Vec<Mid>,
    /// (publisher, its mid, rid, kind) to ask for a keyframe.
    pub keyframe_requests: Vec<(SessionId, Mid, Option<Rid>, KeyframeRequestKind)>,
    pub connected: bool,
    /// Packets received, with the mid and rid of their stream (in the caller's vector, kept
    /// between polls: a vector per received packet was an allocation on the forward path).
    pub packets: Vec<(Mid, Option<Rid>, RtpPacket)>,
}

/// Turns one RTCP-derived reading into histogram samples (jitter from RTP clock units).
fn push_samples(
    samples: &mut Vec<Sample>,
    loss: Option<f32>,
    rtt: Option<Duration>,
    jitter: Option<u32>,
    kind: Option<MediaKind>,
) {
    if samples.len() > 10_000 {
        return; // Nobody is draining: do not grow without bound.
    }
    if let Some(l) = loss {
        samples.push(Sample::Loss(f64::from(l)));
    }
    if let Some(r) = rtt {
        samples.push(Sample::Rtt(r));
    }
    if let (Some(j), Some(kind)) = (jitter, kind) {
        let clock = if kind == MediaKind::Audio {
            48_000.0
        } else {
            90_000.0
        };
        samples.push(Sample::Jitter(f64::from(j) / clock));
    }
}

/// The header extension values that describe the media itself. The publisher's MID and RID
/// are its own (the subscriber's m-line is another), and transport-wide sequence numbers and
/// send times belong to each hop.
fn forwarded_extensions(v: &ExtensionValues) -> ExtensionValues {
    ExtensionValues {
        audio_level: v.audio_level,
        voice_activity: v.voice_activity,
        video_orientation: v.video_orientation,
        video_content_type: v.video_content_type,
        abs_capture_time: v.abs_capture_time,
        play_delay_min: v.play_delay_min,
        play_delay_max: v.play_delay_max,
        ..Default::default()
    }
}

/// A forwarded packet's facts, found once per packet on the publisher side.
pub(crate) struct Incoming<'a> {
    pub publisher: SessionId,
    pub mid: Mid,
    pub rid: Option<Rid>,
    pub params: PayloadParams,
    /// The packet is RFC 2198 RED wrapping `params`' codec.
    pub red: bool,
    pub pkt: &'a RtpPacket,
    pub keyframe: bool,
    pub vp8: Option<Vp8Descriptor>,
}

/// The pacing rate as a multiple of the estimate: libwebrtc's for video. At str0m's default of
/// 1.1 each keyframe of a forwarded share (already paced by its sender) queued for as long as it
/// takes at the estimate (one-way delay p99 of 360-450 ms for 29 viewers of a share on loopback,
/// 156-235 ms at 2.5; bench/RESULTS.md). At 5 the simulated recovery after a bandwidth drop took
/// 12.7 s (6.3 s at 2.5, 4.5 s at 1.1).
const PACING_FACTOR: f64 = 2.5;

impl Session {
    pub fn new(
        id: SessionId,
        room: String,
        stream_id: String,
        cert: Option<&DtlsCert>,
        now: Instant,
    ) -> Self {
        let mut config = Rtc::builder();
        if let Some(cert) = cert {
            config = config.set_dtls_cert(cert.clone());
        }
        let mut rtc = config
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, true)
            .enable_vp8(true)
            // The estimate starts where a screen share (~1.6 Mbit/s) or a top camera layer fits:
            // from 1 Mbit/s, 29 viewers of a share got 30 % fewer of its packets in a 12 s run
            // while their estimates climbed; a thin link brings it down within seconds.
            .enable_bwe(Some(Bitrate::kbps(2_500)))
            .set_stats_interval(Some(Duration::from_secs(5)))
            .build(now);
        // No automatic padding (str0m pads up to 50 kbit/s whenever it sends media with
        // transport-cc, patched in vendor/str0m). On a link with room for the audio alone, that
        // padding is what cut the audio; where the estimate is wanted, the SFU asks for probes
        // towards what the subscriber would receive (`Sfu::select`). Without padding, str0m's
        // pacer also stops asking for a timeout after the last queued audio packet.
        rtc.bwe().set_padding_target(Bitrate::ZERO);
        rtc.bwe().set_pacing_factor(PACING_FACTOR);
        // No video goes to a new participant yet (see `pause_estimator_without_video`).
        rtc.bwe().set_paused(true);
        rtc.bwe().set_audio_transport_cc(false);
        Session {
            id,
            room,
            stream_id,
            rtc,
            next_timeout: now,
            estimator_timeout: None,
            queued: false,
            tracks_in: Vec::new(),
            tracks_out: Vec::new(),
            out_index: FxHashMap::default(),
            screen_mids: Vec::new(),
            view: None,
            estimate: None,
            loudness: 0.0,
            pending: None,
            last_offer_id: 0,
            negotiated: false,
            connected: false,
            speaking: SpeakingDetector::default(),
            keyframes_wanted: Vec::new(),
            can_publish: true,
            can_subscribe: true,
            bwe_asked: None,
            last_probe: None,
            probe_from: 0,
            probe_every: crate::STARVED_PROBE_MIN,
            estimator_paused: true,
        }
    }

    /// Runs str0m's bandwidth estimator only while video flows to this participant: the
    /// estimate chooses video layers, and with audio alone the estimator's work on each
    /// transport-wide feedback costs more than forwarding the packets it reports on. Called
    /// wherever a track to this participant opens or stops.
    ///
    /// Forwarded audio carries transport-wide sequence numbers only while the estimator runs:
    /// without them the participant sends no transport-wide feedback for audio, where it
    /// otherwise reports every 50 ms (in a call of audio alone, as many RTCP packets came in
    /// as the audio packets of the unmuted speakers). With video, the audio's feedback is what
    /// shows the estimator the link while the video is paused for want of bandwidth.
    fn pause_estimator_without_video(&mut self) {
        let video_out = self
            .tracks_out
            .iter()
            .any(|t| t.kind == MediaKind::Video && t.is_open());
        if self.estimator_paused == video_out {
            self.estimator_paused = !video_out;
            self.rtc.bwe().set_paused(!video_out);
            self.rtc.bwe().set_audio_transport_cc(video_out);
        }
    }

    pub fn ufrag(&mut self) -> String {
        self.rtc.direct_api().local_ice_credentials().ufrag
    }

    fn source_of(&self, mid: Mid, kind: MediaKind) -> TrackSource {
        match kind {
            MediaKind::Audio => TrackSource::Mic,
            MediaKind::Video if self.screen_mids.contains(&mid) => TrackSource::Screen,
            MediaKind::Video => TrackSource::Camera,
        }
    }

    /// Accepts the participant's offer. An offer of ours still outstanding is rolled back (we
    /// are the polite peer) and its changes are offered again later.
    pub fn accept_offer(&mut self, offer: SdpOffer, mids: &[Mid]) -> Result<String, String> {
        if self.pending.take().is_some() {
            tracing::debug!(session = %self.id, "glare: rolling back our offer");
            self.rollback_tracks();
        }
        let answer = self
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| format!("offer refused: {e}"))?;
        self.negotiated = true;
        // Register the participant's tracks now rather than when str0m reports them (after
        // ICE and DTLS); each is offered to the others from its first packet on.
        for mid in mids {
            let Some(media) = self.rtc.media(*mid) else {
                continue;
            };
            let kind = media.kind();
            if self.can_publish
                && media.direction().is_receiving()
                && !self.tracks_in.iter().any(|t| t.mid == *mid)
            {
                tracing::debug!(session = %self.id, %mid, ?kind, "track published");
                let source = self.source_of(*mid, kind);
                self.tracks_in.push(TrackIn::new(*mid, kind, source));
            }
        }
        Ok(answer.to_sdp_string())
    }

    /// The participant unmuted its microphone (`audio`) and/or camera (`video`): returns the
    /// tracks not offered yet, now marked offered, for the room to be offered them.
    pub fn announce_unmuted(&mut self, audio: bool, video: bool) -> Vec<(Mid, MediaKind)> {
        self.tracks_in
            .iter_mut()
            .filter(|t| !t.offered)
            .filter(|t| match t.source {
                TrackSource::Mic => audio,
                TrackSource::Camera => video,
                TrackSource::Screen => false,
            })
            .map(|t| {
                t.offered = true;
                (t.mid, t.kind)
            })
            .collect()
    }

    /// Accepts the answer to our offer `id`; returns the tracks that opened. An answer to an
    /// offer that was rolled back is ignored.
    pub fn accept_answer(
        &mut self,
        id: u64,
        answer: SdpAnswer,
    ) -> Result<Vec<(SessionId, Mid, MediaKind)>, String> {
        let Some((pending_id, pending)) = self.pending.take() else {
            tracing::debug!(session = %self.id, id, "answer with no offer outstanding");
            return Ok(Vec::new());
        };
        if pending_id != id {
            tracing::debug!(session = %self.id, id, pending_id, "stale answer ignored");
            self.pending = Some((pending_id, pending));
            return Ok(Vec::new());
        }
        if let Err(e) = self.rtc.sdp_api().accept_answer(pending, answer) {
            self.rollback_tracks();
            return Err(format!("answer refused: {e}"));
        }
        tracing::debug!(session = %self.id, id, "answer accepted");
        let mut opened = Vec::new();
        for t in &mut self.tracks_out {
            if let TrackState::Negotiating(mid) = t.state {
                if t.publisher_gone {
                    t.state = TrackState::ToStop(mid);
                } else {
                    t.state = TrackState::Open(mid);
                    opened.push((t.publisher, t.publisher_mid, t.kind));
                    if t.kind == MediaKind::Video
                        && let Some(tx) = self.rtc.direct_api().stream_tx_by_mid(mid, None)
                    {
                        // A resend older than this arrives too late to be shown.
                        tx.set_rtx_cache(1024, RTX_MAX_AGE, Some(0.15));
                    }
                }
            }
        }
        self.retain_tracks_out(|t| !matches!(t.state, TrackState::NegotiatingStop(_)));
        self.pause_estimator_without_video();
        Ok(opened)
    }

    fn rollback_tracks(&mut self) {
        for t in &mut self.tracks_out {
            match t.state {
                TrackState::Negotiating(_) => t.state = TrackState::ToOpen,
                TrackState::NegotiatingStop(m) => t.state = TrackState::ToStop(m),
                _ => {}
            }
        }
        self.retain_tracks_out(|t| !(t.publisher_gone && t.state == TrackState::ToOpen));
    }

    /// Adds a track to forward to this participant.
    pub fn add_track_out(&mut self, track: TrackOut) {
        self.out_index
            .entry((track.publisher, track.publisher_mid))
            .or_insert(self.tracks_out.len());
        self.tracks_out.push(track);
    }

    /// Keeps the tracks forwarded to this participant that `keep` accepts.
    fn retain_tracks_out(&mut self, keep: impl FnMut(&TrackOut) -> bool) {
        self.tracks_out.retain(keep);
        self.out_index.clear();
        for (i, t) in self.tracks_out.iter().enumerate() {
            self.out_index
                .entry((t.publisher, t.publisher_mid))
                .or_insert(i);
        }
    }

    /// The publisher left (`mid` None), or stopped publishing track `mid`: stop forwarding.
    pub fn publisher_gone(&mut self, publisher: SessionId, mid: Option<Mid>) {
        let matches =
            |t: &TrackOut| t.publisher == publisher && mid.is_none_or(|m| m == t.publisher_mid);
        self.retain_tracks_out(|t| !(matches(t) && t.state == TrackState::ToOpen));
        for t in self.tracks_out.iter_mut().filter(|t| matches(t)) {
            t.publisher_gone = true;
            if let TrackState::Open(m) = t.state {
                t.state = TrackState::ToStop(m);
            }
        }
        self.pause_estimator_without_video();
    }

    /// Offers the pending track changes, unless an offer is already outstanding.
    fn maybe_negotiate(&mut self, events: &mut VecDeque<MediaEvent>) {
        if !self.negotiated || self.pending.is_some() {
            return;
        }
        let mut api = self.rtc.sdp_api();
        for t in &mut self.tracks_out {
            match t.state {
                TrackState::ToOpen => {
                    let track_id = format!("{}-{}", t.stream_id, t.publisher_mid);
                    let mid = api.add_media(
                        t.kind,
                        Direction::SendOnly,
                        Some(t.stream_id.clone()),
                        Some(track_id),
                        None,
                    );
                    t.state = TrackState::Negotiating(mid);
                }
                TrackState::ToStop(mid) => {
                    api.stop_media(mid);
                    t.state = TrackState::NegotiatingStop(mid);
                }
                _ => {}
            }
        }
        if !api.has_changes() {
            return;
        }
        let Some((offer, pending)) = api.apply() else {
            return;
        };
        self.last_offer_id += 1;
        tracing::debug!(session = %self.id, id = self.last_offer_id, "offering track changes");
        self.pending = Some((self.last_offer_id, pending));
        events.push_back(MediaEvent::Offer {
            session: self.id,
            id: self.last_offer_id,
            sdp: offer.to_sdp_string(),
        });
    }

    /// This session's current entry in the SFU's heap of timers, or of lax timers.
    pub fn timer(&self, lax: bool) -> Option<Instant> {
        if lax {
            self.estimator_timeout
        } else {
            Some(self.next_timeout)
        }
    }

    /// Drains str0m's output: datagrams go to `transmits`, events for signaling to `events`,
    /// and what concerns other sessions is returned, the packets received in `packets` (an
    /// empty vector of the caller's).
    pub fn poll(
        &mut self,
        now: Instant,
        transmits: &mut VecDeque<Transmit>,
        events: &mut VecDeque<MediaEvent>,
        stats: &mut SfuStats,
        samples: &mut Vec<Sample>,
        packets: Vec<(Mid, Option<Rid>, RtpPacket)>,
    ) -> PollOut {
        self.maybe_negotiate(events);
        self.send_deferred_keyframes(now, crate::KEYFRAME_THROTTLE);
        let mut out = PollOut {
            timeout: now + Duration::from_secs(1),
            estimator: None,
            tracks_added: Vec::new(),
            tracks_removed: Vec::new(),
            keyframe_requests: Vec::new(),
            connected: false,
            packets,
        };
        let mut spins = 0;
        loop {
            let output = match self.rtc.poll_output() {
                Ok(o) => o,
                Err(err) => {
                    tracing::warn!(session = %self.id, %err, "poll failed");
                    out.timeout = now + Duration::from_millis(50);
                    break;
                }
            };
            match output {
                Output::Transmit(t) => transmits.push_back(t),
                // Work str0m wants done at once (a written packet moves to the pacer, the
                // pacer releases it): do it now rather than through the timer heap.
                Output::Timeout(t) if t <= now && spins < MAX_IMMEDIATE => {
                    spins += 1;
                    if let Err(err) = self.rtc.handle_input(Input::Timeout(now)) {
                        tracing::debug!(session = %self.id, %err, "timeout refused");
                    }
                }
                Output::Timeout(t) => {
                    // The bandwidth estimator's 25 ms delay-control turn may run a little
                    // late ([`crate::TIMER_SLACK`]); everything else on time, the pacer and
                    // the estimator's probes included (late probe turns kept a simulated
                    // link from recovering its top layer).
                    let rest = self.rtc.timeout_without_estimator();
                    if rest > t && self.rtc.last_timeout_reason() == Reason::BweDelayControl {
                        out.estimator = Some(t);
                    }
                    out.timeout = rest;
                    break;
                }
                Output::Event(event) => {
                    self.handle_event(event, now, events, &mut out, stats, samples)
                }
            }
        }
        out
    }

    fn handle_event(
        &mut self,
        event: Event,
        now: Instant,
        events: &mut VecDeque<MediaEvent>,
        out: &mut PollOut,
        stats: &mut SfuStats,
        samples: &mut Vec<Sample>,
    ) {
        match event {
            Event::IceConnectionStateChange(state) => {
                tracing::debug!(session = %self.id, ?state, "ice state");
                let name = match state {
                    IceConnectionState::New => "new",
                    IceConnectionState::Checking => "checking",
                    IceConnectionState::Connected => "connected",
                    IceConnectionState::Completed => "completed",
                    IceConnectionState::Disconnected => "disconnected",
                };
                if let Some(i) = ICE_STATES.iter().position(|s| *s == name) {
                    stats.state_changes[i] += 1;
                }
                match state {
                    IceConnectionState::Connected | IceConnectionState::Completed
                        if !self.connected =>
                    {
                        self.connected = true;
                        out.connected = true;
                        events.push_back(MediaEvent::Connected { session: self.id });
                    }
                    IceConnectionState::Disconnected => self.connected = false,
                    _ => {}
                }
            }
            Event::MediaChanged(m) if !m.direction.is_receiving() => {
                if let Some(pos) = self.tracks_in.iter().position(|t| t.mid == m.mid) {
                    tracing::debug!(session = %self.id, mid = %m.mid, "track unpublished");
                    self.tracks_in.remove(pos);
                    out.tracks_removed.push(m.mid);
                }
            }
            Event::MediaAdded(m)
                if self.can_publish
                    && m.direction.is_receiving()
                    && !self.tracks_in.iter().any(|t| t.mid == m.mid) =>
            {
                tracing::debug!(session = %self.id, mid = %m.mid, kind = ?m.kind, "track published");
                let source = self.source_of(m.mid, m.kind);
                self.tracks_in.push(TrackIn::new(m.mid, m.kind, source));
            }
            Event::EgressBitrateEstimate(BweKind::Twcc {
                estimate,
                can_probe,
            }) => {
                tracing::trace!(session = %self.id, %estimate, can_probe, "bandwidth estimate");
                self.estimate = Some(estimate);
            }
            Event::RtpPacket(pkt) => {
                let Some((mid, rid)) = self
                    .rtc
                    .direct_api()
                    .stream_rx(&pkt.header.ssrc)
                    .map(|s| (s.mid(), s.rid()))
                else {
                    return;
                };
                let Some(track) = self.tracks_in.iter_mut().find(|t| t.mid == mid) else {
                    return;
                };
                if !track.received_any {
                    track.received_any = true;
                    tracing::debug!(
                        session = %self.id, %mid, kind = ?track.kind,
                        audio_level = ?pkt.header.ext_vals.audio_level, "first packet received"
                    );
                }
                if !track.offered {
                    track.offered = true;
                    out.tracks_added.push((mid, track.kind));
                }
                let kind = track.kind;
                track.layer_mut(rid).count(pkt.payload.len(), now);
                let k = if kind == MediaKind::Audio {
                    AUDIO
                } else {
                    VIDEO
                };
                stats.rtp_in_packets[k] += 1;
                stats.rtp_in_bytes[k] += pkt.payload.len() as u64;
                if kind == MediaKind::Audio
                    && let Some(level) = pkt.header.ext_vals.audio_level
                {
                    let loud = f32::from(level.clamp(-127, 0) + 127) / 127.0;
                    self.loudness += 0.05 * (loud - self.loudness);
                    if let Some(speaking) = self.speaking.update(level, now) {
                        events.push_back(MediaEvent::Speaking {
                            session: self.id,
                            speaking,
                        });
                    }
                }
                out.packets.push((mid, rid, pkt));
            }
            Event::MediaIngressStats(s) => {
                let kind = self
                    .tracks_in
                    .iter()
                    .find(|t| t.mid == s.mid)
                    .map(|t| t.kind);
                push_samples(samples, s.loss, s.rtt, Some(s.jitter), kind);
            }
            Event::MediaEgressStats(s) => {
                let kind = self
                    .tracks_out
                    .iter()
                    .find(|t| t.state == TrackState::Open(s.mid))
                    .map(|t| t.kind);
                let jitter = s.remote.as_ref().map(|r| r.jitter);
                push_samples(samples, s.loss, s.rtt, jitter, kind);
            }
            Event::KeyframeRequest(req) => {
                if let Some(t) = self
                    .tracks_out
                    .iter()
                    .find(|t| t.state == TrackState::Open(req.mid))
                {
                    let rid = t.current.flatten();
                    out.keyframe_requests
                        .push((t.publisher, t.publisher_mid, rid, req.kind));
                }
            }
            _ => {}
        }
    }

    /// Prefetches the memory that `write` of the publisher's track `mid` will read, in stages
    /// (0 to `PREFETCH_STAGES` - 1) that read only what the stages before them fetched: the SFU
    /// runs each stage for every subscriber of a packet before the next, so that their cache
    /// misses overlap instead of coming one after the other, as they did in `write` (some
    /// twenty cold lines per subscriber; a subscriber was last written to a whole round of
    /// packets and system calls ago). Reads nothing that `write` would not.
    pub fn prefetch_write(&self, publisher: SessionId, mid: Mid, stage: usize) {
        let mut f = |p: *const u8| prefetch(p);
        if stage == 0 {
            prefetch(addr(&self.connected));
            prefetch(addr(&self.out_index));
            prefetch(addr(&self.tracks_out));
            self.rtc.send_path(None, 0, &mut f);
            return;
        }
        let Some(t) = self
            .out_index
            .get(&(publisher, mid))
            .and_then(|i| self.tracks_out.get(*i))
        else {
            return;
        };
        if stage == 1 {
            let start = addr(t);
            for offset in (0..size_of::<TrackOut>()).step_by(64) {
                prefetch(start.wrapping_add(offset));
            }
            self.rtc.send_path(None, 1, &mut f);
            return;
        }
        if let TrackState::Open(mid) = t.state {
            self.rtc.send_path(Some(mid), stage, &mut f);
        }
    }

    /// Writes a packet to this subscriber if it receives that track and layer; switches layer
    /// at a keyframe of the target layer. A packet that can leave at once goes straight to
    /// `transmits`. Returns whether a packet was queued, so that the session must be polled.
    pub fn write(
        &mut self,
        inc: &Incoming<'_>,
        now: Instant,
        stats: &mut SfuStats,
        transmits: &mut VecDeque<Transmit>,
    ) -> bool {
        if !self.connected {
            return false;
        }
        let Some(t) = self
            .out_index
            .get(&(inc.publisher, inc.mid))
            .and_then(|i| self.tracks_out.get_mut(*i))
        else {
            return false;
        };
        let TrackState::Open(mid) = t.state else {
            return false;
        };
        tracing::trace!(session = %self.id, publisher = %inc.publisher, kind = ?t.kind, current = ?t.current, target = ?t.target, paused = ?t.paused, key = inc.keyframe, "write");
        let pkt = inc.pkt;
        let pic = inc.vp8.and_then(|d| d.picture_id());
        let tl0 = inc.vp8.and_then(|d| d.tl0_pic_idx());
        if t.current != Some(inc.rid) {
            // Switch only to the target layer, and only where its picture starts afresh.
            let startable = inc.keyframe || t.kind == MediaKind::Audio;
            if t.target != Some(inc.rid) || !startable {
                tracing::trace!(session = %self.id, target = ?t.target, rid = ?inc.rid, startable, paused = ?t.paused, "not switching");
                return false;
            }
            tracing::debug!(
                session = %self.id, publisher = %inc.publisher, mid = %inc.mid,
                from = ?t.current, to = ?inc.rid, "layer switch"
            );
            t.munger
                .switch(*pkt.seq_no, pkt.header.timestamp, pic, tl0, now);
            t.current = Some(inc.rid);
        }
        if t.paused.is_some() {
            return false;
        }
        let in_pt = pkt.header.payload_type;
        let (pt, unwrap_red) = match t.pt_map.iter().flatten().find(|(i, _, _)| *i == in_pt) {
            Some((_, o, u)) => (*o, *u),
            None => {
                let Some(ours) = self.rtc.codec_config().match_params(inc.params) else {
                    tracing::debug!(session = %self.id, %in_pt, "no matching codec");
                    return false;
                };
                // RED (redundant audio) passes through to a subscriber that negotiated it;
                // the others get the primary block only.
                let (o, u) = match (inc.red, ours.red()) {
                    (true, Some(red)) => (red, false),
                    (true, None) => (ours.pt(), true),
                    (false, _) => (ours.pt(), false),
                };
                // Past PT_MAP_LEN payload types, the others are looked up every time.
                if let Some(free) = t.pt_map.iter_mut().find(|e| e.is_none()) {
                    *free = Some((in_pt, o, u));
                }
                (o, u)
            }
        };
        let payload: Arc<[u8]> = if unwrap_red {
            match RedDecoder::decode(&pkt.payload)
                .ok()
                .and_then(|blocks| blocks.into_iter().find(|b| b.is_primary))
            {
                Some(primary) => primary.payload.into(),
                None => return false,
            }
        } else {
            pkt.payload.clone()
        };
        let Some(m) = t
            .munger
            .map(*pkt.seq_no, pkt.header.timestamp, pic, tl0, now)
        else {
            return false;
        };
        if *m.seq == 1000 {
            tracing::debug!(session = %self.id, publisher = %inc.publisher, %mid, kind = ?t.kind, "first packet forwarded");
        }
        let mut write = RtpWrite::new(pt, m.seq, m.ts, pkt.timestamp, payload)
            .marker(pkt.header.marker)
            .ext_vals(forwarded_extensions(&pkt.header.ext_vals))
            .nackable(t.kind == MediaKind::Video);
        if let Some(d) = inc.vp8.filter(|_| m.pic.is_some() || m.tl0.is_some()) {
            let mut patch = d.patch();
            if let Some(p) = m.pic {
                patch =
                    patch.picture_id(if d.picture_id().is_some_and(|x| x < 0x80) && p >= 0x80 {
                        p & 0x7f
                    } else {
                        p
                    });
            }
            if let Some(t0) = m.tl0 {
                patch = patch.tl0_pic_idx(t0);
            }
            match patch.build() {
                Ok(p) => write = write.vp8_patch(p),
                Err(err) => tracing::debug!(%err, "vp8 patch refused"),
            }
        }
        let k = if t.kind == MediaKind::Audio {
            AUDIO
        } else {
            VIDEO
        };
        // When nothing waits ahead of the packet and the pacer would let it go at once, str0m
        // encrypts it here instead of in a turn of the whole session (timeout pass, pacer scan,
        // poll) per packet. (Looking at the stream first would mark the session for that turn.)
        let mut api = self.rtc.direct_api();
        let write = match api.send_rtp_now(mid, write, now) {
            Ok(sent) => {
                stats.rtp_out_packets[k] += 1;
                stats.rtp_out_bytes[k] += pkt.payload.len() as u64;
                let queued = sent.is_none();
                transmits.extend(sent);
                return queued;
            }
            Err(write) => write,
        };
        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
            return false;
        };
        let backlog = tx
            .queue_info()
            .and_then(|q| q.first_unsent())
            .map(|first| now.saturating_duration_since(first));
        if t.kind == MediaKind::Video && backlog.is_some_and(|b| b > MAX_BACKLOG) {
            // The link cannot keep up: stop adding to the queue, and start again at a
            // keyframe once the allocator has chosen a layer that fits.
            tracing::debug!(session = %self.id, publisher = %inc.publisher, ?backlog, "send queue backed up; waiting for a keyframe");
            t.current = None;
            self.keyframes_wanted
                .push((inc.publisher, inc.mid, t.target.flatten()));
            return false;
        }
        stats.rtp_out_packets[k] += 1;
        stats.rtp_out_bytes[k] += pkt.payload.len() as u64;
        tx.write_rtp(write);
        true
    }

    /// Asks this publisher for a keyframe on `mid`/`rid`, at most once per `throttle`.
    pub fn request_keyframe(
        &mut self,
        mid: Mid,
        rid: Option<Rid>,
        kind: KeyframeRequestKind,
        now: Instant,
        throttle: Duration,
    ) -> bool {
        let Some(t) = self.tracks_in.iter_mut().find(|t| t.mid == mid) else {
            return false;
        };
        if t.kind != MediaKind::Video {
            return false;
        }
        // Only layers seen arriving: a request for another one has no stream to go to.
        let Some(layer) = t.layers.iter_mut().find(|l| l.rid == rid) else {
            return false;
        };
        if layer
            .last_keyframe_request
            .is_some_and(|at| now.saturating_duration_since(at) < throttle)
        {
            // Not dropped: a subscriber that joined just after the last keyframe needs one too.
            layer.deferred_keyframe = Some(match layer.deferred_keyframe {
                Some(KeyframeRequestKind::Fir) => KeyframeRequestKind::Fir,
                _ => kind,
            });
            return false;
        }
        layer.last_keyframe_request = Some(now);
        layer.deferred_keyframe = None;
        let mut api = self.rtc.direct_api();
        let Some(rx) = api.stream_rx_by_mid(mid, rid) else {
            return false;
        };
        rx.request_keyframe(kind);
        true
    }

    /// Sends the deferred keyframe requests whose throttle interval has passed.
    fn send_deferred_keyframes(&mut self, now: Instant, throttle: Duration) {
        let due: Vec<(Mid, Option<Rid>, KeyframeRequestKind)> = self
            .tracks_in
            .iter()
            .flat_map(|t| t.layers.iter().map(move |l| (t.mid, l)))
            .filter_map(|(mid, l)| {
                let kind = l.deferred_keyframe?;
                let ready = l
                    .last_keyframe_request
                    .is_none_or(|at| now.saturating_duration_since(at) >= throttle);
                ready.then_some((mid, l.rid, kind))
            })
            .collect();
        for (mid, rid, kind) in due {
            self.request_keyframe(mid, rid, kind, now, throttle);
        }
    }
}

fn addr<T>(x: &T) -> *const u8 {
    std::ptr::from_ref(x).cast()
}

/// Asks the CPU to fetch the cache line at `p` into its first-level cache, without waiting.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint: it never faults or changes memory, whatever the
    // address (and SSE, which it needs, is part of x86-64).
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
