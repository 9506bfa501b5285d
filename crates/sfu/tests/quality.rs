//! Media quality on simulated links (fake time, str0m peers, no sockets): simulcast layer
//! choice, bandwidth changes, loss recovery, pausing, dynacast and the dominant speaker.

mod harness;

use std::time::Duration;

use harness::World;
use parley_proto::media::{MediaCommand, MediaEvent, SessionId, TileView, TrackSource};
use str0m::format::Codec;
use str0m::media::MediaKind;

fn view(w: &mut World, viewer: usize, publisher: usize, width: u32) {
    let cmd = MediaCommand::View {
        session: w.peers[viewer].session,
        tiles: vec![TileView {
            publisher: w.peers[publisher].session,
            source: TrackSource::Camera,
            width,
            height: width * 9 / 16,
        }],
    };
    w.sfu.handle_command(cmd, w.now);
}

fn layer(w: &World, viewer: usize, publisher: &str) -> u8 {
    w.peers[viewer]
        .last_layer
        .get(publisher)
        .copied()
        .unwrap_or(0)
}

/// A simulcast publisher and two subscribers, connected and receiving.
fn call() -> (World, usize, usize, usize) {
    let mut w = World::new();
    let ada = w.join_simulcast("ada", "q");
    let bob = w.join("bob", "q");
    let cy = w.join("cy", "q");
    w.run_until(Duration::from_secs(5), "both receive ada", |w| {
        layer(w, bob, "ada") > 0 && layer(w, cy, "ada") > 0
    });
    (w, ada, bob, cy)
}

/// A simulcast publisher and one subscriber in `room`, connected and receiving.
fn pair(room: &str) -> (World, usize, usize) {
    let mut w = World::new();
    let ada = w.join_simulcast("ada", room);
    let bob = w.join("bob", room);
    w.run_until(Duration::from_secs(5), "bob receives ada", |w| {
        layer(w, bob, "ada") > 0
    });
    (w, ada, bob)
}

#[test]
fn each_subscriber_gets_the_layer_its_tile_needs() {
    let (mut w, ada, bob, cy) = call();
    // No view reported: the best layer.
    w.run_until(Duration::from_secs(5), "top layer by default", |w| {
        layer(w, bob, "ada") == 3 && layer(w, cy, "ada") == 3
    });
    view(&mut w, bob, ada, 200);
    view(&mut w, cy, ada, 1280);
    let took = w.run_until(Duration::from_secs(5), "bob on the small layer", |w| {
        layer(w, bob, "ada") == 1
    });
    eprintln!("small tile: lowest layer after {took:?}");
    w.run(Duration::from_secs(1));
    assert_eq!(
        layer(&w, cy, "ada"),
        3,
        "the large tile keeps the top layer"
    );
    view(&mut w, bob, ada, 700);
    w.run_until(Duration::from_secs(5), "bob back up", |w| {
        layer(w, bob, "ada") == 2
    });
    // Switches happen at keyframes with rewritten numbering: no gap the decoder would see.
    assert_eq!(w.peers[bob].gaps, 0, "sequence gap visible to bob");
    assert_eq!(w.peers[cy].gaps, 0, "sequence gap visible to cy");
}

#[test]
fn hidden_tiles_get_no_video_but_audio_goes_on() {
    let (mut w, _ada, bob, _cy) = call();
    w.sfu.handle_command(
        MediaCommand::View {
            session: w.peers[bob].session,
            tiles: vec![],
        },
        w.now,
    );
    w.run(Duration::from_millis(500));
    let video = w.received(bob, "ada", MediaKind::Video);
    let audio = w.received(bob, "ada", MediaKind::Audio);
    w.run(Duration::from_secs(2));
    assert_eq!(w.received(bob, "ada", MediaKind::Video), video);
    assert!(w.received(bob, "ada", MediaKind::Audio) > audio + 80);
}

#[test]
fn dynacast_pauses_layers_nobody_receives() {
    let (mut w, ada, bob, cy) = call();
    let ada_session = w.peers[ada].session;
    view(&mut w, bob, ada, 200);
    view(&mut w, cy, ada, 200);
    let active = |w: &World| -> Option<Vec<String>> {
        w.events.iter().rev().find_map(|e| match e {
            MediaEvent::Layers {
                session, active, ..
            } if *session == ada_session => Some(active.clone()),
            _ => None,
        })
    };
    view(&mut w, bob, ada, 700);
    w.run_until(
        Duration::from_secs(5),
        "only h (and the always-on q) needed",
        |w| active(w) == Some(vec!["h".to_string(), "q".to_string()]),
    );
    view(&mut w, cy, ada, 1280);
    w.run_until(Duration::from_secs(5), "f needed again", |w| {
        active(w).is_some_and(|a| a.contains(&"f".to_string()))
    });
    w.run_until(Duration::from_secs(5), "cy on the top layer", |w| {
        layer(w, cy, "ada") == 3
    });
}

