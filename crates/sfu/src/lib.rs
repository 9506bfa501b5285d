//! Parley's media plane as a sans-IO state machine.
//!
//! [`Sfu`] owns every media session (one str0m [`Rtc`] per participant, ICE-lite, RTP mode) and
//! forwards RTP packets between the sessions of a room without decoding them. It takes time as
//! an argument and does no I/O: the driver feeds it datagrams ([`Sfu::handle_datagram`]),
//! commands from signaling ([`Sfu::handle_command`]) and timeouts ([`Sfu::handle_timeout`]), and
//! drains datagrams to send ([`Sfu::poll_transmit`]) and events for signaling
//! ([`Sfu::poll_event`]).
//!
//! Incoming datagrams are routed to their session through maps, never by asking each session:
//! STUN by the local ICE ufrag in the USERNAME attribute, everything else by source address
//! (learnt from STUN).

mod alloc;
mod munger;
mod session;
mod speaking;
mod stats;
mod vp8;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parley_proto::media::{MediaCommand, MediaEvent, SessionId, TrackSource};
use rustc_hash::FxHashMap;
use str0m::Input;
use str0m::bwe::Bitrate;
use str0m::crypto::dtls::DtlsCert;
use str0m::format::Codec;
use str0m::ice::StunMessage;
use str0m::media::{KeyframeRequestKind, MediaKind, Mid, Rid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::Vp8Descriptor;

use alloc::{Choice, Demand, LayerInfo};
use session::{Incoming, PREFETCH_STAGES, Pause, Session, TrackOut};
use speaking::DominantSpeaker;

pub use stats::{AUDIO, ICE_STATES, Sample, SfuStats, VIDEO};
pub use str0m::net::Transmit;

/// Static settings of the media plane.
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// Addresses put in ICE host candidates (the one media port on each public address).
    pub candidates: Vec<SocketAddr>,
    /// Also offer passive ICE-TCP candidates on the same addresses (RFC 6544, framing RFC 4571).
    pub tcp: bool,
}

/// The media plane: every session, room and forwarding decision.
pub struct Sfu {
    config: SfuConfig,
    /// Boxed: the table holds only ids and pointers, so that finding a session reads a line
    /// shared with others rather than the cold first line of an 11 KB slot.
    sessions: FxHashMap<SessionId, Box<Session>>,
    rooms: HashMap<String, Vec<SessionId>>,
    by_ufrag: HashMap<String, SessionId>,
    by_addr: FxHashMap<SocketAddr, SessionId>,
    /// Sessions' timeouts (`Session::next_timeout`), and their bandwidth estimators'
    /// delay-control turns that come first (`Session::estimator_timeout`, which may run up to
    /// [`TIMER_SLACK`] late); both by when they are due.
    timers: BinaryHeap<Reverse<(Instant, SessionId)>>,
    lax_timers: BinaryHeap<Reverse<(Instant, SessionId)>>,
    events: VecDeque<MediaEvent>,
    transmits: VecDeque<Transmit>,
    /// Sessions whose output must be polled before the next wait, in the order they got work
    /// (each once: [`Session::queued`]). Datagrams only queue their session; the polling waits
    /// until the caller asks for output, so a batch of datagrams costs each subscriber one
    /// round of str0m's polling, not one per forwarded packet.
    to_drive: VecDeque<SessionId>,
    /// The time of the newest input not yet driven.
    pending_now: Option<Instant>,
    /// The vector a session's poll puts its received packets in, kept between polls.
    polled: Vec<(Mid, Option<Rid>, str0m::rtp::RtpPacket)>,
    /// Dominant speaker per room.
    dominant: HashMap<String, DominantSpeaker>,
    /// When layer selection, dynacast and speaker detection run next.
    next_tick: Option<Instant>,
    stats: SfuStats,
    samples: Vec<Sample>,
    /// One DTLS certificate for every session (its fingerprint goes in every answer), made
    /// once: a certificate per session cost a key generation at each join.
    dtls_cert: Option<DtlsCert>,
}

/// What a participant's access token allows.
#[derive(Debug, Clone, Copy)]
struct Grants {
    publish: bool,
    subscribe: bool,
}

