//! Parley's signaling: the JSON protocol of docs/protocol.md over one WebSocket, one
//! PeerConnection per user (the user offers its tracks; Parley offers the others').

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::media::{MediaUser, SigCmd, SigEvent};
use crate::{ClientConfig, ClientStats};

pub(crate) async fn run(
    cfg: ClientConfig,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<ClientStats> {
    let started = Instant::now();
    let (ws, _) = tokio_tungstenite::connect_async(&cfg.url)
        .await
        .with_context(|| format!("connecting to {}", cfg.url))?;
    let server = crate::resolve(&cfg.url).await?;
    let user = MediaUser::bind(crate::bind_ip_towards(server.ip())?, started).await?;
    let (ev_tx, ev_rx) = mpsc::channel(16);
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let signaling = tokio::spawn(signal(ws, cfg.clone(), ev_tx, cmd_rx));
    let result = user.run(&cfg, true, true, ev_rx, cmd_tx, stop).await;
    // The media side dropped its command sender: the signaling task says goodbye and ends.
    if tokio::time::timeout(Duration::from_secs(2), signaling)
        .await
        .is_err()
    {
        tracing::debug!(user = %cfg.name, "signaling did not close in time");
    }
    result
}

/// How often a quiet signaling connection says something.
const KEEPALIVE: Duration = Duration::from_secs(10);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn signal(
    mut ws: Ws,
    cfg: ClientConfig,
    events: mpsc::Sender<SigEvent>,
    mut cmds: mpsc::Receiver<SigCmd>,
) -> anyhow::Result<()> {
    let mut seq = 0u64;
    let mut last_in = 0u64;
    let mut frame = |mut m: Value, last_in: u64| {
        seq += 1;
        m["seq"] = json!(seq);
        m["ack"] = json!(last_in);
        Message::Text(m.to_string().into())
    };
    // A muted user says so in its join, as the browser SDK does: the server offers the others
    // its microphone (and camera) with its first offer unless told they are muted.
    let join = json!({"type": "join", "room": cfg.room, "name": cfg.name,
        "audio_muted": !cfg.send_audio, "video_muted": !cfg.send_video});
    ws.send(frame(join, last_in)).await?;
    // The server closes a connection that says nothing for 30 s; a user of a quiet call has
    // nothing to answer for longer than that.
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.reset();
    loop {
        tokio::select! {
            _ = keepalive.tick() => {
                ws.send(Message::Text(json!({"type": "ping"}).to_string().into())).await?;
            }
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { break };
                let msg = match cmd {
                    SigCmd::Offer { sdp, screen_mid, .. } => {
                        let tracks: serde_json::Map<String, Value> = screen_mid
                            .into_iter()
                            .map(|m| (m, json!("screen")))
                            .collect();
                        json!({"type": "offer", "sdp": sdp, "tracks": tracks})
                    }
                    SigCmd::Answer { sdp, tag, .. } => json!({"type": "answer", "id": tag, "sdp": sdp}),
                };
                ws.send(frame(msg, last_in)).await?;
            }
            msg = ws.next() => {
                let Some(Ok(msg)) = msg else {
                    let _ = events.send(SigEvent::Fatal("signaling connection closed".into())).await;
                    break;
                };
                let Message::Text(text) = msg else { continue };
                let v: Value = serde_json::from_str(&text)?;
                if let Some(s) = v["seq"].as_u64() {
                    last_in = last_in.max(s);
                }
                let sdp = || v["sdp"].as_str().unwrap_or_default().to_string();
                let ev = match v["type"].as_str() {
                    Some("answer") => Some(SigEvent::Answer { peer: 0, sdp: sdp() }),
                    Some("offer") => Some(SigEvent::Offer { peer: 0, sdp: sdp(), tag: v["id"].clone() }),
                    Some("error") => Some(SigEvent::Fatal(format!("Parley refused: {}", v["message"]))),
                    _ => None,
                };
                if let Some(ev) = ev && events.send(ev).await.is_err() {
                    break;
                }
                if v["seq"].is_u64() {
                    ws.send(Message::Text(json!({"type": "ack", "ack": last_in}).to_string().into())).await?;
                }
            }
        }
    }
    let _ = ws.send(frame(json!({"type": "leave"}), last_in)).await;
    let _ = ws.close(None).await;
    Ok(())
}