#[test]
fn a_bandwidth_drop_lowers_the_layer_and_recovery_restores_it() {
    let (mut w, _ada, bob, _cy) = call();
    w.run_until(Duration::from_secs(10), "bob on the top layer", |w| {
        layer(w, bob, "ada") == 3
    });
    w.peers[bob].down.rate = Some(350_000);
    let down = w.run_until(Duration::from_secs(15), "a lower layer", |w| {
        layer(w, bob, "ada") < 3
    });
    eprintln!("BANDWIDTH_DROP_TO_LOWER_LAYER {} ms", down.as_millis());
    w.peers[bob].down.rate = None;
    let up = w.run_until(Duration::from_secs(30), "the top layer again", |w| {
        layer(w, bob, "ada") == 3
    });
    eprintln!("BANDWIDTH_RECOVERY_TO_TOP_LAYER {} ms", up.as_millis());
}

#[test]
fn five_percent_loss_is_repaired_and_video_keeps_decoding() {
    let (mut w, ada, bob, _cy) = call();
    w.peers[ada].up.loss = 0.05;
    w.peers[bob].down.loss = 0.05;
    w.run(Duration::from_secs(1));
    let before = w.received(bob, "ada", MediaKind::Video);
    let gaps = w.peers[bob].gaps;
    w.run(Duration::from_secs(10));
    let fps = (w.received(bob, "ada", MediaKind::Video) - before) as f64 / 10.0;
    let lost = w.peers[ada].up.dropped + w.peers[bob].down.dropped;
    eprintln!(
        "LOSS_5PCT_DECODED_FPS {fps:.1} (of 30 sent; {lost} datagrams lost, {} frames with gaps)",
        w.peers[bob].gaps - gaps
    );
    assert!(lost > 100, "the links lost little: {lost}");
    assert!(fps > 24.0, "only {fps} frames per second got through");
}

/// A link with room for the audio and not for video: the simulated audio with its RTCP needs
/// about 43 kbit/s on the wire (IP and UDP headers included), which leaves well under the
/// issue's 40 kbit/s for anything else. Before str0m's padding could be turned off, 100 kbit/s
/// was the thinnest link on which the audio got through (26 of 150 packets at 50 kbit/s).
const THIN_LINK: u64 = 50_000;

#[test]
fn a_link_too_thin_for_video_pauses_it_and_audio_continues() {
    let (mut w, ada, bob) = pair("p");
    let (bob_s, ada_s) = (w.peers[bob].session, w.peers[ada].session);
    let paused = move |w: &World, p: bool| {
        w.events.iter().any(|e| {
            matches!(e, MediaEvent::VideoPaused { session, publisher, paused, .. }
                if *session == bob_s && *publisher == ada_s && *paused == p)
        })
    };
    w.peers[bob].down.rate = Some(THIN_LINK);
    let took = w.run_until(Duration::from_secs(20), "video paused", |w| paused(w, true));
    eprintln!(
        "video paused {} ms after the link fell to {} kbps",
        took.as_millis(),
        THIN_LINK / 1000
    );
    // Video already queued towards bob drains at the link's pace; then no more comes.
    let mut last = w.received(bob, "ada", MediaKind::Video);
    let mut quiet_since = w.now;
    w.run_until(Duration::from_secs(20), "queued video drained", |w| {
        let now_frames = w.received(bob, "ada", MediaKind::Video);
        if now_frames != last {
            last = now_frames;
            quiet_since = w.now;
        }
        w.now - quiet_since > Duration::from_secs(1)
    });
    let audio = w.received(bob, "ada", MediaKind::Audio);
    let carried_before = w.peers[bob].down.by_pt.clone();
    let dropped_before = w.peers[bob].down.dropped;
    w.run(Duration::from_secs(3));
    let window: Vec<(u8, u64)> = w.peers[bob]
        .down
        .by_pt
        .iter()
        .map(|(pt, b)| (*pt, b - carried_before.get(pt).copied().unwrap_or(0)))
        .collect();
    eprintln!(
        "in the window bob's link carried {window:?}, dropped {}",
        w.peers[bob].down.dropped - dropped_before
    );
    // No new video is sent. (Frames may still complete late: str0m's padding resends a
    // cached packet, which can fill a gap left on the link before the pause.)
    let vp8 = w.peers[bob]
        .rtc
        .codec_config()
        .iter()
        .find(|p| p.spec().codec == Codec::Vp8)
        .map(|p| *p.pt())
        .expect("bob has VP8");
    let fresh = window
        .iter()
        .find(|(pt, _)| *pt == vp8)
        .map_or(0, |(_, bytes)| *bytes);
    assert!(
        fresh < 2_000,
        "video kept flowing while paused: {fresh} bytes of VP8 in 3 s"
    );
    let got = w.received(bob, "ada", MediaKind::Audio) - audio;
    assert!(got > 135, "audio stalled: {got} of 150 packets in 3 s");
    w.peers[bob].down.rate = None;
    w.run_until(Duration::from_secs(20), "video resumed", |w| {
        paused(w, false)
    });
    let video = w.received(bob, "ada", MediaKind::Video);
    w.run(Duration::from_secs(2));
    assert!(w.received(bob, "ada", MediaKind::Video) > video + 30);
}

