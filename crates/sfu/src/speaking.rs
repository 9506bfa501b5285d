//! Speaking detection from the RFC 6464 audio level of each packet, with hysteresis.

use std::time::{Duration, Instant};

use parley_proto::media::SessionId;

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

/// Smoothed loudness (0 silent, 1 loudest) a participant needs to become dominant.
const DOMINANT_MIN: f32 = 0.5;
/// How much louder than the current dominant speaker a challenger must be ...
const DOMINANT_MARGIN: f32 = 0.08;
/// ... for this many consecutive evaluations (200 ms apart).
const DOMINANT_TICKS: u32 = 4;

/// The dominant speaker of one room: the loudest participant, replaced only by one that stays
/// clearly louder for a while, so short noises do not move it.
#[derive(Debug, Default)]
pub(crate) struct DominantSpeaker {
    current: Option<SessionId>,
    challenger: Option<(SessionId, u32)>,
}

impl DominantSpeaker {
    pub fn current(&self) -> Option<SessionId> {
        self.current
    }

    /// Feeds the smoothed loudness of every member; returns the new dominant speaker on change.
    pub fn update(&mut self, levels: &[(SessionId, f32)]) -> Option<SessionId> {
        if let Some(cur) = self.current
            && !levels.iter().any(|(s, _)| *s == cur)
        {
            self.current = None;
        }
        let (best, level) = levels.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1))?;
        let current_level = self
            .current
            .and_then(|c| levels.iter().find(|(s, _)| *s == c))
            .map_or(0.0, |(_, l)| *l);
        let beats = Some(best) != self.current
            && level >= DOMINANT_MIN
            && level > current_level + DOMINANT_MARGIN;
        if !beats {
            self.challenger = None;
            return None;
        }
        let count = match self.challenger {
            Some((s, n)) if s == best => n + 1,
            _ => 1,
        };
        self.challenger = Some((best, count));
        if count >= DOMINANT_TICKS {
            self.current = Some(best);
            self.challenger = None;
            return Some(best);
        }
        None
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

#[cfg(test)]
mod dominant_tests {
    use super::*;

    #[test]
    fn follows_the_loud_one_and_ignores_short_noise() {
        let (a, b) = (SessionId(1), SessionId(2));
        let mut d = DominantSpeaker::default();
        let mut changes = Vec::new();
        for _ in 0..6 {
            changes.extend(d.update(&[(a, 0.8), (b, 0.1)]));
        }
        assert_eq!(changes, vec![a]);
        // B coughs for two evaluations: nothing changes.
        for lv in [0.95, 0.95, 0.1, 0.1] {
            assert_eq!(d.update(&[(a, 0.8), (b, lv)]), None);
        }
        // B talks for real.
        let mut changes = Vec::new();
        for _ in 0..6 {
            changes.extend(d.update(&[(a, 0.3), (b, 0.9)]));
        }
        assert_eq!(changes, vec![b]);
        assert_eq!(d.current(), Some(b));
    }
}
