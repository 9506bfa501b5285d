//! Deterministic tests of the media plane: str0m client peers, fake time, no sockets.

mod harness;

use std::net::SocketAddr;
use std::time::Duration;

use harness::World;
use parley_proto::media::{MediaCommand, MediaEvent};
use str0m::media::MediaKind;
use str0m::net::Protocol;

const NAMES: [&str; 3] = ["ada", "bob", "cy"];

fn everyone_receives_everyone(w: &World, names: &[&str]) -> bool {
    everyone_receives(w, names, &[MediaKind::Audio, MediaKind::Video])
}

/// Each of `names` has received more than a few packets of each of `kinds` from each other.
fn everyone_receives(w: &World, names: &[&str], kinds: &[MediaKind]) -> bool {
    names.iter().all(|me| {
        let i = w.peer(me);
        names
            .iter()
            .filter(|o| *o != me)
            .all(|o| kinds.iter().all(|k| w.received(i, o, *k) > 5))
    })
}

#[test]
fn three_peers_publish_and_receive_each_other() {
    let mut w = World::new();
    for n in NAMES {
        w.join(n, "room1");
    }
    let took = w.run_until(Duration::from_secs(5), "media from both others", |w| {
        everyone_receives_everyone(w, &NAMES)
    });
    eprintln!("all media flowing after {took:?} of fake time");
    // Nobody receives their own media.
    for n in NAMES {
        let i = w.peer(n);
        assert_eq!(w.received(i, n, MediaKind::Video), 0);
    }
    assert_eq!(w.sfu.session_count(), 3);
}

/// str0m encrypts into buffers the server gives back after sending (`str0m::net::recycle`,
/// patch 15 in vendor/str0m). Buffers of other sizes, full of stale bytes, must not leak into
/// a packet: a wrong byte fails SRTP authentication and the packet is dropped.
#[test]
fn recycled_buffers_with_stale_bytes_make_valid_packets() {
    for len in [256, 300, 1200, 1500, 4000] {
        for _ in 0..50 {
            str0m::net::recycle(vec![0xAA; len]);
        }
    }
    let mut w = World::new();
    for n in NAMES {
        w.join(n, "room1");
    }
    w.run_until(Duration::from_secs(5), "media from both others", |w| {
        everyone_receives_everyone(w, &NAMES)
    });
    let before: Vec<u64> = (0..3)
        .map(|i| w.received(i, NAMES[(i + 1) % 3], MediaKind::Video))
        .collect();
    w.run(Duration::from_secs(2));
    for (i, b) in before.iter().enumerate() {
        let after = w.received(i, NAMES[(i + 1) % 3], MediaKind::Video);
        // 30 frames a second for two seconds, give or take the first and the last.
        assert!(
            after - b >= 55,
            "{} got {} frames in 2 s",
            NAMES[i],
            after - b
        );
    }
}

#[test]
fn rooms_are_isolated() {
    let mut w = World::new();
    w.join("ada", "one");
    w.join("bob", "one");
    w.join("cy", "two");
    w.run_until(Duration::from_secs(5), "ada and bob connected", |w| {
        everyone_receives_everyone(w, &["ada", "bob"])
    });
    w.run(Duration::from_secs(1));
    let cy = w.peer("cy");
    assert!(
        w.peers[cy].received.is_empty(),
        "cy got media from another room"
    );
    assert_eq!(w.received(w.peer("ada"), "cy", MediaKind::Video), 0);
}

#[test]
fn leaving_stops_its_media_and_the_rest_continue() {
    leave_and_check("cy", "ada", "bob");
}

/// The first to join leaves: its tracks come first in everyone else's list of tracks to
/// forward, so the tracks after them move up, and must still be found.
#[test]
fn the_first_to_leave_moves_the_others_tracks_and_they_still_flow() {
    leave_and_check("ada", "bob", "cy");
}

