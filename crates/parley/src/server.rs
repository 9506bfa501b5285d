//! The HTTP side: web client, WebSocket signaling and health, plus the hub's event loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parley_proto::signal::{ClientFrame, ErrorCode, FrameError, ServerMsg};
use tokio::sync::mpsc;

use crate::auth::Auth;
use crate::config::Config;
use crate::hub::{ConnId, Hub, HubConfig, Output};
use crate::ice::IceServers;
use crate::media::MediaPlane;
use crate::metrics::Metrics;
use crate::nodes::NodeAcceptor;
use crate::webhook::{WebhookConfig, Webhooks};

/// Messages from connection tasks (and the admin side) to the hub task.
enum HubIn {
    Open(ConnId, mpsc::Sender<Outbound>),
    Frame(ConnId, ClientFrame),
    Bad(ConnId, FrameError),
    Refuse(ConnId, ErrorCode, String),
    Closed(ConnId),
    Drain,
}

/// Messages from the hub task to one connection task.
enum Outbound {
    Text(String),
    Close(&'static str),
}

#[derive(Clone)]
struct AppState {
    hub: mpsc::UnboundedSender<HubIn>,
    next_conn: Arc<AtomicU64>,
    limits: Limits,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
    auth: Arc<Auth>,
    drain_requested: Arc<tokio::sync::Notify>,
    ice: Arc<IceServers>,
    /// The RFC 5780 STUN server's two addresses, for the diagnostics page.
    nat_stun: Vec<String>,
    /// Dedicated media nodes connect here (`local_media = false`).
    nodes: Option<NodeAcceptor>,
}

#[derive(Clone, Copy)]
struct Limits {
    max_message_bytes: usize,
    max_messages_per_sec: u32,
}

/// A connection that sends nothing (not even the client's pings) for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Queue depth towards one client; a client this far behind is cut off (it can resume).
const CONN_QUEUE: usize = 1024;

pub async fn run(
    config: Config,
    media: MediaPlane,
    nodes: Option<NodeAcceptor>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let auth = Auth::new(config.api_keys.clone());
    if auth.is_open() {
        tracing::warn!(
            "no API keys configured: open mode, anyone who can reach this server can join any room"
        );
    }
    let webhooks = if config.webhook_urls.is_empty() {
        None
    } else {
        let wc = WebhookConfig {
            urls: config.webhook_urls.clone(),
            secret: config.webhook_secret.clone().unwrap_or_default(),
            ..WebhookConfig::default()
        };
        wc.validate().context("webhook_urls")?;
        Some(Webhooks::start(wc))
    };
    let ice = IceServers {
        stun: config.stun_servers.clone(),
        turn: config.turn_servers.clone(),
        turn_secret: config.turn_secret.clone(),
        turn_ttl: Duration::from_secs(config.turn_ttl_secs),
    };
    let (hub_tx, hub_rx) = mpsc::unbounded_channel();
    let hub = Hub::new(
        HubConfig {
            max_participants: config.max_participants,
            resume_window: Duration::from_secs(config.resume_window_secs),
            last_n: config.last_n,
            auth: auth.clone(),
            ring_timeout: Duration::from_secs(config.ring_timeout_secs),
            p2p_timeout: Duration::from_millis(config.p2p_timeout_ms),
            ice: ice.clone(),
        },
        Box::new(random_token),
    );
    let handle = axum_server::Handle::new();
    let drained = Arc::new(tokio::sync::Notify::new());
    let draining = Arc::new(AtomicBool::new(false));
    tokio::spawn(hub_loop(
        hub,
        hub_rx,
        media,
        HubSide {
            metrics: metrics.clone(),
            webhooks,
            drained: drained.clone(),
            draining: draining.clone(),
        },
    ));

    let state = AppState {
        hub: hub_tx.clone(),
        next_conn: Arc::new(AtomicU64::new(1)),
        limits: Limits {
            max_message_bytes: config.max_message_bytes,
            max_messages_per_sec: config.max_messages_per_sec,
        },
        metrics: metrics.clone(),
        draining: draining.clone(),
        auth: Arc::new(auth),
        drain_requested: Arc::new(tokio::sync::Notify::new()),
        ice: Arc::new(ice),
        nat_stun: match (config.stun_listen, config.stun_alternate_ip) {
            (Some(listen), Some(alt)) => vec![
                format!("stun:{listen}"),
                format!("stun:{}", SocketAddr::new(alt, config.stun_alternate_port)),
            ],
            _ => Vec::new(),
        },
        nodes,
    };
    let drain_requested = state.drain_requested.clone();
    let admin = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/admin/drain", post(admin_drain))
        .route("/media-node", get(media_node_upgrade))
        .with_state(state.clone());
    let mut app = Router::new()
        .route("/", get(|| async { page(INDEX_HTML) }))
        .route("/r/{room}", get(|| async { page(INDEX_HTML) }))
        .route("/u/{user}", get(|| async { page(CALL_HTML) }))
        .route("/diag", get(|| async { page(DIAG_HTML) }))
        .route("/app/{file}", get(app_asset))
        .route("/sdk/{file}", get(sdk_asset))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/ice-servers", get(ice_servers))
        .route("/diag-info", get(diag_info))
        .route("/ws", get(ws_upgrade))
        .with_state(state.clone());
    match config.admin_http {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding admin_http {addr}"))?;
            tracing::info!(%addr, "metrics and admin API");
            tokio::spawn(async move {
                if let Err(err) = axum::serve(listener, admin).await {
                    tracing::error!(%err, "admin server failed");
                }
            });
        }
        None => app = app.merge(admin),
    }

