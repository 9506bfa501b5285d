//! The signaling plane as a sans-IO state machine: rooms, participants, reliable delivery
//! and resume. The driver (`ws.rs`) feeds it parsed client frames, connection events, media
//! events and ticks, and carries out the [`Output`]s.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parley_proto::media::{MediaCommand, MediaEvent, SessionId, TileView, TrackSource};

mod calls;

use crate::auth::Auth;
use crate::ice::IceServers;
use crate::webhook::WebhookEvent;
use parley_proto::signal::{
    ClientFrame, ClientMsg, ErrorCode, FrameError, ParticipantInfo, ServerFrame, ServerMsg,
    validate_display_name, validate_room_name,
};

/// One WebSocket connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Most participants in one room; `None` is unlimited.
    pub max_participants: Option<usize>,
    /// How long a participant whose connection dropped may resume.
    pub resume_window: Duration,
    /// Clients show video of the last N speakers only in rooms larger than this.
    pub last_n: Option<u32>,
    /// API keys; empty is open mode.
    pub auth: Auth,
    /// Direct calls nobody answers end after this.
    pub ring_timeout: Duration,
    /// Told to devices: move a call to the SFU if peer-to-peer is not up this long after the answer.
    pub p2p_timeout: Duration,
    /// STUN and TURN servers for clients.
    pub ice: IceServers,
}

#[derive(Debug, PartialEq)]
pub enum Output {
    Send(ConnId, ServerFrame),
    /// Close the connection after sending what was queued.
    Close(ConnId, &'static str),
    Media(MediaCommand),
    Webhook(WebhookEvent),
}

struct Participant {
    id: u64,
    /// Empty for a device of a user (direct calls).
    room: String,
    /// The user this connection is a device of, for direct calls.
    user: Option<String>,
    name: String,
    /// From the access token; in open mode the display name.
    identity: String,
    can_publish: bool,
    can_subscribe: bool,
    audio_muted: bool,
    video_muted: bool,
    speaking: bool,
    token: String,
    conn: Option<ConnId>,
    disconnected_at: Option<Instant>,
    /// Server messages not yet acknowledged, oldest first.
    unacked: VecDeque<ServerFrame>,
    next_seq: u64,
    /// Highest client `seq` processed.
    last_in: u64,
}

impl Participant {
    fn wire_id(&self) -> String {
        wire_id(self.id)
    }

    fn info(&self) -> ParticipantInfo {
        ParticipantInfo {
            id: self.wire_id(),
            name: self.name.clone(),
            audio_muted: self.audio_muted,
            video_muted: self.video_muted,
            speaking: self.speaking,
        }
    }
}

/// Server messages kept for one participant until acknowledged; beyond this it is cut off.
const MAX_UNACKED: usize = 4096;

fn wire_id(id: u64) -> String {
    format!("p{id}")
}

fn parse_wire_id(id: &str) -> Option<u64> {
    id.strip_prefix('p')?.parse().ok()
}

pub struct Hub {
    config: HubConfig,
    participants: HashMap<u64, Participant>,
    rooms: HashMap<String, Vec<u64>>,
    by_token: HashMap<String, u64>,
    /// Connections and the participant each one speaks for, once joined or resumed.
    conns: HashMap<ConnId, Option<u64>>,
    next_id: u64,
    out: Vec<Output>,
    token_source: Box<dyn FnMut() -> String + Send>,
    draining: bool,
    /// Direct calls: the devices of each user, and the calls.
    users: HashMap<String, Vec<u64>>,
    calls: HashMap<String, calls::Call>,
    /// The dominant speaker of each room, for newcomers.
    dominant: HashMap<String, u64>,
}

impl Hub {
    pub fn new(config: HubConfig, token_source: Box<dyn FnMut() -> String + Send>) -> Self {
        Hub {
            config,
            participants: HashMap::new(),
            rooms: HashMap::new(),
            by_token: HashMap::new(),
            conns: HashMap::new(),
            next_id: 1,
            out: Vec::new(),
            token_source,
            draining: false,
            users: HashMap::new(),
            calls: HashMap::new(),
            dominant: HashMap::new(),
        }
    }

