//! str0m's send streams live in a vector with indexes by SSRC and by Mid/Rid beside it (str0m
//! patch 29, `vendor/str0m/src/streams/mod.rs`). Every way a stream comes and goes must keep
//! both indexes pointing at the right stream.

use str0m::Rtc;
use str0m::media::{MediaKind, Mid, Rid};
use str0m::rtp::Ssrc;

fn ssrc(n: u32) -> Ssrc {
    n.into()
}

/// The SSRC found by SSRC and by Mid/Rid, each `None` if not found.
fn lookup(rtc: &mut Rtc, s: u32, mid: Mid, rid: Option<Rid>) -> (Option<Ssrc>, Option<Ssrc>) {
    let mut api = rtc.direct_api();
    let by_ssrc = api.stream_tx(&ssrc(s)).map(|t| t.ssrc());
    let by_midrid = api.stream_tx_by_mid(mid, rid).map(|t| t.ssrc());
    (by_ssrc, by_midrid)
}

#[test]
fn indexes_follow_declares_removals_and_resets() {
    let mut rtc = Rtc::new(std::time::Instant::now());
    let (a, b, c) = (Mid::from("a"), Mid::from("b"), Mid::from("c"));
    let (low, high) = (Some(Rid::from("l")), Some(Rid::from("h")));
    {
        let mut api = rtc.direct_api();
        api.declare_media(a, MediaKind::Audio);
        api.declare_media(b, MediaKind::Video);
        api.declare_media(c, MediaKind::Audio);
        api.declare_stream_tx(ssrc(1), None, a, None);
        api.declare_stream_tx(ssrc(2), Some(ssrc(20)), b, low);
        api.declare_stream_tx(ssrc(3), Some(ssrc(30)), b, high);
        api.declare_stream_tx(ssrc(4), None, c, None);
        // Declaring an SSRC again gives the stream there, not a second one.
        let again = api.declare_stream_tx(ssrc(2), Some(ssrc(20)), b, low);
        assert_eq!(again.rid(), low);
    }
    assert_eq!(lookup(&mut rtc, 1, a, None), (Some(ssrc(1)), Some(ssrc(1))));
    assert_eq!(lookup(&mut rtc, 2, b, low), (Some(ssrc(2)), Some(ssrc(2))));
    assert_eq!(lookup(&mut rtc, 3, b, high), (Some(ssrc(3)), Some(ssrc(3))));
    assert_eq!(lookup(&mut rtc, 4, c, None), (Some(ssrc(4)), Some(ssrc(4))));

    // Removing one from the middle moves those after it; both indexes follow.
    assert!(rtc.direct_api().remove_stream_tx(ssrc(2)));
    assert!(!rtc.direct_api().remove_stream_tx(ssrc(2)));
    assert_eq!(lookup(&mut rtc, 2, b, low), (None, None));
    assert_eq!(lookup(&mut rtc, 3, b, high), (Some(ssrc(3)), Some(ssrc(3))));
    assert_eq!(lookup(&mut rtc, 4, c, None), (Some(ssrc(4)), Some(ssrc(4))));

    // A new SSRC for a stream: found by the new one, not the old.
    let reset = rtc
        .direct_api()
        .reset_stream_tx(b, high, ssrc(5), Some(ssrc(50)))
        .map(|t| t.ssrc());
    assert_eq!(reset, Some(ssrc(5)));
    assert_eq!(lookup(&mut rtc, 3, b, high), (None, Some(ssrc(5))));
    assert_eq!(lookup(&mut rtc, 5, b, high), (Some(ssrc(5)), Some(ssrc(5))));
    // The same SSRC again changes nothing.
    assert!(
        rtc.direct_api()
            .reset_stream_tx(b, high, ssrc(5), None)
            .is_none()
    );

    // Removing a media removes its streams and leaves the others where they can be found.
    rtc.direct_api().remove_media(a);
    assert_eq!(lookup(&mut rtc, 1, a, None), (None, None));
    assert_eq!(lookup(&mut rtc, 5, b, high), (Some(ssrc(5)), Some(ssrc(5))));
    assert_eq!(lookup(&mut rtc, 4, c, None), (Some(ssrc(4)), Some(ssrc(4))));
}

/// `Rtc::send_path` (str0m patch 32) names, stage by stage, memory that a send on a Mid reads:
/// its stream from stage 2 on, so only for a Mid that has one.
#[test]
fn the_send_path_names_the_stream_of_the_mid_only() {
    let mut rtc = Rtc::new(std::time::Instant::now());
    let (a, b) = (Mid::from("a"), Mid::from("b"));
    {
        let mut api = rtc.direct_api();
        api.declare_media(a, MediaKind::Audio);
        api.declare_media(b, MediaKind::Video);
        api.declare_stream_tx(ssrc(1), None, a, None);
    }
    let named = |mid: Option<Mid>, stage: usize| {
        let mut v = Vec::new();
        let more = rtc.send_path(mid, stage, &mut |p| v.push(p as usize));
        (v, more)
    };
    let rtc_at = &rtc as *const Rtc as usize;
    let inside_rtc = |p: usize| (rtc_at..rtc_at + size_of::<Rtc>()).contains(&p);

    // Stage 0: fields of the Rtc itself, whatever the Mid.
    let (zero, more) = named(None, 0);
    assert!(more && !zero.is_empty());
    assert!(zero.iter().all(|p| inside_rtc(*p)), "stage 0 left the Rtc");
    // Stage 1: what those fields point at (the Mid/Rid list, payload types...), on the heap.
    let (one, more) = named(None, 1);
    assert!(more && one.iter().any(|p| !inside_rtc(*p)));
    // Stage 2: the stream, on the heap; with no Mid or one without a stream, nothing.
    let (two, _) = named(Some(a), 2);
    assert!(two.len() >= 10 && two.iter().all(|p| !inside_rtc(*p)));
    assert!(named(Some(b), 2).0.is_empty());
    assert!(named(None, 2).0.is_empty());
    // Stage 3: the stream's media, then no more.
    let (three, more) = named(Some(a), 3);
    assert!(!more && !three.is_empty());
    assert!(three.iter().all(|p| !two.contains(p)));
    assert_eq!(named(Some(a), 4), (vec![], false));
}
