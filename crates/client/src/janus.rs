//! Janus's VideoRoom plugin over its WebSocket API (bench/janus/README.md has the request
//! sequence, verified against Debian's Janus 1.1.2): one session per user with a publisher
//! handle (peer 0, when the user sends anything) and a multistream subscriber handle (peer 1)
//! that receives every other publisher of the room.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::media::{MediaUser, SigCmd, SigEvent};
use crate::{ClientConfig, ClientStats};

const PLUGIN: &str = "janus.plugin.videoroom";
const KEEPALIVE: Duration = Duration::from_secs(25);
/// Active publishers a room allows (Janus's default is 3).
const ROOM_PUBLISHERS: u32 = 1_000;
const PUBLISHER: usize = 0;
const SUBSCRIBER: usize = 1;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) async fn run(
    cfg: ClientConfig,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<ClientStats> {
    let started = Instant::now();
    let mut request = cfg.url.as_str().into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "janus-protocol".parse().context("subprotocol header")?,
    );
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("connecting to {}", cfg.url))?;
    let server = crate::resolve(&cfg.url).await?;
    // Janus never gathers candidates on loopback (bench/janus/README.md): with Janus on this
    // machine, media goes to the address of the default route, so bind there too.
    let towards = if server.ip().is_loopback() {
        std::net::IpAddr::from([203, 0, 113, 1])
    } else {
        server.ip()
    };
    let user = MediaUser::bind(crate::bind_ip_towards(towards)?, started).await?;
    let mut janus = Janus {
        ws,
        session: 0,
        room: cfg.room_number,
        next_tx: 0,
        stash: VecDeque::new(),
    };
    let (publisher, subscriber, feeds) = janus.setup(&cfg).await?;
    let publish = cfg.send_audio || cfg.send_video || cfg.send_screen;
    let (ev_tx, ev_rx) = mpsc::channel(16);
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let signaling = tokio::spawn(async move {
        let result = janus
            .signal(publisher, subscriber, feeds, ev_tx.clone(), cmd_rx)
            .await;
        if let Err(err) = &result {
            let _ = ev_tx.send(SigEvent::Fatal(format!("{err:#}"))).await;
        }
        result
    });
    let result = user.run(&cfg, publish, false, ev_rx, cmd_tx, stop).await;
    if tokio::time::timeout(Duration::from_secs(2), signaling)
        .await
        .is_err()
    {
        tracing::debug!(user = %cfg.name, "janus signaling did not close in time");
    }
    result
}

struct Janus {
    ws: Ws,
    session: u64,
    room: u64,
    next_tx: u64,
    /// Messages that arrived while waiting for a reply.
    stash: VecDeque<Value>,
}

/// The plugin's answer inside an event or success, and its error if it is one.
fn plugin_data(v: &Value) -> &Value {
    &v["plugindata"]["data"]
}

fn plugin_error(v: &Value) -> Option<(u64, String)> {
    let d = plugin_data(v);
    d["error_code"]
        .as_u64()
        .map(|c| (c, d["error"].as_str().unwrap_or_default().to_string()))
}

fn feed_ids(list: &Value) -> impl Iterator<Item = u64> + '_ {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
}

impl Janus {
    /// Sends a request (adding the transaction and session); returns the transaction.
    async fn send(&mut self, mut msg: Value) -> anyhow::Result<String> {
        self.next_tx += 1;
        let tx = format!("t{}", self.next_tx);
        msg["transaction"] = json!(tx);
        if self.session != 0 {
            msg["session_id"] = json!(self.session);
        }
        self.ws.send(Message::Text(msg.to_string().into())).await?;
        Ok(tx)
    }

    async fn next_message(&mut self) -> anyhow::Result<Value> {
        loop {
            let Some(msg) = self.ws.next().await else {
                bail!("Janus closed the connection");
            };
            match msg? {
                Message::Text(text) => {
                    tracing::trace!(%text, "from Janus");
                    return Ok(serde_json::from_str(&text)?);
                }
                Message::Close(_) => bail!("Janus closed the connection"),
                _ => {}
            }
        }
    }

    /// Sends a request and waits for its result (not the `ack`), stashing other messages.
    async fn call(&mut self, msg: Value) -> anyhow::Result<Value> {
        let tx = self.send(msg).await?;
        loop {
            let v = self.next_message().await?;
            if v["transaction"].as_str() == Some(tx.as_str()) && v["janus"] != "ack" {
                if v["janus"] == "error" {
                    bail!("Janus: {}", v["error"]);
                }
                return Ok(v);
            }
            self.stash.push_back(v);
        }
    }

    fn message(handle: u64, body: Value) -> Value {
        json!({"janus": "message", "handle_id": handle, "body": body})
    }