    /// Stops new rooms from being started here; existing ones go on.
    pub fn start_draining(&mut self) {
        self.draining = true;
    }

    pub fn drain(&mut self) -> std::vec::Drain<'_, Output> {
        self.out.drain(..)
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    pub fn participant_count(&self) -> usize {
        self.participants.len()
    }

    pub fn connection_opened(&mut self, conn: ConnId) {
        self.conns.insert(conn, None);
    }

    pub fn connection_closed(&mut self, conn: ConnId, now: Instant) {
        if let Some(Some(pid)) = self.conns.remove(&conn)
            && let Some(p) = self.participants.get_mut(&pid)
            && p.conn == Some(conn)
        {
            p.conn = None;
            p.disconnected_at = Some(now);
            tracing::info!(participant = %p.wire_id(), room = %p.room, "connection lost; waiting for resume");
        }
    }

    /// A frame the driver could not parse, or refused for its size or rate.
    pub fn bad_frame(&mut self, conn: ConnId, err: FrameError) {
        let (code, message) = match err {
            FrameError::UnknownType(t) => (
                ErrorCode::UnknownType,
                format!("unknown message type {t:?}"),
            ),
            FrameError::BadMessage(m) => (ErrorCode::BadMessage, format!("malformed message: {m}")),
        };
        tracing::info!(conn = conn.0, %message, "bad client message");
        self.error(conn, code, message, None);
    }

    pub fn refuse(&mut self, conn: ConnId, code: ErrorCode, message: String) {
        tracing::info!(conn = conn.0, ?code, %message, "client refused");
        self.error(conn, code, message, None);
        self.out.push(Output::Close(conn, "refused"));
    }

