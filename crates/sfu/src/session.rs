//! One participant's PeerConnection on the media plane.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parley_proto::media::{MediaEvent, SessionId};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::PayloadParams;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Pt};
use str0m::rtp::{RtpPacket, RtpWrite, SeqNo};
use str0m::{Event, IceConnectionState, Output, Rtc};

use crate::Transmit;
use crate::speaking::SpeakingDetector;

pub(crate) struct Session {
    pub id: SessionId,
    pub room: String,
    /// Labels this participant's tracks for the others (`msid` stream id).
    pub stream_id: String,
    pub rtc: Rtc,
    pub next_timeout: Instant,
    /// Tracks this participant publishes.
    pub tracks_in: Vec<TrackIn>,
    /// Other participants' tracks forwarded to this one.
    pub tracks_out: Vec<TrackOut>,
    /// Our outstanding offer and its id.
    pending: Option<(u64, SdpPendingOffer)>,
    last_offer_id: u64,
    /// The first offer/answer exchange is done; only then do we offer changes ourselves.
    negotiated: bool,
    connected: bool,
    speaking: SpeakingDetector,
}

pub(crate) struct TrackIn {
    pub mid: Mid,
    pub kind: MediaKind,
    last_keyframe_request: Option<Instant>,
    /// A keyframe request that came within the throttle interval, sent when it ends.
    deferred_keyframe: Option<KeyframeRequestKind>,
    received_any: bool,
}

impl TrackIn {
    fn new(mid: Mid, kind: MediaKind) -> Self {
        TrackIn {
            mid,
            kind,
            last_keyframe_request: None,
            deferred_keyframe: None,
            received_any: false,
        }
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

pub(crate) struct TrackOut {
    pub source: SessionId,
    pub source_mid: Mid,
    pub kind: MediaKind,
    stream_id: String,
    state: TrackState,
    /// The source left while this track was being negotiated.
    source_gone: bool,
    /// Incoming payload type → ours, learnt on first use.
    pt_map: Vec<(Pt, Pt)>,
    /// First forwarded incoming sequence number: outgoing numbers start near 0 for each
    /// subscriber, so SRTP's rollover counter starts at 0 on both sides.
    seq_base: Option<u64>,
}

impl TrackOut {
    pub fn new(source: SessionId, source_mid: Mid, kind: MediaKind, stream_id: &str) -> Self {
        TrackOut {
            source,
            source_mid,
            kind,
            stream_id: stream_id.to_string(),
            state: TrackState::ToOpen,
            source_gone: false,
            pt_map: Vec::new(),
            seq_base: None,
        }
    }

    fn rebase(&mut self, seq: SeqNo) -> Option<SeqNo> {
        const START: u64 = 1000;
        let seq = *seq;
        let base = *self.seq_base.get_or_insert(seq);
        // Packets older than the first one forwarded are of no use to this subscriber.
        seq.checked_sub(base).map(|d| SeqNo::from(d + START))
    }
}

/// What one round of polling a session produced that concerns other sessions.
pub(crate) struct PollOut {
    pub timeout: Instant,
    pub tracks_added: Vec<(Mid, MediaKind)>,
    pub tracks_removed: Vec<Mid>,
    pub keyframe_requests: Vec<(SessionId, Mid, KeyframeRequestKind)>,
    pub connected: bool,
    pub packets: Vec<(Mid, RtpPacket)>,
}

impl Session {
    pub fn new(id: SessionId, room: String, stream_id: String, now: Instant) -> Self {
        let rtc = Rtc::builder()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .build(now);
        Session {
            id,
            room,
            stream_id,
            rtc,
            next_timeout: now,
            tracks_in: Vec::new(),
            tracks_out: Vec::new(),
            pending: None,
            last_offer_id: 0,
            negotiated: false,
            connected: false,
            speaking: SpeakingDetector::default(),
        }
    }

    pub fn ufrag(&mut self) -> String {
        self.rtc.direct_api().local_ice_credentials().ufrag
    }

    /// Accepts the participant's offer. An offer of ours still outstanding is rolled back (we
    /// are the polite peer) and its changes are offered again later.
    pub fn accept_offer(
        &mut self,
        offer: SdpOffer,
        mids: &[Mid],
    ) -> Result<(String, Vec<(Mid, MediaKind)>), String> {
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
        // Publish the participant's tracks now rather than when str0m reports them (after
        // ICE and DTLS), so the others can negotiate them while this one connects.
        let mut published = Vec::new();
        for mid in mids {
            let Some(media) = self.rtc.media(*mid) else {
                continue;
            };
            let kind = media.kind();
            tracing::trace!(session = %self.id, %mid, dir = ?media.direction(), "offered media");
            if media.direction().is_receiving() && !self.tracks_in.iter().any(|t| t.mid == *mid) {
                tracing::debug!(session = %self.id, %mid, ?kind, "track published");
                self.tracks_in.push(TrackIn::new(*mid, kind));
                published.push((*mid, kind));
            }
        }
        Ok((answer.to_sdp_string(), published))
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
                if t.source_gone {
                    t.state = TrackState::ToStop(mid);
                } else {
                    t.state = TrackState::Open(mid);
                    opened.push((t.source, t.source_mid, t.kind));
                }
            }
        }
        self.tracks_out
            .retain(|t| !matches!(t.state, TrackState::NegotiatingStop(_)));
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
        self.tracks_out
            .retain(|t| !(t.source_gone && t.state == TrackState::ToOpen));
    }

