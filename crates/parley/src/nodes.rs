//! Dedicated media nodes (the *split* mode).
//!
//! A media node (`parley media`) runs the media plane of [`crate::media`] and dials out to the
//! signaling server's `/media-node` WebSocket (`Authorization: Bearer <node_secret>`). It sends
//! a [`NodeMsg::Hello`] first, then every [`MediaEvent`] as JSON text, and applies every
//! [`MediaCommand`] it receives; on SIGTERM it says [`NodeMsg::Draining`] and exits once its
//! sessions have ended.
//!
//! On the signaling side, [`router`] presents the same [`MediaPlane`] to the hub as the local
//! media plane does: a room is placed on the connected node with the fewest sessions at its
//! first offer and stays there; every command for a session goes to that session's node; the
//! events of all nodes merge into one channel. When a node goes away, each of its sessions gets
//! [`MediaEvent::Closed`]. The placement itself is the sans-IO [`Router`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use parley_proto::media::{MediaCommand, MediaEvent, SessionId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite;

use crate::config::Config;
use crate::media::MediaPlane;
use crate::metrics::Metrics;

/// Largest message on a node link (an SDP with many m-lines is tens of KB).
pub const MAX_MESSAGE: usize = 16 << 20;
/// Signaling pings every node this often...
const PING_EVERY: Duration = Duration::from_secs(2);
/// ...and either side drops a link that carried nothing for this long (a node that vanished
/// without closing its connection: power lost, network cut, process frozen), or on which a
/// send could not be handed to the kernel for as long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(6);
/// A node must say hello this soon after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A link that lasted this long starts the backoff over.
const STABLE_LINK: Duration = Duration::from_secs(10);

/// Node → signaling messages besides the [`MediaEvent`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeMsg {
    /// The first message of a link.
    Hello { node: String, version: String },
    /// The node is shutting down: place no new rooms on it; its calls go on.
    Draining,
}

/// Why an offer cannot be placed.
pub const NO_NODE: &str = "no media node is available";

/// One node link on the signaling side (a new one for every connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeKey(pub u64);

#[derive(Debug)]
struct NodeState {
    name: String,
    sessions: usize,
    draining: bool,
}

#[derive(Debug)]
struct Placement {
    node: NodeKey,
    room: String,
}

#[derive(Debug)]
struct RoomPlacement {
    node: NodeKey,
    sessions: usize,
}

/// Where a command goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Node(NodeKey, MediaCommand),
    /// Answered here, without a node.
    Hub(MediaEvent),
    /// For a session no node has (it ended already): nothing to do.
    Nowhere,
}

/// Room and session placement over the connected media nodes (sans-IO).
#[derive(Debug, Default)]
pub struct Router {
    nodes: BTreeMap<NodeKey, NodeState>,
    sessions: HashMap<SessionId, Placement>,
    rooms: HashMap<String, RoomPlacement>,
}

impl Router {
    /// A node said hello. A link of the same name that is still here is a stale one of the
    /// same node (it reconnected before the old link timed out): it is returned, already
    /// removed, with the `Closed` events of its sessions.
    pub fn node_up(&mut self, key: NodeKey, name: &str) -> Option<(NodeKey, Vec<MediaEvent>)> {
        let stale = self
            .nodes
            .iter()
            .find(|(_, n)| n.name == name)
            .map(|(k, _)| *k);
        let replaced = stale.map(|old| (old, self.node_down(old)));
        self.nodes.insert(
            key,
            NodeState {
                name: name.to_string(),
                sessions: 0,
                draining: false,
            },
        );
        replaced
    }

    pub fn node_draining(&mut self, key: NodeKey) {
        if let Some(n) = self.nodes.get_mut(&key) {
            n.draining = true;
        }
    }