    pub fn handle_frame(&mut self, conn: ConnId, frame: ClientFrame, now: Instant) {
        let Some(joined) = self.conns.get(&conn).copied() else {
            return;
        };
        if let ClientMsg::Resume { session } = &frame.msg {
            self.resume(conn, joined, session, frame.ack.unwrap_or(0));
            return;
        }
        if let (Some(pid), Some(ack)) = (joined, frame.ack) {
            self.acknowledge(pid, ack);
        }
        let reliable = frame.msg.is_reliable();
        if reliable {
            match (joined, frame.seq) {
                (_, None) => {
                    self.error(
                        conn,
                        ErrorCode::BadMessage,
                        "reliable message without \"seq\"".into(),
                        None,
                    );
                    return;
                }
                (Some(pid), Some(seq)) => {
                    let Some(p) = self.participants.get_mut(&pid) else {
                        return;
                    };
                    if seq <= p.last_in {
                        // Resent after a resume, and processed already: acknowledge again.
                        self.send_ack(pid);
                        return;
                    }
                    p.last_in = seq;
                }
                (None, Some(_)) => {}
            }
        }
        let sent_before = self.out.len();
        match frame.msg {
            ClientMsg::Join {
                room,
                name,
                token,
                audio_muted,
                video_muted,
            } => {
                let muted = (audio_muted, video_muted);
                self.join(conn, joined, room, name, token, muted, frame.seq)
            }
            ClientMsg::Offer { sdp, tracks } => {
                if let Some(p) = self.joined(conn, joined, frame.seq) {
                    let cmd = MediaCommand::Offer {
                        session: SessionId(p.id),
                        room: p.room.clone(),
                        stream_id: p.wire_id(),
                        sdp,
                        screen_mids: tracks
                            .into_iter()
                            .filter(|(_, s)| *s == TrackSource::Screen)
                            .map(|(mid, _)| mid)
                            .collect(),
                        can_publish: p.can_publish,
                        can_subscribe: p.can_subscribe,
                    };
                    // With it, the mute state as the participant last told it (unmuted until it
                    // says otherwise): the tracks of a live microphone or camera are offered
                    // to the others now, so that their renegotiation runs while this
                    // participant's ICE and DTLS do, not after its first packet.
                    let mute = MediaCommand::Mute {
                        session: SessionId(p.id),
                        audio: p.audio_muted,
                        video: p.video_muted,
                    };
                    self.out.push(Output::Media(cmd));
                    self.out.push(Output::Media(mute));
                }
            }
            ClientMsg::View { tiles } => {
                if let Some(p) = self.joined(conn, joined, frame.seq) {
                    // Tiles of unknown participants are ignored: they may have just left.
                    let tiles = tiles
                        .iter()
                        .filter_map(|t| {
                            Some(TileView {
                                publisher: SessionId(parse_wire_id(&t.id)?),
                                source: t.source,
                                width: t.width,
                                height: t.height,
                            })
                        })
                        .collect();
                    let cmd = MediaCommand::View {
                        session: SessionId(p.id),
                        tiles,
                    };
                    self.out.push(Output::Media(cmd));
                }
            }
            ClientMsg::Answer { id, sdp } => {
                if let Some(p) = self.joined(conn, joined, frame.seq) {
                    let cmd = MediaCommand::Answer {
                        session: SessionId(p.id),
                        id,
                        sdp,
                    };
                    self.out.push(Output::Media(cmd));
                }
            }
            ClientMsg::Mute { audio, video } => {
                if let Some(p) = self.joined_mut(conn, joined, frame.seq) {
                    p.audio_muted = audio;
                    p.video_muted = video;
                    let (id, room) = (p.wire_id(), p.room.clone());
                    let session = SessionId(p.id);
                    self.broadcast(&room, None, ServerMsg::Mute { id, audio, video });
                    self.out.push(Output::Media(MediaCommand::Mute {
                        session,
                        audio,
                        video,
                    }));
                }
            }
            ClientMsg::Leave => {
                if let Some(pid) = joined {
                    self.remove(pid, "left");
                    self.conns.insert(conn, None);
                    self.out.push(Output::Close(conn, "left"));
                } else {
                    self.error(
                        conn,
                        ErrorCode::NotJoined,
                        "you have not joined a room".into(),
                        frame.seq,
                    );
                }
            }
            ClientMsg::Register { user, token } => {
                self.register(conn, joined, user, token, frame.seq)
            }
            msg @ (ClientMsg::Call { .. }
            | ClientMsg::CallCancel { .. }
            | ClientMsg::CallAnswer { .. }
            | ClientMsg::CallDecline { .. }
            | ClientMsg::CallHangup { .. }
            | ClientMsg::CallSignal { .. }) => {
                if let Some(me) = self.device(conn, joined, frame.seq) {
                    self.call_message(me, conn, msg, frame.seq, now);
                }
            }
            ClientMsg::Ping => self.out.push(Output::Send(
                conn,
                ServerFrame {
                    seq: None,
                    ack: None,
                    msg: ServerMsg::Pong,
                },
            )),
            ClientMsg::Ack | ClientMsg::Resume { .. } => {}
        }
        // Acknowledge a reliable message that got no reply of its own.
        let replied = self.out[sent_before..]
            .iter()
            .any(|o| matches!(o, Output::Send(c, _) if *c == conn));
        if reliable
            && !replied
            && let Some(Some(pid)) = self.conns.get(&conn).copied()
        {
            self.send_ack(pid);
        }
    }

    pub fn handle_media_event(&mut self, ev: MediaEvent) {
        let pid = ev.session().0;
        match ev {
            MediaEvent::Answer { sdp, .. } => self.send(pid, ServerMsg::Answer { sdp }),
            MediaEvent::Offer { id, sdp, .. } => self.send(pid, ServerMsg::Offer { id, sdp }),
            MediaEvent::SdpRejected { reason, .. } => {
                self.send(pid, ServerMsg::error(ErrorCode::SdpRejected, reason, None))
            }
            MediaEvent::Speaking { speaking, .. } => {
                if let Some(p) = self.participants.get_mut(&pid) {
                    p.speaking = speaking;
                    let room = p.room.clone();
                    let id = wire_id(pid);
                    self.broadcast(&room, None, ServerMsg::Speaking { id, speaking });
                }
            }
            MediaEvent::DominantSpeaker { .. } => {
                if let Some(room) = self.participants.get(&pid).map(|p| p.room.clone()) {
                    self.dominant.insert(room.clone(), pid);
                    let id = wire_id(pid);
                    self.broadcast(&room, None, ServerMsg::DominantSpeaker { id });
                }
            }
            MediaEvent::Layers { mid, active, .. } => {
                self.send(pid, ServerMsg::Layers { mid, active });
            }
            MediaEvent::VideoPaused {
                publisher,
                source,
                paused,
                ..
            } => {
                let msg = ServerMsg::VideoPaused {
                    id: wire_id(publisher.0),
                    source,
                    paused,
                    reason: "bandwidth".into(),
                };
                self.send(pid, msg);
            }
            MediaEvent::Connected { .. } => {
                tracing::info!(participant = %wire_id(pid), "media connected");
            }
            MediaEvent::Closed { .. } => {
                // The participant is still here (a leave removes it before Close goes out):
                // its media node was lost or ICE timed out there. A new offer makes a new
                // session, placed afresh.
                if self.participants.contains_key(&pid) {
                    tracing::info!(participant = %wire_id(pid), "media session closed; asking for a new one");
                    self.send(pid, ServerMsg::MediaClosed);
                }
            }
        }
    }

