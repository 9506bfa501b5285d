//! Bandwidth estimation.

use crate::poll::RtcMut;
use crate::{Rtc, rtp_::Mid};

pub use crate::rtp_::Bitrate;

#[derive(Debug, PartialEq)]
#[non_exhaustive]
/// Bandwidth estimation kind.
pub enum BweKind {
    /// Transport wide congestion control.
    ///
    /// Emits the current estimate with `can_probe: true` when probing becomes
    /// available, initially using the configured starting bitrate. Estimate
    /// updates follow while probing is available. On loss of probing capability,
    /// emits the last reported estimate once with `can_probe: false`, then
    /// suppresses updates until probing becomes available again.
    Twcc {
        /// Estimated available bitrate. Initially this is the configured starting bitrate.
        /// When probing becomes unavailable, this retains the last estimate.
        estimate: Bitrate,
        /// Whether the local BWE can currently probe for capacity.
        ///
        /// Requires BWE to be enabled, SRTP keys, and a sending media section
        /// supporting TWCC feedback and the transport sequence extension.
        /// This does not guarantee that feedback is arriving.
        can_probe: bool,
    },
    /// REMB (Receiver Estimated Maximum Bitrate)
    Remb {
        /// Bitrate reported by the remote receiver.
        estimate: Bitrate,
        /// Media section associated with the report.
        mid: Mid,
    },
}

/// Access to the Bandwidth Estimate subsystem.
///
// The inner `RtcMut` arms the readiness on mutable deref only; see `crate::poll`.
pub struct Bwe<'a>(pub(crate) RtcMut<'a>);

impl<'a> Bwe<'a> {
    pub(crate) fn new(rtc: &'a mut Rtc) -> Self {
        Bwe(RtcMut::new(rtc))
    }

    /// Configure the minimum transmit bitrate and desired bandwidth.
    ///
    /// `minimum` is the total outgoing rate to sustain with media and padding. When
    /// media sends less, padding fills the gap, capped by the current bandwidth
    /// estimate. Padding is suppressed during overuse and requires an active sending
    /// media section with TWCC feedback and a usable padding source. This is not guaranteed bandwidth.
    /// The automatic 50 kbit/s padding target remains a floor, even with a zero
    /// minimum, and is also capped by the estimate. The minimum is clamped to
    /// `desired`; it does not force a probe or raise the estimate.
    ///
    /// `desired` is the bitrate you would like to eventually send at. BWE tries to
    /// discover this capacity through probing. It is not a hard ceiling: probes
    /// may exceed it, and the network may not sustain it. Allocate media using the
    /// estimates from [`Event::EgressBitrateEstimate`][crate::Event::EgressBitrateEstimate].
    ///
    /// Increasing the desired bitrate above the current estimate can trigger an allocation
    /// probe, whether or not the application is currently sending below its estimated capacity.
    /// Initial probing and congestion conditions can suppress this probe. Repeating or reducing
    /// the desired bitrate does not request an allocation probe.
    ///
    /// An SFU can set `minimum` to the rate needed to start its next video layer,
    /// and `desired` to the rate needed for its preferred quality. As the estimate
    /// grows, more padding is allowed until media can take its place. Lower the
    /// minimum when sustained traffic is no longer wanted.
    ///
    /// This only has an effect when BWE is enabled via
    /// [`RtcConfig::enable_bwe`][crate::RtcConfig::enable_bwe]. Both rates are retained
    /// across [`reset`][Self::reset].
    ///
    /// # Example
    ///
    /// ```
    /// # use str0m::{Rtc, bwe::Bitrate};
    /// # let mut rtc = Rtc::builder().enable_bwe(Some(Bitrate::kbps(300))).build(std::time::Instant::now());
    /// // Sustain traffic toward the next layer while probing for the preferred rate.
    /// rtc.bwe().set_bitrate(Bitrate::kbps(800), Bitrate::mbps(3));
    /// ```
    pub fn set_bitrate(&mut self, minimum: Bitrate, desired: Bitrate) {
        let mut m = self.0.mutate();
        m.session.set_bwe_bitrate(minimum, desired);
        // Reconfiguring BWE only re-arms the estimator/pacer timers; any probing
        // padding is produced later from the timeout path, so no event is queued.
        m.no_events();
    }