    /// The node is gone: `Closed` for each of its sessions, in session order.
    pub fn node_down(&mut self, key: NodeKey) -> Vec<MediaEvent> {
        if self.nodes.remove(&key).is_none() {
            return Vec::new();
        }
        self.rooms.retain(|_, r| r.node != key);
        let mut lost: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, p)| p.node == key)
            .map(|(s, _)| *s)
            .collect();
        lost.sort();
        for s in &lost {
            self.sessions.remove(s);
        }
        lost.into_iter()
            .map(|session| MediaEvent::Closed { session })
            .collect()
    }

    pub fn command(&mut self, cmd: MediaCommand) -> Route {
        let session = match &cmd {
            MediaCommand::Offer { session, .. }
            | MediaCommand::View { session, .. }
            | MediaCommand::Mute { session, .. }
            | MediaCommand::Answer { session, .. }
            | MediaCommand::Close { session } => *session,
        };
        if let Some(p) = self.sessions.get(&session) {
            let node = p.node;
            if matches!(cmd, MediaCommand::Close { .. }) {
                self.forget(session);
            }
            return Route::Node(node, cmd);
        }
        let MediaCommand::Offer { room, .. } = &cmd else {
            return Route::Nowhere;
        };
        let node = match self.rooms.get(room) {
            Some(r) => r.node,
            None => {
                let least = self
                    .nodes
                    .iter()
                    .filter(|(_, n)| !n.draining)
                    .min_by_key(|(k, n)| (n.sessions, **k))
                    .map(|(k, _)| *k);
                let Some(node) = least else {
                    return Route::Hub(MediaEvent::SdpRejected {
                        session,
                        reason: NO_NODE.into(),
                    });
                };
                self.rooms
                    .insert(room.clone(), RoomPlacement { node, sessions: 0 });
                node
            }
        };
        if let Some(r) = self.rooms.get_mut(room) {
            r.sessions += 1;
        }
        if let Some(n) = self.nodes.get_mut(&node) {
            n.sessions += 1;
        }
        self.sessions.insert(
            session,
            Placement {
                node,
                room: room.clone(),
            },
        );
        Route::Node(node, cmd)
    }

    /// An event from node `from`, passed on if it is about one of that node's sessions.
    pub fn event(&mut self, from: NodeKey, ev: MediaEvent) -> Option<MediaEvent> {
        let session = ev.session();
        if self.sessions.get(&session).map(|p| p.node) != Some(from) {
            return None;
        }
        if matches!(ev, MediaEvent::Closed { .. }) {
            self.forget(session);
        }
        Some(ev)
    }

    fn forget(&mut self, session: SessionId) {
        let Some(p) = self.sessions.remove(&session) else {
            return;
        };
        if let Some(n) = self.nodes.get_mut(&p.node) {
            n.sessions = n.sessions.saturating_sub(1);
        }
        if let Some(r) = self.rooms.get_mut(&p.room) {
            r.sessions = r.sessions.saturating_sub(1);
            if r.sessions == 0 {
                self.rooms.remove(&p.room);
            }
        }
    }

    /// Connected nodes: name and number of sessions.
    pub fn load(&self) -> impl Iterator<Item = (&str, usize)> {
        self.nodes.values().map(|n| (n.name.as_str(), n.sessions))
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
}

// ---- signaling side -------------------------------------------------------------------------

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

/// The router's own series, added to signaling's `/metrics`.
struct NodeMetrics {
    registry: Registry,
    nodes: Gauge,
    sessions: Family<NodeLabel, Gauge>,
}

impl NodeMetrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let nodes = Gauge::default();
        let sessions = Family::<NodeLabel, Gauge>::default();
        let p = registry.sub_registry_with_prefix("parley");
        p.register("media_nodes", "Connected media nodes", nodes.clone());
        p.register(
            "media_node_sessions",
            "Media sessions placed on each connected media node",
            sessions.clone(),
        );
        NodeMetrics {
            registry,
            nodes,
            sessions,
        }
    }

    fn update(&self, router: &Router) {
        self.nodes.set(router.nodes.len() as i64);
        self.sessions.clear();
        for (node, n) in router.load() {
            self.sessions
                .get_or_create(&NodeLabel { node: node.into() })
                .set(n as i64);
        }
    }
}

enum RouterIn {
    Up {
        key: NodeKey,
        name: String,
        link: mpsc::UnboundedSender<MediaCommand>,
    },
    Draining(NodeKey),
    Event(NodeKey, MediaEvent),
    Down(NodeKey),
}

