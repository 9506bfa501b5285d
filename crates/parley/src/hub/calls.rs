//! Direct (1:1) calls in the signaling hub: devices of users, ringing every device, the first
//! answer winning, cancel/decline/busy/unavailable/no answer, glare, and the held signals that
//! let media start as soon as a device answers.

use std::collections::HashMap;
use std::time::Instant;

use parley_proto::signal::{
    CallEndReason, CallRole, ClientMsg, ErrorCode, ServerMsg, validate_room_name,
};

use super::{ConnId, Hub, Output, Participant, wire_id};
use crate::webhook::WebhookEvent;

/// Signals a ringing device may hold before it answers (an answer and its candidates).
const MAX_HELD: usize = 256;

pub(super) struct Call {
    id: String,
    caller: u64,
    caller_user: String,
    callee_user: String,
    state: State,
    /// Each ringing device's own signals (its prepared answer), released when it answers.
    held: HashMap<u64, Vec<serde_json::Value>>,
    started: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Ringing { devices: Vec<u64> },
    Connected { callee: u64 },
}

impl Hub {
    pub(super) fn register(
        &mut self,
        conn: ConnId,
        joined: Option<u64>,
        user: String,
        token: Option<String>,
        seq: Option<u64>,
    ) {
        if joined.is_some() {
            let msg = "this connection is already in a session".into();
            self.error(conn, ErrorCode::AlreadyJoined, msg, seq);
            return;
        }
        if let Err(msg) = validate_room_name(&user) {
            let msg = msg.replace("room name", "user name");
            self.error(conn, ErrorCode::InvalidName, msg, seq);
            return;
        }
        if !self.config.auth.is_open() {
            match self.config.auth.verify_identity(token.as_deref()) {
                Ok(c) if c.sub == user => {}
                Ok(c) => {
                    let msg = format!("the access token is for user {:?}, not {user:?}", c.sub);
                    self.error(conn, ErrorCode::Unauthorized, msg, seq);
                    return;
                }
                Err(err) => {
                    self.error(conn, ErrorCode::Unauthorized, err.to_string(), seq);
                    return;
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let session = (self.token_source)();
        self.participants.insert(
            id,
            Participant {
                id,
                room: String::new(),
                user: Some(user.clone()),
                name: user.clone(),
                identity: user.clone(),
                can_publish: true,
                can_subscribe: true,
                audio_muted: false,
                video_muted: false,
                speaking: false,
                token: session.clone(),
                conn: Some(conn),
                disconnected_at: None,
                unacked: Default::default(),
                next_seq: 1,
                last_in: seq.unwrap_or(0),
            },
        );
        self.by_token.insert(session.clone(), id);
        self.conns.insert(conn, Some(id));
        self.users.entry(user.clone()).or_default().push(id);
        tracing::info!(device = %wire_id(id), %user, "device registered");
        let p2p_timeout_ms = self.config.p2p_timeout.as_millis() as u64;
        let ice_servers = self.config.ice.for_identity(&user);
        self.send(
            id,
            ServerMsg::Registered {
                device: wire_id(id),
                session,
                user,
                p2p_timeout_ms,
                ice_servers,
            },
        );
    }

    /// The device speaking on `conn`, or an error to it.
    pub(super) fn device(
        &mut self,
        conn: ConnId,
        joined: Option<u64>,
        seq: Option<u64>,
    ) -> Option<u64> {
        match joined {
            Some(pid)
                if self
                    .participants
                    .get(&pid)
                    .is_some_and(|p| p.user.is_some()) =>
            {
                Some(pid)
            }
            _ => {
                let msg = "register this device for a user first".into();
                self.error(conn, ErrorCode::NotJoined, msg, seq);
                None
            }
        }
    }

    fn user_of(&self, device: u64) -> String {
        self.participants
            .get(&device)
            .and_then(|p| p.user.clone())
            .unwrap_or_default()
    }

    /// Whether `user` is the caller or the callee of call `id`.
    pub(super) fn is_call_party(&self, id: &str, user: &str) -> bool {
        self.calls
            .get(id)
            .is_some_and(|c| c.caller_user == user || c.callee_user == user)
    }

    fn in_connected_call(&self, device: u64) -> bool {
        self.calls.values().any(|c| match c.state {
            State::Connected { callee } => callee == device || c.caller == device,
            State::Ringing { .. } => false,
        })
    }

    fn end(&mut self, device: u64, call: &str, reason: CallEndReason) {
        self.send(
            device,
            ServerMsg::CallEnded {
                call: call.into(),
                reason,
            },
        );
    }

    /// A call message from device `me` (on `conn`).
    pub(super) fn call_message(
        &mut self,
        me: u64,
        conn: ConnId,
        msg: ClientMsg,
        seq: Option<u64>,
        now: Instant,
    ) {
        match msg {
            ClientMsg::Call { call, to } => self.call(me, conn, call, to, seq, now),
            ClientMsg::CallCancel { call } => self.call_cancel(me, &call),
            ClientMsg::CallAnswer { call } => self.answer(me, &call),
            ClientMsg::CallDecline { call } => self.call_decline(me, &call),
            ClientMsg::CallHangup { call } => self.call_hangup(me, &call),
            ClientMsg::CallSignal { call, data } => self.call_signal(me, &call, data),
            _ => {}
        }
    }

    fn call(
        &mut self,
        me: u64,
        conn: ConnId,
        call: String,
        to: String,
        seq: Option<u64>,
        now: Instant,
    ) {
        if call.is_empty() || call.len() > 64 || self.calls.contains_key(&call) {
            let msg = "a call needs a new id of 1 to 64 characters".into();
            self.error(conn, ErrorCode::BadMessage, msg, seq);
            return;
        }
        let my_user = self.user_of(me);
        // Glare: the callee is calling us right now. Our device answers that call instead.
        let crossing = self.calls.values().find(|c| {
            c.caller_user == to
                && c.callee_user == my_user
                && matches!(&c.state, State::Ringing { devices } if devices.contains(&me))
        });
        if let Some(other) = crossing.map(|c| c.id.clone()) {
            tracing::info!(call = %other, device = %wire_id(me), "glare: calls merged");
            self.send(
                me,
                ServerMsg::CallMerged {
                    call: other.clone(),
                    role: CallRole::Callee,
                },
            );
            self.answer(me, &other);
            return;
        }
        // A device already calling, or in a call, cannot start another one.
        let engaged = self.calls.values().any(|c| {
            c.caller == me || matches!(c.state, State::Connected { callee } if callee == me)
        });
        if engaged {
            self.end(me, &call, CallEndReason::Busy);
            return;
        }
        let devices: Vec<u64> = self
            .users
            .get(&to)
            .into_iter()
            .flatten()
            .copied()
            .filter(|d| *d != me)
            .collect();
        let refused = if devices.is_empty() {
            Some(CallEndReason::Unavailable)
        } else if devices.iter().any(|d| self.in_connected_call(*d)) {
            Some(CallEndReason::Busy)
        } else {
            None
        };
        if let Some(reason) = refused {
            self.end(me, &call, reason);
            self.out.push(Output::Webhook(WebhookEvent::CallMissed {
                call,
                caller: my_user,
                callee: to,
                reason,
            }));
            return;
        }
        tracing::info!(%call, from = %my_user, %to, devices = devices.len(), "ringing");
        self.send(
            me,
            ServerMsg::CallRinging {
                call: call.clone(),
                to: to.clone(),
            },
        );
        for d in &devices {
            self.send(
                *d,
                ServerMsg::CallIncoming {
                    call: call.clone(),
                    from: my_user.clone(),
                },
            );
        }
        self.out.push(Output::Webhook(WebhookEvent::CallRinging {
            call: call.clone(),
            caller: my_user.clone(),
            callee: to.clone(),
        }));
        self.calls.insert(
            call.clone(),
            Call {
                id: call,
                caller: me,
                caller_user: my_user,
                callee_user: to,
                state: State::Ringing { devices },
                held: HashMap::new(),
                started: now,
            },
        );
    }

    /// Device `me` answers `call`: it wins if the call still rings on it.
    fn answer(&mut self, me: u64, call: &str) {
        let Some(c) = self.calls.get_mut(call) else {
            self.end(me, call, CallEndReason::Cancelled);
            return;
        };
        let State::Ringing { devices } = &c.state else {
            // Someone else answered first.
            self.end(me, call, CallEndReason::AnsweredElsewhere);
            return;
        };
        if !devices.contains(&me) {
            self.end(me, call, CallEndReason::AnsweredElsewhere);
            return;
        }
        let others: Vec<u64> = devices.iter().copied().filter(|d| *d != me).collect();
        c.state = State::Connected { callee: me };
        let held = c.held.remove(&me).unwrap_or_default();
        c.held.clear();
        let (caller, caller_user, callee_user) =
            (c.caller, c.caller_user.clone(), c.callee_user.clone());
        tracing::info!(%call, device = %wire_id(me), "answered");
        let answered = ServerMsg::CallAnswered {
            call: call.into(),
            device: wire_id(me),
        };
        self.send(me, answered.clone());
        self.send(caller, answered);
        for data in held {
            self.send(
                caller,
                ServerMsg::CallSignal {
                    call: call.into(),
                    data,
                },
            );
        }
        for d in others {
            self.end(d, call, CallEndReason::AnsweredElsewhere);
        }
        self.out.push(Output::Webhook(WebhookEvent::CallAnswered {
            call: call.into(),
            caller: caller_user,
            callee: callee_user,
            device: wire_id(me),
        }));
    }

    fn call_decline(&mut self, me: u64, call: &str) {
        let ringing_here = self.calls.get(call).is_some_and(
            |c| matches!(&c.state, State::Ringing { devices } if devices.contains(&me)),
        );
        if !ringing_here {
            return;
        }
        let Some(c) = self.calls.remove(call) else {
            return;
        };
        tracing::info!(%call, device = %wire_id(me), "declined");
        if let State::Ringing { devices } = &c.state {
            for d in devices.iter().filter(|d| **d != me) {
                self.end(*d, call, CallEndReason::Declined);
            }
        }
        self.end(c.caller, call, CallEndReason::Declined);
        self.end(me, call, CallEndReason::Declined);
        self.out.push(Output::Webhook(WebhookEvent::CallDeclined {
            call: call.into(),
            caller: c.caller_user,
            callee: c.callee_user,
        }));
    }

    fn call_cancel(&mut self, me: u64, call: &str) {
        if self.calls.get(call).is_some_and(|c| c.caller == me) {
            self.finish(call, CallEndReason::Cancelled, Some(me));
        }
    }

    fn call_hangup(&mut self, me: u64, call: &str) {
        let Some(c) = self.calls.get(call) else {
            return;
        };
        let party = c.caller == me || c.state == State::Connected { callee: me };
        if party {
            let reason = match c.state {
                State::Ringing { .. } => CallEndReason::Cancelled,
                State::Connected { .. } => CallEndReason::Hangup,
            };
            self.finish(call, reason, Some(me));
        }
    }

    /// Ends `call` for everyone but `by` (who ended it), with `reason`.
    fn finish(&mut self, call: &str, reason: CallEndReason, by: Option<u64>) {
        let Some(c) = self.calls.remove(call) else {
            return;
        };
        tracing::info!(%call, ?reason, "call ended");
        let mut parties = vec![c.caller];
        match &c.state {
            State::Ringing { devices } => {
                parties.extend(devices);
                if matches!(
                    reason,
                    CallEndReason::Cancelled | CallEndReason::NoAnswer | CallEndReason::Gone
                ) {
                    self.out.push(Output::Webhook(WebhookEvent::CallMissed {
                        call: call.into(),
                        caller: c.caller_user.clone(),
                        callee: c.callee_user.clone(),
                        reason,
                    }));
                }
            }
            State::Connected { callee } => parties.push(*callee),
        }
        for p in parties.into_iter().filter(|p| Some(*p) != by) {
            self.end(p, call, reason);
        }
    }

    fn call_signal(&mut self, me: u64, call: &str, data: serde_json::Value) {
        let Some(c) = self.calls.get_mut(call) else {
            return; // Ended meanwhile: late candidates are expected.
        };
        let to: Vec<u64> = match &c.state {
            State::Ringing { devices } if c.caller == me => devices.clone(),
            State::Ringing { devices } if devices.contains(&me) => {
                let held = c.held.entry(me).or_default();
                if held.len() < MAX_HELD {
                    held.push(data);
                }
                return;
            }
            State::Connected { callee } if c.caller == me => vec![*callee],
            State::Connected { callee } if *callee == me => vec![c.caller],
            _ => return,
        };
        for d in to {
            self.send(
                d,
                ServerMsg::CallSignal {
                    call: call.into(),
                    data: data.clone(),
                },
            );
        }
    }

    /// Ends calls nobody answered in time.
    pub(super) fn ring_timeouts(&mut self, now: Instant) {
        let timeout = self.config.ring_timeout;
        let due: Vec<String> = self
            .calls
            .values()
            .filter(|c| {
                matches!(c.state, State::Ringing { .. })
                    && now.saturating_duration_since(c.started) >= timeout
            })
            .map(|c| c.id.clone())
            .collect();
        for call in due {
            self.finish(&call, CallEndReason::NoAnswer, None);
        }
    }

    /// A device left for good: its calls end or stop ringing on it.
    pub(super) fn device_gone(&mut self, device: u64) {
        let involved: Vec<String> = self
            .calls
            .values()
            .filter(|c| {
                c.caller == device
                    || match &c.state {
                        State::Ringing { devices } => devices.contains(&device),
                        State::Connected { callee } => *callee == device,
                    }
            })
            .map(|c| c.id.clone())
            .collect();
        for call in involved {
            let Some(c) = self.calls.get_mut(&call) else {
                continue;
            };
            match &mut c.state {
                State::Ringing { devices } if c.caller != device => {
                    devices.retain(|d| *d != device);
                    c.held.remove(&device);
                    if devices.is_empty() {
                        self.finish(&call, CallEndReason::Gone, Some(device));
                    }
                }
                _ => self.finish(&call, CallEndReason::Gone, Some(device)),
            }
        }
    }
}
