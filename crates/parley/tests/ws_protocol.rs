//! The signaling protocol against the real `parley` binary, over real WebSockets.
//! Signaling only: no SDP, no media.

mod support;

use futures_util::SinkExt;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn bad_messages_get_errors_and_the_connection_stays_usable() {
    within_time_limit(async {
        let server = Server::start(&[]).await;
        let mut c = server.client().await;

        c.send_text("this is not json").await;
        c.expect_error("bad_message").await;
        c.send_text("[1, 2, 3]").await;
        c.expect_error("bad_message").await;
        c.send(json!({"seq": 1, "type": "dance"})).await;
        let e = c.expect_error("unknown_type").await;
        assert!(
            e["message"].as_str().is_some_and(|m| m.contains("dance")),
            "{e}"
        );
        c.send(json!({"seq": 1, "type": "offer"})).await;
        c.expect_error("bad_message").await;
        c.send(json!({"seq": 1, "type": "join", "room": "demo"}))
            .await;
        c.expect_error("bad_message").await;
        c.send(json!({"type": "join", "room": "demo", "name": "Ada"}))
            .await;
        c.expect_error("bad_message").await;
        c.send(json!({"seq": 1, "type": "mute", "audio": "yes", "video": false}))
            .await;
        c.expect_error("bad_message").await;
        c.send(json!({"seq": 1, "type": "join", "room": "no spaces", "name": "Ada"}))
            .await;
        c.expect_error("invalid_room").await;
        c.send(json!({"seq": 1, "type": "join", "room": "demo", "name": " "}))
            .await;
        c.expect_error("invalid_name").await;
        c.send(json!({"seq": 1, "type": "mute", "audio": true, "video": true}))
            .await;
        c.expect_error("not_joined").await;
        c.ping_pong().await;

        // Still a working connection: it can join and talk.
        let joined = c.join("demo", "Ada").await;
        assert_eq!(joined["seq"], 1);
        assert_eq!(joined["ack"], 1);
        assert_eq!(joined["participants"], json!([]));
        c.send(json!({"seq": 2, "type": "join", "room": "demo", "name": "Ada"}))
            .await;
        let e = c.expect_error("already_joined").await;
        assert_eq!(e["seq"], 2, "errors to a participant are numbered: {e}");
        assert_eq!(e["in_reply_to"], 2);
        c.send_text("{").await;
        c.expect_error("bad_message").await;
        c.ping_pong().await;
    })
    .await;
}

#[tokio::test]
async fn binary_frames_are_refused_with_bad_message() {
    within_time_limit(async {
        let server = Server::start(&[]).await;
        let mut c = server.client().await;
        let ping = json!({"type": "ping"}).to_string().into_bytes();
        c.ws.send(Message::Binary(ping.into()))
            .await
            .expect("send a binary frame");
        let e = c.expect_error("bad_message").await;
        assert!(
            e["message"].as_str().is_some_and(|m| m.contains("binary")),
            "the error says why: {e}"
        );
        c.ping_pong().await;
    })
    .await;
}

#[tokio::test]
async fn an_oversized_message_closes_only_that_connection() {
    within_time_limit(async {
        let server = Server::start(&["--max-message-bytes", "4096"]).await;
        let mut bob = server.client().await;
        bob.join("demo", "Bob").await;
        let mut ada = server.client().await;
        ada.join("demo", "Ada").await;
        assert_eq!(bob.expect("participant_joined").await["participant"]["name"], "Ada");

        // Just under the limit is fine (unknown fields are ignored).
        ada.send(json!({"type": "ping", "pad": "x".repeat(3000)}))
            .await;
        ada.expect("pong").await;

        let big = json!({"seq": 2, "type": "mute", "audio": true, "video": true, "pad": "x".repeat(10_000)});
        ada.send(big).await;
        let frames = ada.until_closed().await;
        assert_eq!(types(&frames), vec!["error"], "{frames:?}");
        assert_eq!(frames[0]["code"], "too_large", "{frames:?}");

        // Bob's connection and room are unaffected, and Ada's mute was never applied.
        bob.ping_pong().await;
        let mut cy = server.client().await;
        let joined = cy.join("demo", "Cy").await;
        let present = joined["participants"].as_array().expect("a list").clone();
        assert_eq!(present.len(), 2, "{joined}");
        assert!(present.iter().all(|p| p["audio_muted"] == false), "{joined}");
        assert_eq!(bob.expect("participant_joined").await["participant"]["name"], "Cy");
        bob.ping_pong().await;
    })
    .await;
}

