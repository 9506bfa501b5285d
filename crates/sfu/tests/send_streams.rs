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