/// How often layers are chosen, publishers' layers paused or resumed, and speakers ranked.
const TICK: Duration = Duration::from_millis(200);
/// A packet is forwarded to its subscribers this many at a time, their state prefetched for
/// all of them first (`Session::prefetch_write`): some 40 cache lines each, so that a chunk's
/// fit in the 32 KB first-level cache.
const PREFETCH_AHEAD: usize = 8;
/// A layer with no packet for this long is not flowing (paused at the encoder, or lost).
const LAYER_ALIVE: Duration = Duration::from_millis(1000);
/// How soon a subscriber with a video paused for bandwidth is probed for more again: a second
/// after a probe that the estimate rose with (the link is coming back, and a probe goes to twice
/// the estimate at most). After one that left the estimate where it was the wait doubles, up to
/// `STARVED_PROBE_MAX`: on a link too thin for any video every probe costs the audio some
/// packets. (Probing again 400 ms after a rise brought the video back no sooner with Chromium,
/// and let fewer audio packets through the simulated thin link.)
pub(crate) const STARVED_PROBE_MIN: Duration = Duration::from_secs(1);
const STARVED_PROBE_MAX: Duration = Duration::from_secs(4);
/// Assumed need of one forwarded audio track when sharing a subscriber's bandwidth.
const AUDIO_BITRATE: u64 = 50_000;

/// How late a bandwidth estimator's delay-control turn may run (its rate control counts the
/// time that passed since its last turn). A worker forwarding a screen share to 29 viewers ran
/// about 1 000 session timeouts a second, most of them these 25 ms turns, and woke as often for
/// timers as for datagrams; within this slack a turn runs with the next datagram or timeout of
/// any session instead.
pub const TIMER_SLACK: Duration = Duration::from_millis(5);

/// Do not ask a publisher for keyframes more often than this per track.
pub(crate) const KEYFRAME_THROTTLE: Duration = Duration::from_millis(500);