/// What the `/media-node` route needs: the secret and the way to the router.
#[derive(Clone)]
pub struct NodeAcceptor {
    inbox: mpsc::UnboundedSender<RouterIn>,
    secret: Arc<str>,
    next_key: Arc<AtomicU64>,
    metrics: Arc<NodeMetrics>,
}

impl NodeAcceptor {
    /// Compares in constant time: the answer must not tell how much of the secret matched.
    pub fn is_secret(&self, candidate: &str) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(
            self.secret.as_bytes(),
            candidate.as_bytes(),
        )
        .is_ok()
    }

    /// Adds the media node series to an OpenMetrics text (before its `# EOF`).
    pub fn add_metrics(&self, text: &mut String) {
        let mut own = String::new();
        if let Err(err) =
            prometheus_client::encoding::text::encode(&mut own, &self.metrics.registry)
        {
            tracing::warn!(%err, "cannot encode the media node metrics");
            return;
        }
        let own = own.strip_suffix("# EOF\n").unwrap_or(&own);
        match text.rfind("# EOF") {
            Some(i) => text.insert_str(i, own),
            None => text.push_str(own),
        }
    }
}

/// Starts the router: the hub gets a [`MediaPlane`], the HTTP server the [`NodeAcceptor`].
pub fn router(secret: String, metrics: Arc<Metrics>) -> (MediaPlane, NodeAcceptor) {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let node_metrics = Arc::new(NodeMetrics::new());
    tokio::spawn(router_loop(
        cmd_rx,
        in_rx,
        ev_tx,
        node_metrics.clone(),
        metrics,
    ));
    (
        MediaPlane {
            commands: cmd_tx,
            events: ev_rx,
        },
        NodeAcceptor {
            inbox: in_tx,
            secret: secret.into(),
            next_key: Arc::new(AtomicU64::new(1)),
            metrics: node_metrics,
        },
    )
}

async fn router_loop(
    mut commands: mpsc::UnboundedReceiver<MediaCommand>,
    mut inbox: mpsc::UnboundedReceiver<RouterIn>,
    events: mpsc::UnboundedSender<MediaEvent>,
    node_metrics: Arc<NodeMetrics>,
    metrics: Arc<Metrics>,
) {
    let mut router = Router::default();
    let mut links: HashMap<NodeKey, mpsc::UnboundedSender<MediaCommand>> = HashMap::new();
    let mut to_hub: Vec<MediaEvent> = Vec::new();
    node_metrics.update(&router);
    loop {
        tokio::select! {
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                match router.command(cmd) {
                    Route::Node(key, cmd) => {
                        // A link that just went away: its Down is on the way.
                        if let Some(link) = links.get(&key) {
                            let _ = link.send(cmd);
                        }
                    }
                    Route::Hub(ev) => {
                        tracing::warn!(session = %ev.session(), "{NO_NODE}: offer refused");
                        to_hub.push(ev);
                    }
                    Route::Nowhere => {}
                }
            }
            msg = inbox.recv() => {
                let Some(msg) = msg else { break };
                match msg {
                    RouterIn::Up { key, name, link } => {
                        if let Some((old, closed)) = router.node_up(key, &name) {
                            tracing::warn!(node = %name, sessions = closed.len(),
                                "media node connected again; its previous link and sessions are dropped");
                            links.remove(&old);
                            to_hub.extend(closed);
                        }
                        links.insert(key, link);
                    }
                    RouterIn::Draining(key) => router.node_draining(key),
                    RouterIn::Event(key, ev) => match router.event(key, ev) {
                        Some(ev) => to_hub.push(ev),
                        None => tracing::debug!("event from a media node for a session it does not have; ignored"),
                    },
                    RouterIn::Down(key) => {
                        if links.remove(&key).is_some() {
                            let closed = router.node_down(key);
                            if !closed.is_empty() {
                                tracing::warn!(sessions = closed.len(), "media node lost: its sessions are closed");
                            }
                            to_hub.extend(closed);
                        }
                    }
                }
            }
        }
        for ev in to_hub.drain(..) {
            if events.send(ev).is_err() {
                return;
            }
        }
        node_metrics.update(&router);
        metrics.sessions_active.set(router.session_count() as i64);
    }
}