/// What `tests/e2e/bandwidth.mjs` does with Chromium: a camera behind a 100 kbit/s link, with
/// audio the size of Chromium's Opus with RED (about 50 kbit/s on the wire). While the video
/// is paused only the audio is acknowledged, and a loss-limited estimate may grow only to 1.5
/// times that. Before probes could raise it (str0m patch 23), the video came back 11.8 s after
/// the link when it had been paused for one second, and not at all after three; then after 7.8
/// and 6.4 s. Since the SFU probes as soon as the estimator would send the probe (str0m patch
/// 25) and again a second after one that raised the estimate, after 4.4–4.8 and 1.8–2.4 s
/// (runs of the simulation differ by a step or two), within the 6 s allowed.
#[test]
fn a_video_paused_beside_chromium_sized_audio_comes_back_with_the_link() {
    for pause in [1, 3] {
        let mut w = World::new();
        let ada = w.join_simulcast("ada", "p");
        let bob = w.join("bob", "p");
        for p in [ada, bob] {
            w.peers[p].audio_bytes = 120;
        }
        w.run_until(Duration::from_secs(5), "bob receives ada", |w| {
            layer(w, bob, "ada") > 0
        });
        // Past the estimator's start-up, where a probe result sets the estimate outright.
        w.run(Duration::from_secs(5));
        w.peers[bob].down.rate = Some(100_000);
        w.run_until(Duration::from_secs(20), "video paused", |w| {
            was_paused(w, bob, ada)
        });
        w.run(Duration::from_secs(pause));
        w.peers[bob].down.rate = None;
        let took = w.run_until(Duration::from_secs(6), "video resumed", |w| {
            !paused_now(w, bob, ada)
        });
        eprintln!(
            "paused {pause} s: video resumed {} ms after the link came back",
            took.as_millis()
        );
        let video = w.received(bob, "ada", MediaKind::Video);
        w.run(Duration::from_secs(2));
        assert!(w.received(bob, "ada", MediaKind::Video) > video + 30);
    }
}

/// Probing a link too thin for any video costs the audio what the probes crowd out. Probing
/// every second let 1 313 to 1 377 of 1 500 audio packets through in 30 s at 50 kbit/s; backing
/// off to every 4 s after probes that found nothing lets 1 408 to 1 448 through (1 428 with the
/// fixed 4 s of before).
#[test]
fn probing_a_link_too_thin_for_video_leaves_the_audio_through() {
    let (mut w, ada, bob) = pair("p");
    w.run(Duration::from_secs(5));
    w.peers[bob].down.rate = Some(THIN_LINK);
    w.run_until(Duration::from_secs(20), "video paused", |w| {
        was_paused(w, bob, ada)
    });
    w.run(Duration::from_secs(5));
    let audio = w.received(bob, "ada", MediaKind::Audio);
    w.run(Duration::from_secs(30));
    let got = w.received(bob, "ada", MediaKind::Audio) - audio;
    eprintln!("THIN_LINK_AUDIO {got} of 1500 packets in 30 s");
    assert!(
        got > 1_360,
        "probing crowded out the audio: {got} of 1500 packets in 30 s"
    );
}

