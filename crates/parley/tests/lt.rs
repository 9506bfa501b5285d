//! `parley lt` against the real binary: simulated WebRTC users in two calls, and the figures
//! it reports (the final JSON line).

mod support;

use std::process::{Command, Stdio};

use serde_json::Value;
use support::*;

/// Runs `parley lt` with `load` against a fresh server; returns its stdout and final JSON line.
async fn load_test(load: &'static [&'static str]) -> (String, Value) {
    let server = Server::start(&[]).await;
    run_lt(&server, load).await
}

async fn run_lt(server: &Server, load: &'static [&'static str]) -> (String, Value) {
    let url = format!("ws://{}/ws", server.http);
    let pid = server.child.id().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_parley"))
            .arg("lt")
            .args(load)
            .args(["--duration", "3", "--join-duration", "1", "--url", &url])
            .args(["--server-pid", &pid])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .expect("parley lt runs")
    })
    .await
    .expect("joined");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    let last = text.lines().last().expect("a JSON line");
    let v: Value = serde_json::from_str(last).expect("JSON");
    (text, v)
}

#[tokio::test]
async fn the_load_test_reports_joins_media_and_server_cost() {
    within_time_limit(async {
        let (text, v) =
            load_test(&["--calls", "2", "--users-per-call", "3", "--unmuted", "2"]).await;
        assert_eq!(v["users"], 6, "{v}");
        assert_eq!(v["calls"], 2, "{v}");
        // Per call: the two unmuted users hear each other (50 + 50 packets/s), the muted one
        // hears both (100): 200 packets/s per call.
        let pps = v["rx_pps"].as_f64().expect("rx_pps");
        assert!((300.0..=480.0).contains(&pps), "rx_pps {pps}: {text}");
        assert!(v["loss_pct"].as_f64().expect("loss") < 2.0, "{v}");
        assert!(v["join_ms_p99"].as_f64().expect("join") < 3000.0, "{v}");
        assert!(v["delay_ms_p99"].as_f64().expect("delay") < 200.0, "{v}");
        assert!(
            v["server_cpu_us_per_pkt"].as_f64().expect("cpu") > 0.0,
            "{v}"
        );
        assert!(v["server_rss_mb"].as_f64().expect("rss") > 1.0, "{v}");
        assert!(
            text.contains("measured on"),
            "says which receivers were measured: {text}"
        );
    })
    .await;
}

#[tokio::test]
async fn simulated_cameras_and_screen_shares_reach_the_others() {
    within_time_limit(async {
        // Nobody speaks: every packet received is simulcast camera or screen-share video.
        let (text, v) = load_test(&[
            "--calls",
            "1",
            "--users-per-call",
            "3",
            "--unmuted",
            "0",
            "--video",
            "1",
            "--screen-sharing",
            "1",
        ])
        .await;
        assert_eq!(v["users"], 3, "{v}");
        assert!(text.contains("3 of 3"), "all connected: {text}");
        let pps = v["rx_pps"].as_f64().expect("rx_pps");
        assert!(
            pps > 60.0,
            "video reaches the two viewers: rx_pps {pps}: {text}"
        );
        // No loss bound here: with the other tests sharing the two cores the receivers fall
        // behind and video loss reached 11 % (bench/RESULTS.md has loss under a real load).
        assert!(v["loss_pct"].is_number(), "{v}");
    })
    .await;
}

#[tokio::test]
async fn calls_spread_over_media_workers_and_keep_their_media() {
    within_time_limit(async {
        let server = Server::start(&["--media-workers", "3"]).await;
        let http = server.http;
        // Halfway through the steady window, each of the three calls has its own worker.
        let during = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
            get_text(http, "/metrics").await.1
        });
        let (text, v) = run_lt(
            &server,
            &["--calls", "3", "--users-per-call", "3", "--unmuted", "2"],
        )
        .await;
        let metrics = during.await.expect("metrics scraped");
        for w in 0..3 {
            let series = format!("parley_media_worker_sessions{{worker=\"{w}\"}}");
            assert_eq!(metric(&metrics, &series), Some(3.0), "{series}: {metrics}");
        }
        assert_eq!(v["users"], 9, "{v}");
        assert!(text.contains("9 of 9"), "all connected: {text}");
        // 200 packets/s per call, as above, whichever worker the call is on.
        let pps = v["rx_pps"].as_f64().expect("rx_pps");
        assert!((450.0..=720.0).contains(&pps), "rx_pps {pps}: {text}");
        assert!(v["loss_pct"].as_f64().expect("loss") < 2.0, "{v}");
    })
    .await;
}
