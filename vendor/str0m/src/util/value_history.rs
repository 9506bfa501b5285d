use std::ops::{AddAssign, SubAssign};
use std::time::{Duration, Instant};

/// PATCH(parley): how many parts the window is cut into, and how long each lasts. The sum
/// covers the last `SLOTS - 1` parts whole and the current one so far: 0.9 to 1 s.
const SLOTS: usize = 10;
const SLOT: Duration = Duration::from_millis(100);

/// Holds the sum of values added over about the last second.
///
/// PATCH(parley): in `SLOTS` fixed parts of the window instead of a queue of every value and
/// its time. Upstream a send stream pushed each packet's size and time onto a `VecDeque` (a
/// new, cold cache line every few packets, as the ring walked through a second's worth of
/// entries) and popped them again as they aged; this touches the same few bytes each time.
#[derive(Debug)]
pub(crate) struct ValueHistory<T> {
    /// The sum of `slots`.
    value: T,
    slots: [T; SLOTS],
    /// The slot `head_start` begins; values at or after it go there.
    head: usize,
    /// When the head slot began; `None` before the first value.
    head_start: Option<Instant>,
}

impl<T: Default + Copy> Default for ValueHistory<T> {
    fn default() -> Self {
        Self {
            value: Default::default(),
            slots: [T::default(); SLOTS],
            head: 0,
            head_start: None,
        }
    }
}

impl<T> ValueHistory<T>
where
    T: Default + Copy + AddAssign + SubAssign,
{
    /// Adds a timed value. A value older than the window is dropped.
    pub fn push(&mut self, t: Instant, v: T) {
        self.purge_old(t);
        let Some(start) = self.head_start else {
            return;
        };
        let back = if t >= start {
            0
        } else {
            // An earlier time than the latest: into the slot it falls in, if still kept.
            let behind = start - t;
            (behind.as_nanos().div_ceil(SLOT.as_nanos())) as usize
        };
        if back >= SLOTS {
            return;
        }
        let i = (self.head + SLOTS - back) % SLOTS;
        self.slots[i] += v;
        self.value += v;
    }

    /// The sum of the values in the window as of the latest time given to `push` or
    /// `purge_old`.
    pub fn sum(&self) -> T {
        self.value
    }

    /// Moves the window on to `now`, dropping the values that fall out of it.
    pub fn purge_old(&mut self, now: Instant) {
        let Some(mut start) = self.head_start else {
            self.head_start = Some(now);
            return;
        };
        let mut steps = 0;
        while now >= start + SLOT {
            if steps == SLOTS {
                // Everything has aged out.
                self.slots = [T::default(); SLOTS];
                self.value = T::default();
                self.head_start = Some(now);
                return;
            }
            steps += 1;
            start += SLOT;
            self.head = (self.head + 1) % SLOTS;
            self.value -= self.slots[self.head];
            self.slots[self.head] = T::default();
        }
        self.head_start = Some(start);
    }
}

#[allow(clippy::unchecked_time_subtraction)]
#[cfg(test)]
mod test {
    use std::time::{Duration, Instant};

    use super::ValueHistory;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn values_age_out_of_the_window() {
        let now = Instant::now();
        let mut h = ValueHistory::default();

        assert_eq!(h.sum(), 0);
        h.push(now - ms(1500), 22);
        assert_eq!(h.sum(), 22);
        h.purge_old(now);
        assert_eq!(h.sum(), 0);
        h.push(now - ms(700), 22);
        h.push(now - ms(500), 33);
        assert_eq!(h.sum(), 22 + 33);
        h.purge_old(now);
        assert_eq!(h.sum(), 22 + 33);

        h.purge_old(now + ms(400));
        assert_eq!(h.sum(), 33);
        h.purge_old(now + ms(600));
        assert_eq!(h.sum(), 0);
    }

    #[test]
    fn a_steady_rate_sums_to_most_of_a_second() {
        let start = Instant::now();
        let mut h = ValueHistory::default();
        // 50 values a second for 10 s.
        for i in 0..500 {
            h.push(start + ms(20 * i), 100u64);
            assert!(h.sum() <= 50 * 100, "{} at {i}", h.sum());
        }
        assert!(h.sum() >= 45 * 100, "{}", h.sum());
        // A pause longer than the window empties it; the next value starts afresh.
        h.purge_old(start + ms(20 * 500 + 1000));
        assert_eq!(h.sum(), 0);
        h.push(start + ms(20 * 500 + 1001), 7);
        assert_eq!(h.sum(), 7);
    }

    #[test]
    fn a_value_older_than_the_window_is_dropped() {
        let now = Instant::now();
        let mut h = ValueHistory::default();
        h.push(now, 1u64);
        h.push(now - ms(2000), 5);
        assert_eq!(h.sum(), 1);
    }
}
