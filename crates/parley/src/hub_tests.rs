//! The hub driven through its public inputs, with a fake clock and predictable session tokens.

use super::*;

/// A hub plus everything it produced, sorted by connection.
struct TestHub {
    hub: Hub,
    start: Instant,
    now: Instant,
    next_conn: u64,
    frames: HashMap<ConnId, Vec<ServerFrame>>,
    closed: Vec<(ConnId, &'static str)>,
    media: Vec<MediaCommand>,
    webhooks: Vec<crate::webhook::WebhookEvent>,
}

impl TestHub {
    fn new(max_participants: Option<usize>) -> Self {
        let mut n = 0u64;
        let tokens = Box::new(move || {
            n += 1;
            format!("token-{n}")
        });
        let hub = Hub::new(
            HubConfig {
                max_participants,
                resume_window: Duration::from_secs(30),
                last_n: None,
                auth: crate::auth::Auth::default(),
                ring_timeout: Duration::from_secs(45),
                p2p_timeout: Duration::from_secs(4),
                ice: Default::default(),
            },
            tokens,
        );
        let now = Instant::now();
        TestHub {
            hub,
            start: now,
            now,
            next_conn: 1,
            frames: HashMap::new(),
            closed: Vec::new(),
            media: Vec::new(),
            webhooks: Vec::new(),
        }
    }

    fn open(&mut self) -> ConnId {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.hub.connection_opened(conn);
        self.collect();
        conn
    }

    fn close(&mut self, conn: ConnId) {
        self.hub.connection_closed(conn, self.now);
        self.collect();
    }

    fn send(&mut self, conn: ConnId, json: &str) {
        let frame = ClientFrame::parse(json).expect("the test sends valid frames");
        self.hub.handle_frame(conn, frame, self.now);
        self.collect();
    }

    fn media_event(&mut self, ev: MediaEvent) {
        self.hub.handle_media_event(ev);
        self.collect();
    }

    /// Moves the clock to `secs` seconds after the start and ticks.
    fn tick_at(&mut self, secs: f64) {
        self.now = self.start + Duration::from_secs_f64(secs);
        self.hub.tick(self.now);
        self.collect();
    }

    fn collect(&mut self) {
        for out in self.hub.drain() {
            match out {
                Output::Send(conn, frame) => self.frames.entry(conn).or_default().push(frame),
                Output::Close(conn, why) => self.closed.push((conn, why)),
                Output::Media(cmd) => self.media.push(cmd),
                Output::Webhook(ev) => self.webhooks.push(ev),
            }
        }
    }

    /// What `conn` received since the last call.
    fn take(&mut self, conn: ConnId) -> Vec<ServerFrame> {
        self.frames.remove(&conn).unwrap_or_default()
    }

    /// The message types `conn` received since the last call.
    fn take_msgs(&mut self, conn: ConnId) -> Vec<ServerMsg> {
        self.take(conn).into_iter().map(|f| f.msg).collect()
    }

    fn take_media(&mut self) -> Vec<MediaCommand> {
        std::mem::take(&mut self.media)
    }

    fn is_closed(&self, conn: ConnId) -> bool {
        self.closed.iter().any(|(c, _)| *c == conn)
    }