/// Everyone in `NAMES` joins; `leaver` leaves; `x` and `y` still receive each other, not it.
fn leave_and_check(leaver: &str, x: &str, y: &str) {
    let mut w = World::new();
    for n in NAMES {
        w.join(n, "room1");
    }
    w.run_until(Duration::from_secs(5), "full mesh", |w| {
        everyone_receives_everyone(w, &NAMES)
    });
    let gone = w.peer(leaver);
    w.leave(gone);
    w.run(Duration::from_millis(500));
    let (x_at, y_at) = (w.peer(x), w.peer(y));
    let from_leaver = w.received(x_at, leaver, MediaKind::Video);
    let counts = |w: &World| {
        [MediaKind::Audio, MediaKind::Video]
            .map(|k| (w.received(x_at, y, k), w.received(y_at, x, k)))
    };
    let before = counts(&w);
    w.run(Duration::from_secs(1));
    assert_eq!(
        w.received(x_at, leaver, MediaKind::Video),
        from_leaver,
        "media from a leaver"
    );
    for (b, a) in before.iter().zip(counts(&w)) {
        assert!(
            a.0 > b.0 + 10 && a.1 > b.1 + 10,
            "{x} and {y}: {b:?} then {a:?}"
        );
    }
    // The stayers were offered the removal of the leaver's m-lines, and answered.
    for i in [x_at, y_at] {
        assert!(
            w.peers[i].last_offer_id.unwrap_or(0) >= 2,
            "no renegotiation after leave"
        );
    }
    assert!(
        w.events
            .iter()
            .any(|e| matches!(e, MediaEvent::Closed { .. }))
    );
}

#[test]
fn late_joiner_gets_existing_tracks() {
    let mut w = World::new();
    w.join("ada", "r");
    w.join("bob", "r");
    w.run_until(Duration::from_secs(5), "pair", |w| {
        everyone_receives_everyone(w, &["ada", "bob"])
    });
    w.run(Duration::from_secs(2));
    w.join("cy", "r");
    let took = w.run_until(Duration::from_secs(5), "late joiner in mesh", |w| {
        everyone_receives_everyone(w, &NAMES)
    });
    eprintln!("late joiner receiving after {took:?}");
}

/// The kinds of `from`'s media sections in the latest offer the SFU made to peer `to`.
fn sections_offered(w: &World, to: usize, from: &str) -> Vec<String> {
    let to = w.peers[to].session;
    let msid = format!("a=msid:{from} ");
    w.events
        .iter()
        .filter_map(|e| match e {
            MediaEvent::Offer { session, sdp, .. } if *session == to => Some(sdp),
            _ => None,
        })
        .next_back()
        .into_iter()
        .flat_map(|sdp| sdp.split("\r\nm=").skip(1))
        .filter(|m| m.contains(&msid))
        .map(|m| m.split(' ').next().unwrap_or_default().to_string())
        .collect()
}

/// Ada, and Bob who joined with his microphone and camera muted (tracks that send nothing);
/// returns once Bob receives Ada's audio and video.
fn ada_and_muted_bob() -> (World, usize, usize) {
    let mut w = World::new();
    let ada = w.join("ada", "r");
    let bob = w.join("bob", "r");
    w.peers[bob].sending = false;
    w.run_until(Duration::from_secs(5), "bob receives ada", |w| {
        w.received(bob, "ada", MediaKind::Audio) > 0 && w.received(bob, "ada", MediaKind::Video) > 0
    });
    (w, ada, bob)
}

#[test]
fn a_track_is_offered_from_its_first_packet() {
    let (mut w, ada, bob) = ada_and_muted_bob();
    w.run(Duration::from_secs(2));
    assert!(
        sections_offered(&w, ada, "bob").is_empty(),
        "ada was offered bob's tracks before they carried a packet"
    );
    // Bob unmutes: his tracks reach ada.
    w.peers[bob].sending = true;
    let took = w.run_until(Duration::from_secs(5), "ada receives bob", |w| {
        w.received(ada, "bob", MediaKind::Audio) > 0 && w.received(ada, "bob", MediaKind::Video) > 0
    });
    eprintln!("ada receiving bob {took:?} after he started sending");
    let mut kinds = sections_offered(&w, ada, "bob");
    kinds.sort();
    assert_eq!(kinds, ["audio", "video"]);
    // A newcomer gets bob's tracks in its first offer, now that they carry media.
    let cy = w.join("cy", "r");
    w.run_until(Duration::from_secs(5), "cy receives both", |w| {
        ["ada", "bob"].iter().all(|n| {
            w.received(cy, n, MediaKind::Audio) > 0 && w.received(cy, n, MediaKind::Video) > 0
        })
    });
}

