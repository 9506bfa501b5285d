//! Rewrites sequence numbers, timestamps and VP8 picture ids of one forwarded track so that the
//! subscriber sees one continuous stream across layer switches (and starts near zero).

use std::time::Instant;

use str0m::rtp::SeqNo;

/// Outgoing sequence numbers of a new subscription start here (SRTP's rollover counter then
/// starts at 0 on both sides).
const FIRST_SEQ: u64 = 1000;
const VIDEO_CLOCK: f64 = 90_000.0;

#[derive(Debug, Default)]
pub(crate) struct Munger {
    state: Option<State>,
}

#[derive(Debug)]
struct State {
    seq_delta: i64,
    ts_delta: u32,
    pic_delta: u16,
    tl0_delta: u8,
    /// Packets of the current layer older than its first forwarded one are dropped.
    first_in_seq: u64,
    last_seq: u64,
    last_ts: u32,
    last_pic: Option<u16>,
    last_tl0: Option<u8>,
    last_at: Instant,
}

/// One packet's rewritten header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Munged {
    pub seq: SeqNo,
    pub ts: u32,
    /// New VP8 picture id and TL0PICIDX, when they must change.
    pub pic: Option<u16>,
    pub tl0: Option<u8>,
}

impl Munger {
    /// Starts forwarding a (new) layer whose first packet is `seq`/`ts`/`pic`/`tl0`.
    pub fn switch(&mut self, seq: u64, ts: u32, pic: Option<u16>, tl0: Option<u8>, now: Instant) {
        let Some(s) = &mut self.state else {
            self.state = Some(State {
                seq_delta: FIRST_SEQ as i64 - seq as i64,
                ts_delta: 0,
                pic_delta: 0,
                tl0_delta: 0,
                first_in_seq: seq,
                last_seq: FIRST_SEQ - 1,
                last_ts: ts,
                last_pic: None,
                last_tl0: None,
                last_at: now,
            });
            return;
        };
        s.seq_delta = (s.last_seq + 1) as i64 - seq as i64;
        let elapsed = now.saturating_duration_since(s.last_at).as_secs_f64();
        let advance = ((elapsed * VIDEO_CLOCK) as u32).max(1);
        s.ts_delta = s.last_ts.wrapping_add(advance).wrapping_sub(ts);
        if let (Some(last), Some(p)) = (s.last_pic, pic) {
            s.pic_delta = last.wrapping_add(1).wrapping_sub(p);
        }
        if let (Some(last), Some(t)) = (s.last_tl0, tl0) {
            s.tl0_delta = last.wrapping_add(1).wrapping_sub(t);
        }
        s.first_in_seq = seq;
    }

    /// The outgoing fields of a packet of the current layer, or `None` to drop it.
    pub fn map(
        &mut self,
        seq: u64,
        ts: u32,
        pic: Option<u16>,
        tl0: Option<u8>,
        now: Instant,
    ) -> Option<Munged> {
        let s = self.state.as_mut()?;
        if seq < s.first_in_seq {
            return None;
        }
        let out_seq = (seq as i64 + s.seq_delta) as u64;
        let out_ts = ts.wrapping_add(s.ts_delta);
        let out_pic = pic.map(|p| p.wrapping_add(s.pic_delta) & 0x7fff);
        let out_tl0 = tl0.map(|t| t.wrapping_add(s.tl0_delta));
        if out_seq > s.last_seq {
            s.last_seq = out_seq;
            s.last_ts = out_ts;
            s.last_at = now;
            if out_pic.is_some() {
                s.last_pic = out_pic;
            }
            if out_tl0.is_some() {
                s.last_tl0 = out_tl0;
            }
        }
        Some(Munged {
            seq: SeqNo::from(out_seq),
            ts: out_ts,
            pic: out_pic.filter(|_| s.pic_delta != 0),
            tl0: out_tl0.filter(|_| s.tl0_delta != 0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn starts_near_zero_and_passes_gaps_through() {
        let t = Instant::now();
        let mut m = Munger::default();
        m.switch(50_000, 7, Some(300), Some(9), t);
        let a = m.map(50_000, 7, Some(300), Some(9), t).expect("first");
        assert_eq!(*a.seq, FIRST_SEQ);
        assert_eq!(
            (a.pic, a.tl0),
            (None, None),
            "nothing to patch without a switch"
        );
        let b = m.map(50_003, 3007, Some(301), Some(9), t).expect("later");
        assert_eq!(*b.seq, FIRST_SEQ + 3, "a loss stays visible, for NACK");
        assert_eq!(
            m.map(49_999, 0, None, None, t),
            None,
            "older than the start"
        );
    }

    #[test]
    fn a_layer_switch_continues_every_field() {
        let t = Instant::now();
        let mut m = Munger::default();
        m.switch(100, 1000, Some(10), Some(1), t);
        for i in 0..5 {
            m.map(
                100 + i,
                1000 + 3000 * i as u32,
                Some(10 + i as u16),
                Some(1),
                t,
            );
        }
        // The new layer has its own numbering.
        let t2 = t + Duration::from_millis(33);
        m.switch(9000, 555, Some(32000), Some(200), t2);
        let p = m
            .map(9000, 555, Some(32000), Some(200), t2)
            .expect("switched");
        assert_eq!(*p.seq, FIRST_SEQ + 5);
        assert_eq!(p.ts, 1000 + 3000 * 4 + 2970);
        assert_eq!(p.pic, Some(15));
        assert_eq!(p.tl0, Some(2));
        let q = m
            .map(9001, 555, Some(32000), Some(200), t2)
            .expect("same frame");
        assert_eq!(*q.seq, FIRST_SEQ + 6);
        assert_eq!(q.ts, p.ts);
        assert_eq!(
            m.map(8999, 0, None, None, t2),
            None,
            "old layer's stragglers dropped"
        );
    }

    #[test]
    fn picture_ids_wrap_at_15_bits() {
        let t = Instant::now();
        let mut m = Munger::default();
        m.switch(1, 0, Some(0x7ffe), None, t);
        m.map(1, 0, Some(0x7ffe), None, t);
        m.switch(50, 0, Some(5), None, t);
        assert_eq!(
            m.map(50, 0, Some(5), None, t).and_then(|p| p.pic),
            Some(0x7fff)
        );
        assert_eq!(m.map(51, 0, Some(6), None, t).and_then(|p| p.pic), Some(0));
    }
}