    /// Opens a connection and joins `room` as `name` with client seq 1; returns the connection,
    /// the participant id and the session token.
    fn join(&mut self, room: &str, name: &str) -> (ConnId, String, String) {
        let conn = self.open();
        self.send(
            conn,
            &format!(r#"{{"seq":1,"type":"join","room":"{room}","name":"{name}"}}"#),
        );
        let frames = self.take(conn);
        assert_eq!(frames.len(), 1, "one reply to a join: {frames:?}");
        match &frames[0].msg {
            ServerMsg::Joined {
                participant,
                session,
                ..
            } => (conn, participant.clone(), session.clone()),
            other => panic!("expected joined, got {other:?}"),
        }
    }
}

fn info(id: &str, name: &str) -> ParticipantInfo {
    ParticipantInfo {
        id: id.into(),
        name: name.into(),
        audio_muted: false,
        video_muted: false,
        speaking: false,
    }
}

fn error_code(frame: &ServerFrame) -> Option<ErrorCode> {
    match &frame.msg {
        ServerMsg::Error { code, .. } => Some(*code),
        _ => None,
    }
}

fn seqs(frames: &[ServerFrame]) -> Vec<Option<u64>> {
    frames.iter().map(|f| f.seq).collect()
}

// ---- joining and leaving ----

#[test]
fn join_replies_joined_with_seq_1_and_everyone_already_present() {
    let mut t = TestHub::new(None);
    let a = t.open();
    t.send(a, r#"{"seq":1,"type":"join","room":"demo","name":"Ada"}"#);
    let frames = t.take(a);
    assert_eq!(
        frames,
        vec![ServerFrame {
            seq: Some(1),
            ack: Some(1),
            msg: ServerMsg::Joined {
                participant: "p1".into(),
                session: "token-1".into(),
                room: "demo".into(),
                participants: vec![],
                last_n: None,
            },
        }]
    );

    let b = t.open();
    t.send(
        b,
        r#"{"seq":1,"type":"join","room":"demo","name":"  Bob  "}"#,
    );
    assert_eq!(
        t.take(b),
        vec![ServerFrame {
            seq: Some(1),
            ack: Some(1),
            msg: ServerMsg::Joined {
                participant: "p2".into(),
                session: "token-2".into(),
                room: "demo".into(),
                participants: vec![info("p1", "Ada")],
                last_n: None,
            },
        }]
    );
    let to_a = t.take(a);
    assert_eq!(seqs(&to_a), vec![Some(2)]);
    assert_eq!(
        to_a[0].msg,
        ServerMsg::ParticipantJoined {
            participant: info("p2", "Bob")
        }
    );
    assert_eq!(t.hub.participant_count(), 2);
    assert_eq!(t.hub.room_count(), 1);
}

#[test]
fn joined_lists_current_mute_state_of_those_present() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    t.send(a, r#"{"seq":2,"type":"mute","audio":true,"video":false}"#);
    let (_, _, _) = t.join("other", "Eve");
    let b = t.open();
    t.send(b, r#"{"seq":1,"type":"join","room":"demo","name":"Bob"}"#);
    let frames = t.take(b);
    let ServerMsg::Joined { participants, .. } = &frames[0].msg else {
        panic!("expected joined, got {frames:?}");
    };
    assert_eq!(
        participants,
        &vec![ParticipantInfo {
            id: "p1".into(),
            name: "Ada".into(),
            audio_muted: true,
            video_muted: false,
            speaking: false,
        }],
        "only the room's own participants, with their mute state"
    );
}

#[test]
fn rooms_are_separate() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("one", "Ada");
    let (b, _, _) = t.join("two", "Bob");
    assert!(t.take(a).is_empty(), "a join elsewhere is not announced");
    t.send(b, r#"{"seq":2,"type":"mute","audio":true,"video":true}"#);
    assert!(t.take(a).is_empty(), "a mute elsewhere is not announced");
    assert_eq!(t.hub.room_count(), 2);
}

#[test]
fn leave_tells_the_others_and_closes_the_media_session() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    let (b, b_id, b_token) = t.join("demo", "Bob");
    t.take(a);
    t.take_media();

    t.send(b, r#"{"seq":2,"type":"leave"}"#);
    let to_a = t.take(a);
    assert_eq!(
        to_a.iter().map(|f| &f.msg).collect::<Vec<_>>(),
        vec![&ServerMsg::ParticipantLeft { id: b_id.clone() }]
    );
    assert_eq!(to_a[0].seq, Some(3));
    assert_eq!(
        t.take_media(),
        vec![MediaCommand::Close {
            session: SessionId(2)
        }]
    );
    assert!(t.is_closed(b), "the leaver's connection is closed");
    assert_eq!(t.hub.participant_count(), 1);

    // The session is over: it cannot be resumed.
    let b2 = t.open();
    t.send(
        b2,
        &format!(r#"{{"type":"resume","session":"{b_token}","ack":1}}"#),
    );
    assert!(matches!(
        t.take_msgs(b2).as_slice(),
        [ServerMsg::ResumeFailed { .. }]
    ));
}

#[test]
fn last_leaver_removes_the_room() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    t.send(a, r#"{"seq":2,"type":"leave"}"#);
    assert_eq!(t.hub.room_count(), 0);
    assert_eq!(t.hub.participant_count(), 0);
}

#[test]
fn invalid_room_name_is_refused() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    for room in ["", "has space", "ünï", &"x".repeat(65)] {
        let c = t.open();
        t.send(
            c,
            &format!(r#"{{"seq":1,"type":"join","room":"{room}","name":"Bob"}}"#),
        );
        let frames = t.take(c);
        assert_eq!(frames.len(), 1, "{room:?}: {frames:?}");
        assert_eq!(
            error_code(&frames[0]),
            Some(ErrorCode::InvalidRoom),
            "{room:?}"
        );
        assert!(
            matches!(
                frames[0].msg,
                ServerMsg::Error {
                    in_reply_to: Some(1),
                    ..
                }
            ),
            "the error names the offending message: {frames:?}"
        );
    }
    assert!(t.take(a).is_empty(), "nobody joined demo");
    assert_eq!(t.hub.participant_count(), 1);
}

#[test]
fn invalid_display_name_is_refused() {
    let mut t = TestHub::new(None);
    let long = "n".repeat(65);
    for name in ["", "   ", "tab\\there", long.as_str()] {
        let c = t.open();
        t.send(
            c,
            &format!(r#"{{"seq":1,"type":"join","room":"demo","name":"{name}"}}"#),
        );
        let frames = t.take(c);
        assert_eq!(frames.len(), 1, "{name:?}: {frames:?}");
        assert_eq!(
            error_code(&frames[0]),
            Some(ErrorCode::InvalidName),
            "{name:?}"
        );
    }
    assert_eq!(t.hub.participant_count(), 0);
    // The connection can still join after fixing its name.
    let c = t.open();
    t.send(c, r#"{"seq":1,"type":"join","room":"demo","name":""}"#);
    t.send(c, r#"{"seq":2,"type":"join","room":"demo","name":"Ada"}"#);
    assert!(matches!(
        t.take_msgs(c).as_slice(),
        [ServerMsg::Error { .. }, ServerMsg::Joined { .. }]
    ));
}

#[test]
fn a_full_room_refuses_the_next_participant_without_telling_the_others() {
    let mut t = TestHub::new(Some(2));
    let (a, _, _) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take(a);
    t.take_media();

    let c = t.open();
    t.send(c, r#"{"seq":1,"type":"join","room":"demo","name":"Cy"}"#);
    let frames = t.take(c);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::RoomFull));
    assert_eq!(frames[0].seq, None, "not joined: errors are not numbered");
    assert!(t.take(a).is_empty());
    assert!(t.take(b).is_empty());
    assert!(t.take_media().is_empty());
    assert_eq!(t.hub.participant_count(), 2);

    // Another room is not affected by the limit.
    let (_, _, _) = t.join("elsewhere", "Cy");

    // Once someone leaves there is room again.
    t.send(b, r#"{"seq":2,"type":"leave"}"#);
    let d = t.open();
    t.send(d, r#"{"seq":1,"type":"join","room":"demo","name":"Di"}"#);
    assert!(matches!(
        t.take_msgs(d).as_slice(),
        [ServerMsg::Joined { .. }]
    ));
}

#[test]
fn offer_before_join_is_refused_with_not_joined() {
    let mut t = TestHub::new(None);
    let c = t.open();
    t.send(c, r#"{"seq":1,"type":"offer","sdp":"v=0"}"#);
    t.send(c, r#"{"seq":2,"type":"mute","audio":true,"video":true}"#);
    t.send(c, r#"{"seq":3,"type":"answer","id":1,"sdp":"v=0"}"#);
    t.send(c, r#"{"seq":4,"type":"leave"}"#);
    let frames = t.take(c);
    assert_eq!(
        frames.iter().map(error_code).collect::<Vec<_>>(),
        vec![Some(ErrorCode::NotJoined); 4]
    );
    assert!(t.take_media().is_empty(), "nothing reaches the media plane");
    assert!(!t.is_closed(c));
}

#[test]
fn a_second_join_on_the_same_connection_is_refused() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    t.send(a, r#"{"seq":2,"type":"join","room":"other","name":"Ada"}"#);
    let frames = t.take(a);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::AlreadyJoined));
    assert_eq!(
        frames[0].seq,
        Some(2),
        "errors to a participant are numbered"
    );
    assert!(matches!(
        frames[0].msg,
        ServerMsg::Error {
            in_reply_to: Some(2),
            ..
        }
    ));
    assert_eq!(t.hub.participant_count(), 1);
    assert_eq!(t.hub.room_count(), 1);
}

// ---- negotiation and media events ----

#[test]
fn offer_and_answer_go_to_the_media_plane() {
    let mut t = TestHub::new(None);
    let (_, _, _) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take_media();
    t.send(b, r#"{"seq":2,"type":"offer","sdp":"v=0 offer"}"#);
    t.send(b, r#"{"seq":3,"type":"answer","id":7,"sdp":"v=0 answer"}"#);
    assert_eq!(
        t.take_media(),
        vec![
            MediaCommand::Offer {
                session: SessionId(2),
                room: "demo".into(),
                stream_id: "p2".into(),
                sdp: "v=0 offer".into(),
                screen_mids: vec![],
                can_publish: true,
                can_subscribe: true,
            },
            // Bob never said he was muted: his microphone and camera go to the others now.
            MediaCommand::Mute {
                session: SessionId(2),
                audio: false,
                video: false,
            },
            MediaCommand::Answer {
                session: SessionId(2),
                id: 7,
                sdp: "v=0 answer".into(),
            },
        ]
    );
}

#[test]
fn media_answers_and_offers_reach_only_their_participant() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take(a);
    t.send(b, r#"{"seq":2,"type":"offer","sdp":"v=0 offer"}"#);
    t.take(b); // at most an acknowledgement
    t.media_event(MediaEvent::Answer {
        session: SessionId(2),
        sdp: "v=0 answer".into(),
    });
    t.media_event(MediaEvent::Offer {
        session: SessionId(1),
        id: 4,
        sdp: "v=0 from sfu".into(),
    });
    assert_eq!(
        t.take(b),
        vec![ServerFrame {
            seq: Some(2),
            ack: Some(2),
            msg: ServerMsg::Answer {
                sdp: "v=0 answer".into()
            },
        }],
        "the answer also acknowledges the offer"
    );
    assert_eq!(
        t.take(a),
        vec![ServerFrame {
            seq: Some(3),
            ack: Some(1),
            msg: ServerMsg::Offer {
                id: 4,
                sdp: "v=0 from sfu".into()
            },
        }]
    );
}

#[test]
fn speaking_is_broadcast_to_the_room() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    let (e, _, _) = t.join("other", "Eve");
    t.take(a);
    t.media_event(MediaEvent::Speaking {
        session: SessionId(2),
        speaking: true,
    });
    let expected = ServerMsg::Speaking {
        id: "p2".into(),
        speaking: true,
    };
    assert_eq!(t.take_msgs(a), vec![expected.clone()]);
    assert_eq!(t.take_msgs(b), vec![expected]);
    assert!(t.take(e).is_empty());
}

#[test]
fn rejected_sdp_is_an_error_to_its_participant() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take(a);
    t.send(b, r#"{"seq":2,"type":"offer","sdp":"garbage"}"#);
    t.take(b); // at most an acknowledgement
    t.media_event(MediaEvent::SdpRejected {
        session: SessionId(2),
        reason: "no m-lines".into(),
    });
    let frames = t.take(b);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::SdpRejected));
    assert_eq!(frames[0].seq, Some(2));
    assert!(
        matches!(&frames[0].msg, ServerMsg::Error { message, .. } if message.contains("no m-lines"))
    );
    assert!(t.take(a).is_empty());
}

#[test]
fn media_events_for_unknown_sessions_are_ignored() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    t.media_event(MediaEvent::Answer {
        session: SessionId(99),
        sdp: "v=0".into(),
    });
    t.media_event(MediaEvent::Speaking {
        session: SessionId(99),
        speaking: true,
    });
    t.media_event(MediaEvent::Connected {
        session: SessionId(1),
    });
    assert!(t.take(a).is_empty());
}

// ---- reliability ----

#[test]
fn reliable_frames_are_numbered_consecutively_and_pongs_are_not() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.send(a, r#"{"type":"ping"}"#);
    t.send(b, r#"{"seq":2,"type":"mute","audio":true,"video":false}"#);
    t.media_event(MediaEvent::Speaking {
        session: SessionId(2),
        speaking: true,
    });
    t.send(a, r#"{"seq":2,"type":"join","room":"x","name":"y"}"#);
    t.send(b, r#"{"seq":3,"type":"leave"}"#);
    let frames = t.take(a);
    let reliable: Vec<u64> = frames
        .iter()
        .filter(|f| f.msg.is_reliable())
        .map(|f| f.seq.expect("a reliable frame has a seq"))
        .collect();
    assert_eq!(reliable, vec![2, 3, 4, 5, 6], "{frames:?}");
    for f in frames.iter().filter(|f| !f.msg.is_reliable()) {
        assert_eq!(f.seq, None, "{f:?}");
    }
    assert!(frames.iter().any(|f| f.msg == ServerMsg::Pong));
}

#[test]
fn an_answer_to_parleys_offer_is_acknowledged() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    t.send(a, r#"{"seq":2,"type":"answer","id":1,"sdp":"v=0"}"#);
    let frames = t.take(a);
    assert!(
        frames.iter().any(|f| f.ack == Some(2)),
        "Parley acknowledges every client message it processes (protocol.md): {frames:?}"
    );
}

#[test]
fn acknowledged_frames_are_not_resent() {
    let mut t = TestHub::new(None);
    let (a, _, a_token) = t.join("demo", "Ada");
    let (_, _, _) = t.join("demo", "Bob");
    let (_, _, _) = t.join("demo", "Cy");
    let (_, _, _) = t.join("demo", "Di");
    assert_eq!(seqs(&t.take(a)), vec![Some(2), Some(3), Some(4)]);
    t.send(a, r#"{"type":"ack","ack":3}"#);
    assert!(t.take(a).is_empty(), "an ack gets no reply");
    t.close(a);

    // The resume itself acknowledges nothing new: only what the ack message did not cover comes back.
    let a2 = t.open();
    t.send(
        a2,
        &format!(r#"{{"type":"resume","session":"{a_token}","ack":0}}"#),
    );
    let frames = t.take(a2);
    assert_eq!(frames[0].msg, ServerMsg::Resumed);
    assert_eq!(seqs(&frames[1..]), vec![Some(4)], "{frames:?}");
    assert_eq!(
        frames[1].msg,
        ServerMsg::ParticipantJoined {
            participant: info("p4", "Di")
        }
    );
}

#[test]
fn an_ack_carried_on_another_message_also_counts() {
    let mut t = TestHub::new(None);
    let (a, _, a_token) = t.join("demo", "Ada");
    let (_, _, _) = t.join("demo", "Bob");
    let (_, _, _) = t.join("demo", "Cy");
    t.take(a);
    t.send(
        a,
        r#"{"seq":2,"ack":2,"type":"mute","audio":true,"video":true}"#,
    );
    t.take(a);
    t.close(a);
    let a2 = t.open();
    t.send(a2, &format!(r#"{{"type":"resume","session":"{a_token}"}}"#));
    let frames = t.take(a2);
    assert_eq!(seqs(&frames), vec![None, Some(3), Some(4)], "{frames:?}");
}

#[test]
fn a_mute_reaches_the_media_plane() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    t.take_media();
    t.send(a, r#"{"seq":2,"type":"mute","audio":false,"video":true}"#);
    assert_eq!(
        t.take_media(),
        vec![MediaCommand::Mute {
            session: SessionId(1),
            audio: false,
            video: true,
        }]
    );
}

#[test]
fn an_offer_carries_the_mute_state_told_before_it() {
    // A participant who joins muted says so before its first offer (as the SDK does): its
    // microphone and camera wait until it unmutes.
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    t.send(a, r#"{"seq":2,"type":"mute","audio":true,"video":false}"#);
    t.take_media();
    t.send(a, r#"{"seq":3,"type":"offer","sdp":"v=0"}"#);
    let cmds = t.take_media();
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    assert!(matches!(cmds[0], MediaCommand::Offer { .. }), "{cmds:?}");
    assert_eq!(
        cmds[1],
        MediaCommand::Mute {
            session: SessionId(1),
            audio: true,
            video: false,
        }
    );
}

#[test]
fn a_join_that_says_muted_keeps_the_microphone_back_from_an_offer_right_behind_it() {
    // The SDK sends its first offer right behind `join`, before the reply: a mute state told
    // only after the reply would come too late, and the room would be offered a silent
    // microphone. Told in the join, it holds from the first offer, and the others see it.
    let mut t = TestHub::new(None);
    let (b, _, _) = t.join("demo", "Bob");
    let a = t.open();
    t.send(
        a,
        r#"{"seq":1,"type":"join","room":"demo","name":"Ada","audio_muted":true}"#,
    );
    t.send(a, r#"{"seq":2,"type":"offer","sdp":"v=0"}"#);
    let cmds = t.take_media();
    assert!(
        cmds.iter().any(|c| matches!(c, MediaCommand::Offer { .. })),
        "{cmds:?}"
    );
    assert_eq!(
        cmds.last(),
        Some(&MediaCommand::Mute {
            session: SessionId(2),
            audio: true,
            video: false,
        }),
        "{cmds:?}"
    );
    assert_eq!(
        t.take_msgs(b),
        vec![ServerMsg::ParticipantJoined {
            participant: ParticipantInfo {
                audio_muted: true,
                ..info("p2", "Ada")
            }
        }]
    );
}

#[test]
fn a_resent_client_message_is_processed_once_but_acknowledged() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take(a);
    t.send(a, r#"{"seq":2,"type":"mute","audio":true,"video":false}"#);
    assert_eq!(
        t.take_msgs(b),
        vec![ServerMsg::Mute {
            id: "p1".into(),
            audio: true,
            video: false
        }]
    );
    t.take(a);

    t.send(a, r#"{"seq":2,"type":"mute","audio":true,"video":false}"#);
    assert!(
        t.take(b).is_empty(),
        "the resent mute is not announced again"
    );
    let frames = t.take(a);
    assert_eq!(
        frames,
        vec![ServerFrame {
            seq: None,
            ack: Some(2),
            msg: ServerMsg::Ack
        }]
    );

    // An older duplicate is dropped too, even if its content differs.
    t.send(a, r#"{"seq":1,"type":"mute","audio":false,"video":false}"#);
    assert!(t.take(b).is_empty());
}

#[test]
fn a_mute_resent_after_resume_is_broadcast_once() {
    let mut t = TestHub::new(None);
    let (a, _, a_token) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take(a);
    // Processed by Parley, but the connection drops before the client sees the acknowledgement.
    t.send(a, r#"{"seq":2,"type":"mute","audio":true,"video":true}"#);
    t.close(a);
    assert_eq!(t.take_msgs(b).len(), 1);

    let a2 = t.open();
    t.send(
        a2,
        &format!(r#"{{"type":"resume","session":"{a_token}","ack":2}}"#),
    );
    let frames = t.take(a2);
    assert_eq!(frames[0].msg, ServerMsg::Resumed);
    assert_eq!(
        frames[0].ack,
        Some(2),
        "Parley tells the client it has seq 2 already"
    );
    // A client that resends anyway (e.g. it ignored the ack) does not cause a second broadcast.
    t.send(a2, r#"{"seq":2,"type":"mute","audio":true,"video":true}"#);
    assert!(t.take(b).is_empty());
    // The next new message is processed normally.
    t.send(a2, r#"{"seq":3,"type":"mute","audio":false,"video":true}"#);
    assert_eq!(
        t.take_msgs(b),
        vec![ServerMsg::Mute {
            id: "p1".into(),
            audio: false,
            video: true
        }]
    );
}

#[test]
fn a_client_message_lost_with_the_connection_is_processed_when_resent() {
    let mut t = TestHub::new(None);
    let (a, _, a_token) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take(a);
    t.close(a);
    let a2 = t.open();
    t.send(
        a2,
        &format!(r#"{{"type":"resume","session":"{a_token}","ack":2}}"#),
    );
    let frames = t.take(a2);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].ack, Some(1), "Parley has only processed the join");
    t.send(a2, r#"{"seq":2,"type":"mute","audio":true,"video":false}"#);
    assert_eq!(t.take_msgs(b).len(), 1);
}

#[test]
fn resume_delivers_exactly_the_missed_frames_in_order() {
    let mut t = TestHub::new(None);
    let (a, a_id, a_token) = t.join("demo", "Ada");
    let (b, b_id, _) = t.join("demo", "Bob");
    // A receives participant_joined (seq 2) and a mute (seq 3), and processes both but
    // its acknowledgement of 3 is lost with the connection; it had acknowledged 2.
    t.send(b, r#"{"seq":2,"type":"mute","audio":true,"video":false}"#);
    assert_eq!(seqs(&t.take(a)), vec![Some(2), Some(3)]);
    t.send(a, r#"{"type":"ack","ack":2}"#);
    t.close(a);

    // More happens while A is away.
    let (_, c_id, _) = t.join("demo", "Cy");
    t.media_event(MediaEvent::Speaking {
        session: SessionId(2),
        speaking: true,
    });
    t.media_event(MediaEvent::Offer {
        session: SessionId(1),
        id: 1,
        sdp: "v=0 sfu".into(),
    });
    t.send(b, r#"{"seq":3,"type":"leave"}"#);
    assert!(
        t.take(a).is_empty(),
        "nothing is sent to a closed connection"
    );
    assert_eq!(
        t.hub.participant_count(),
        2,
        "A is kept for its resume window"
    );

    let a2 = t.open();
    t.send(
        a2,
        &format!(r#"{{"type":"resume","session":"{a_token}","ack":3}}"#),
    );
    let frames = t.take(a2);
    assert_eq!(
        frames[0],
        ServerFrame {
            seq: None,
            ack: Some(1),
            msg: ServerMsg::Resumed
        }
    );
    assert_eq!(
        frames[1..]
            .iter()
            .map(|f| (f.seq, &f.msg))
            .collect::<Vec<_>>(),
        vec![
            (
                Some(4),
                &ServerMsg::ParticipantJoined {
                    participant: info(&c_id, "Cy")
                }
            ),
            (
                Some(5),
                &ServerMsg::Speaking {
                    id: b_id.clone(),
                    speaking: true
                }
            ),
            (
                Some(6),
                &ServerMsg::Offer {
                    id: 1,
                    sdp: "v=0 sfu".into()
                }
            ),
            (Some(7), &ServerMsg::ParticipantLeft { id: b_id }),
        ]
    );
    assert_eq!(a_id, "p1");

    // Back to normal: new messages go to the new connection with the next seq.
    t.media_event(MediaEvent::Speaking {
        session: SessionId(1),
        speaking: true,
    });
    assert_eq!(seqs(&t.take(a2)), vec![Some(8)]);
}

#[test]
fn resuming_again_does_not_duplicate() {
    let mut t = TestHub::new(None);
    let (a, _, a_token) = t.join("demo", "Ada");
    let (_, _, _) = t.join("demo", "Bob");
    t.take(a);
    t.close(a);
    let (_, _, _) = t.join("demo", "Cy");

    let a2 = t.open();
    t.send(
        a2,
        &format!(r#"{{"type":"resume","session":"{a_token}","ack":1}}"#),
    );
    assert_eq!(seqs(&t.take(a2)), vec![None, Some(2), Some(3)]);
    // A second resume on the same connection is refused and resends nothing.
    t.send(
        a2,
        &format!(r#"{{"type":"resume","session":"{a_token}","ack":1}}"#),
    );
    let frames = t.take(a2);
    assert_eq!(
        frames.iter().map(error_code).collect::<Vec<_>>(),
        vec![Some(ErrorCode::AlreadyJoined)],
        "{frames:?}"
    );

    // The client processed everything up to the error (seq 4), then lost this connection too.
    t.close(a2);
    let a3 = t.open();
    t.send(
        a3,
        &format!(r#"{{"type":"resume","session":"{a_token}","ack":4}}"#),
    );
    assert_eq!(
        t.take_msgs(a3),
        vec![ServerMsg::Resumed],
        "everything was acknowledged: nothing to resend"
    );
    let (_, _, _) = t.join("demo", "Di");
    assert_eq!(seqs(&t.take(a3)), vec![Some(5)]);
}

#[test]
fn resume_with_an_unknown_session_fails() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    let c = t.open();
    t.send(c, r#"{"type":"resume","session":"no-such-token","ack":5}"#);
    let frames = t.take(c);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert!(matches!(frames[0].msg, ServerMsg::ResumeFailed { .. }));
    assert_eq!(frames[0].seq, None);
    assert!(t.take(a).is_empty());
    // The client can join afresh on the same connection.
    t.send(c, r#"{"seq":1,"type":"join","room":"demo","name":"Bob"}"#);
    assert!(matches!(
        t.take_msgs(c).as_slice(),
        [ServerMsg::Joined { .. }]
    ));
}

#[test]
fn after_the_resume_window_the_participant_has_left() {
    let mut t = TestHub::new(None);
    let (a, a_id, a_token) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take(b);
    t.take_media();
    t.tick_at(5.0);
    t.close(a);

    t.tick_at(34.9);
    assert!(t.take(b).is_empty(), "still within the window");
    assert_eq!(t.hub.participant_count(), 2);

    t.tick_at(35.0);
    assert_eq!(
        t.take_msgs(b),
        vec![ServerMsg::ParticipantLeft { id: a_id }]
    );
    assert_eq!(
        t.take_media(),
        vec![MediaCommand::Close {
            session: SessionId(1)
        }]
    );
    assert_eq!(t.hub.participant_count(), 1);

    let a2 = t.open();
    t.send(
        a2,
        &format!(r#"{{"type":"resume","session":"{a_token}","ack":2}}"#),
    );
    assert!(matches!(
        t.take_msgs(a2).as_slice(),
        [ServerMsg::ResumeFailed { .. }]
    ));
    t.tick_at(100.0);
    assert!(t.take(b).is_empty(), "the participant leaves once");
}

#[test]
fn a_resumed_session_is_not_expired() {
    let mut t = TestHub::new(None);
    let (a, _, a_token) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take(a);
    t.close(a);
    t.tick_at(20.0);
    let a2 = t.open();
    t.send(
        a2,
        &format!(r#"{{"type":"resume","session":"{a_token}","ack":2}}"#),
    );
    t.tick_at(1000.0);
    assert!(t.take(b).is_empty());
    assert_eq!(t.hub.participant_count(), 2);
}

#[test]
fn resuming_elsewhere_closes_the_old_connection() {
    let mut t = TestHub::new(None);
    let (a, _, a_token) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take(a);

    // The old connection is still open (e.g. a half-dead network path) when the client resumes.
    let a2 = t.open();
    t.send(
        a2,
        &format!(r#"{{"type":"resume","session":"{a_token}","ack":2}}"#),
    );
    assert!(t.is_closed(a), "the old connection is closed");
    assert!(!t.is_closed(a2));
    assert_eq!(t.take_msgs(a2), vec![ServerMsg::Resumed]);
    assert!(t.take(a).is_empty());

    // Frames now go to the new connection only.
    t.send(b, r#"{"seq":2,"type":"mute","audio":true,"video":true}"#);
    assert!(t.take(a).is_empty());
    assert_eq!(seqs(&t.take(a2)), vec![Some(3)]);
    t.take(b);

    // The old connection speaks for nobody any more, and its close does not end the session.
    t.send(a, r#"{"seq":2,"type":"mute","audio":true,"video":true}"#);
    assert_eq!(
        t.take(a).iter().map(error_code).collect::<Vec<_>>(),
        vec![Some(ErrorCode::NotJoined)]
    );
    assert!(t.take(b).is_empty());
    t.close(a);
    t.tick_at(1000.0);
    assert!(t.take(b).is_empty(), "A is still in the room");
    assert_eq!(t.hub.participant_count(), 2);
}

// ---- bad input ----

#[test]
fn unknown_type_and_malformed_messages_get_errors_and_touch_nobody_else() {
    let mut t = TestHub::new(None);
    let (a, _, a_token) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take(a);
    t.take_media();
    let c = t.open();

    for conn in [b, c] {
        t.hub
            .bad_frame(conn, FrameError::UnknownType("dance".into()));
        t.hub
            .bad_frame(conn, FrameError::BadMessage("expected value".into()));
        t.collect();
        t.send(conn, r#"{"type":"mute","audio":true,"video":true}"#);
    }
    let to_b = t.take(b);
    assert_eq!(
        to_b.iter().map(error_code).collect::<Vec<_>>(),
        vec![
            Some(ErrorCode::UnknownType),
            Some(ErrorCode::BadMessage),
            Some(ErrorCode::BadMessage)
        ],
        "{to_b:?}"
    );
    assert_eq!(
        seqs(&to_b),
        vec![Some(2), Some(3), Some(4)],
        "a participant's errors are reliable"
    );
    let to_c = t.take(c);
    assert_eq!(
        to_c.iter().map(error_code).collect::<Vec<_>>(),
        vec![
            Some(ErrorCode::UnknownType),
            Some(ErrorCode::BadMessage),
            Some(ErrorCode::BadMessage)
        ],
        "{to_c:?}"
    );
    assert!(matches!(&to_c[0].msg, ServerMsg::Error { message, .. } if message.contains("dance")));

    assert!(t.take(a).is_empty(), "A saw nothing of it");
    assert!(t.take_media().is_empty());
    assert!(
        t.closed.is_empty(),
        "bad input does not cost the connection"
    );
    // A's queue is unchanged: a resume from scratch resends exactly joined and B's arrival.
    t.close(a);
    let a2 = t.open();
    t.send(
        a2,
        &format!(r#"{{"type":"resume","session":"{a_token}","ack":0}}"#),
    );
    assert_eq!(seqs(&t.take(a2)), vec![None, Some(1), Some(2)]);

    // B's state is untouched: its next message works and is numbered on.
    t.send(b, r#"{"seq":2,"type":"mute","audio":true,"video":false}"#);
    assert_eq!(t.take_msgs(a2).len(), 1);
    assert_eq!(seqs(&t.take(b)), vec![Some(5)]);
}

#[test]
fn refused_connections_get_the_error_then_are_closed() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take(a);
    t.hub
        .refuse(b, ErrorCode::TooLarge, "message of 10000 bytes".into());
    t.collect();
    let frames = t.take(b);
    assert_eq!(
        frames.iter().map(error_code).collect::<Vec<_>>(),
        vec![Some(ErrorCode::TooLarge)]
    );
    assert!(t.is_closed(b));
    assert!(t.take(a).is_empty());
}

#[test]
fn frames_from_unopened_connections_are_ignored() {
    let mut t = TestHub::new(None);
    t.send(
        ConnId(77),
        r#"{"seq":1,"type":"join","room":"demo","name":"Ada"}"#,
    );
    assert!(t.take(ConnId(77)).is_empty());
    assert_eq!(t.hub.participant_count(), 0);
}

#[test]
fn a_newcomer_learns_the_dominant_speaker() {
    let mut h = TestHub::new(None);
    let (_, ada, _) = h.join("room", "Ada");
    let session = SessionId(ada.trim_start_matches('p').parse().expect("wire id"));
    h.media_event(MediaEvent::DominantSpeaker { session });
    let b = h.open();
    h.send(b, r#"{"seq":1,"type":"join","room":"room","name":"Bob"}"#);
    let msgs = h.take_msgs(b);
    assert!(
        matches!(msgs.as_slice(), [ServerMsg::Joined { .. }, ServerMsg::DominantSpeaker { id }] if *id == ada),
        "{msgs:?}"
    );
}

#[test]
fn a_newcomer_learns_who_is_speaking_already() {
    let mut h = TestHub::new(None);
    let (_, ada, _) = h.join("room", "Ada");
    let session = SessionId(ada.trim_start_matches('p').parse().expect("wire id"));
    h.media_event(MediaEvent::Speaking {
        session,
        speaking: true,
    });
    let b = h.open();
    h.send(b, r#"{"seq":1,"type":"join","room":"room","name":"Bob"}"#);
    let msgs = h.take_msgs(b);
    let Some(ServerMsg::Joined { participants, .. }) = msgs.first() else {
        panic!("no joined: {msgs:?}");
    };
    assert!(
        participants[0].speaking,
        "Ada is speaking: {participants:?}"
    );
}

#[test]
fn screen_tracks_and_views_reach_the_media_plane() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take_media();
    t.send(
        b,
        r#"{"seq":2,"type":"offer","sdp":"v=0","tracks":{"2":"screen","0":"mic"}}"#,
    );
    t.send(
        a,
        r#"{"seq":2,"type":"view","tiles":[{"id":"p2","source":"screen","width":1280,"height":720},{"id":"nobody","width":1,"height":1}]}"#,
    );
    assert_eq!(
        t.take_media(),
        vec![
            MediaCommand::Offer {
                session: SessionId(2),
                room: "demo".into(),
                stream_id: "p2".into(),
                sdp: "v=0".into(),
                screen_mids: vec!["2".into()],
                can_publish: true,
                can_subscribe: true,
            },
            MediaCommand::Mute {
                session: SessionId(2),
                audio: false,
                video: false,
            },
            MediaCommand::View {
                session: SessionId(1),
                tiles: vec![parley_proto::media::TileView {
                    publisher: SessionId(2),
                    source: TrackSource::Screen,
                    width: 1280,
                    height: 720,
                }],
            },
        ]
    );
}

#[test]
fn media_plane_layer_events_reach_the_right_clients() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take_msgs(a);
    t.media_event(MediaEvent::Layers {
        session: SessionId(1),
        mid: "1".into(),
        active: vec!["q".into()],
    });
    t.media_event(MediaEvent::VideoPaused {
        session: SessionId(2),
        publisher: SessionId(1),
        source: TrackSource::Camera,
        paused: true,
    });
    t.media_event(MediaEvent::DominantSpeaker {
        session: SessionId(1),
    });
    assert_eq!(
        t.take_msgs(a),
        vec![
            ServerMsg::Layers {
                mid: "1".into(),
                active: vec!["q".into()]
            },
            ServerMsg::DominantSpeaker { id: "p1".into() },
        ]
    );
    assert_eq!(
        t.take_msgs(b),
        vec![
            ServerMsg::VideoPaused {
                id: "p1".into(),
                source: TrackSource::Camera,
                paused: true,
                reason: "bandwidth".into()
            },
            ServerMsg::DominantSpeaker { id: "p1".into() },
        ]
    );
}

#[test]
fn a_lost_media_session_asks_its_participant_for_a_new_one() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.take_msgs(a);
    t.take_msgs(b);
    t.media_event(MediaEvent::Closed {
        session: SessionId(1),
    });
    assert_eq!(t.take_msgs(a), vec![ServerMsg::MediaClosed]);
    assert_eq!(t.take_msgs(b), vec![], "the others are not disturbed");
    // After a leave the Closed that follows tells nobody anything.
    t.send(b, r#"{"seq":2,"type":"leave"}"#);
    t.take_msgs(a);
    t.media_event(MediaEvent::Closed {
        session: SessionId(2),
    });
    assert_eq!(t.take_msgs(a), vec![]);
}

#[test]
fn webhook_events_follow_rooms_and_participants() {
    use crate::webhook::WebhookEvent as W;
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("demo", "Ada");
    let (b, _, _) = t.join("demo", "Bob");
    t.send(a, r#"{"seq":2,"type":"leave"}"#);
    t.send(b, r#"{"seq":2,"type":"leave"}"#);
    let room = || "demo".to_string();
    let p = |id: &str, name: &str| (id.to_string(), name.to_string());
    let (ada, bob) = (p("Ada", "Ada"), p("Bob", "Bob"));
    assert_eq!(
        t.webhooks,
        vec![
            W::RoomStarted { room: room() },
            W::ParticipantJoined {
                room: room(),
                participant: ada.0.clone(),
                name: ada.1.clone()
            },
            W::ParticipantJoined {
                room: room(),
                participant: bob.0.clone(),
                name: bob.1.clone()
            },
            W::ParticipantLeft {
                room: room(),
                participant: ada.0,
                name: ada.1
            },
            W::ParticipantLeft {
                room: room(),
                participant: bob.0,
                name: bob.1
            },
            W::RoomFinished { room: room() },
        ]
    );
}

#[test]
fn draining_refuses_new_rooms_but_not_existing_ones() {
    let mut t = TestHub::new(None);
    let (a, _, _) = t.join("live", "Ada");
    t.hub.start_draining();
    let c = t.open();
    t.send(c, r#"{"seq":1,"type":"join","room":"new","name":"Cy"}"#);
    assert!(matches!(
        t.take_msgs(c).as_slice(),
        [ServerMsg::Error {
            code: ErrorCode::Draining,
            ..
        }]
    ));
    let (_, _, _) = t.join("live", "Bob");
    assert!(matches!(
        t.take_msgs(a).as_slice(),
        [ServerMsg::ParticipantJoined { .. }]
    ));
}

// ---- direct calls -----------------------------------------------------------------------------

mod calls {
    use super::*;
    use parley_proto::signal::{CallEndReason as R, CallRole};

    /// A registered device: its connection and the next client seq it will use.
    struct Dev {
        conn: ConnId,
        seq: u64,
        session: String,
    }

    impl TestHub {
        fn register(&mut self, user: &str) -> Dev {
            let conn = self.open();
            self.send(
                conn,
                &format!(r#"{{"seq":1,"type":"register","user":"{user}"}}"#),
            );
            let msgs = self.take_msgs(conn);
            let Some(ServerMsg::Registered { session, .. }) = msgs.first() else {
                panic!("expected registered, got {msgs:?}");
            };
            Dev {
                conn,
                seq: 1,
                session: session.clone(),
            }
        }

        fn act(&mut self, d: &mut Dev, body: &str) {
            d.seq += 1;
            let json = format!(r#"{{"seq":{},{}}}"#, d.seq, &body[1..body.len() - 1]);
            self.send(d.conn, &json);
        }

        /// What `d` received, without acks.
        fn got(&mut self, d: &Dev) -> Vec<ServerMsg> {
            self.take_msgs(d.conn)
                .into_iter()
                .filter(|m| *m != ServerMsg::Ack)
                .collect()
        }
    }

    fn ended(call: &str, reason: R) -> ServerMsg {
        ServerMsg::CallEnded {
            call: call.into(),
            reason,
        }
    }

    fn signal(call: &str, v: serde_json::Value) -> ServerMsg {
        ServerMsg::CallSignal {
            call: call.into(),
            data: v,
        }
    }

    /// Ann calls Bob, who has two devices; returns (ann, bob1, bob2) with inboxes emptied.
    fn ringing() -> (TestHub, Dev, Dev, Dev) {
        let mut t = TestHub::new(None);
        let mut ann = t.register("ann");
        let b1 = t.register("bob");
        let b2 = t.register("bob");
        t.act(&mut ann, r#"{"type":"call","call":"c1","to":"bob"}"#);
        assert_eq!(
            t.got(&ann),
            vec![ServerMsg::CallRinging {
                call: "c1".into(),
                to: "bob".into()
            }]
        );
        let incoming = ServerMsg::CallIncoming {
            call: "c1".into(),
            from: "ann".into(),
        };
        assert_eq!(t.got(&b1), vec![incoming.clone()]);
        assert_eq!(t.got(&b2), vec![incoming]);
        (t, ann, b1, b2)
    }

    #[test]
    fn every_device_rings_and_the_first_answer_wins() {
        let (mut t, ann, mut b1, mut b2) = ringing();
        t.act(&mut b1, r#"{"type":"call_answer","call":"c1"}"#);
        let won = ServerMsg::CallAnswered {
            call: "c1".into(),
            device: "p2".into(),
        };
        assert_eq!(t.got(&ann), vec![won.clone()]);
        assert_eq!(t.got(&b1), vec![won]);
        assert_eq!(t.got(&b2), vec![ended("c1", R::AnsweredElsewhere)]);
        // The second device answering a moment later loses cleanly.
        t.act(&mut b2, r#"{"type":"call_answer","call":"c1"}"#);
        assert_eq!(t.got(&b2), vec![ended("c1", R::AnsweredElsewhere)]);
        assert!(t.got(&ann).is_empty());
    }

    #[test]
    fn the_callers_signals_wait_at_every_device_and_only_the_winners_answer_is_released() {
        let (mut t, mut ann, mut b1, mut b2) = ringing();
        t.act(
            &mut ann,
            r#"{"type":"call_signal","call":"c1","data":{"sdp":"offer"}}"#,
        );
        t.act(
            &mut ann,
            r#"{"type":"call_signal","call":"c1","data":{"candidate":"a1"}}"#,
        );
        for d in [&b1, &b2] {
            assert_eq!(
                t.got(d),
                vec![
                    signal("c1", serde_json::json!({"sdp": "offer"})),
                    signal("c1", serde_json::json!({"candidate": "a1"})),
                ]
            );
        }
        // Both devices prepare answers while ringing; Parley holds them.
        t.act(
            &mut b1,
            r#"{"type":"call_signal","call":"c1","data":{"sdp":"answer1"}}"#,
        );
        t.act(
            &mut b2,
            r#"{"type":"call_signal","call":"c1","data":{"sdp":"answer2"}}"#,
        );
        t.act(
            &mut b1,
            r#"{"type":"call_signal","call":"c1","data":{"candidate":"b1"}}"#,
        );
        assert!(
            t.got(&ann).is_empty(),
            "nothing reaches the caller before an answer"
        );
        t.act(&mut b2, r#"{"type":"call_answer","call":"c1"}"#);
        assert_eq!(
            t.got(&ann),
            vec![
                ServerMsg::CallAnswered {
                    call: "c1".into(),
                    device: "p3".into()
                },
                signal("c1", serde_json::json!({"sdp": "answer2"})),
            ]
        );
        // From now on signals go straight between the two.
        t.act(
            &mut ann,
            r#"{"type":"call_signal","call":"c1","data":{"candidate":"a2"}}"#,
        );
        assert_eq!(
            t.got(&b2).last(),
            Some(&signal("c1", serde_json::json!({"candidate": "a2"})))
        );
        assert_eq!(t.got(&b1), vec![ended("c1", R::AnsweredElsewhere)]);
        t.act(
            &mut b1,
            r#"{"type":"call_signal","call":"c1","data":{"candidate":"late"}}"#,
        );
        assert!(
            t.got(&ann).is_empty(),
            "the losing device's signals go nowhere"
        );
    }

    #[test]
    fn cancelling_stops_every_ringing_device_even_before_any_reply() {
        let mut t = TestHub::new(None);
        let mut ann = t.register("ann");
        let b1 = t.register("bob");
        let b2 = t.register("bob");
        // Call and cancel back to back, before reading anything.
        t.act(&mut ann, r#"{"type":"call","call":"c1","to":"bob"}"#);
        t.act(&mut ann, r#"{"type":"call_cancel","call":"c1"}"#);
        for d in [&b1, &b2] {
            assert_eq!(
                t.got(d),
                vec![
                    ServerMsg::CallIncoming {
                        call: "c1".into(),
                        from: "ann".into()
                    },
                    ended("c1", R::Cancelled),
                ]
            );
        }
        // Calling again with a new id is a new, separate call.
        t.act(&mut ann, r#"{"type":"call","call":"c2","to":"bob"}"#);
        assert_eq!(
            t.got(&b1),
            vec![ServerMsg::CallIncoming {
                call: "c2".into(),
                from: "ann".into()
            }]
        );
        assert!(t.webhooks.iter().any(
            |w| matches!(w, crate::webhook::WebhookEvent::CallMissed { call, .. } if call == "c1")
        ));
    }

    #[test]
    fn a_cancel_racing_an_answer_leaves_one_outcome() {
        let (mut t, mut ann, mut b1, _b2) = ringing();
        // The answer is processed first: the call is on; the late cancel hangs it up.
        t.act(&mut b1, r#"{"type":"call_answer","call":"c1"}"#);
        t.act(&mut ann, r#"{"type":"call_cancel","call":"c1"}"#);
        assert_eq!(
            t.got(&b1),
            vec![
                ServerMsg::CallAnswered {
                    call: "c1".into(),
                    device: "p2".into()
                },
                ended("c1", R::Cancelled)
            ]
        );
        // The other order: cancel first, then the answer finds no call.
        let (mut t, mut ann, mut b1, _b2) = ringing();
        t.act(&mut ann, r#"{"type":"call_cancel","call":"c1"}"#);
        t.act(&mut b1, r#"{"type":"call_answer","call":"c1"}"#);
        assert_eq!(
            t.got(&b1),
            vec![ended("c1", R::Cancelled), ended("c1", R::Cancelled)]
        );
        assert!(t.got(&ann).is_empty());
    }

    #[test]
    fn declining_ends_the_call_for_the_caller_and_the_other_devices() {
        let (mut t, ann, mut b1, b2) = ringing();
        t.act(&mut b1, r#"{"type":"call_decline","call":"c1"}"#);
        assert_eq!(t.got(&ann), vec![ended("c1", R::Declined)]);
        assert_eq!(t.got(&b2), vec![ended("c1", R::Declined)]);
        assert_eq!(t.got(&b1), vec![ended("c1", R::Declined)]);
    }

    #[test]
    fn unavailable_busy_and_no_answer() {
        let mut t = TestHub::new(None);
        let mut ann = t.register("ann");
        t.act(&mut ann, r#"{"type":"call","call":"c0","to":"nobody"}"#);
        assert_eq!(t.got(&ann), vec![ended("c0", R::Unavailable)]);
        assert!(t.webhooks.iter().any(|w| matches!(
            w,
            crate::webhook::WebhookEvent::CallMissed {
                reason: R::Unavailable,
                ..
            }
        )));

        let (mut t, _ann, mut b1, _b2) = ringing();
        t.act(&mut b1, r#"{"type":"call_answer","call":"c1"}"#);
        let mut cy = t.register("cy");
        t.act(&mut cy, r#"{"type":"call","call":"c9","to":"bob"}"#);
        assert_eq!(t.got(&cy), vec![ended("c9", R::Busy)]);

        let (mut t, ann, b1, b2) = ringing();
        t.tick_at(44.0);
        assert!(t.got(&ann).is_empty());
        t.tick_at(45.5);
        for d in [&ann, &b1, &b2] {
            assert_eq!(t.got(d), vec![ended("c1", R::NoAnswer)]);
        }
    }

    #[test]
    fn glare_makes_one_connected_call() {
        let mut t = TestHub::new(None);
        let mut ann = t.register("ann");
        let mut bob = t.register("bob");
        t.act(&mut ann, r#"{"type":"call","call":"a-to-b","to":"bob"}"#);
        t.act(&mut bob, r#"{"type":"call","call":"b-to-a","to":"ann"}"#);
        let merged = t.got(&bob);
        assert_eq!(
            merged,
            vec![
                ServerMsg::CallIncoming {
                    call: "a-to-b".into(),
                    from: "ann".into()
                },
                ServerMsg::CallMerged {
                    call: "a-to-b".into(),
                    role: CallRole::Callee
                },
                ServerMsg::CallAnswered {
                    call: "a-to-b".into(),
                    device: "p2".into()
                },
            ]
        );
        assert_eq!(
            t.got(&ann),
            vec![
                ServerMsg::CallRinging {
                    call: "a-to-b".into(),
                    to: "bob".into()
                },
                ServerMsg::CallAnswered {
                    call: "a-to-b".into(),
                    device: "p2".into()
                },
            ]
        );
        // Connected: a hang-up reaches the other side.
        t.act(&mut ann, r#"{"type":"call_hangup","call":"a-to-b"}"#);
        assert_eq!(t.got(&bob), vec![ended("a-to-b", R::Hangup)]);
    }

    #[test]
    fn a_device_that_reconnects_gets_what_it_missed_once() {
        let (mut t, ann, b1, mut b2) = ringing();
        // Bob's second device loses its connection before acknowledging anything.
        t.close(b2.conn);
        let mut b1 = b1;
        t.act(&mut b1, r#"{"type":"call_answer","call":"c1"}"#);
        let _ = t.got(&ann);
        // b2 comes back on a new connection, having processed nothing: the incoming call and
        // the "answered elsewhere" arrive, in order, once.
        let conn = t.open();
        t.send(
            conn,
            &format!(r#"{{"type":"resume","session":"{}","ack":1}}"#, b2.session),
        );
        let msgs: Vec<ServerMsg> = t.take_msgs(conn);
        assert_eq!(
            msgs,
            vec![
                ServerMsg::Resumed,
                ServerMsg::CallIncoming {
                    call: "c1".into(),
                    from: "ann".into()
                },
                ended("c1", R::AnsweredElsewhere),
            ]
        );
        // Resending an already processed message does nothing twice.
        b2.conn = conn;
        b2.seq -= 1;
        t.act(&mut b2, r#"{"type":"call_answer","call":"c1"}"#);
        t.act(&mut b2, r#"{"type":"call_answer","call":"c1"}"#);
        let again = t.got(&b2);
        assert_eq!(
            again,
            vec![ended("c1", R::AnsweredElsewhere)],
            "one reply for one new message"
        );
    }
}