#[test]
fn an_unmuted_track_is_offered_before_its_first_packet() {
    let (mut w, ada, bob) = ada_and_muted_bob();
    assert!(sections_offered(&w, ada, "bob").is_empty());
    // Bob says he unmuted his microphone (camera still off): ada is offered his audio only,
    // while he has sent nothing yet.
    let cmd = MediaCommand::Mute {
        session: w.peers[bob].session,
        audio: false,
        video: true,
    };
    let now = w.now;
    w.sfu.handle_command(cmd, now);
    w.run(Duration::from_millis(200));
    assert_eq!(sections_offered(&w, ada, "bob"), ["audio"]);
    w.peers[bob].sending = true;
    w.run_until(Duration::from_secs(5), "ada receives bob", |w| {
        w.received(ada, "bob", MediaKind::Audio) > 0 && w.received(ada, "bob", MediaKind::Video) > 0
    });
    assert_eq!(sections_offered(&w, ada, "bob"), ["audio", "video"]);
}

#[test]
fn renegotiation_adds_a_track_for_everyone() {
    let mut w = World::new();
    for n in NAMES {
        w.join(n, "room1");
    }
    w.run_until(Duration::from_secs(5), "full mesh", |w| {
        everyone_receives_everyone(w, &NAMES)
    });
    let ada = w.peer("ada");
    w.add_video(ada);
    let bob = w.peer("bob");
    let before = w.received(bob, "ada", MediaKind::Video);
    // Two video m-lines from ada now: more frames than one 30 fps video can carry.
    w.run(Duration::from_secs(3));
    let got = w.received(bob, "ada", MediaKind::Video) - before;
    assert!(got > 120, "bob got {got} frames of ada's two videos in 3 s");
}

#[test]
fn glare_converges() {
    let mut w = World::new();
    let ada = w.join("ada", "g");
    w.run_until(Duration::from_secs(5), "ada connected", |w| {
        w.peers[ada].connected
    });
    // Bob joins: the SFU offers bob's tracks to ada. Before that offer reaches her, ada offers
    // a new track of her own. Both offers cross.
    let ada_session = w.peers[ada].session;
    w.hold_signal = Some(ada_session);
    w.join("bob", "g");
    w.run_until(
        Duration::from_secs(5),
        "the SFU offers bob's tracks to ada",
        |w| w.held.iter().any(|e| matches!(e, MediaEvent::Offer { .. })),
    );
    w.add_video(ada);
    w.hold_signal = None;
    w.run_until(Duration::from_secs(5), "both receive after glare", |w| {
        everyone_receives_everyone(w, &["ada", "bob"])
    });
    assert_eq!(
        w.peers[ada].ignored_offers,
        vec![1],
        "ada ignored the crossing offer"
    );
    assert_eq!(
        w.peers[ada].last_offer_id,
        Some(2),
        "the SFU offered again after rollback"
    );
    // Bob gets both of ada's videos.
    let bob = w.peer("bob");
    let before = w.received(bob, "ada", MediaKind::Video);
    w.run(Duration::from_secs(2));
    assert!(w.received(bob, "ada", MediaKind::Video) - before > 90);
}