/// What a node may send after its hello.
enum FromNode {
    Event(MediaEvent),
    Control(NodeMsg),
}

fn parse_from_node(text: &str) -> Result<FromNode, serde_json::Error> {
    match serde_json::from_str::<MediaEvent>(text) {
        Ok(ev) => Ok(FromNode::Event(ev)),
        Err(err) => serde_json::from_str::<NodeMsg>(text)
            .map(FromNode::Control)
            .map_err(|_| err),
    }
}

fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// One media node's link, on the signaling side (after the secret was checked).
pub async fn serve_node(mut socket: WebSocket, nodes: NodeAcceptor) {
    let hello = tokio::time::timeout(HELLO_TIMEOUT, socket.recv()).await;
    let (name, version) = match hello {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<NodeMsg>(&t) {
            Ok(NodeMsg::Hello { node, version }) if valid_node_id(&node) => (node, version),
            _ => {
                tracing::warn!("a media node did not start with a valid hello; closing");
                close(&mut socket, 1008, "expected a hello with a valid node id").await;
                return;
            }
        },
        _ => {
            tracing::warn!("a media node sent no hello in time; closing");
            return;
        }
    };
    let key = NodeKey(nodes.next_key.fetch_add(1, Ordering::Relaxed));
    let (link_tx, mut link_rx) = mpsc::unbounded_channel();
    let up = RouterIn::Up {
        key,
        name: name.clone(),
        link: link_tx,
    };
    if nodes.inbox.send(up).is_err() {
        return;
    }
    tracing::info!(node = %name, %version, "media node connected");
    let mut ping = tokio::time::interval(PING_EVERY);
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            incoming = socket.recv() => {
                let msg = match incoming {
                    Some(Ok(m)) => m,
                    Some(Err(err)) => {
                        tracing::info!(node = %name, %err, "media node link failed");
                        break;
                    }
                    None => break,
                };
                idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                let to_router = match msg {
                    Message::Text(t) => match parse_from_node(&t) {
                        Ok(FromNode::Event(ev)) => RouterIn::Event(key, ev),
                        Ok(FromNode::Control(NodeMsg::Draining)) => {
                            tracing::info!(node = %name, "media node is draining: no new rooms on it");
                            RouterIn::Draining(key)
                        }
                        Ok(FromNode::Control(NodeMsg::Hello { .. })) => {
                            tracing::warn!(node = %name, "second hello from a media node; ignored");
                            continue;
                        }
                        Err(err) => {
                            tracing::warn!(node = %name, %err, "malformed message from a media node; ignored");
                            continue;
                        }
                    },
                    Message::Binary(_) => {
                        tracing::warn!(node = %name, "binary message from a media node; ignored");
                        continue;
                    }
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => continue,
                };
                if nodes.inbox.send(to_router).is_err() {
                    break;
                }
            }
            cmd = link_rx.recv() => {
                let Some(cmd) = cmd else {
                    close(&mut socket, 1000, "replaced by a newer link of this node").await;
                    break;
                };
                let text = match serde_json::to_string(&cmd) {
                    Ok(t) => t,
                    Err(err) => {
                        tracing::error!(%err, "cannot serialize a media command");
                        continue;
                    }
                };
                if let Err(err) = bounded(socket.send(Message::Text(text.into()))).await {
                    tracing::warn!(node = %name, %err, "sending to a media node failed");
                    break;
                }
            }
            _ = ping.tick() => {
                if let Err(err) = bounded(socket.send(Message::Ping(bytes::Bytes::new()))).await {
                    tracing::warn!(node = %name, %err, "sending to a media node failed");
                    break;
                }
            }
            _ = &mut idle => {
                tracing::warn!(node = %name, "media node silent for {IDLE_TIMEOUT:?}; dropping its link");
                break;
            }
        }
    }
    let _ = nodes.inbox.send(RouterIn::Down(key));
    tracing::info!(node = %name, "media node disconnected");
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

// ---- media node side ------------------------------------------------------------------------

#[derive(Default)]
struct NodeStatus {
    connected: AtomicBool,
    draining: AtomicBool,
}

#[derive(Clone)]
struct NodeHttp {
    status: Arc<NodeStatus>,
    metrics: Arc<Metrics>,
}