    /// Session, both handles, the room (created by whoever comes first) and the publisher's
    /// join; returns the handles and the feeds already publishing.
    async fn setup(&mut self, cfg: &ClientConfig) -> anyhow::Result<(u64, u64, HashSet<u64>)> {
        let created = self.call(json!({"janus": "create"})).await?;
        self.session = created["data"]["id"].as_u64().context("no session id")?;
        let mut handles = [0u64; 2];
        for h in &mut handles {
            let attached = self
                .call(json!({"janus": "attach", "plugin": PLUGIN}))
                .await?;
            *h = attached["data"]["id"].as_u64().context("no handle id")?;
        }
        let [publisher, subscriber] = handles;
        let join = json!({"request": "join", "ptype": "publisher", "room": cfg.room_number, "display": cfg.name});
        let mut joined = self.call(Self::message(publisher, join.clone())).await?;
        if let Some((426, _)) = plugin_error(&joined) {
            let create = json!({"request": "create", "room": cfg.room_number,
                "publishers": ROOM_PUBLISHERS, "description": cfg.room});
            let created = self.call(Self::message(publisher, create)).await?;
            match plugin_error(&created) {
                None | Some((427, _)) => {}
                Some((code, why)) => bail!("Janus refused to create the room: {code} {why}"),
            }
            joined = self.call(Self::message(publisher, join)).await?;
        }
        if let Some((code, why)) = plugin_error(&joined) {
            bail!("Janus refused the join: {code} {why}");
        }
        let feeds = feed_ids(&plugin_data(&joined)["publishers"]).collect();
        Ok((publisher, subscriber, feeds))
    }

    async fn signal(
        &mut self,
        publisher: u64,
        subscriber: u64,
        mut feeds: HashSet<u64>,
        events: mpsc::Sender<SigEvent>,
        mut cmds: mpsc::Receiver<SigCmd>,
    ) -> anyhow::Result<()> {
        let mut subscribed: HashSet<u64> = HashSet::new();
        let mut sub_joined = false;
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        loop {
            // Subscribe to feeds not yet subscribed.
            let new: Vec<u64> = feeds.difference(&subscribed).copied().collect();
            if !new.is_empty() {
                let streams: Vec<Value> = new.iter().map(|f| json!({"feed": f})).collect();
                let body = if sub_joined {
                    json!({"request": "subscribe", "streams": streams})
                } else {
                    json!({"request": "join", "ptype": "subscriber", "room": self.room, "streams": streams})
                };
                self.send(Self::message(subscriber, body)).await?;
                sub_joined = true;
                subscribed.extend(new);
            }
            let v = if let Some(v) = self.stash.pop_front() {
                v
            } else {
                tokio::select! {
                    cmd = cmds.recv() => {
                        let Some(cmd) = cmd else { break };
                        match cmd {
                            SigCmd::Offer { peer, sdp, .. } => {
                                debug_assert_eq!(peer, PUBLISHER);
                                let mut m = Self::message(publisher, json!({"request": "publish"}));
                                m["jsep"] = json!({"type": "offer", "sdp": sdp, "trickle": false});
                                self.send(m).await?;
                            }
                            SigCmd::Answer { peer, sdp, .. } => {
                                debug_assert_eq!(peer, SUBSCRIBER);
                                let mut m = Self::message(subscriber, json!({"request": "start"}));
                                m["jsep"] = json!({"type": "answer", "sdp": sdp, "trickle": false});
                                self.send(m).await?;
                            }
                        }
                        continue;
                    }
                    _ = keepalive.tick() => {
                        self.send(json!({"janus": "keepalive"})).await?;
                        continue;
                    }
                    v = self.next_message() => v?,
                }
            };
            let sender = v["sender"].as_u64();
            match v["janus"].as_str() {
                Some("event") => {}
                Some("hangup") => bail!("Janus hung up: {}", v["reason"]),
                Some("timeout") => bail!("Janus timed the session out"),
                _ => continue,
            }
            let data = plugin_data(&v);
            if let Some((code, why)) = plugin_error(&v) {
                // A feed that left before we subscribed (428) is not an error of ours.
                if code != 428 {
                    tracing::warn!(code, why, "Janus error");
                }
                continue;
            }
            if sender == Some(publisher) {
                feeds.extend(feed_ids(&data["publishers"]));
                for key in ["unpublished", "leaving"] {
                    if let Some(id) = data[key].as_u64() {
                        feeds.remove(&id);
                        subscribed.remove(&id);
                    }
                }
                if v["jsep"]["type"] == "answer" {
                    let sdp = v["jsep"]["sdp"].as_str().unwrap_or_default().to_string();
                    events
                        .send(SigEvent::Answer {
                            peer: PUBLISHER,
                            sdp,
                        })
                        .await?;
                }
            } else if sender == Some(subscriber) && v["jsep"]["type"] == "offer" {
                let sdp = v["jsep"]["sdp"].as_str().unwrap_or_default().to_string();
                events
                    .send(SigEvent::Offer {
                        peer: SUBSCRIBER,
                        sdp,
                        tag: Value::Null,
                    })
                    .await?;
            }
        }
        let _ = self.send(json!({"janus": "destroy"})).await;
        let _ = self.ws.close(None).await;
        Ok(())
    }
}