/// A sender names the track of a new SSRC in every packet (the MID header extension) only
/// until the receiver's first report on that SSRC says it has bound it, as libwebrtc does.
/// str0m checked the report against the main SSRC only for streams without RTX (str0m patch
/// 26), so every forwarded video packet carried its MID for as long as it was sent.
#[test]
fn forwarded_video_stops_naming_its_track_once_the_viewer_reported() {
    let (mut w, _, bob) = pair("m");
    // Receiver reports go out every second or so.
    w.run(Duration::from_secs(3));
    let vp8 = *w.peers[bob]
        .rtc
        .codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == Codec::Vp8)
        .expect("bob has VP8")
        .pt();
    let mid_id = 4; // str0m's standard extension map, which both sides use here
    let before = w.peers[bob]
        .down
        .exts_by_pt
        .get(&vp8)
        .copied()
        .unwrap_or_default();
    w.run(Duration::from_secs(2));
    let after = w.peers[bob].down.exts_by_pt[&vp8];
    let (packets, with_mid) = (after[0] - before[0], after[mid_id] - before[mid_id]);
    eprintln!("in 2 s, {with_mid} of {packets} video packets to bob carried the MID");
    assert!(packets > 50, "video stalled: {packets} packets in 2 s");
    assert_eq!(with_mid, 0, "video packets still name their track");
    assert!(
        w.peers[bob].down.exts_by_pt[&vp8][mid_id] > 0,
        "the first packets named their track"
    );
}

#[test]
fn dominant_speaker_follows_the_loud_peer_and_ignores_a_cough() {
    let mut w = World::new();
    let ada = w.join("ada", "d");
    let bob = w.join("bob", "d");
    w.run_until(Duration::from_secs(5), "connected", |w| {
        w.received(bob, "ada", MediaKind::Audio) > 10
            && w.received(ada, "bob", MediaKind::Audio) > 10
    });
    let dominant = |w: &World| -> Vec<SessionId> {
        w.events
            .iter()
            .filter_map(|e| match e {
                MediaEvent::DominantSpeaker { session } => Some(*session),
                _ => None,
            })
            .collect()
    };
    let (ada_s, bob_s) = (w.peers[ada].session, w.peers[bob].session);
    w.peers[ada].audio_level = -20;
    w.run_until(Duration::from_secs(5), "ada dominant", |w| {
        dominant(w) == vec![ada_s]
    });
    // Bob coughs: 100 ms loud.
    w.peers[bob].audio_level = -5;
    w.run(Duration::from_millis(100));
    w.peers[bob].audio_level = -127;
    w.run(Duration::from_secs(2));
    assert_eq!(
        dominant(&w),
        vec![ada_s],
        "a cough moved the dominant speaker"
    );
    // Bob talks, Ada stops.
    w.peers[bob].audio_level = -20;
    w.peers[ada].audio_level = -127;
    w.run_until(Duration::from_secs(5), "bob dominant", |w| {
        dominant(w) == vec![ada_s, bob_s]
    });
}

#[test]
fn red_audio_reaches_subscribers_with_and_without_red() {
    let mut w = World::new();
    let ada = w.join_opus("ada", "r", true);
    let bob = w.join_opus("bob", "r", true);
    let cy = w.join_opus("cy", "r", false);
    w.run_until(Duration::from_secs(5), "audio to both", |w| {
        w.received(bob, "ada", MediaKind::Audio) > 20
            && w.received(cy, "ada", MediaKind::Audio) > 20
    });
    let _ = ada;
    // Bob's link carried a payload type that is neither Opus (111) nor VP8/RTX (96/97): RED.
    let other_pt_bytes = |i: usize| -> u64 {
        w.peers[i]
            .down
            .by_pt
            .iter()
            .filter(|(pt, _)| ![111u8, 96, 97, 255].contains(pt))
            .map(|(_, b)| *b)
            .sum()
    };
    let (red_bytes, cy_red) = (other_pt_bytes(bob), other_pt_bytes(cy));
    assert!(red_bytes > 0, "no RED towards bob");
    assert_eq!(cy_red, 0, "RED sent to cy, who did not negotiate it");
}

#[test]
fn muted_participants_leave_the_bandwidth_to_video() {
    // Fifteen open audio tracks reach bob, but only ada's carries sound: were each to keep
    // its share of bob's 1.2 Mbit/s link, ada's video could not have its top layer.
    let mut w = World::new();
    let ada = w.join_simulcast("ada", "big");
    let bob = w.join("bob", "big");
    for i in 0..14 {
        let p = w.join(&format!("muted{i}"), "big");
        w.peers[p].sending = false;
    }
    w.peers[bob].down.rate = Some(1_200_000);
    let took = w.run_until(Duration::from_secs(20), "bob on ada's top layer", |w| {
        layer(w, bob, "ada") == 3
    });
    eprintln!("top layer beside 14 muted participants after {took:?}");
    w.run(Duration::from_secs(3));
    assert_eq!(layer(&w, bob, "ada"), 3, "stays on the top layer");
    assert!(w.received(bob, "ada", MediaKind::Audio) > 100);
    let _ = ada;
}

