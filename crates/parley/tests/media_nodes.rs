//! Dedicated media nodes (the split mode) against the real binary: `parley serve
//! --no-local-media` and `parley media` processes on loopback, with the load-test tool's real
//! WebRTC users in the calls.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const SECRET: &str = "0123456789abcdef-node-secret";

/// A whole test here runs processes for longer than the usual limit.
const LONG_TEST: Duration = Duration::from_secs(120);

async fn signaling() -> Server {
    // A short resume window: users whose leave did not get through are removed quickly.
    Server::start(&[
        "--no-local-media",
        "--node-secret",
        SECRET,
        "--resume-window-secs",
        "1",
    ])
    .await
}

/// Polls `addr`'s /metrics until `ok` holds; returns that text.
async fn wait_metrics(addr: std::net::SocketAddr, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = get_text(addr, "/metrics").await;
        if ok(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 20 s; /metrics of {addr}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn audio_in(text: &str) -> f64 {
    metric(
        text,
        "parley_rtp_packets_total{direction=\"in\",kind=\"audio\"}",
    )
    .unwrap_or(0.0)
}

fn node_sessions(text: &str, node: &str) -> Option<f64> {
    metric(
        text,
        &format!("parley_media_node_sessions{{node=\"{node}\"}}"),
    )
}

/// Runs `parley lt` (2 calls of 3 users, one of them talking) to the end; its stdout.
async fn load_test(url: String, duration: u64) -> (bool, String) {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_parley"))
            .args([
                "lt",
                "--calls",
                "2",
                "--users-per-call",
                "3",
                "--unmuted",
                "1",
            ])
            .args(["--duration", &duration.to_string(), "--join-duration", "1"])
            .args(["--url", &url])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .expect("parley lt runs")
    })
    .await
    .expect("joined");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// "users connected        6 of 6 (0 failed)" → 6.
fn users_connected(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("users connected"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no \"users connected\" line: {text}"))
}

fn summary(text: &str) -> Value {
    let last = text.lines().last().expect("a JSON line");
    serde_json::from_str(last).unwrap_or_else(|_| panic!("JSON as the last line: {text}"))
}

#[tokio::test]
async fn calls_are_spread_over_the_media_nodes_and_media_flows() {
    tokio::time::timeout(LONG_TEST, async {
        let server = signaling().await;
        let a = MediaNode::spawn(server.http, SECRET, "node-a");
        let b = MediaNode::spawn(server.http, SECRET, "node-b");
        wait_metrics(server.http, "both media nodes registered", |t| {
            metric(t, "parley_media_nodes") == Some(2.0)
        })
        .await;
        for node in [&a, &b] {
            let (code, body) = get_text(node.http, "/readyz").await;
            assert_eq!(code, 200, "a connected node is ready: {body}");
        }

        let (ok, text) = load_test(format!("ws://{}/ws", server.http), 3).await;
        assert!(ok, "{text}");
        assert_eq!(users_connected(&text), 6, "{text}");
        let v = summary(&text);
        assert_eq!(v["loss_pct"].as_f64(), Some(0.0), "{v}");
        // Per call the talker is heard by two users: 100 packets/s per call.
        let pps = v["rx_pps"].as_f64().expect("rx_pps");
        assert!((150.0..=250.0).contains(&pps), "rx_pps {pps}: {text}");

        // The second call went to the other node: both forwarded audio.
        for (name, node) in [("node-a", &a), ("node-b", &b)] {
            let (_, m) = get_text(node.http, "/metrics").await;
            assert!(audio_in(&m) > 0.0, "{name} carried no call:\n{m}");
        }
        // Everyone left (or their resume window ended): the sessions are closed on both nodes.
        wait_metrics(server.http, "sessions closed", |t| {
            metric(t, "parley_sessions_active") == Some(0.0)
                && node_sessions(t, "node-a") == Some(0.0)
                && node_sessions(t, "node-b") == Some(0.0)
        })
        .await;
    })
    .await
    .expect("the test finishes in time");
}