    /// Ends the sessions whose resume window has passed.
    pub fn tick(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .participants
            .values()
            .filter(|p| {
                p.disconnected_at.is_some_and(|at| {
                    now.saturating_duration_since(at) >= self.config.resume_window
                })
            })
            .map(|p| p.id)
            .collect();
        for pid in expired {
            self.remove(pid, "resume window expired");
        }
        self.ring_timeouts(now);
    }

    #[allow(clippy::too_many_arguments)]
    fn join(
        &mut self,
        conn: ConnId,
        joined: Option<u64>,
        room: String,
        name: String,
        token: Option<String>,
        (audio_muted, video_muted): (bool, bool),
        seq: Option<u64>,
    ) {
        if joined.is_some() {
            self.error(
                conn,
                ErrorCode::AlreadyJoined,
                "this connection has joined a room already".into(),
                seq,
            );
            return;
        }
        if let Err(msg) = validate_room_name(&room) {
            self.error(conn, ErrorCode::InvalidRoom, msg, seq);
            return;
        }
        let claims = if self.config.auth.is_open() {
            None
        } else {
            // A direct call moved to the SFU: its two users' identity tokens admit them.
            let party_of_call = |claims: &crate::auth::Claims| {
                room.strip_prefix("call-")
                    .is_some_and(|id| self.is_call_party(id, &claims.sub))
            };
            let verified = match self.config.auth.verify(token.as_deref(), &room) {
                Err(crate::auth::AuthError::WrongRoom(r)) => {
                    match self.config.auth.verify_identity(token.as_deref()) {
                        Ok(c) if party_of_call(&c) => Ok(c),
                        _ => Err(crate::auth::AuthError::WrongRoom(r)),
                    }
                }
                other => other,
            };
            match verified {
                Ok(c) => Some(c),
                Err(err) => {
                    tracing::info!(conn = conn.0, %room, %err, "join refused");
                    self.error(conn, ErrorCode::Unauthorized, err.to_string(), seq);
                    return;
                }
            }
        };
        let name = claims.as_ref().and_then(|c| c.name.clone()).unwrap_or(name);
        let name = match validate_display_name(&name) {
            Ok(n) => n,
            Err(msg) => {
                self.error(conn, ErrorCode::InvalidName, msg, seq);
                return;
            }
        };
        if self.draining && !self.rooms.contains_key(&room) {
            self.error(
                conn,
                ErrorCode::Draining,
                "this server is shutting down and takes no new rooms; try again in a moment".into(),
                seq,
            );
            return;
        }
        let members = self.rooms.get(&room).map_or(0, Vec::len);
        if let Some(max) = self.config.max_participants
            && members >= max
        {
            self.error(
                conn,
                ErrorCode::RoomFull,
                format!("room {room:?} is full ({max} participants)"),
                seq,
            );
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let token = (self.token_source)();
        let others: Vec<ParticipantInfo> = self
            .rooms
            .get(&room)
            .into_iter()
            .flatten()
            .filter_map(|m| self.participants.get(m))
            .map(Participant::info)
            .collect();
        let identity = claims
            .as_ref()
            .map_or_else(|| name.clone(), |c| c.sub.clone());
        let p = Participant {
            id,
            room: room.clone(),
            user: None,
            name,
            identity,
            can_publish: claims.as_ref().is_none_or(|c| c.publish),
            can_subscribe: claims.as_ref().is_none_or(|c| c.subscribe),
            audio_muted,
            video_muted,
            speaking: false,
            token: token.clone(),
            conn: Some(conn),
            disconnected_at: None,
            unacked: VecDeque::new(),
            next_seq: 1,
            last_in: seq.unwrap_or(0),
        };
        let info = p.info();
        tracing::info!(participant = %info.id, %room, name = %info.name, "joined");
        let webhook = WebhookEvent::ParticipantJoined {
            room: room.clone(),
            participant: p.identity.clone(),
            name: p.name.clone(),
        };
        self.participants.insert(id, p);
        self.by_token.insert(token.clone(), id);
        self.conns.insert(conn, Some(id));
        if !self.rooms.contains_key(&room) {
            self.out.push(Output::Webhook(WebhookEvent::RoomStarted {
                room: room.clone(),
            }));
        }
        self.out.push(Output::Webhook(webhook));
        self.rooms.entry(room.clone()).or_default().push(id);
        self.send(
            id,
            ServerMsg::Joined {
                participant: wire_id(id),
                session: token,
                room: room.clone(),
                participants: others,
                last_n: self.config.last_n,
            },
        );
        self.broadcast(
            &room,
            Some(id),
            ServerMsg::ParticipantJoined { participant: info },
        );
        // Like `speaking` in the participant list: a newcomer learns who talks already.
        if let Some(d) = self.dominant.get(&room).copied() {
            self.send(id, ServerMsg::DominantSpeaker { id: wire_id(d) });
        }
    }

    fn resume(&mut self, conn: ConnId, joined: Option<u64>, token: &str, ack: u64) {
        if joined.is_some() {
            self.error(
                conn,
                ErrorCode::AlreadyJoined,
                "this connection is already in a session".into(),
                None,
            );
            return;
        }
        let Some(pid) = self.by_token.get(token).copied() else {
            self.out.push(Output::Send(
                conn,
                ServerFrame {
                    seq: None,
                    ack: None,
                    msg: ServerMsg::ResumeFailed {
                        message: "the session has ended; join again".into(),
                    },
                },
            ));
            return;
        };
        let Some(p) = self.participants.get_mut(&pid) else {
            return;
        };
        if let Some(old) = p.conn.replace(conn)
            && old != conn
        {
            self.conns.insert(old, None);
            self.out.push(Output::Close(old, "resumed elsewhere"));
        }
        p.disconnected_at = None;
        self.conns.insert(conn, Some(pid));
        tracing::info!(participant = %p.wire_id(), ack, "resumed");
        self.out.push(Output::Send(
            conn,
            ServerFrame {
                seq: None,
                ack: Some(p.last_in),
                msg: ServerMsg::Resumed,
            },
        ));
        self.acknowledge(pid, ack);
        if let Some(p) = self.participants.get(&pid) {
            for f in &p.unacked {
                let mut f = f.clone();
                f.ack = Some(p.last_in);
                self.out.push(Output::Send(conn, f));
            }
        }
    }

    fn acknowledge(&mut self, pid: u64, ack: u64) {
        if let Some(p) = self.participants.get_mut(&pid) {
            while p
                .unacked
                .front()
                .is_some_and(|f| f.seq.is_some_and(|s| s <= ack))
            {
                p.unacked.pop_front();
            }
        }
    }

    /// The participant on `conn` if it is in a room; errors to a device for calls or to a
    /// connection that has not joined.
    fn in_room(&mut self, conn: ConnId, joined: Option<u64>, seq: Option<u64>) -> Option<u64> {
        let msg = match joined {
            Some(pid)
                if self
                    .participants
                    .get(&pid)
                    .is_some_and(|p| p.user.is_none()) =>
            {
                return Some(pid);
            }
            Some(_) => "a device for calls is in no room",
            None => "join a room first",
        };
        self.error(conn, ErrorCode::NotJoined, msg.into(), seq);
        None
    }

    fn joined(
        &mut self,
        conn: ConnId,
        joined: Option<u64>,
        seq: Option<u64>,
    ) -> Option<&Participant> {
        let pid = self.in_room(conn, joined, seq)?;
        self.participants.get(&pid)
    }

    fn joined_mut(
        &mut self,
        conn: ConnId,
        joined: Option<u64>,
        seq: Option<u64>,
    ) -> Option<&mut Participant> {
        let pid = self.in_room(conn, joined, seq)?;
        self.participants.get_mut(&pid)
    }

    fn remove(&mut self, pid: u64, why: &str) {
        if self
            .participants
            .get(&pid)
            .is_some_and(|p| p.user.is_some())
        {
            self.device_gone(pid);
        }
        let Some(p) = self.participants.remove(&pid) else {
            return;
        };
        if let Some(user) = &p.user {
            tracing::info!(device = %p.wire_id(), %user, why, "device gone");
            self.by_token.remove(&p.token);
            if let Some(conn) = p.conn {
                self.conns.insert(conn, None);
            }
            if let Some(devices) = self.users.get_mut(user) {
                devices.retain(|d| *d != pid);
                if devices.is_empty() {
                    self.users.remove(user);
                }
            }
            return;
        }
        tracing::info!(participant = %p.wire_id(), room = %p.room, why, "left");
        self.by_token.remove(&p.token);
        if let Some(conn) = p.conn {
            self.conns.insert(conn, None);
        }
        self.out
            .push(Output::Webhook(WebhookEvent::ParticipantLeft {
                room: p.room.clone(),
                participant: p.identity.clone(),
                name: p.name.clone(),
            }));
        if self.dominant.get(&p.room) == Some(&pid) {
            self.dominant.remove(&p.room);
        }
        if let Some(members) = self.rooms.get_mut(&p.room) {
            members.retain(|m| *m != pid);
            if members.is_empty() {
                self.rooms.remove(&p.room);
                self.out.push(Output::Webhook(WebhookEvent::RoomFinished {
                    room: p.room.clone(),
                }));
            }
        }
        self.out.push(Output::Media(MediaCommand::Close {
            session: SessionId(pid),
        }));
        self.broadcast(
            &p.room,
            None,
            ServerMsg::ParticipantLeft { id: p.wire_id() },
        );
    }

    /// Sends a reliable message to a participant (kept until acknowledged).
    fn send(&mut self, pid: u64, msg: ServerMsg) {
        let Some(p) = self.participants.get_mut(&pid) else {
            return;
        };
        let frame = ServerFrame {
            seq: Some(p.next_seq),
            ack: Some(p.last_in),
            msg,
        };
        p.next_seq += 1;
        if p.unacked.len() >= MAX_UNACKED {
            // A client that never acknowledges would grow this queue without bound.
            tracing::warn!(participant = %p.wire_id(), "too many unacknowledged messages");
            if let Some(conn) = p.conn {
                self.out
                    .push(Output::Close(conn, "too many unacknowledged messages"));
            }
            self.remove(pid, "too many unacknowledged messages");
            return;
        }
        p.unacked.push_back(frame.clone());
        if let Some(conn) = p.conn {
            self.out.push(Output::Send(conn, frame));
        }
    }

    fn send_ack(&mut self, pid: u64) {
        if let Some(p) = self.participants.get(&pid)
            && let Some(conn) = p.conn
        {
            self.out.push(Output::Send(
                conn,
                ServerFrame {
                    seq: None,
                    ack: Some(p.last_in),
                    msg: ServerMsg::Ack,
                },
            ));
        }
    }

    fn broadcast(&mut self, room: &str, except: Option<u64>, msg: ServerMsg) {
        let members: Vec<u64> = self
            .rooms
            .get(room)
            .into_iter()
            .flatten()
            .copied()
            .filter(|m| Some(*m) != except)
            .collect();
        for m in members {
            self.send(m, msg.clone());
        }
    }

    /// An error to whoever is on `conn`: reliable once joined, plain before.
    fn error(&mut self, conn: ConnId, code: ErrorCode, message: String, in_reply_to: Option<u64>) {
        let msg = ServerMsg::error(code, message, in_reply_to);
        match self.conns.get(&conn).copied().flatten() {
            Some(pid) => self.send(pid, msg),
            None => self.out.push(Output::Send(
                conn,
                ServerFrame {
                    seq: None,
                    ack: None,
                    msg,
                },
            )),
        }
    }
}

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