#[tokio::test]
async fn a_message_far_over_the_limit_is_refused_with_too_large() {
    within_time_limit(async {
        let server = Server::start(&["--max-message-bytes", "4096"]).await;
        let mut ada = server.client().await;
        ada.join("demo", "Ada").await;
        // A large SDP pasted by a buggy client: far over the limit, as one frame.
        ada.send(json!({"seq": 2, "type": "offer", "sdp": "x".repeat(200_000)}))
            .await;
        let frames = ada.until_closed().await;
        assert_eq!(
            frames
                .iter()
                .map(|f| f["code"].as_str())
                .collect::<Vec<_>>(),
            vec![Some("too_large")],
            "the client learns why it was disconnected: {frames:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_flood_of_messages_is_cut_off_without_disturbing_others() {
    within_time_limit(async {
        let server = Server::start(&["--max-messages-per-sec", "20"]).await;
        let mut bob = server.client().await;
        bob.join("demo", "Bob").await;
        let mut flooder = server.client().await;
        flooder.join("demo", "Flo").await;
        bob.expect("participant_joined").await;

        for _ in 0..200 {
            let ping = Message::Text(json!({"type": "ping"}).to_string().into());
            if flooder.ws.feed(ping).await.is_err() {
                break;
            }
        }
        let _ = flooder.ws.flush().await;
        let frames = flooder.until_closed().await;
        let pongs = frames.iter().filter(|f| f["type"] == "pong").count();
        assert!(pongs < 200, "the flood was not cut off: {pongs} pongs");
        assert!(
            frames
                .iter()
                .any(|f| f["type"] == "error" && f["code"] == "rate_limited"),
            "the client is told why: {:?}",
            types(&frames)
        );

        // Bob still has a working connection, with nothing from the flood.
        bob.ping_pong().await;
        bob.send(json!({"seq": 2, "type": "mute", "audio": true, "video": false}))
            .await;
        let mute = bob.expect("mute").await;
        assert_eq!(mute["ack"], 2);
        bob.ping_pong().await;
    })
    .await;
}

#[tokio::test]
async fn a_flood_of_binary_frames_is_cut_off_too() {
    within_time_limit(async {
        let server = Server::start(&["--max-messages-per-sec", "20"]).await;
        let mut flooder = server.client().await;
        flooder.join("demo", "Flo").await;
        for _ in 0..200 {
            if flooder
                .ws
                .feed(Message::Binary(vec![0u8; 16].into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = flooder.ws.flush().await;
        let frames = flooder.until_closed().await;
        let errors = frames.iter().filter(|f| f["code"] == "bad_message").count();
        assert!(
            frames.iter().any(|f| f["code"] == "rate_limited"),
            "binary frames count towards --max-messages-per-sec: {errors} bad_message errors, {:?}",
            types(&frames)
        );
    })
    .await;
}

#[tokio::test]
async fn a_full_room_refuses_the_next_participant() {
    within_time_limit(async {
        let server = Server::start(&["--max-participants", "2"]).await;
        let mut ada = server.client().await;
        ada.join("demo", "Ada").await;
        let mut bob = server.client().await;
        bob.join("demo", "Bob").await;
        ada.expect("participant_joined").await;

        let mut cy = server.client().await;
        cy.send(json!({"seq": 1, "type": "join", "room": "demo", "name": "Cy"}))
            .await;
        cy.expect_error("room_full").await;
        ada.ping_pong().await;
        bob.ping_pong().await;

        // Other rooms still have space, on the same connection.
        cy.send(json!({"seq": 2, "type": "join", "room": "other", "name": "Cy"}))
            .await;
        cy.expect("joined").await;
    })
    .await;
}

#[tokio::test]
async fn resume_after_a_dropped_connection_delivers_missed_messages_once() {
    within_time_limit(async {
        let server = Server::start(&[]).await;
        let mut ada = server.client().await;
        let joined = ada.join("demo", "Ada").await;
        let session = joined["session"]
            .as_str()
            .expect("a session token")
            .to_string();
        let ada_id = joined["participant"].clone();
        assert_eq!(joined["seq"], 1);
        let last_processed = 1;

        let mut bob = server.client().await;
        let bob_joined = bob.join("demo", "Bob").await;
        let bob_id = bob_joined["participant"].clone();
        // Ada's participant_joined (seq 2) arrives, but her connection dies before she handles it.
        let pj = ada.expect("participant_joined").await;
        assert_eq!(pj["seq"], 2);
        drop(ada);

        bob.send(json!({"seq": 2, "type": "mute", "audio": true, "video": false}))
            .await;
        bob.expect("mute").await;

        let mut ada = server.client().await;
        ada.send(json!({"type": "resume", "session": session, "ack": last_processed}))
            .await;
        let resumed = ada.expect("resumed").await;
        assert_eq!(
            resumed["ack"], 1,
            "Parley has processed Ada's join: {resumed}"
        );
        let pj = ada.expect("participant_joined").await;
        assert_eq!(pj["seq"], 2);
        assert_eq!(pj["participant"]["id"], bob_id);
        let mute = ada.expect("mute").await;
        assert_eq!(mute["seq"], 3);
        assert_eq!(mute["id"], bob_id);
        assert_eq!(mute["audio"], true);
        ada.ping_pong().await;

        // Ada handles 2 and 3, and the connection drops again before her acknowledgement.
        drop(ada);
        let mut cy = server.client().await;
        cy.join("demo", "Cy").await;
        let pj_cy = bob.expect("participant_joined").await;
        assert_eq!(pj_cy["participant"]["name"], "Cy");

        let mut ada = server.client().await;
        ada.send(json!({"type": "resume", "session": session, "ack": 3}))
            .await;
        ada.expect("resumed").await;
        let pj = ada.expect("participant_joined").await;
        assert_eq!(pj["seq"], 4, "only what Ada has not processed: {pj}");
        assert_eq!(pj["participant"]["name"], "Cy");
        ada.ping_pong().await;

        // Ada is still in the room for the others, and the session works as before.
        ada.send(json!({"seq": 2, "ack": 4, "type": "mute", "audio": false, "video": true}))
            .await;
        let m = ada.expect("mute").await;
        assert_eq!((m["seq"].clone(), m["ack"].clone()), (json!(5), json!(2)));
        let m = cy.expect("mute").await;
        assert_eq!(m["id"], ada_id);
        bob.expect("mute").await;
    })
    .await;
}

#[tokio::test]
async fn resume_of_an_unknown_session_fails() {
    within_time_limit(async {
        let server = Server::start(&[]).await;
        let mut c = server.client().await;
        c.send(json!({"type": "resume", "session": "0123456789abcdef", "ack": 3}))
            .await;
        let f = c.expect("resume_failed").await;
        assert!(f["message"].as_str().is_some_and(|m| !m.is_empty()), "{f}");
        c.join("demo", "Ada").await;
    })
    .await;
}

#[tokio::test]
async fn a_direct_call_rings_both_devices_and_relays_signals_over_real_websockets() {
    within_time_limit(async {
        let server = Server::start(&[]).await;
        let mut ann = server.client().await;
        let mut bob1 = server.client().await;
        let mut bob2 = server.client().await;
        for (c, user) in [(&mut ann, "ann"), (&mut bob1, "bob"), (&mut bob2, "bob")] {
            c.send(json!({"seq": 1, "type": "register", "user": user})).await;
            let v = c.expect("registered").await;
            assert!(v["p2p_timeout_ms"].as_u64().is_some(), "{v}");
        }
        ann.send(json!({"seq": 2, "type": "call", "call": "c-1", "to": "bob"}))
            .await;
        ann.send(json!({"seq": 3, "type": "call_signal", "call": "c-1", "data": {"type": "offer", "sdp": "v=0"}}))
            .await;
        assert_eq!(ann.expect("call_ringing").await["to"], "bob");
        for b in [&mut bob1, &mut bob2] {
            assert_eq!(b.expect("call_incoming").await["from"], "ann");
            assert_eq!(b.expect("call_signal").await["data"]["type"], "offer");
        }
        bob2.send(json!({"seq": 2, "type": "call_signal", "call": "c-1", "data": {"type": "answer", "sdp": "v=0"}}))
            .await;
        bob2.send(json!({"seq": 3, "type": "call_answer", "call": "c-1"}))
            .await;
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let v = ann.recv().await;
            if v["type"] != "ack" {
                seen.push(v);
            }
        }
        assert_eq!(seen[0]["type"], "call_answered", "{seen:?}");
        assert_eq!(seen[1]["data"]["type"], "answer", "the held answer follows at once: {seen:?}");
        let v = bob1.expect("call_ended").await;
        assert_eq!(v["reason"], "answered_elsewhere");
    })
    .await;
}