#[tokio::test]
async fn a_wrong_node_secret_is_refused_and_offers_without_nodes_are_rejected() {
    within_time_limit(async {
        let server = signaling().await;
        let mut intruder = MediaNode::spawn(server.http, "not-the-right-secret", "intruder");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = intruder.child.try_wait().expect("child status") {
                break status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a media node with a wrong secret keeps running"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!status.success(), "it exits with an error: {status}");
        let text = wait_metrics(server.http, "the refusal counted", |t| {
            metric(t, "parley_errors_total{kind=\"media_node_unauthorized\"}") >= Some(1.0)
        })
        .await;
        assert_eq!(metric(&text, "parley_media_nodes"), Some(0.0), "{text}");

        // No node: a participant's offer is refused with a reason.
        let mut c = server.client().await;
        c.join("nowhere", "Ada").await;
        c.send(json!({"seq": 2, "type": "offer", "sdp": "v=0\r\n"}))
            .await;
        // The offer is acknowledged at once; the refusal comes back from the media side.
        let mut err = c.recv().await;
        if err["type"] == "ack" {
            err = c.recv().await;
        }
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["code"], "sdp_rejected", "{err}");
        assert!(
            err["message"]
                .as_str()
                .is_some_and(|m| m.contains("no media node")),
            "{err}"
        );
    })
    .await;
}

#[tokio::test]
async fn losing_a_node_closes_its_sessions_while_the_other_call_goes_on() {
    lose_a_node(Loss::Killed).await;
}

/// A node that stops answering without closing its connection (here frozen with SIGSTOP; as
/// a host that lost power or its network) is dropped after the links' idle timeout.
#[tokio::test]
async fn a_node_gone_silent_is_dropped_within_seconds() {
    lose_a_node(Loss::Frozen).await;
}

enum Loss {
    /// SIGKILL: the kernel closes the node's connection at once.
    Killed,
    /// SIGSTOP: the connection stays open, and nothing comes through it.
    Frozen,
}

/// Two calls, one on each of two nodes; node-a is lost: its sessions are closed and the call
/// on node-b goes on.
async fn lose_a_node(how: Loss) {
    tokio::time::timeout(LONG_TEST, async {
        let server = signaling().await;
        let mut a = MediaNode::spawn(server.http, SECRET, "node-a");
        let b = MediaNode::spawn(server.http, SECRET, "node-b");
        wait_metrics(server.http, "both media nodes registered", |t| {
            metric(t, "parley_media_nodes") == Some(2.0)
        })
        .await;

        let lt = tokio::spawn(load_test(format!("ws://{}/ws", server.http), 10));
        wait_metrics(server.http, "one call on each node", |t| {
            node_sessions(t, "node-a") == Some(3.0) && node_sessions(t, "node-b") == Some(3.0)
        })
        .await;
        for node in [&a, &b] {
            wait_metrics(node.http, "media flowing", |t| audio_in(t) > 0.0).await;
        }

        let lost_at = std::time::Instant::now();
        match how {
            Loss::Killed => {
                a.child.kill().expect("kill node-a");
                let _ = a.child.wait();
            }
            Loss::Frozen => {
                // SAFETY: a plain signal to our own child process.
                let rc = unsafe { libc::kill(a.child.id() as libc::pid_t, libc::SIGSTOP) };
                assert_eq!(rc, 0, "SIGSTOP node-a");
            }
        }
        let text = wait_metrics(server.http, "node-a's sessions closed", |t| {
            metric(t, "parley_media_nodes") == Some(1.0)
                && metric(t, "parley_sessions_active") == Some(3.0)
        })
        .await;
        let noticed = lost_at.elapsed();
        // The idle timeout is 6 s; a ping every 2 s.
        assert!(
            noticed < Duration::from_secs(9),
            "node-a's loss noticed after {noticed:?}"
        );
        eprintln!("node-a's loss noticed after {noticed:?}");
        assert_eq!(node_sessions(&text, "node-a"), None, "{text}");
        assert_eq!(node_sessions(&text, "node-b"), Some(3.0), "{text}");

        // The call on node-b goes on.
        let (_, before) = get_text(b.http, "/metrics").await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (_, after) = get_text(b.http, "/metrics").await;
        assert!(
            audio_in(&after) > audio_in(&before) + 20.0,
            "node-b forwards: {} then {}",
            audio_in(&before),
            audio_in(&after)
        );

        let (_, text) = lt.await.expect("the load test ends");
        assert_eq!(users_connected(&text), 6, "{text}");
    })
    .await
    .expect("the test finishes in time");
}

#[test]
fn missing_keys_are_named() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(args)
            .env_remove("PARLEY_CONFIG")
            .env_remove("PARLEY_NODE_SECRET")
            .stdin(Stdio::null())
            .output()
            .expect("parley runs")
    };
    let out = run(&["serve", "--no-local-media", "--http", "127.0.0.1:0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node_secret"), "{err}");
    let out = run(&["media", "--node-secret", SECRET]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("signaling_url"), "{err}");
    let out = run(&[
        "config",
        "print",
        "--no-local-media",
        "--node-secret",
        SECRET,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("local_media = false"), "{text}");
    assert!(!text.contains(SECRET), "the secret is masked: {text}");
}