impl Sfu {
    pub fn new(config: SfuConfig) -> Self {
        Sfu {
            config,
            sessions: FxHashMap::default(),
            rooms: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: FxHashMap::default(),
            timers: BinaryHeap::new(),
            lax_timers: BinaryHeap::new(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            to_drive: VecDeque::new(),
            pending_now: None,
            polled: Vec::new(),
            dominant: HashMap::new(),
            next_tick: None,
            stats: SfuStats::default(),
            samples: Vec::new(),
            dtls_cert: str0m::crypto::from_feature_flags()
                .dtls_provider
                .generate_certificate(),
        }
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The local ICE ufrag of a session: STUN for it names it in its USERNAME.
    pub fn ice_ufrag(&mut self, session: SessionId) -> Option<String> {
        Some(self.sessions.get_mut(&session)?.ufrag())
    }

    /// Counters since start.
    pub fn stats(&self) -> &SfuStats {
        &self.stats
    }

    /// RTCP readings gathered since the last call.
    pub fn drain_samples(&mut self) -> Vec<Sample> {
        std::mem::take(&mut self.samples)
    }

    /// A command from the signaling plane.
    pub fn handle_command(&mut self, cmd: MediaCommand, now: Instant) {
        match cmd {
            MediaCommand::Offer {
                session,
                room,
                stream_id,
                sdp,
                screen_mids,
                can_publish,
                can_subscribe,
            } => {
                let grants = Grants {
                    publish: can_publish,
                    subscribe: can_subscribe,
                };
                self.handle_offer(session, room, stream_id, &sdp, &screen_mids, grants, now)
            }
            MediaCommand::View { session, tiles } => {
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.view = Some(
                        tiles
                            .iter()
                            .map(|t| (t.publisher, t.source, t.width))
                            .collect(),
                    );
                    self.select(session, now);
                }
            }
            MediaCommand::Mute {
                session,
                audio,
                video,
            } => {
                let unmuted: Vec<(Mid, MediaKind)> = self
                    .sessions
                    .get_mut(&session)
                    .map(|s| s.announce_unmuted(!audio, !video))
                    .unwrap_or_default();
                for (mid, kind) in unmuted {
                    self.publish(session, mid, kind);
                }
            }
            MediaCommand::Answer { session, id, sdp } => self.handle_answer(session, id, &sdp, now),
            MediaCommand::Close { session } => self.close_session(session),
        }
        self.drive_all(now);
    }

    /// A datagram that arrived on the media port. Anything that is not ours is dropped.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        proto: Protocol,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) {
        let Some(sid) = self.route(source, data) else {
            tracing::trace!(%source, len = data.len(), "datagram for no session");
            self.stats.datagrams_unrouted += 1;
            return;
        };
        let Ok(contents) = data.try_into() else {
            tracing::trace!(%source, "unparseable datagram");
            return;
        };
        let Some(session) = self.sessions.get_mut(&sid) else {
            return;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto,
                source,
                destination,
                contents,
            },
        );
        if let Err(err) = session.rtc.handle_input(input) {
            tracing::debug!(session = %sid, %err, "input refused");
            self.stats.inputs_refused += 1;
        }
        // str0m wants its output drained after each input, so this session is polled now;
        // the subscribers its packets were written to wait until the caller asks for output.
        self.drive_session(sid, now);
        self.pending_now = Some(now);
    }

    /// Polls the sessions that datagrams gave work to.
    fn drive_pending(&mut self) {
        if let Some(now) = self.pending_now.take() {
            self.drive_all(now);
        }
    }

    /// The earliest time [`Sfu::handle_timeout`] must be called.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.drive_pending();
        let sessions = &self.sessions;
        let strict = next_valid(&mut self.timers, sessions, false);
        let lax = next_valid(&mut self.lax_timers, sessions, true).map(|at| at + TIMER_SLACK);
        [strict, lax, self.next_tick].into_iter().flatten().min()
    }

    /// Advances every session whose timer is due. Called at [`Sfu::poll_timeout`], and best
    /// also after datagrams: the timeouts that may run late ([`TIMER_SLACK`]) run then
    /// instead of waking the caller again.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.run_due_timers(now);
        if self.next_tick.is_some_and(|t| t <= now) {
            self.tick(now);
        }
        // The sessions are polled as their datagrams are taken (`poll_transmit`).
        self.pending_now = Some(now);
    }

    /// Runs the timeouts of sessions due by `now`, the lax ones included: whatever woke the
    /// worker, they run now rather than wake it again.
    fn run_due_timers(&mut self, now: Instant) {
        for lax in [false, true] {
            loop {
                let heap = if lax {
                    &mut self.lax_timers
                } else {
                    &mut self.timers
                };
                let Some(Reverse((at, sid))) = heap.peek().copied() else {
                    break;
                };
                if at > now {
                    break;
                }
                heap.pop();
                let Some(session) = self.sessions.get_mut(&sid) else {
                    continue;
                };
                if session.timer(lax) != Some(at) {
                    continue;
                }
                self.stats.session_timeouts += 1;
                if let Err(err) = session.rtc.handle_input(Input::Timeout(now)) {
                    tracing::debug!(session = %sid, %err, "timeout refused");
                }
                queue(&mut self.to_drive, session);
            }
        }
    }

    /// The next datagram to send. Sessions with work are polled one at a time, as their
    /// datagrams are taken: the time str0m stamps on a packet for transport-wide congestion
    /// control is then close to when it leaves, not a whole round of sessions earlier (which
    /// a bandwidth estimator takes for a queue building up).
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        loop {
            if let Some(t) = self.transmits.pop_front() {
                if self.transmits.is_empty() {
                    // Back to the start of the ring (`clear` does that): the next round writes
                    // into the few slots still in the cache, not on around a ring that a
                    // burst (everyone joining at once) may have grown to megabytes.
                    self.transmits.clear();
                }
                return Some(t);
            }
            let now = self.pending_now?;
            match self.to_drive.pop_front() {
                Some(sid) if self.sessions.get(&sid).is_some_and(|s| s.queued) => {
                    self.drive_session(sid, now)
                }
                Some(_) => {}
                None => self.pending_now = None,
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<MediaEvent> {
        self.drive_pending();
        let ev = self.events.pop_front()?;
        if matches!(ev, MediaEvent::SdpRejected { .. }) {
            self.stats.sdp_rejected += 1;
        }
        Some(ev)
    }

    fn route(&mut self, source: SocketAddr, data: &[u8]) -> Option<SessionId> {
        // RFC 7983: a first byte of 0..=3 is STUN.
        if data.first().is_some_and(|b| *b < 4)
            && let Ok(msg) = StunMessage::parse(data)
            && let Some((local, _remote)) = msg.split_username()
        {
            let Some(sid) = self.by_ufrag.get(local).copied() else {
                tracing::debug!(%source, ufrag = local, "STUN for an unknown ufrag");
                return None;
            };
            // Learn (or move) the source address once the session's ICE agent checked
            // the message integrity; until then route by ufrag only.
            let session = self.sessions.get(&sid)?;
            let input_ok = msg.is_binding_request();
            if input_ok && self.by_addr.get(&source) != Some(&sid) {
                if let Some(old) = self.by_addr.insert(source, sid) {
                    tracing::debug!(%source, from = %old, to = %sid, "address moved session");
                }
                tracing::debug!(session = %sid, %source, room = %session.room, "learnt address");
            }
            return Some(sid);
        }
        self.by_addr.get(&source).copied()
    }

    // The fields of `MediaCommand::Offer`, taken apart.
    #[allow(clippy::too_many_arguments)]
    fn handle_offer(
        &mut self,
        sid: SessionId,
        room: String,
        stream_id: String,
        sdp: &str,
        screen_mids: &[String],
        grants: Grants,
        now: Instant,
    ) {
        let offer = match str0m::change::SdpOffer::from_sdp_string(sdp) {
            Ok(o) => o,
            Err(err) => {
                self.events.push_back(MediaEvent::SdpRejected {
                    session: sid,
                    reason: format!("invalid SDP offer: {err}"),
                });
                return;
            }
        };

        if !self.sessions.contains_key(&sid) {
            let mut session =
                Session::new(sid, room.clone(), stream_id, self.dtls_cert.as_ref(), now);
            session.can_publish = grants.publish;
            session.can_subscribe = grants.subscribe;
            for addr in &self.config.candidates {
                match str0m::Candidate::host(*addr, "udp") {
                    Ok(c) => {
                        session.rtc.add_local_candidate(c);
                    }
                    Err(err) => tracing::warn!(%addr, %err, "unusable candidate address"),
                }
                if self.config.tcp {
                    let tcp = str0m::Candidate::builder()
                        .tcp()
                        .host(*addr)
                        .tcptype(str0m::net::TcpType::Passive)
                        .build();
                    match tcp {
                        Ok(c) => {
                            session.rtc.add_local_candidate(c);
                        }
                        Err(err) => tracing::warn!(%addr, %err, "unusable TCP candidate address"),
                    }
                }
            }
            // Subscribe the newcomer to every track already offered in the room.
            let members = self.rooms.entry(room).or_default();
            for other in members.iter().filter(|_| grants.subscribe) {
                if let Some(o) = self.sessions.get(other) {
                    for t in o.tracks_in.iter().filter(|t| t.offered) {
                        session.add_track_out(TrackOut::new(
                            *other,
                            t.mid,
                            t.kind,
                            t.source,
                            &o.stream_id,
                        ));
                    }
                }
            }
            members.push(sid);
            self.sessions.insert(sid, Box::new(session));
            tracing::info!(session = %sid, "media session created");
        }

        if self.next_tick.is_none() {
            self.next_tick = Some(now + TICK);
        }
        let Some(session) = self.sessions.get_mut(&sid) else {
            return;
        };
        for m in screen_mids {
            let mid = Mid::from(m.as_str());
            if !session.screen_mids.contains(&mid) {
                session.screen_mids.push(mid);
            }
        }
        let old_ufrag = session.ufrag();
        let mids: Vec<Mid> = sdp
            .lines()
            .filter_map(|l| l.strip_prefix("a=mid:"))
            .map(|m| Mid::from(m.trim()))
            .collect();
        match session.accept_offer(offer, &mids) {
            Ok(answer) => {
                self.events.push_back(MediaEvent::Answer {
                    session: sid,
                    sdp: answer,
                });
            }
            Err(reason) => {
                self.events.push_back(MediaEvent::SdpRejected {
                    session: sid,
                    reason,
                });
            }
        }
        let new_ufrag = session.ufrag();
        if old_ufrag != new_ufrag {
            self.by_ufrag.remove(&old_ufrag);
        }
        self.by_ufrag.insert(new_ufrag, sid);
        self.mark(sid);
    }

    fn handle_answer(&mut self, sid: SessionId, id: u64, sdp: &str, now: Instant) {
        let Some(session) = self.sessions.get_mut(&sid) else {
            return;
        };
        let answer = match str0m::change::SdpAnswer::from_sdp_string(sdp) {
            Ok(a) => a,
            Err(err) => {
                self.events.push_back(MediaEvent::SdpRejected {
                    session: sid,
                    reason: format!("invalid SDP answer: {err}"),
                });
                return;
            }
        };
        match session.accept_answer(id, answer) {
            Ok(opened) => {
                if !opened.is_empty() {
                    // Choosing the new tracks' layers also asks for their keyframes.
                    self.select(sid, now);
                }
            }
            Err(reason) => self.events.push_back(MediaEvent::SdpRejected {
                session: sid,
                reason,
            }),
        }
        self.mark(sid);
    }

    fn close_session(&mut self, sid: SessionId) {
        let Some(mut session) = self.sessions.remove(&sid) else {
            return;
        };
        session.rtc.disconnect();
        self.by_ufrag.retain(|_, s| *s != sid);
        self.by_addr.retain(|_, s| *s != sid);
        if let Some(members) = self.rooms.get_mut(&session.room) {
            members.retain(|m| *m != sid);
            for m in members.iter() {
                if let Some(other) = self.sessions.get_mut(m) {
                    other.publisher_gone(sid, None);
                    queue(&mut self.to_drive, other);
                }
            }
            if members.is_empty() {
                self.rooms.remove(&session.room);
                self.dominant.remove(&session.room);
            }
        }
        self.events.push_back(MediaEvent::Closed { session: sid });
        tracing::info!(session = %sid, "media session closed");
    }

    /// Polls every session that has work until none has, forwarding media between them.
    fn drive_all(&mut self, now: Instant) {
        self.pending_now = None;
        while let Some(sid) = self.to_drive.pop_front() {
            if self.sessions.get(&sid).is_some_and(|s| s.queued) {
                self.drive_session(sid, now);
            }
        }
    }

    /// Polls one session's output: forwards its packets, sends its datagrams.
    fn drive_session(&mut self, sid: SessionId, now: Instant) {
        {
            let Some(session) = self.sessions.get_mut(&sid) else {
                return;
            };
            session.queued = false;
            self.stats.session_polls += 1;
            let out = session.poll(
                now,
                &mut self.transmits,
                &mut self.events,
                &mut self.stats,
                &mut self.samples,
                std::mem::take(&mut self.polled),
            );
            let timeout = out.timeout;
            if session.next_timeout != timeout {
                session.next_timeout = timeout;
                self.timers.push(Reverse((timeout, sid)));
            }
            if session.estimator_timeout != out.estimator {
                session.estimator_timeout = out.estimator;
                if let Some(at) = out.estimator {
                    self.lax_timers.push(Reverse((at, sid)));
                }
            }
            for added in out.tracks_added {
                self.publish(sid, added.0, added.1);
            }
            for mid in out.tracks_removed {
                self.unpublish(sid, mid);
            }
            for (publisher, mid, rid, kind) in out.keyframe_requests {
                self.request_keyframe(publisher, mid, rid, kind, now);
            }
            if out.connected {
                // A subscriber that just connected needs a keyframe of every video it receives.
                let wanted: Vec<_> = self
                    .sessions
                    .get(&sid)
                    .into_iter()
                    .flat_map(|s| s.tracks_out.iter())
                    .filter(|t| t.kind == MediaKind::Video)
                    .filter_map(|t| Some((t.publisher, t.publisher_mid, t.target?)))
                    .collect();
                for (publisher, mid, rid) in wanted {
                    self.request_keyframe(publisher, mid, rid, KeyframeRequestKind::Pli, now);
                }
            }
            let mut packets = out.packets;
            for (mid, rid, pkt) in packets.drain(..) {
                self.forward(sid, mid, rid, &pkt, now);
            }
            self.polled = packets;
        }
    }

    /// Queues `sid` to be polled.
    fn mark(&mut self, sid: SessionId) {
        if let Some(s) = self.sessions.get_mut(&sid) {
            queue(&mut self.to_drive, s);
        }
    }

    /// A session's track carried its first packet, or was unmuted: offer it to everyone else
    /// in the room.
    fn publish(&mut self, sid: SessionId, mid: Mid, kind: MediaKind) {
        let Some(session) = self.sessions.get(&sid) else {
            return;
        };
        let stream_id = session.stream_id.clone();
        let source = session
            .tracks_in
            .iter()
            .find(|t| t.mid == mid)
            .map_or(TrackSource::Camera, |t| t.source);
        let Some(members) = self.rooms.get(&session.room) else {
            return;
        };
        for m in members.iter().filter(|m| **m != sid) {
            if let Some(other) = self.sessions.get_mut(m).filter(|o| o.can_subscribe) {
                other.add_track_out(TrackOut::new(sid, mid, kind, source, &stream_id));
                queue(&mut self.to_drive, other);
            }
        }
    }

    /// A session stopped publishing a track: stop it for everyone else.
    fn unpublish(&mut self, sid: SessionId, mid: Mid) {
        let Some(room) = self.sessions.get(&sid).map(|s| s.room.clone()) else {
            return;
        };
        let Some(members) = self.rooms.get(&room) else {
            return;
        };
        for m in members.iter().filter(|m| **m != sid) {
            if let Some(other) = self.sessions.get_mut(m) {
                other.publisher_gone(sid, Some(mid));
                queue(&mut self.to_drive, other);
            }
        }
    }

    fn forward(
        &mut self,
        sid: SessionId,
        mid: Mid,
        rid: Option<Rid>,
        pkt: &str0m::rtp::RtpPacket,
        now: Instant,
    ) {
        let Some(publisher) = self.sessions.get_mut(&sid) else {
            return;
        };
        let in_pt = pkt.header.payload_type;
        let Some(params) = publisher
            .rtc
            .codec_config()
            .find(|p| p.pt() == in_pt || p.red() == Some(in_pt))
            .copied()
        else {
            return;
        };
        let red = params.red() == Some(in_pt);
        let is_vp8 = params.spec().codec == Codec::Vp8;
        let vp8 = if is_vp8 {
            Vp8Descriptor::parse(&pkt.payload).ok()
        } else {
            None
        };
        let size = if is_vp8 {
            vp8::keyframe_size(&pkt.payload)
        } else {
            None
        };
        if let (Some((w, _)), Some(t)) =
            (size, publisher.tracks_in.iter_mut().find(|t| t.mid == mid))
            && let Some(l) = t.layers.iter_mut().find(|l| l.rid == rid)
        {
            l.width = u32::from(w);
        }
        let incoming = Incoming {
            publisher: sid,
            mid,
            rid,
            params,
            red,
            pkt,
            keyframe: size.is_some() || !is_vp8,
            vp8,
        };
        let Some(members) = self.rooms.get(&publisher.room) else {
            return;
        };
        let mut wanted = Vec::new();
        for chunk in members.chunks(PREFETCH_AHEAD) {
            for stage in 0..PREFETCH_STAGES {
                for m in chunk.iter().filter(|m| **m != sid) {
                    if let Some(sub) = self.sessions.get(m) {
                        sub.prefetch_write(sid, mid, stage);
                    }
                }
            }
            for m in chunk {
                if *m == sid {
                    continue;
                }
                let Some(sub) = self.sessions.get_mut(m) else {
                    continue;
                };
                if sub.write(&incoming, now, &mut self.stats, &mut self.transmits) {
                    queue(&mut self.to_drive, sub);
                }
                if !sub.keyframes_wanted.is_empty() {
                    wanted.append(&mut sub.keyframes_wanted);
                }
            }
        }
        for (publisher, mid, rid) in wanted {
            self.request_keyframe(publisher, mid, rid, KeyframeRequestKind::Pli, now);
        }
    }

    /// Layer selection, dynacast and speaker ranking, every [`TICK`].
    fn tick(&mut self, now: Instant) {
        self.next_tick = (!self.sessions.is_empty()).then_some(now + TICK);
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for sid in &ids {
            self.select(*sid, now);
        }
        self.dynacast();
        let rooms: Vec<(String, Vec<SessionId>)> = self
            .rooms
            .iter()
            .map(|(r, m)| (r.clone(), m.clone()))
            .collect();
        for (room, members) in rooms {
            let levels: Vec<(SessionId, f32)> = members
                .iter()
                .filter_map(|m| Some((*m, self.sessions.get(m)?.loudness)))
                .collect();
            let detector = self.dominant.entry(room).or_default();
            if let Some(session) = detector.update(&levels) {
                self.events
                    .push_back(MediaEvent::DominantSpeaker { session });
            }
        }
    }

    /// Chooses, for each video subscriber `sid` receives, the layer its view and bandwidth
    /// allow; asks for keyframes of new targets and tells it about paused videos.
    fn select(&mut self, sid: SessionId, now: Instant) {
        let Some(sub) = self.sessions.get(&sid) else {
            return;
        };
        let dominant = self.dominant.get(&sub.room).and_then(|d| d.current());
        // Bandwidth is kept for the audio that flows: a muted microphone sends nothing, and in
        // a large call reserving for every open audio track would leave none for video.
        let audio = sub
            .tracks_out
            .iter()
            .filter(|t| t.is_open() && t.kind == MediaKind::Audio)
            .filter(|t| {
                self.sessions
                    .get(&t.publisher)
                    .and_then(|p| p.tracks_in.iter().find(|x| x.mid == t.publisher_mid))
                    .is_some_and(|track| {
                        track.layers.iter().any(|l| {
                            l.last_packet
                                .is_some_and(|at| now.saturating_duration_since(at) < LAYER_ALIVE)
                        })
                    })
            })
            .count() as u64;
        let budget = sub
            .estimate
            .map(|e| (e.as_u64()).saturating_sub(audio * AUDIO_BITRATE));
        let mut which = Vec::new();
        let mut demands = Vec::new();
        for (i, t) in sub.tracks_out.iter().enumerate() {
            if !t.is_open() || t.kind != MediaKind::Video {
                continue;
            }
            let Some(track) = self
                .sessions
                .get(&t.publisher)
                .and_then(|p| p.tracks_in.iter().find(|x| x.mid == t.publisher_mid))
            else {
                continue;
            };
            if track.layers.is_empty() {
                continue;
            }
            let priority = match t.source {
                TrackSource::Screen => 0,
                _ if Some(t.publisher) == dominant => 1,
                _ => 2,
            };
            let layers = track
                .layers
                .iter()
                .map(|l| LayerInfo {
                    width: l.width,
                    bitrate: l.bitrate,
                })
                .collect();
            let rids: Vec<Option<Rid>> = track.layers.iter().map(|l| l.rid).collect();
            let alive: Vec<bool> = track
                .layers
                .iter()
                .map(|l| {
                    l.last_packet
                        .is_some_and(|at| now.saturating_duration_since(at) < LAYER_ALIVE)
                })
                .collect();
            which.push((i, rids, alive));
            demands.push(Demand {
                priority,
                screen: t.source == TrackSource::Screen,
                layers,
                want: t.want(&sub.view),
            });
        }
        // What the subscriber would receive with no bandwidth limit, with headroom: str0m
        // probes up to it, so a paused or lowered video can come back when the link allows.
        let unconstrained: u64 = demands
            .iter()
            .map(
                |d| match alloc::allocate(None, std::slice::from_ref(d))[0] {
                    Choice::Layer(l) => alloc::layer_bitrate(d, l),
                    _ => 0,
                },
            )
            .sum();
        let desired = (unconstrained + audio * AUDIO_BITRATE) * 5 / 4;
        let choices = alloc::allocate(budget, &demands);
        let Some(sub) = self.sessions.get_mut(&sid) else {
            return;
        };
        let mut keyframes = Vec::new();
        for ((i, rids, alive), choice) in which.into_iter().zip(choices) {
            let t = &mut sub.tracks_out[i];
            let (target, paused) = match choice {
                Choice::Layer(l) => {
                    // A video that has not started yet starts on a layer that is flowing now
                    // (a paused one would first have to be resumed at the encoder); the next
                    // rounds move it up.
                    let l = if t.current.is_none() && !alive[l] {
                        (0..l).rev().find(|x| alive[*x]).unwrap_or(l)
                    } else {
                        l
                    };
                    (Some(rids[l]), None)
                }
                Choice::Hidden => (None, Some(Pause::Hidden)),
                Choice::Paused => (None, Some(Pause::Bandwidth)),
            };
            let was_bw = t.paused == Some(Pause::Bandwidth);
            let is_bw = paused == Some(Pause::Bandwidth);
            if was_bw != is_bw {
                tracing::debug!(session = %sid, publisher = %t.publisher, paused = is_bw, "video paused for bandwidth");
                self.events.push_back(MediaEvent::VideoPaused {
                    session: sid,
                    publisher: t.publisher,
                    source: t.source,
                    paused: is_bw,
                });
            }
            if was_bw != is_bw
                && let Some(mid) = t.open_mid()
                && let Some(tx) = sub.rtc.direct_api().stream_tx_by_mid(mid, None)
            {
                // Resends of a paused video would only compete with the audio.
                let (packets, age) = if is_bw {
                    (1, Duration::from_millis(1))
                } else {
                    (1024, session::RTX_MAX_AGE)
                };
                tx.set_rtx_cache(packets, age, Some(0.15));
            }
            if paused.is_some() {
                // Resuming starts afresh at a keyframe, where the munger re-bases sequence
                // numbers: the packets skipped while paused leave no gap to NACK.
                t.current = None;
            }
            t.paused = paused;
            if target != t.target {
                tracing::debug!(session = %sid, publisher = %t.publisher, from = ?t.target, to = ?target, ?budget, "layer target");
                t.target = target;
            }
            if let Some(rid) = t.target
                && t.current != Some(rid)
            {
                keyframes.push((t.publisher, t.publisher_mid, rid));
            }
        }
        if unconstrained > 0 {
            // No sustained padding (str0m's own 50 kbit/s is off, see `Session::new`): padding
            // up to the forwarded video filled every gap between frames with tiny packets, a
            // timer and a send each, and added nothing the estimate needed. Probing goes
            // towards what the subscriber would like, in coarse steps so it is not asked for
            // again and again as the estimate moves.
            let min = 0;
            let mut desired = desired.div_ceil(100_000) * 100_000;
            let starved = sub
                .tracks_out
                .iter()
                .any(|t| t.paused == Some(Pause::Bandwidth));
            if starved {
                // On a link too thin for any video, probing all the time would crowd out the
                // audio: probe for the lowest video layer only every few seconds. A probe asked
                // for while the estimator still holds back for loss would not go out: wait for
                // one that can, which comes soon after the link does.
                let estimate = sub.estimate.map_or(0, |e| e.as_u64());
                let due = sub
                    .last_probe
                    .is_none_or(|at| now.saturating_duration_since(at) >= sub.probe_every)
                    && sub.rtc.bwe().may_probe();
                if due {
                    if sub.last_probe.is_some() {
                        sub.probe_every = if estimate > sub.probe_from + sub.probe_from / 10 {
                            STARVED_PROBE_MIN
                        } else {
                            (sub.probe_every * 2).min(STARVED_PROBE_MAX)
                        };
                    }
                    tracing::debug!(session = %sid, estimate, next = ?sub.probe_every, "probing the link of a paused video");
                    sub.last_probe = Some(now);
                    sub.probe_from = estimate;
                } else {
                    desired = min.max(estimate);
                }
            } else {
                sub.last_probe = None;
                sub.probe_every = STARVED_PROBE_MIN;
            }
            if sub.bwe_asked != Some((min, desired)) {
                sub.bwe_asked = Some((min, desired));
                sub.rtc
                    .bwe()
                    .set_bitrate(Bitrate::from(min), Bitrate::from(desired));
            }
        }
        for (publisher, mid, rid) in keyframes {
            self.request_keyframe(publisher, mid, rid, KeyframeRequestKind::Pli, now);
        }
    }

    /// Tells publishers which simulcast layers anyone receives, so the rest can be paused.
    fn dynacast(&mut self) {
        let mut needed: HashMap<(SessionId, Mid), Vec<Rid>> = HashMap::new();
        for s in self.sessions.values() {
            for t in s.tracks_out.iter().filter(|t| t.is_open()) {
                let entry = needed.entry((t.publisher, t.publisher_mid)).or_default();
                for rid in [t.current.flatten(), t.target.flatten()]
                    .into_iter()
                    .flatten()
                {
                    if t.paused.is_none() && !entry.contains(&rid) {
                        entry.push(rid);
                    }
                }
            }
        }
        for (sid, s) in self.sessions.iter_mut() {
            for t in s.tracks_in.iter_mut() {
                if t.layers.len() < 2 {
                    continue;
                }
                let mut active = needed.remove(&(*sid, t.mid)).unwrap_or_default();
                // The lowest layer stays on, so a new subscriber can start at once.
                if let Some(lowest) = t.layers.first().and_then(|l| l.rid)
                    && !active.contains(&lowest)
                {
                    active.push(lowest);
                }
                active.sort_by_key(|r| r.to_string());
                if t.active_sent.as_ref() != Some(&active) {
                    t.active_sent = Some(active.clone());
                    self.events.push_back(MediaEvent::Layers {
                        session: *sid,
                        mid: t.mid.to_string(),
                        active: active.iter().map(|r| r.to_string()).collect(),
                    });
                }
            }
        }
    }

    fn request_keyframe(
        &mut self,
        publisher: SessionId,
        mid: Mid,
        rid: Option<Rid>,
        kind: KeyframeRequestKind,
        now: Instant,
    ) {
        if let Some(p) = self.sessions.get_mut(&publisher)
            && p.request_keyframe(mid, rid, kind, now, KEYFRAME_THROTTLE)
        {
            self.mark(publisher);
        }
    }
}

/// The earliest timeout in `heap` that is still its session's (older entries are dropped).
fn next_valid(
    heap: &mut BinaryHeap<Reverse<(Instant, SessionId)>>,
    sessions: &FxHashMap<SessionId, Box<Session>>,
    lax: bool,
) -> Option<Instant> {
    while let Some(Reverse((at, sid))) = heap.peek().copied() {
        match sessions.get(&sid) {
            Some(s) if s.timer(lax) == Some(at) => return Some(at),
            _ => {
                heap.pop();
            }
        }
    }
    None
}

/// Queues a session to be polled, once.
fn queue(to_drive: &mut VecDeque<SessionId>, session: &mut Session) {
    if !session.queued {
        session.queued = true;
        to_drive.push_back(session.id);
    }
}
