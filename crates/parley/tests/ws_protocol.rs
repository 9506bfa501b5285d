//! The signaling protocol against the real `parley` binary, over real WebSockets.
//! Signaling only: no SDP, no media.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a reply may take before the test fails.
const REPLY: Duration = Duration::from_secs(5);
/// How long a whole test may take.
const TEST: Duration = Duration::from_secs(60);

/// A running `parley serve`, killed on drop.
struct Server {
    child: Child,
    http: SocketAddr,
}

impl Server {
    async fn start(extra: &[&str]) -> Server {
        let http = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let rtc_port = free_udp_port().to_string();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
        cmd.args(["serve", "--http", &http.to_string()])
            .args(["--rtc-port", &rtc_port, "--public-ip", "127.0.0.1"])
            .args(extra)
            .env_remove("PARLEY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // Set PARLEY_TEST_LOG=1 to see the server's log.
        if std::env::var_os("PARLEY_TEST_LOG").is_none() {
            cmd.stderr(Stdio::null());
        }
        let child = cmd.spawn().expect("the parley binary starts");
        let mut server = Server { child, http };
        server.wait_healthy().await;
        server
    }

    async fn wait_healthy(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("child status") {
                panic!("parley exited before it was ready: {status}");
            }
            if healthz(self.http).await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "parley did not answer /healthz within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn client(&self) -> Client {
        let url = format!("ws://{}/ws", self.http);
        let (ws, _) = tokio::time::timeout(REPLY, tokio_tungstenite::connect_async(url))
            .await
            .expect("the WebSocket handshake in time")
            .expect("the WebSocket handshake succeeds");
        Client { ws }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_tcp_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
    l.local_addr().expect("local address").port()
}

fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
    s.local_addr().expect("local address").port()
}

async fn healthz(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.is_err() {
        return false;
    }
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut reply)).await;
    reply.starts_with(b"HTTP/1.0 200") || reply.starts_with(b"HTTP/1.1 200")
}

/// One WebSocket client speaking raw JSON.
struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::Text(text.into().into()))
            .await
            .expect("send a frame");
    }

    async fn send(&mut self, v: Value) {
        self.send_text(v.to_string()).await;
    }

    /// The next JSON frame from Parley; fails on a close or after [`REPLY`].
    async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(REPLY, self.ws.next())
                .await
                .expect("a frame from Parley in time")
                .expect("the connection is open")
                .expect("a valid WebSocket frame");
            match msg {
                Message::Text(t) => {
                    return serde_json::from_str(&t).expect("Parley sends JSON");
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next frame, which must be of type `ty`.
    async fn expect(&mut self, ty: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(v["type"], ty, "expected {ty}, got {v}");
        v
    }

    /// The next frame, which must be an error with `code`.
    async fn expect_error(&mut self, code: &str) -> Value {
        let v = self.expect("error").await;
        assert_eq!(v["code"], code, "{v}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "errors explain themselves: {v}"
        );
        v
    }

    /// Pings and expects the pong as the very next frame: nothing else was pending.
    async fn ping_pong(&mut self) {
        self.send(json!({"type": "ping"})).await;
        let v = self.recv().await;
        assert_eq!(v["type"], "pong", "expected nothing but the pong, got {v}");
    }

    /// Joins with client seq 1; returns the `joined` frame.
    async fn join(&mut self, room: &str, name: &str) -> Value {
        self.send(json!({"seq": 1, "type": "join", "room": room, "name": name}))
            .await;
        self.expect("joined").await
    }

    /// Every frame until Parley closes the connection.
    async fn until_closed(&mut self) -> Vec<Value> {
        let mut frames: Vec<Value> = Vec::new();
        loop {
            let Ok(next) = tokio::time::timeout(REPLY, self.ws.next()).await else {
                let mut counts = std::collections::BTreeMap::new();
                for f in &frames {
                    *counts
                        .entry(format!("{} {}", f["type"], f["code"]))
                        .or_insert(0) += 1;
                }
                panic!("Parley did not close the connection within {REPLY:?}; it sent {counts:?}");
            };
            match next {
                Some(Ok(Message::Text(t))) => {
                    frames.push(serde_json::from_str(&t).expect("Parley sends JSON"))
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return frames,
                Some(Ok(_)) => {}
            }
        }
    }
}

fn types(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f["type"].as_str().unwrap_or("?"))
        .collect()
}

async fn within_time_limit(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(TEST, test)
        .await
        .expect("the test finishes in time");
}

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