/// Whether the last word on `publisher`'s video to `viewer` was that it is paused.
fn paused_now(w: &World, viewer: usize, publisher: usize) -> bool {
    let (v, p) = (w.peers[viewer].session, w.peers[publisher].session);
    w.events.iter().rev().find_map(|e| match e {
        MediaEvent::VideoPaused {
            session,
            publisher,
            paused,
            ..
        } if *session == v && *publisher == p => Some(*paused),
        _ => None,
    }) == Some(true)
}

/// Whether `viewer` was told that `publisher`'s video was paused for bandwidth.
fn was_paused(w: &World, viewer: usize, publisher: usize) -> bool {
    let (v, p) = (w.peers[viewer].session, w.peers[publisher].session);
    w.events.iter().any(|e| {
        matches!(e, MediaEvent::VideoPaused { session, publisher, paused: true, .. }
            if *session == v && *publisher == p)
    })
}

#[test]
fn a_new_viewer_gets_a_running_video_without_a_pause() {
    // A single-layer video of about 1.5 Mbit/s, a camera or a screen share, joined by a new
    // viewer on an unlimited link. The viewer's first probes are small (the video's bitrate is
    // not measured yet) and str0m's pacer used to send them at under 1 Mbit/s; their results
    // took the initial estimate of 2.5 Mbit/s down and paused the video for the viewer.
    for screen in [false, true] {
        let mut w = World::new();
        let ada = w.join_audio_only("ada", "s");
        w.peers[ada].frame_bytes = 6_000;
        w.run_until(Duration::from_secs(5), "ada connected", |w| {
            w.peers[ada].connected
        });
        let stream = if screen {
            w.add_screen(ada);
            "ada.screen"
        } else {
            w.add_video(ada);
            "ada"
        };
        w.run(Duration::from_millis(100));
        let bob = w.join_audio_only("bob", "s");
        w.peers[bob].sending = false;
        w.run_until(Duration::from_secs(5), "bob receives ada's video", |w| {
            w.received(bob, stream, MediaKind::Video) > 0
        });
        let before = w.received(bob, stream, MediaKind::Video);
        w.run(Duration::from_secs(4));
        let frames = w.received(bob, stream, MediaKind::Video) - before;
        eprintln!("screen {screen}: {frames} frames in 4 s");
        assert!(
            !was_paused(&w, bob, ada),
            "paused for bob (screen {screen})"
        );
        assert!(frames > 110, "{frames} of 120 frames (screen {screen})");
    }
}

#[test]
fn a_video_paused_for_bandwidth_comes_back_soon_after_the_link_does() {
    let mut w = World::new();
    let ada = w.join_audio_only("ada", "s");
    w.peers[ada].frame_bytes = 8_000;
    w.run_until(Duration::from_secs(5), "ada connected", |w| {
        w.peers[ada].connected
    });
    w.add_screen(ada);
    let bob = w.join_audio_only("bob", "s");
    w.peers[bob].sending = false;
    w.run(Duration::from_secs(5));
    w.peers[bob].down.rate = Some(500_000);
    w.run_until(Duration::from_secs(20), "paused", |w| {
        was_paused(w, bob, ada)
    });
    w.run(Duration::from_secs(2));
    w.peers[bob].down.rate = None;
    let n = w.events.len();
    let bob_s = w.peers[bob].session;
    // Probes without media to resend are blank padding, at most 240 bytes a packet: while
    // str0m's pacer sent one such packet per 2 ms, a probe could not show more than 0.96
    // Mbit/s and the share came back after 11.6 s.
    let took = w.run_until(Duration::from_secs(8), "resumed", |w| {
        w.events[n..].iter().any(|e| {
            matches!(e, MediaEvent::VideoPaused { session, paused: false, .. } if *session == bob_s)
        })
    });
    eprintln!(
        "PAUSED_SHARE_RESUMED {} ms after the link came back",
        took.as_millis()
    );
    let before = w.received(bob, "ada.screen", MediaKind::Video);
    w.run(Duration::from_secs(2));
    let frames = w.received(bob, "ada.screen", MediaKind::Video) - before;
    assert!(frames > 50, "{frames} frames in the 2 s after resuming");
}
