//! Speaking detection from the RFC 6464 audio level of each packet, with hysteresis.

use std::time::{Duration, Instant};

/// Audio level (dBov, 0 loudest, -127 silence) at or above which a packet counts as voice.
const VOICE_DBOV: i8 = -50;
/// Smoothing: each 20 ms packet moves the estimate this far towards 0 or 1.
const ALPHA: f32 = 0.15;
const START: f32 = 0.55;
const STOP: f32 = 0.15;
/// Shortest time between two changes, so a cough does not flap the indicator.
const MIN_HOLD: Duration = Duration::from_millis(400);

#[derive(Debug, Default)]
pub(crate) struct SpeakingDetector {
    activity: f32,
    speaking: bool,
    changed_at: Option<Instant>,
}

impl SpeakingDetector {
    /// Feeds one packet's level; returns the new state when it changes.
    pub fn update(&mut self, level: i8, now: Instant) -> Option<bool> {
        let voice = if level >= VOICE_DBOV { 1.0 } else { 0.0 };
        self.activity += ALPHA * (voice - self.activity);
        let want = if self.speaking {
            self.activity > STOP
        } else {
            self.activity >= START
        };
        if want == self.speaking {
            return None;
        }
        if self
            .changed_at
            .is_some_and(|at| now.saturating_duration_since(at) < MIN_HOLD)
        {
            return None;
        }
        self.speaking = want;
        self.changed_at = Some(now);
        Some(want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(d: &mut SpeakingDetector, level: i8, packets: u32, t: &mut Instant) -> Vec<bool> {
        let mut changes = Vec::new();
        for _ in 0..packets {
            *t += Duration::from_millis(20);
            if let Some(c) = d.update(level, *t) {
                changes.push(c);
            }
        }
        changes
    }

    #[test]
    fn follows_voice_with_hysteresis() {
        let mut d = SpeakingDetector::default();
        let mut t = Instant::now();
        assert_eq!(feed(&mut d, -127, 50, &mut t), Vec::<bool>::new());
        assert_eq!(feed(&mut d, -20, 50, &mut t), vec![true]);
        assert_eq!(feed(&mut d, -127, 50, &mut t), vec![false]);
    }

    #[test]
    fn short_noise_does_not_flap() {
        let mut d = SpeakingDetector::default();
        let mut t = Instant::now();
        // Three loud packets (60 ms) in silence.
        feed(&mut d, -127, 10, &mut t);
        assert!(feed(&mut d, -10, 3, &mut t).is_empty());
        assert!(feed(&mut d, -127, 20, &mut t).is_empty());
    }
}