/// This host's name, as a node id.
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let id: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if id.is_empty() { "media".into() } else { id }
}

/// How a link to signaling ended.
enum LinkEnd {
    /// Drained, or told to stop: exit.
    Exit,
    /// The link dropped: connect again.
    Lost(String),
}

type NodeSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

enum ConnectError {
    /// Signaling answered 401: the secret is wrong; retrying will not help.
    Refused(u16),
    Other(String),
}

async fn connect(url: &str, secret: &str) -> Result<NodeSocket, ConnectError> {
    use tungstenite::client::IntoClientRequest;
    let mut req = url
        .into_client_request()
        .map_err(|e| ConnectError::Other(e.to_string()))?;
    let auth = tungstenite::http::HeaderValue::from_str(&format!("Bearer {secret}"))
        .map_err(|_| ConnectError::Other("node_secret is not a valid header value".into()))?;
    req.headers_mut().insert(header::AUTHORIZATION, auth);
    let attempt = tokio_tungstenite::connect_async(req);
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tungstenite::Error::Http(resp)))
            if resp.status() == StatusCode::UNAUTHORIZED
                || resp.status() == StatusCode::NOT_FOUND =>
        {
            Err(ConnectError::Refused(resp.status().as_u16()))
        }
        Ok(Err(err)) => Err(ConnectError::Other(err.to_string())),
        Err(_) => Err(ConnectError::Other("no answer within 10 s".into())),
    }
}

