//! The JSON signaling protocol between clients and Parley (see `docs/protocol.md`).

use serde::{Deserialize, Serialize};

/// A message from a client, with its reliability header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Present on reliable messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The highest server `seq` the client has processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<u64>,
    #[serde(flatten)]
    pub msg: ClientMsg,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    Join {
        room: String,
        name: String,
        /// Access token, required when Parley has API keys configured.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// Joins with the microphone muted. Told here rather than by a `mute` behind the
        /// join, the room never sees (nor is offered) a live microphone first, whatever the
        /// order of the join's reply and the first offer.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        audio_muted: bool,
        /// Joins with the camera muted.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        video_muted: bool,
    },
    Offer {
        sdp: String,
        /// Mid → source, for tracks that are not the microphone or the camera.
        #[serde(default)]
        tracks: std::collections::BTreeMap<String, crate::media::TrackSource>,
    },
    View {
        tiles: Vec<ViewTile>,
    },
    Answer {
        id: u64,
        sdp: String,
    },
    Mute {
        audio: bool,
        video: bool,
    },
    Leave,
    /// This connection is a device of `user` (direct calls).
    Register {
        user: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    Call {
        call: String,
        to: String,
    },
    CallCancel {
        call: String,
    },
    CallAnswer {
        call: String,
    },
    CallDecline {
        call: String,
    },
    CallHangup {
        call: String,
    },
    CallSignal {
        call: String,
        data: serde_json::Value,
    },
    Ack,
    Resume {
        session: String,
    },
    Ping,
}

impl ClientMsg {
    /// Whether the message is numbered, kept until acknowledged and resent after a resume.
    pub fn is_reliable(&self) -> bool {
        !matches!(
            self,
            ClientMsg::Ack | ClientMsg::Resume { .. } | ClientMsg::Ping
        )
    }
}

/// A message from Parley, with its reliability header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerFrame {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<u64>,
    #[serde(flatten)]
    pub msg: ServerMsg,
}

/// One remote video as the client shows it (`view`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewTile {
    pub id: String,
    #[serde(default)]
    pub source: crate::media::TrackSource,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantInfo {
    pub id: String,
    pub name: String,
    pub audio_muted: bool,
    pub video_muted: bool,
    /// Speaking right now (later changes come as `speaking` messages).
    #[serde(default)]
    pub speaking: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Joined {
        participant: String,
        session: String,
        room: String,
        participants: Vec<ParticipantInfo>,
        /// In rooms with more participants than this, show video of the last N speakers only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_n: Option<u32>,
    },
    ParticipantJoined {
        participant: ParticipantInfo,
    },
    ParticipantLeft {
        id: String,
    },
    Answer {
        sdp: String,
    },
    Offer {
        id: u64,
        sdp: String,
    },
    Mute {
        id: String,
        audio: bool,
        video: bool,
    },
    Speaking {
        id: String,
        speaking: bool,
    },
    DominantSpeaker {
        id: String,
    },
    Layers {
        mid: String,
        active: Vec<String>,
    },
    VideoPaused {
        id: String,
        source: crate::media::TrackSource,
        paused: bool,
        reason: String,
    },
    /// Your media session ended on the server (its media node was lost, or ICE timed out
    /// there): start a new PeerConnection with a fresh offer; the room and signaling go on.
    MediaClosed,
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        in_reply_to: Option<u64>,
    },
    Ack,
    Resumed,
    ResumeFailed {
        message: String,
    },
    Pong,
    Registered {
        device: String,
        session: String,
        user: String,
        p2p_timeout_ms: u64,
        ice_servers: Vec<serde_json::Value>,
    },
    CallRinging {
        call: String,
        to: String,
    },
    CallIncoming {
        call: String,
        from: String,
    },
    CallAnswered {
        call: String,
        device: String,
    },
    CallEnded {
        call: String,
        reason: CallEndReason,
    },
    CallSignal {
        call: String,
        data: serde_json::Value,
    },
    CallMerged {
        call: String,
        role: CallRole,
    },
}

/// Why a direct call ended, for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallEndReason {
    Cancelled,
    Declined,
    AnsweredElsewhere,
    Busy,
    Unavailable,
    NoAnswer,
    Hangup,
    Gone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallRole {
    Caller,
    Callee,
}

impl ServerMsg {
    /// Whether the message is numbered, kept until acknowledged and resent after a resume.
    pub fn is_reliable(&self) -> bool {
        !matches!(
            self,
            ServerMsg::Ack | ServerMsg::Resumed | ServerMsg::ResumeFailed { .. } | ServerMsg::Pong
        )
    }