    /// Set the automatic padding target (50 kbit/s unless set).
    ///
    /// While a sending media section has TWCC feedback, the pacer pads up to this rate (or
    /// the `minimum` of [`set_bitrate`][Self::set_bitrate], whichever is higher, capped by
    /// the estimate) whenever media sends less. On a link too thin for more than audio, that
    /// padding competes with the audio itself: a zero target leaves the link to media, and
    /// probing (raise `desired`) discovers when the link recovers.
    ///
    /// PATCH(parley): not in upstream str0m 0.25, where the target is a constant.
    pub fn set_padding_target(&mut self, target: Bitrate) {
        let mut m = self.0.mutate();
        m.session.set_padding_target(target);
        m.no_events();
    }

    /// Set the pacing rate as a multiple of the estimate (1.1 unless set).
    ///
    /// The pacer spreads what is sent over time at this multiple of the bandwidth estimate. An
    /// SFU forwards media that its sender already paced; at 1.1 every keyframe waits in the
    /// queue for as long as it takes at the estimate (libwebrtc paces video at 2.5).
    ///
    /// PATCH(parley): not in upstream str0m 0.25, where the factor is a constant.
    pub fn set_pacing_factor(&mut self, factor: f64) {
        let mut m = self.0.mutate();
        m.session.set_pacing_factor(factor);
        m.no_events();
    }

    /// Pause or resume the estimator.
    ///
    /// While paused, transport-wide feedback still counts for loss and round-trip time, but it
    /// is not fed to the delay and loss controllers, the estimator's timer does not run and no
    /// probe starts. For a session that sends nothing the estimate is used for, such as audio
    /// only, where the controllers cost more per packet than forwarding it. On resume the
    /// estimator continues from its last estimate.
    ///
    /// PATCH(parley): not in upstream str0m 0.25.
    pub fn set_paused(&mut self, paused: bool) {
        let mut m = self.0.mutate();
        m.session.set_bwe_paused(paused);
        m.no_events();
    }

    /// Whether sent audio carries transport-wide sequence numbers (on by default where the
    /// remote side negotiated them).
    ///
    /// Without them a receiver of audio sends no transport-wide feedback for it: a receiver of
    /// audio alone then sends next to no RTCP, where it otherwise reports every 50 ms. The
    /// estimate then rests on the video (and padding) sent, which is most of the bytes.
    ///
    /// PATCH(parley): not in upstream str0m 0.25.
    pub fn set_audio_transport_cc(&mut self, enabled: bool) {
        let mut m = self.0.mutate();
        m.session.set_audio_transport_cc(enabled);
        m.no_events();
        m.no_timeout();
    }

    /// Whether a probe asked for now, by raising `desired` in
    /// [`set_bitrate`][Self::set_bitrate], could start.
    ///
    /// False while the estimator is paused or not enabled, and while it holds the estimate down
    /// for loss it still sees or for rising delay: it does not probe then, and an increase of
    /// `desired` passes without one. An application that probes sparingly, such as an SFU
    /// probing a link too thin for video every few seconds, can wait for this instead of
    /// spending its turn.
    ///
    /// PATCH(parley): not in upstream str0m 0.25.
    pub fn may_probe(&self) -> bool {
        self.0.session.bwe_may_probe()
    }

    /// Reset the BWE with a new init_bitrate
    ///
    /// This discards the current estimator state and starts estimation again
    /// from `init_bitrate`. Normal transitions from audio-only to video sending
    /// do not require a reset: with TWCC negotiated, probing can discover
    /// capacity before video starts. The desired bitrate controls the capacity
    /// the estimator attempts to discover.
    pub fn reset(&mut self, init_bitrate: Bitrate) {
        let mut m = self.0.mutate();
        m.session.reset_bwe(init_bitrate);
        // Resetting the estimator moves no output, only timers.
        m.no_events();
    }
}