/// Runs a dedicated media node around a started media plane: its HTTP endpoints, and the link
/// to signaling, reconnected with backoff.
pub async fn run_node(
    config: Config,
    mut media: MediaPlane,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let url = config
        .signaling_url
        .clone()
        .context("signaling_url: required by a media node")?;
    let secret = config
        .node_secret
        .clone()
        .context("node_secret: required by a media node")?;
    let node_id = config.node_id.clone().unwrap_or_else(host_name);
    let grace = Duration::from_secs(config.drain_grace_secs);
    let status = Arc::new(NodeStatus::default());

    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("binding the HTTP address {}", config.http))?;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(node_readyz))
        .route("/metrics", get(node_metrics))
        .with_state(NodeHttp {
            status: status.clone(),
            metrics,
        });
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "HTTP server failed");
        }
    });
    tracing::info!(node = %node_id, signaling = %url, http = %config.http, "media node");

    let (sig_tx, mut signals) = mpsc::unbounded_channel();
    tokio::spawn(forward_signals(sig_tx));

    let mut sessions: BTreeSet<SessionId> = BTreeSet::new();
    let mut backoff = BACKOFF_MIN;
    loop {
        match connect(&url, &secret).await {
            Ok(ws) => {
                status.connected.store(true, Ordering::Relaxed);
                tracing::info!(signaling = %url, "connected to signaling");
                let started = tokio::time::Instant::now();
                let end = link(
                    ws,
                    &node_id,
                    &mut media,
                    &mut sessions,
                    &mut signals,
                    &status,
                    grace,
                )
                .await?;
                status.connected.store(false, Ordering::Relaxed);
                close_all(&media, &mut sessions);
                match end {
                    LinkEnd::Exit => return Ok(()),
                    LinkEnd::Lost(why) => {
                        tracing::warn!(%why, "link to signaling lost; its sessions are closed")
                    }
                }
                if started.elapsed() >= STABLE_LINK {
                    backoff = BACKOFF_MIN;
                }
            }
            Err(ConnectError::Refused(code)) => {
                anyhow::bail!(
                    "signaling at {url} refused this media node (HTTP {code}): check node_secret, \
                     and that signaling runs with local_media = false"
                );
            }
            Err(ConnectError::Other(err)) => {
                tracing::warn!(%err, retry_in = ?backoff, "cannot reach signaling at {url}");
            }
        }
        // Wait, dropping what the media plane still says about the sessions just closed.
        let wake = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                ev = media.events.recv() => {
                    if ev.is_none() {
                        anyhow::bail!("the media plane stopped");
                    }
                }
                _ = signals.recv() => {
                    tracing::info!("signal while not connected: exiting");
                    return Ok(());
                }
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection to signaling, until it drops or the node has drained.
async fn link(
    mut ws: NodeSocket,
    node_id: &str,
    media: &mut MediaPlane,
    sessions: &mut BTreeSet<SessionId>,
    signals: &mut mpsc::UnboundedReceiver<()>,
    status: &NodeStatus,
    grace: Duration,
) -> anyhow::Result<LinkEnd> {
    let hello = NodeMsg::Hello {
        node: node_id.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    if let Err(err) = send_json(&mut ws, &hello).await {
        return Ok(LinkEnd::Lost(err));
    }
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    let drain_end = tokio::time::sleep(Duration::from_secs(365 * 86400));
    tokio::pin!(drain_end);
    let mut draining = false;
    loop {
        tokio::select! {
            msg = ws.next() => {
                let msg = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(err)) => return Ok(LinkEnd::Lost(err.to_string())),
                    None => return Ok(LinkEnd::Lost("closed by signaling".into())),
                };
                idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                match msg {
                    tungstenite::Message::Text(t) => match serde_json::from_str::<MediaCommand>(&t) {
                        Ok(cmd) => {
                            match &cmd {
                                MediaCommand::Offer { session, .. } => {
                                    sessions.insert(*session);
                                }
                                MediaCommand::Close { session } => {
                                    sessions.remove(session);
                                }
                                MediaCommand::View { .. }
                                | MediaCommand::Mute { .. }
                                | MediaCommand::Answer { .. } => {}
                            }
                            if media.commands.send(cmd).is_err() {
                                anyhow::bail!("the media plane stopped");
                            }
                        }
                        Err(err) => tracing::warn!(%err, "malformed command from signaling; ignored"),
                    },
                    tungstenite::Message::Close(_) => {
                        return Ok(LinkEnd::Lost("closed by signaling".into()));
                    }
                    tungstenite::Message::Binary(_) => {
                        tracing::warn!("binary message from signaling; ignored");
                    }
                    _ => {}
                }
            }
            ev = media.events.recv() => {
                let Some(ev) = ev else { anyhow::bail!("the media plane stopped") };
                if let MediaEvent::Closed { session } = &ev {
                    sessions.remove(session);
                }
                let text = serde_json::to_string(&ev).context("serializing a media event")?;
                if let Err(err) = bounded(ws.send(tungstenite::Message::Text(text.into()))).await {
                    return Ok(LinkEnd::Lost(err));
                }
            }
            _ = signals.recv() => {
                if draining {
                    tracing::info!("second signal: exiting now");
                    return Ok(LinkEnd::Exit);
                }
                draining = true;
                status.draining.store(true, Ordering::Relaxed);
                tracing::info!(?grace, sessions = sessions.len(), "draining: no new rooms here; existing calls go on");
                if let Err(err) = send_json(&mut ws, &NodeMsg::Draining).await {
                    return Ok(LinkEnd::Lost(err));
                }
                drain_end.as_mut().reset(tokio::time::Instant::now() + grace);
            }
            _ = &mut drain_end, if draining => {
                tracing::info!("drain grace period over: exiting");
                return Ok(LinkEnd::Exit);
            }
            _ = &mut idle => {
                return Ok(LinkEnd::Lost(format!("no message from signaling for {IDLE_TIMEOUT:?}")));
            }
        }
        if draining && sessions.is_empty() {
            tracing::info!("drained: the last session has ended");
            let _ = ws.close(None).await;
            return Ok(LinkEnd::Exit);
        }
    }
}

async fn send_json(ws: &mut NodeSocket, msg: &impl Serialize) -> Result<(), String> {
    let text = serde_json::to_string(msg).map_err(|e| e.to_string())?;
    bounded(ws.send(tungstenite::Message::Text(text.into()))).await
}

/// A send on a node link, given up after [`IDLE_TIMEOUT`]: toward a peer that stopped reading
/// (frozen, or cut off without a reset), it would otherwise wait as long as TCP retransmits,
/// and the link's idle check with it.
async fn bounded<E: std::fmt::Display>(
    send: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(IDLE_TIMEOUT, send).await {
        Ok(res) => res.map_err(|e| e.to_string()),
        Err(_) => Err(format!("the peer took nothing for {IDLE_TIMEOUT:?}")),
    }
}

