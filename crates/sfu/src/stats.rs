//! Counters and samples the media plane keeps for metrics; the driver exports them.

use std::time::Duration;

/// Index of a media kind in the per-kind counters.
pub const AUDIO: usize = 0;
pub const VIDEO: usize = 1;

/// ICE connection states counted in [`SfuStats::state_changes`], in this order.
pub const ICE_STATES: [&str; 5] = ["checking", "connected", "completed", "disconnected", "new"];

/// Monotonic counters since start (the driver turns them into Prometheus counters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SfuStats {
    /// RTP packets and payload bytes received from publishers, by kind.
    pub rtp_in_packets: [u64; 2],
    pub rtp_in_bytes: [u64; 2],
    /// RTP packets and payload bytes forwarded to subscribers, by kind.
    pub rtp_out_packets: [u64; 2],
    pub rtp_out_bytes: [u64; 2],
    /// ICE connection state changes, by [`ICE_STATES`].
    pub state_changes: [u64; ICE_STATES.len()],
    /// Datagrams for no session, and inputs str0m refused.
    pub datagrams_unrouted: u64,
    pub inputs_refused: u64,
    pub sdp_rejected: u64,
    /// Sessions advanced because their timer was due, and session polls in all (timer,
    /// datagram or command): what the media plane's CPU goes to besides the packets.
    pub session_timeouts: u64,
    pub session_polls: u64,
}

/// A reading from an RTCP report, for the histograms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sample {
    /// Fraction of packets lost (0 to 1).
    Loss(f64),
    Rtt(Duration),
    /// Interarrival jitter in seconds.
    Jitter(f64),
}