#[test]
fn hostile_input_is_refused_and_others_are_untouched() {
    let mut w = World::new();
    w.join("ada", "h");
    w.join("bob", "h");
    w.run_until(Duration::from_secs(5), "pair", |w| {
        everyone_receives_everyone(w, &["ada", "bob"])
    });

    // Garbage datagrams: from strangers, and from a participant's own address.
    let sfu = w.sfu_addr;
    let stranger: SocketAddr = "10.9.9.9:4000".parse().expect("addr");
    let ada_addr = w.peers[w.peer("ada")].addr;
    let mut junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![1, 1, 0, 0],
        vec![0x80; 12],
        vec![0x16; 40],
    ];
    let mut x: u32 = 12345;
    for len in [1usize, 13, 100, 1500, 3000] {
        junk.push(
            (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect(),
        );
    }
    // A STUN binding request with a username of an unknown ufrag.
    let mut stun = vec![0x00, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
    stun.extend_from_slice(&[7; 12]);
    stun.extend_from_slice(&[0x00, 0x06, 0x00, 0x08]);
    stun.extend_from_slice(b"nope:abc");
    junk.push(stun);
    for j in &junk {
        w.sfu
            .handle_datagram(w.now, Protocol::Udp, stranger, sfu, j);
        w.sfu
            .handle_datagram(w.now, Protocol::Udp, ada_addr, sfu, j);
    }

    // Hostile SDP: not SDP, a truncated one, a stale answer id.
    let bob = w.peers[w.peer("bob")].session;
    for sdp in ["hello", "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", ""] {
        w.sfu.handle_command(
            MediaCommand::Offer {
                session: bob,
                room: "h".into(),
                stream_id: "bob".into(),
                sdp: sdp.into(),
                screen_mids: vec![],
                can_publish: true,
                can_subscribe: true,
            },
            w.now,
        );
        w.sfu.handle_command(
            MediaCommand::Answer {
                session: bob,
                id: 999,
                sdp: sdp.into(),
            },
            w.now,
        );
    }
    w.step();
    assert!(
        w.events
            .iter()
            .filter(|e| matches!(e, MediaEvent::SdpRejected { .. }))
            .count()
            >= 3
    );

    let ada = w.peer("ada");
    let before = w.received(ada, "bob", MediaKind::Video);
    let bob_i = w.peer("bob");
    let bob_before = w.received(bob_i, "ada", MediaKind::Video);
    w.run(Duration::from_secs(1));
    assert!(w.received(ada, "bob", MediaKind::Video) > before + 20);
    assert!(w.received(bob_i, "ada", MediaKind::Video) > bob_before + 20);
}

#[test]
fn speaking_follows_the_loud_peer() {
    let mut w = World::new();
    w.join("ada", "s");
    w.join("bob", "s");
    w.run_until(Duration::from_secs(5), "pair", |w| {
        everyone_receives_everyone(w, &["ada", "bob"])
    });
    let ada = w.peer("ada");
    let ada_session = w.peers[ada].session;
    w.peers[ada].audio_level = -15;
    w.run_until(Duration::from_secs(2), "ada speaking", |w| {
        w.events.iter().any(|e| matches!(e, MediaEvent::Speaking { session, speaking: true } if *session == ada_session))
    });
    w.peers[ada].audio_level = -127;
    w.run_until(Duration::from_secs(3), "ada silent", |w| {
        w.events.iter().any(|e| matches!(e, MediaEvent::Speaking { session, speaking: false } if *session == ada_session))
    });
    let bob_session = w.peers[w.peer("bob")].session;
    assert!(
        !w.events
            .iter()
            .any(|e| matches!(e, MediaEvent::Speaking { session, .. } if *session == bob_session))
    );
}

#[test]
fn ice_restart_from_a_new_address_keeps_media_flowing() {
    let mut w = World::new();
    w.join("ada", "i");
    w.join("bob", "i");
    w.run_until(Duration::from_secs(5), "pair", |w| {
        everyone_receives_everyone(w, &["ada", "bob"])
    });
    let ada = w.peer("ada");
    let bob = w.peer("bob");
    w.ice_restart(ada, 6000);
    w.run(Duration::from_millis(300));
    let (to_bob, to_ada) = (
        w.received(bob, "ada", MediaKind::Video),
        w.received(ada, "bob", MediaKind::Video),
    );
    w.run(Duration::from_secs(2));
    assert!(w.received(bob, "ada", MediaKind::Video) > to_bob + 30);
    assert!(w.received(ada, "bob", MediaKind::Video) > to_ada + 30);
}

/// Forwarded audio carries transport-wide sequence numbers only while video goes to the
/// participant (str0m patch 11): with audio alone its estimator is paused, and feedback on
/// every audio packet would be work for both sides that feeds nothing.
#[test]
fn audio_carries_transport_wide_numbers_only_to_those_receiving_video() {
    let mut w = World::new();
    for n in NAMES {
        w.join_audio_only(n, "room1");
    }
    w.run_until(Duration::from_secs(5), "audio from both others", |w| {
        everyone_receives(w, &NAMES, &[MediaKind::Audio])
    });
    w.run(Duration::from_secs(2));
    for n in NAMES {
        let p = &w.peers[w.peer(n)];
        assert!(p.received.values().sum::<u64>() > 100, "{n} receives audio");
        assert_eq!(p.audio_with_twcc, 0, "{n} receives audio alone: no numbers");
    }
    // One of them turns a camera on: the other two now receive video, and with it audio with
    // numbers; the one sending video still receives audio alone.
    let (camera, others) = (NAMES[0], &NAMES[1..]);
    let c = w.peer(camera);
    w.add_video(c);
    w.run_until(Duration::from_secs(5), "the camera's video", |w| {
        others
            .iter()
            .all(|o| w.received(w.peer(o), camera, MediaKind::Video) > 10)
    });
    w.run(Duration::from_secs(2));
    for o in others {
        let n = w.peers[w.peer(o)].audio_with_twcc;
        assert!(n > 20, "{o} receives video, so numbered audio: {n}");
    }
    assert_eq!(w.peers[c].audio_with_twcc, 0, "{camera} receives no video");
}