    /// The publisher `source` left (`mid` None), or stopped publishing track `mid`: stop
    /// forwarding.
    pub fn source_gone(&mut self, source: SessionId, mid: Option<Mid>) {
        let matches = |t: &TrackOut| t.source == source && mid.is_none_or(|m| m == t.source_mid);
        self.tracks_out
            .retain(|t| !(matches(t) && t.state == TrackState::ToOpen));
        for t in self.tracks_out.iter_mut().filter(|t| matches(t)) {
            t.source_gone = true;
            if let TrackState::Open(m) = t.state {
                t.state = TrackState::ToStop(m);
            }
        }
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
                    let track_id = format!("{}-{}", t.stream_id, t.source_mid);
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

    /// Drains str0m's output: datagrams go to `transmits`, events for signaling to `events`,
    /// and what concerns other sessions is returned.
    pub fn poll(
        &mut self,
        now: Instant,
        transmits: &mut VecDeque<Transmit>,
        events: &mut VecDeque<MediaEvent>,
    ) -> PollOut {
        self.maybe_negotiate(events);
        self.send_deferred_keyframes(now, crate::KEYFRAME_THROTTLE);
        let mut out = PollOut {
            timeout: now + Duration::from_secs(1),
            tracks_added: Vec::new(),
            tracks_removed: Vec::new(),
            keyframe_requests: Vec::new(),
            connected: false,
            packets: Vec::new(),
        };
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
                Output::Timeout(t) => {
                    out.timeout = t;
                    break;
                }
                Output::Event(event) => self.handle_event(event, now, events, &mut out),
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
    ) {
        match event {
            Event::IceConnectionStateChange(state) => {
                tracing::debug!(session = %self.id, ?state, "ice state");
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
                if m.direction.is_receiving() && !self.tracks_in.iter().any(|t| t.mid == m.mid) =>
            {
                tracing::debug!(session = %self.id, mid = %m.mid, kind = ?m.kind, "track published");
                self.tracks_in.push(TrackIn::new(m.mid, m.kind));
                out.tracks_added.push((m.mid, m.kind));
            }
            Event::RtpPacket(pkt) => {
                let Some(mid) = self
                    .rtc
                    .direct_api()
                    .stream_rx(&pkt.header.ssrc)
                    .map(|s| s.mid())
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
                let is_audio = track.kind == MediaKind::Audio;
                if is_audio
                    && let Some(level) = pkt.header.ext_vals.audio_level
                    && let Some(speaking) = self.speaking.update(level, now)
                {
                    events.push_back(MediaEvent::Speaking {
                        session: self.id,
                        speaking,
                    });
                }
                out.packets.push((mid, pkt));
            }
            Event::KeyframeRequest(req) => {
                if let Some(t) = self
                    .tracks_out
                    .iter()
                    .find(|t| t.state == TrackState::Open(req.mid))
                {
                    out.keyframe_requests
                        .push((t.source, t.source_mid, req.kind));
                }
            }
            _ => {}
        }
    }

    /// Writes a packet of `source`'s track `source_mid` to this subscriber, if it receives it.
    pub fn write(
        &mut self,
        source: SessionId,
        source_mid: Mid,
        params: PayloadParams,
        pkt: &RtpPacket,
    ) -> bool {
        if !self.connected {
            return false;
        }
        let Some(t) = self
            .tracks_out
            .iter_mut()
            .find(|t| t.source == source && t.source_mid == source_mid)
        else {
            return false;
        };
        let TrackState::Open(mid) = t.state else {
            return false;
        };
        let in_pt = pkt.header.payload_type;
        let pt = match t.pt_map.iter().find(|(i, _)| *i == in_pt) {
            Some((_, o)) => *o,
            None => {
                let Some(o) = self.rtc.codec_config().match_params(params).map(|p| p.pt()) else {
                    tracing::debug!(session = %self.id, %in_pt, "no matching codec");
                    return false;
                };
                t.pt_map.push((in_pt, o));
                o
            }
        };
        let first = t.seq_base.is_none();
        let Some(seq) = t.rebase(pkt.seq_no) else {
            return false;
        };
        if first {
            tracing::debug!(session = %self.id, %source, %mid, kind = ?t.kind, "first packet forwarded");
        }
        let nackable = t.kind == MediaKind::Video;
        let mut api = self.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
            return false;
        };
        tx.write_rtp(
            RtpWrite::new(
                pt,
                seq,
                pkt.header.timestamp,
                pkt.timestamp,
                pkt.payload.clone(),
            )
            .marker(pkt.header.marker)
            .ext_vals(pkt.header.ext_vals.clone())
            .nackable(nackable),
        );
        true
    }

    /// Asks this publisher for a keyframe on `mid`, at most once per `throttle`.
    pub fn request_keyframe(
        &mut self,
        mid: Mid,
        kind: KeyframeRequestKind,
        now: Instant,
        throttle: Duration,
    ) -> bool {
        let Some(t) = self.tracks_in.iter_mut().find(|t| t.mid == mid) else {
            return false;
        };
        if t.last_keyframe_request
            .is_some_and(|at| now.saturating_duration_since(at) < throttle)
        {
            // Not dropped: a subscriber that joined just after the last keyframe needs one too.
            t.deferred_keyframe = Some(match t.deferred_keyframe {
                Some(KeyframeRequestKind::Fir) => KeyframeRequestKind::Fir,
                _ => kind,
            });
            return false;
        }
        let mut api = self.rtc.direct_api();
        let Some(rx) = api.stream_rx_by_mid(mid, None) else {
            return false;
        };
        rx.request_keyframe(kind);
        t.last_keyframe_request = Some(now);
        t.deferred_keyframe = None;
        true
    }

    /// Sends the deferred keyframe requests whose throttle interval has passed.
    fn send_deferred_keyframes(&mut self, now: Instant, throttle: Duration) {
        let due: Vec<(Mid, KeyframeRequestKind)> = self
            .tracks_in
            .iter()
            .filter_map(|t| {
                let kind = t.deferred_keyframe?;
                let ready = t
                    .last_keyframe_request
                    .is_none_or(|at| now.saturating_duration_since(at) >= throttle);
                ready.then_some((t.mid, kind))
            })
            .collect();
        for (mid, kind) in due {
            self.request_keyframe(mid, kind, now, throttle);
        }
    }
}
