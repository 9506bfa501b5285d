//! Commands from the signaling plane to the media plane, and the events coming back.
//!
//! Everything here is serializable so that the media plane can later run as a separate
//! process (dedicated media nodes); in the integrated mode they travel over in-process channels.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One participant's media session (one PeerConnection) on the media plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// What a published track carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrackSource {
    Mic,
    #[default]
    Camera,
    Screen,
}

/// One remote video as a subscriber shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileView {
    pub publisher: SessionId,
    pub source: TrackSource,
    /// Size in device pixels.
    pub width: u32,
    pub height: u32,
}

fn yes() -> bool {
    true
}

/// Signaling plane → media plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MediaCommand {
    /// An SDP offer from the participant. Creates the session on its first offer.
    /// `stream_id` labels the participant's tracks towards the other participants
    /// (it becomes the `msid` stream id in their SDP).
    Offer {
        session: SessionId,
        room: String,
        stream_id: String,
        sdp: String,
        /// Mids of the offer that carry a screen share.
        #[serde(default)]
        screen_mids: Vec<String>,
        /// The participant may send media / receive the others' (from its access token).
        #[serde(default = "yes")]
        can_publish: bool,
        #[serde(default = "yes")]
        can_subscribe: bool,
    },
    /// What the participant shows; videos not listed are not sent to it.
    View {
        session: SessionId,
        tiles: Vec<TileView>,
    },
    /// The participant's mute state (`true` = muted), as it told the room. An unmuted
    /// microphone (`audio`) or camera (`video`) whose track has not carried a packet yet is
    /// offered to the others at once, so that the offer travels while the client's sender
    /// starts, not after its first packet.
    Mute {
        session: SessionId,
        audio: bool,
        video: bool,
    },
    /// The participant's answer to the media plane's offer number `id`.
    Answer {
        session: SessionId,
        id: u64,
        sdp: String,
    },
    /// The participant left: close the session and remove its tracks from everyone.
    Close { session: SessionId },
}

/// Media plane → signaling plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MediaEvent {
    /// The answer to the participant's offer.
    Answer { session: SessionId, sdp: String },
    /// The media plane needs to renegotiate (remote tracks added or removed).
    Offer {
        session: SessionId,
        id: u64,
        sdp: String,
    },
    /// An offer or answer was refused; the session is otherwise untouched.
    SdpRejected { session: SessionId, reason: String },
    /// ICE and DTLS are up: media can flow.
    Connected { session: SessionId },
    /// The session ended on the media plane (ICE timed out, or closed).
    Closed { session: SessionId },
    /// The participant started or stopped speaking (RFC 6464 audio level).
    Speaking { session: SessionId, speaking: bool },
    /// The participant is now the dominant speaker of its room.
    DominantSpeaker { session: SessionId },
    /// Dynacast: of the publisher's simulcast track `mid`, only `active` rids are needed.
    Layers {
        session: SessionId,
        mid: String,
        active: Vec<String>,
    },
    /// The subscriber's bandwidth does not allow `publisher`'s video (or allows it again).
    VideoPaused {
        session: SessionId,
        publisher: SessionId,
        source: TrackSource,
        paused: bool,
    },
}

impl MediaEvent {
    /// The session this event is about.
    pub fn session(&self) -> SessionId {
        match self {
            MediaEvent::Answer { session, .. }
            | MediaEvent::Offer { session, .. }
            | MediaEvent::SdpRejected { session, .. }
            | MediaEvent::Connected { session }
            | MediaEvent::Closed { session }
            | MediaEvent::Speaking { session, .. }
            | MediaEvent::DominantSpeaker { session }
            | MediaEvent::Layers { session, .. }
            | MediaEvent::VideoPaused { session, .. } => *session,
        }
    }
}