    // Drain on the first SIGTERM (or Ctrl-C), exit on the second, on the grace period's end,
    // or once the last call has ended.
    let grace = Duration::from_secs(config.drain_grace_secs);
    let shutdown = handle.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = drain_requested.notified() => {}
        }
        tracing::info!(?grace, "draining: no new rooms; existing calls go on");
        let _ = hub_tx.send(HubIn::Drain);
        tokio::select! {
            _ = shutdown_signal() => tracing::info!("second signal: exiting now"),
            _ = tokio::time::sleep(grace) => tracing::info!("drain grace period over: exiting"),
            _ = drained.notified() => tracing::info!("drained: the last call has ended"),
        }
        shutdown.graceful_shutdown(Some(Duration::from_secs(1)));
    });

    let addr: SocketAddr = config.http;
    let tls = crate::tls::load(&config).await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let std_listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the HTTP address {addr}"))?;
    std_listener.set_nonblocking(true)?;
    let bound = std_listener.local_addr()?;
    tracing::info!(
        "Parley is ready: open {scheme}://{}/r/demo",
        display_addr(bound)
    );
    let service = app.into_make_service();
    match tls {
        Some(tls) => {
            axum_server::from_tcp_rustls(std_listener, tls)?
                .handle(handle)
                .serve(service)
                .await?
        }
        None => {
            axum_server::from_tcp(std_listener)?
                .handle(handle)
                .serve(service)
                .await?
        }
    }
    Ok(())
}

