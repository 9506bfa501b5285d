use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::rtp_::Bitrate;

/// Time window for averaging estimate changes.
const ESTIMATE_WINDOW: Duration = Duration::from_secs(3);

/// PATCH(parley): the window in which a fall of the estimate shows.
const FALL_WINDOW: Duration = Duration::from_millis(250);

const TOLERANCE: f64 = 0.05;

/// PATCH(parley): an estimate and when it began, in seconds since the first estimate, with
/// the integral of all estimates before it (bits): averages over any window are then two
/// lookups, whatever the number of estimates in it.
#[derive(Clone, Copy)]
struct Held {
    start: f64,
    rate: f64,
    before: f64,
}

/// Smooths BWE estimates by averaging over a time window.
///
/// PATCH(parley): the average is weighted by time: each estimate counts for as long as it
/// held. The smaller of the averages over the last 3 s and the last 250 ms is taken, so that
/// the smoothed estimate follows a fall within a quarter of a second and a rise only once it
/// has held. Upstream averaged the distinct estimates it was shown, one vote each, so how fast
/// the average followed the link depended on how often the session was polled (a session
/// polled per forwarded packet saw more intermediate estimates than one polled on its timers).
pub struct EstimateSmoother {
    origin: Option<Instant>,
    estimates: VecDeque<Held>,
    average: Option<Bitrate>,
    maybe_emit: bool,
    emitted: Option<Bitrate>,
}

impl EstimateSmoother {
    pub fn new() -> Self {
        Self {
            origin: None,
            estimates: VecDeque::new(),
            average: None,
            maybe_emit: false,
            emitted: None,
        }
    }

    /// Record the current estimate and update the smoothed average.
    pub fn record(&mut self, now: Instant, estimate: Bitrate) {
        let origin = *self.origin.get_or_insert(now);
        let now = now.saturating_duration_since(origin).as_secs_f64();
        let rate = estimate.as_f64();

        match self.estimates.back() {
            Some(last) if last.rate == rate => {}
            Some(last) => {
                let start = now.max(last.start);
                let before = last.before + last.rate * (start - last.start);
                self.estimates.push_back(Held {
                    start,
                    rate,
                    before,
                });
            }
            None => self.estimates.push_back(Held {
                start: now,
                rate,
                before: 0.0,
            }),
        }

        // Drop estimates that were replaced before the window began. The oldest one left may
        // have begun before the window; only its part inside the window counts.
        let window_start = now - ESTIMATE_WINDOW.as_secs_f64();
        while self.estimates.len() > 1 && self.estimates[1].start <= window_start {
            self.estimates.pop_front();
        }

        // A fall shows within the short window, a rise must hold over the whole window.
        let long = self.average_since(window_start, now);
        let short = self.average_since(now - FALL_WINDOW.as_secs_f64(), now);
        let average = Bitrate::from(long.min(short));
        if Some(average) != self.average {
            self.average = Some(average);
            self.maybe_emit = true;
        }
    }

    /// The time-weighted average from `from` (or the first estimate kept) to `now`.
    fn average_since(&self, from: f64, now: f64) -> f64 {
        let (Some(first), Some(last)) = (self.estimates.front(), self.estimates.back()) else {
            return 0.0;
        };
        let from = from.max(first.start);
        // Within the last estimate (or no time at all): exactly that estimate.
        if from >= last.start || now - from <= 0.0 {
            return last.rate;
        }
        (self.integral_to(now) - self.integral_to(from)) / (now - from)
    }

    fn integral_to(&self, t: f64) -> f64 {
        let after = self.estimates.partition_point(|e| e.start <= t);
        let held = self.estimates[after.saturating_sub(1)];
        held.before + held.rate * (t - held.start).max(0.0)
    }

    /// Poll for an estimate to emit. Returns Some only when there's a new value to emit.
    pub fn poll(&mut self) -> Option<Bitrate> {
        if !self.maybe_emit {
            return None;
        }
        self.maybe_emit = false;

        let rate = self.average?;

        // This forces emitting if we have the first ever value, or a last
        // where the rest of the window is gone (estimates stop changing).
        let force = self.estimates.len() == 1 && self.emitted != Some(rate);

        // Emit if we deviate enough from previously emitted.
        let deviate = if let Some(emitted) = self.emitted {
            !in_tolerance(emitted, rate)
        } else {
            true
        };

        // Are we not to emit?
        if !force && !deviate {
            return None;
        }

        self.emitted = Some(rate);
        Some(rate)
    }
}

fn in_tolerance(b1: Bitrate, b2: Bitrate) -> bool {
    let min = b1 * (1.0 - TOLERANCE);
    let max = b1 * (1.0 + TOLERANCE);
    b2 > min && b2 < max
}

#[cfg(test)]
mod test {
    use super::*;

    /// Drives a smoother with `estimate(ms since start)`, recorded every `step_ms`, and returns
    /// the smoothed value at each whole second up to `secs`.
    fn run(step_ms: u64, secs: u64, estimate: impl Fn(u64) -> u64) -> Vec<f64> {
        let start = Instant::now();
        let mut smoother = EstimateSmoother::new();
        let mut out = vec![];
        let mut t = 0;
        while t <= secs * 1000 {
            smoother.record(start + Duration::from_millis(t), Bitrate::bps(estimate(t)));
            if t % 1000 == 0 {
                out.push(smoother.average.expect("an average").as_f64());
            }
            t += step_ms;
        }
        out
    }

    fn ramp(t: u64) -> u64 {
        // Rises by 100 kbps a second from 500 kbps, falls to 300 kbps at 6 s, rises again.
        if t < 6000 {
            500_000 + t * 100
        } else {
            300_000 + (t - 6000) * 50
        }
    }

    #[test]
    fn the_average_does_not_depend_on_how_often_it_is_recorded() {
        let often = run(1, 12, ramp);
        let seldom = run(25, 12, ramp);
        for (a, b) in often.iter().zip(&seldom) {
            assert!((a - b).abs() / a < 0.02, "{often:?} against {seldom:?}");
        }
    }

    #[test]
    fn a_fall_shows_at_once_and_a_rise_only_once_it_held() {
        let step = |t: u64| match t {
            0..5000 => 2_000_000,
            5000..10000 => 500_000,
            _ => 2_000_000,
        };
        let start = Instant::now();
        let mut smoother = EstimateSmoother::new();
        let at = |ms| start + Duration::from_millis(ms);
        for t in (0..=5300).step_by(25) {
            smoother.record(at(t), Bitrate::bps(step(t)));
        }
        assert_eq!(smoother.average, Some(Bitrate::bps(500_000)));
        for t in (5300..=11_000).step_by(25) {
            smoother.record(at(t), Bitrate::bps(step(t)));
        }
        let avg = smoother.average.expect("an average").as_f64();
        assert!(
            avg < 1_100_000.0,
            "rose to {avg} one second after the link did"
        );
        for t in (11_000..=13_100).step_by(25) {
            smoother.record(at(t), Bitrate::bps(step(t)));
        }
        assert_eq!(smoother.average, Some(Bitrate::bps(2_000_000)));
    }

    #[test]
    fn a_steady_estimate_is_emitted_once_and_exactly() {
        let start = Instant::now();
        let mut smoother = EstimateSmoother::new();
        smoother.record(start, Bitrate::bps(1_000_000));
        assert_eq!(smoother.poll(), Some(Bitrate::bps(1_000_000)));
        for ms in 1..100 {
            smoother.record(
                start + Duration::from_millis(ms * 25),
                Bitrate::bps(1_000_000),
            );
            assert_eq!(smoother.poll(), None);
        }
    }
}