    pub fn error(code: ErrorCode, message: impl Into<String>, in_reply_to: Option<u64>) -> Self {
        ServerMsg::Error {
            code,
            message: message.into(),
            in_reply_to,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadMessage,
    TooLarge,
    UnknownType,
    InvalidRoom,
    InvalidName,
    RoomFull,
    NotJoined,
    AlreadyJoined,
    SdpRejected,
    RateLimited,
    Unauthorized,
    Draining,
    Internal,
}

/// Why a client frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Valid JSON with a `type` this server does not know.
    UnknownType(String),
    /// Not JSON, not an object, or fields missing or of the wrong type.
    BadMessage(String),
}

impl ClientFrame {
    /// Parses one WebSocket text frame, telling unknown message types apart from malformed ones.
    pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        match serde_json::from_str::<ClientFrame>(text) {
            Ok(frame) => Ok(frame),
            Err(err) => {
                #[derive(Deserialize)]
                struct TypeOnly {
                    #[serde(rename = "type")]
                    kind: String,
                }
                match serde_json::from_str::<TypeOnly>(text) {
                    Ok(t) if !KNOWN_CLIENT_TYPES.contains(&t.kind.as_str()) => {
                        Err(FrameError::UnknownType(t.kind))
                    }
                    _ => Err(FrameError::BadMessage(err.to_string())),
                }
            }
        }
    }
}

const KNOWN_CLIENT_TYPES: &[&str] = &[
    "join",
    "offer",
    "view",
    "answer",
    "mute",
    "leave",
    "ack",
    "resume",
    "ping",
    "register",
    "call",
    "call_cancel",
    "call_answer",
    "call_decline",
    "call_hangup",
    "call_signal",
];

/// Room names: 1 to 64 characters from `A-Z a-z 0-9 - _ .`.
pub fn validate_room_name(room: &str) -> Result<(), String> {
    if room.is_empty() || room.len() > 64 {
        return Err(format!(
            "room name must be 1 to 64 characters long (got {})",
            room.chars().count()
        ));
    }
    if let Some(c) = room
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "room name may only contain letters, digits, '-', '_' and '.' (found {c:?})"
        ));
    }
    Ok(())
}

/// Display names: 1 to 64 characters after trimming, no control characters.
pub fn validate_display_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    let len = name.chars().count();
    if len == 0 || len > 64 {
        return Err(format!("name must be 1 to 64 characters long (got {len})"));
    }
    if name.chars().any(char::is_control) {
        return Err("name may not contain control characters".into());
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reliable_join() {
        let f = ClientFrame::parse(r#"{"seq":1,"type":"join","room":"demo","name":"Ada"}"#)
            .expect("valid join");
        assert_eq!(f.seq, Some(1));
        assert_eq!(
            f.msg,
            ClientMsg::Join {
                room: "demo".into(),
                name: "Ada".into(),
                token: None,
                audio_muted: false,
                video_muted: false,
            }
        );
        let f = ClientFrame::parse(
            r#"{"seq":1,"type":"join","room":"demo","name":"Ada","audio_muted":true}"#,
        )
        .expect("valid join");
        assert!(matches!(
            f.msg,
            ClientMsg::Join {
                audio_muted: true,
                video_muted: false,
                ..
            }
        ));
    }

    #[test]
    fn tells_unknown_type_from_malformed() {
        assert_eq!(
            ClientFrame::parse(r#"{"seq":1,"type":"dance"}"#),
            Err(FrameError::UnknownType("dance".into()))
        );
        assert!(matches!(
            ClientFrame::parse(r#"{"seq":1,"type":"offer"}"#),
            Err(FrameError::BadMessage(_))
        ));
        assert!(matches!(
            ClientFrame::parse("not json"),
            Err(FrameError::BadMessage(_))
        ));
        assert!(matches!(
            ClientFrame::parse(r#"{"seq":"x","type":"leave"}"#),
            Err(FrameError::BadMessage(_))
        ));
    }

    #[test]
    fn server_frames_serialize_flat() {
        let f = ServerFrame {
            seq: Some(3),
            ack: Some(2),
            msg: ServerMsg::ParticipantLeft { id: "p2".into() },
        };
        let json = serde_json::to_string(&f).expect("serializable");
        assert_eq!(
            json,
            r#"{"seq":3,"ack":2,"type":"participant_left","id":"p2"}"#
        );
        let ack = serde_json::to_string(&ServerFrame {
            seq: None,
            ack: Some(4),
            msg: ServerMsg::Ack,
        })
        .expect("serializable");
        assert_eq!(ack, r#"{"ack":4,"type":"ack"}"#);
    }

    #[test]
    fn room_names() {
        assert!(validate_room_name("demo-1_a.b").is_ok());
        assert!(validate_room_name("").is_err());
        assert!(validate_room_name(&"a".repeat(65)).is_err());
        assert!(validate_room_name("a b").is_err());
        assert!(validate_room_name("ünï").is_err());
    }
}