fn display_addr(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Resolves at the next SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn random_token() -> String {
    let mut buf = [0u8; 16];
    // Without an OS random source no session could be protected; there is nothing to fall back to.
    getrandom::fill(&mut buf).expect("the OS random number generator is available");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

#[derive(serde::Deserialize)]
struct IceQuery {
    token: Option<String>,
}

/// `GET /ice-servers?token=…`: STUN and TURN (with fresh credentials) for this client. With API
/// keys configured a valid token is needed, and its identity names the TURN credential.
async fn ice_servers(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<IceQuery>,
) -> Response {
    let identity = if state.auth.is_open() {
        "guest".to_string()
    } else {
        match state.auth.verify_identity(q.token.as_deref()) {
            Ok(claims) => claims.sub,
            Err(err) => return (StatusCode::UNAUTHORIZED, format!("{err}\n")).into_response(),
        }
    };
    let body = serde_json::Value::from(state.ice.for_identity(&identity)).to_string();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// `GET /diag-info`: what the diagnostics page needs besides `/ice-servers`.
async fn diag_info(State(state): State<AppState>) -> Response {
    let body = serde_json::json!({
        "nat_stun": state.nat_stun,
        "turn": !state.ice.turn.is_empty(),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let mut text = state.metrics.render();
    if let Some(nodes) = &state.nodes {
        nodes.add_metrics(&mut text);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `GET /media-node`: a dedicated media node's WebSocket, with
/// `Authorization: Bearer <node_secret>`.
async fn media_node_upgrade(
    ws: WebSocketUpgrade,
    headers: axum::http::HeaderMap,
    State(state): State<AppState>,
) -> Response {
    let Some(nodes) = state.nodes.clone() else {
        return (
            StatusCode::NOT_FOUND,
            "this server runs its own media (local_media = true)\n",
        )
            .into_response();
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !bearer.is_some_and(|b| nodes.is_secret(b)) {
        state.metrics.error("media_node_unauthorized");
        tracing::warn!("a media node was refused: wrong or missing node secret");
        return (
            StatusCode::UNAUTHORIZED,
            "the node secret is required: Authorization: Bearer <node_secret>\n",
        )
            .into_response();
    }
    ws.max_message_size(crate::nodes::MAX_MESSAGE)
        .max_frame_size(crate::nodes::MAX_MESSAGE)
        .on_upgrade(move |socket| crate::nodes::serve_node(socket, nodes))
}

/// `POST /admin/drain`: with API keys configured, `Authorization: Bearer <an API secret>`.
async fn admin_drain(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if !state.auth.is_open() {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !bearer.is_some_and(|b| state.auth.is_secret(b)) {
            return (
                StatusCode::UNAUTHORIZED,
                "an API secret is required: Authorization: Bearer <secret>\n",
            )
                .into_response();
        }
    }
    state.drain_requested.notify_one();
    (StatusCode::ACCEPTED, "draining\n").into_response()
}

/// What the hub loop needs besides the hub and the media plane.
struct HubSide {
    metrics: Arc<Metrics>,
    webhooks: Option<Webhooks>,
    drained: Arc<tokio::sync::Notify>,
    draining: Arc<AtomicBool>,
}

async fn hub_loop(
    mut hub: Hub,
    mut rx: mpsc::UnboundedReceiver<HubIn>,
    mut media: MediaPlane,
    side: HubSide,
) {
    let mut conns: std::collections::HashMap<ConnId, mpsc::Sender<Outbound>> =
        std::collections::HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut draining = false;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let now = Instant::now();
                match msg {
                    HubIn::Open(conn, tx) => {
                        conns.insert(conn, tx);
                        hub.connection_opened(conn);
                    }
                    HubIn::Frame(conn, frame) => hub.handle_frame(conn, frame, now),
                    HubIn::Bad(conn, err) => hub.bad_frame(conn, err),
                    HubIn::Refuse(conn, code, message) => hub.refuse(conn, code, message),
                    HubIn::Closed(conn) => {
                        conns.remove(&conn);
                        hub.connection_closed(conn, now);
                    }
                    HubIn::Drain => {
                        draining = true;
                        side.draining.store(true, Ordering::Relaxed);
                        side.metrics.draining.set(1);
                        hub.start_draining();
                    }
                }
            }
            ev = media.events.recv() => {
                let Some(ev) = ev else {
                    tracing::error!("media plane stopped");
                    break;
                };
                hub.handle_media_event(ev);
            }
            _ = tick.tick() => hub.tick(Instant::now()),
        }
        let outputs: Vec<Output> = hub.drain().collect();
        for out in outputs {
            match out {
                Output::Send(conn, frame) => {
                    let Some(tx) = conns.get(&conn) else { continue };
                    if let ServerMsg::Error { code, .. } = &frame.msg {
                        side.metrics
                            .error(&format!("signal_{}", error_code_name(*code)));
                    }
                    let text = match serde_json::to_string(&frame) {
                        Ok(t) => t,
                        Err(err) => {
                            tracing::error!(%err, "cannot serialize a server frame");
                            continue;
                        }
                    };
                    if tx.try_send(Outbound::Text(text)).is_err() {
                        tracing::info!(conn = conn.0, "client too slow; disconnecting");
                        conns.remove(&conn);
                        hub.connection_closed(conn, Instant::now());
                    }
                }
                Output::Close(conn, why) => {
                    if let Some(tx) = conns.get(&conn) {
                        let _ = tx.try_send(Outbound::Close(why));
                    }
                }
                Output::Media(cmd) => {
                    if media.commands.send(cmd).is_err() {
                        tracing::error!("media plane is gone");
                    }
                }
                Output::Webhook(ev) => {
                    if let Some(w) = &side.webhooks {
                        w.send(ev);
                    }
                }
            }
        }
        side.metrics.rooms_active.set(hub.room_count() as i64);
        side.metrics
            .participants_active
            .set(hub.participant_count() as i64);
        if draining && hub.participant_count() == 0 {
            side.drained.notify_one();
        }
    }
}

fn error_code_name(code: ErrorCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// Bytes read from a signaling WebSocket at a time (larger messages take several reads).
const WS_READ_BUFFER: usize = 8 * 1024;

async fn ws_upgrade(ws: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    // The transport's own cap is generous so that a too-large frame gets a clear error from us.
    let cap = state
        .limits
        .max_message_bytes
        .saturating_mul(16)
        .max(1 << 20);
    // Signaling is a few small messages a second: tungstenite's default 128 KiB read buffer
    // per connection was a third of an idle participant's memory.
    ws.max_message_size(cap)
        .max_frame_size(cap)
        .read_buffer_size(WS_READ_BUFFER)
        .on_upgrade(move |socket| connection(socket, state))
}

async fn connection(mut socket: WebSocket, state: AppState) {
    let conn = ConnId(state.next_conn.fetch_add(1, Ordering::Relaxed));
    let (tx, mut rx) = mpsc::channel(CONN_QUEUE);
    if state.hub.send(HubIn::Open(conn, tx)).is_err() {
        return;
    }
    state.metrics.ws_connections_active.inc();
    let limits = state.limits;
    let mut bucket = TokenBucket::new(limits.max_messages_per_sec, Instant::now());
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            _ = &mut idle => {
                // A half-open connection: a live client pings every few seconds.
                tracing::info!(conn = conn.0, "no message for {IDLE_TIMEOUT:?}; closing");
                break;
            }
            incoming = socket.recv() => {
                let msg = match incoming {
                    Some(Ok(m)) => m,
                    Some(Err(err)) => {
                        tracing::debug!(conn = conn.0, %err, "websocket error");
                        // The transport refused a frame over its own cap: say so before closing.
                        if err.to_string().contains("Space limit exceeded") {
                            let refuse = HubIn::Refuse(conn, ErrorCode::TooLarge, format!(
                                "message over the limit of {} bytes", limits.max_message_bytes));
                            if state.hub.send(refuse).is_ok() {
                                flush_until_close(&mut socket, &mut rx).await;
                            }
                        }
                        break;
                    }
                    None => break,
                };
                idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                if matches!(msg, Message::Text(_) | Message::Binary(_)) {
                    state.metrics.ws_message(true);
                }
                if matches!(msg, Message::Text(_) | Message::Binary(_)) && !bucket.take(Instant::now()) {
                    let refuse = HubIn::Refuse(conn, ErrorCode::RateLimited, format!(
                        "more than {} messages per second; disconnected", limits.max_messages_per_sec));
                    if state.hub.send(refuse).is_err() {
                        break;
                    }
                    continue;
                }
                let to_hub = match msg {
                    Message::Text(text) => {
                        if text.len() > limits.max_message_bytes {
                            HubIn::Refuse(conn, ErrorCode::TooLarge, format!(
                                "message of {} bytes is over the limit of {} bytes", text.len(), limits.max_message_bytes))
                        } else {
                            match ClientFrame::parse(&text) {
                                Ok(frame) => HubIn::Frame(conn, frame),
                                Err(err) => HubIn::Bad(conn, err),
                            }
                        }
                    }
                    Message::Binary(_) => HubIn::Bad(conn, FrameError::BadMessage(
                        "binary frames are not supported; send JSON text".into())),
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => continue,
                };
                if state.hub.send(to_hub).is_err() {
                    break;
                }
            }
            out = rx.recv() => {
                match out {
                    Some(Outbound::Text(t)) => {
                        state.metrics.ws_message(false);
                        if socket.send(Message::Text(t.into())).await.is_err() {
                            break;
                        }
                    }
                    Some(Outbound::Close(why)) => {
                        let _ = socket.send(Message::Close(Some(CloseFrame {
                            code: 1000,
                            reason: Utf8Bytes::from_static(why),
                        }))).await;
                        break;
                    }
                    None => break,
                }
            }
        }
    }
    let _ = state.hub.send(HubIn::Closed(conn));
    state.metrics.ws_connections_active.dec();
}

/// Sends what the hub queued for a refused connection, until its close arrives.
async fn flush_until_close(socket: &mut WebSocket, rx: &mut mpsc::Receiver<Outbound>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Some(out)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        match out {
            Outbound::Text(t) => {
                if socket.send(Message::Text(t.into())).await.is_err() {
                    return;
                }
            }
            Outbound::Close(why) => {
                let close = CloseFrame {
                    code: 1009,
                    reason: Utf8Bytes::from_static(why),
                };
                let _ = socket.send(Message::Close(Some(close))).await;
                return;
            }
        }
    }
}

/// Allows `rate` messages per second with bursts of twice that.
struct TokenBucket {
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        TokenBucket {
            tokens: rate * 2.0,
            rate,
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate * 2.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

const INDEX_HTML: &str = include_str!("../../../web/app/index.html");
const APP_JS: &str = include_str!("../../../web/app/app.js");
const STYLE_CSS: &str = include_str!("../../../web/app/style.css");
const SDK_JS: &str = include_str!("../../../web/sdk/parley.js");
const CALL_HTML: &str = include_str!("../../../web/app/call.html");
const CALL_JS: &str = include_str!("../../../web/app/call.js");
const UI_JS: &str = include_str!("../../../web/app/ui.js");
const DIAG_HTML: &str = include_str!("../../../web/app/diag.html");
const DIAG_JS: &str = include_str!("../../../web/app/diag.js");

const CALLS_SDK_JS: &str = include_str!("../../../web/sdk/calls.js");

async fn app_asset(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "app.js" => asset("text/javascript; charset=utf-8", APP_JS),
        "style.css" => asset("text/css; charset=utf-8", STYLE_CSS),
        "call.js" => asset("text/javascript; charset=utf-8", CALL_JS),
        "ui.js" => asset("text/javascript; charset=utf-8", UI_JS),
        "diag.js" => asset("text/javascript; charset=utf-8", DIAG_JS),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn sdk_asset(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "parley.js" => asset("text/javascript; charset=utf-8", SDK_JS),
        "calls.js" => asset("text/javascript; charset=utf-8", CALLS_SDK_JS),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// An HTML page of the web client (every path under it serves the same page).
fn page(html: &'static str) -> Response {
    asset("text/html; charset=utf-8", html)
}

fn asset(mime: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