/// Closes every session locally: signaling has failed them over already.
fn close_all(media: &MediaPlane, sessions: &mut BTreeSet<SessionId>) {
    for session in std::mem::take(sessions) {
        let _ = media.commands.send(MediaCommand::Close { session });
    }
}

/// Sends `()` at every SIGTERM or Ctrl-C.
async fn forward_signals(tx: mpsc::UnboundedSender<()>) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(%err, "cannot watch SIGTERM");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        if tx.send(()).is_err() {
            return;
        }
    }
}

async fn node_readyz(State(http): State<NodeHttp>) -> Response {
    if http.status.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !http.status.connected.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to signaling\n",
        )
            .into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn node_metrics(State(http): State<NodeHttp>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        http.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(session: u64, room: &str) -> MediaCommand {
        MediaCommand::Offer {
            session: SessionId(session),
            room: room.into(),
            stream_id: format!("p{session}"),
            sdp: "v=0".into(),
            screen_mids: Vec::new(),
            can_publish: true,
            can_subscribe: true,
        }
    }

    fn node_of(route: Route) -> NodeKey {
        match route {
            Route::Node(k, _) => k,
            other => panic!("expected a node, got {other:?}"),
        }
    }

    const A: NodeKey = NodeKey(1);
    const B: NodeKey = NodeKey(2);

    #[test]
    fn rooms_go_to_the_least_loaded_node_and_stay_there() {
        let mut r = Router::default();
        assert!(r.node_up(A, "a").is_none());
        assert!(r.node_up(B, "b").is_none());
        assert_eq!(node_of(r.command(offer(1, "x"))), A);
        assert_eq!(node_of(r.command(offer(2, "x"))), A);
        assert_eq!(node_of(r.command(offer(3, "y"))), B);
        assert_eq!(node_of(r.command(offer(4, "z"))), B, "B has 1 session, A 2");
        assert_eq!(node_of(r.command(offer(5, "x"))), A, "x is pinned to A");
        let view = MediaCommand::View {
            session: SessionId(3),
            tiles: Vec::new(),
        };
        assert_eq!(r.command(view.clone()), Route::Node(B, view));
        let load: Vec<_> = r.load().collect();
        assert_eq!(load, vec![("a", 3), ("b", 2)]);
    }

    #[test]
    fn without_a_node_an_offer_is_rejected_and_other_commands_go_nowhere() {
        let mut r = Router::default();
        assert_eq!(
            r.command(offer(1, "x")),
            Route::Hub(MediaEvent::SdpRejected {
                session: SessionId(1),
                reason: NO_NODE.into()
            })
        );
        let close = MediaCommand::Close {
            session: SessionId(1),
        };
        assert_eq!(r.command(close), Route::Nowhere);
    }

    #[test]
    fn closing_the_last_session_unpins_the_room() {
        let mut r = Router::default();
        r.node_up(A, "a");
        assert_eq!(node_of(r.command(offer(1, "x"))), A);
        r.node_up(B, "b");
        let close = MediaCommand::Close {
            session: SessionId(1),
        };
        assert_eq!(r.command(close.clone()), Route::Node(A, close.clone()));
        assert_eq!(r.command(close), Route::Nowhere, "closed once");
        assert_eq!(r.session_count(), 0);
        // Both nodes are empty again: the tie goes to the first node.
        assert_eq!(node_of(r.command(offer(2, "x"))), A);
        assert_eq!(node_of(r.command(offer(3, "y"))), B);
    }

    #[test]
    fn a_lost_node_closes_its_sessions_and_its_rooms_move() {
        let mut r = Router::default();
        r.node_up(A, "a");
        r.node_up(B, "b");
        r.command(offer(1, "x"));
        r.command(offer(2, "x"));
        r.command(offer(3, "y"));
        let closed = r.node_down(A);
        assert_eq!(
            closed,
            vec![
                MediaEvent::Closed {
                    session: SessionId(1)
                },
                MediaEvent::Closed {
                    session: SessionId(2)
                },
            ]
        );
        assert!(r.node_down(A).is_empty(), "only once");
        assert_eq!(r.session_count(), 1);
        // The participants offer again: room x is placed anew, on B.
        assert_eq!(node_of(r.command(offer(1, "x"))), B);
        let answer = MediaCommand::Answer {
            session: SessionId(9),
            id: 1,
            sdp: String::new(),
        };
        assert_eq!(r.command(answer), Route::Nowhere, "unknown session");
    }

    #[test]
    fn events_pass_only_from_the_node_of_their_session() {
        let mut r = Router::default();
        r.node_up(A, "a");
        r.node_up(B, "b");
        r.command(offer(1, "x"));
        let connected = MediaEvent::Connected {
            session: SessionId(1),
        };
        assert_eq!(r.event(B, connected.clone()), None, "not B's session");
        assert_eq!(r.event(A, connected.clone()), Some(connected));
        let unknown = MediaEvent::Speaking {
            session: SessionId(7),
            speaking: true,
        };
        assert_eq!(r.event(A, unknown), None);
        let closed = MediaEvent::Closed {
            session: SessionId(1),
        };
        assert_eq!(r.event(A, closed.clone()), Some(closed));
        assert_eq!(
            r.session_count(),
            0,
            "a session the node closed is forgotten"
        );
    }

    #[test]
    fn draining_nodes_take_no_new_rooms_but_keep_theirs() {
        let mut r = Router::default();
        r.node_up(A, "a");
        r.node_up(B, "b");
        r.command(offer(1, "x"));
        r.node_draining(A);
        assert_eq!(node_of(r.command(offer(2, "x"))), A, "x stays on A");
        assert_eq!(node_of(r.command(offer(3, "y"))), B);
        r.node_draining(B);
        assert!(matches!(r.command(offer(4, "z")), Route::Hub(_)));
    }

    #[test]
    fn a_node_that_reconnects_replaces_its_stale_link() {
        let mut r = Router::default();
        r.node_up(A, "a");
        r.command(offer(1, "x"));
        let (old, closed) = r.node_up(B, "a").expect("replaces the stale link");
        assert_eq!(old, A);
        assert_eq!(
            closed,
            vec![MediaEvent::Closed {
                session: SessionId(1)
            }]
        );
        assert_eq!(r.load().collect::<Vec<_>>(), vec![("a", 0)]);
    }

    #[test]
    fn node_messages_parse_and_garbage_is_an_error() {
        assert!(matches!(
            parse_from_node(r#"{"type":"connected","session":3}"#),
            Ok(FromNode::Event(MediaEvent::Connected { .. }))
        ));
        assert!(matches!(
            parse_from_node(r#"{"type":"draining"}"#),
            Ok(FromNode::Control(NodeMsg::Draining))
        ));
        assert!(parse_from_node("{not json").is_err());
        assert!(parse_from_node(r#"{"type":"connected"}"#).is_err());
        assert!(valid_node_id("media-1.example"));
        assert!(!valid_node_id("a b") && !valid_node_id(""));
    }

    #[test]
    fn node_series_are_added_before_the_end_marker() {
        let m = NodeMetrics::new();
        let mut r = Router::default();
        r.node_up(A, "a");
        r.command(offer(1, "x"));
        m.update(&r);
        let (_, acceptor) = {
            let (in_tx, _in_rx) = mpsc::unbounded_channel();
            (
                (),
                NodeAcceptor {
                    inbox: in_tx,
                    secret: "0123456789abcdef".into(),
                    next_key: Arc::new(AtomicU64::new(1)),
                    metrics: Arc::new(m),
                },
            )
        };
        let mut text = String::from("# TYPE x gauge\nx 1\n# EOF\n");
        acceptor.add_metrics(&mut text);
        assert!(text.contains("parley_media_nodes 1\n"), "{text}");
        assert!(
            text.contains("parley_media_node_sessions{node=\"a\"} 1\n"),
            "{text}"
        );
        assert!(
            text.ends_with("# EOF\n") && text.matches("# EOF").count() == 1,
            "{text}"
        );
        assert!(acceptor.is_secret("0123456789abcdef"));
        assert!(!acceptor.is_secret("0123456789abcdeX") && !acceptor.is_secret(""));
    }
}
