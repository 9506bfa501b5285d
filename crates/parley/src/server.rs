//! The HTTP side: web client, WebSocket signaling and health, plus the hub's event loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parley_proto::signal::{ClientFrame, ErrorCode, FrameError};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::hub::{ConnId, Hub, HubConfig, Output};
use crate::media::MediaPlane;

/// Messages from connection tasks to the hub task.
enum HubIn {
    Open(ConnId, mpsc::Sender<Outbound>),
    Frame(ConnId, ClientFrame),
    Bad(ConnId, FrameError),
    Refuse(ConnId, ErrorCode, String),
    Closed(ConnId),
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

pub async fn run(config: Config, media: MediaPlane) -> anyhow::Result<()> {
    let (hub_tx, hub_rx) = mpsc::unbounded_channel();
    let hub = Hub::new(
        HubConfig {
            max_participants: config.max_participants,
            resume_window: Duration::from_secs(config.resume_window_secs),
            last_n: config.last_n,
        },
        Box::new(random_token),
    );
    tokio::spawn(hub_loop(hub, hub_rx, media));

    let state = AppState {
        hub: hub_tx,
        next_conn: Arc::new(AtomicU64::new(1)),
        limits: Limits {
            max_message_bytes: config.max_message_bytes,
            max_messages_per_sec: config.max_messages_per_sec,
        },
    };
    let app = Router::new()
        .route("/", get(index))
        .route("/r/{room}", get(index))
        .route("/app/{file}", get(app_asset))
        .route("/sdk/{file}", get(sdk_asset))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ws", get(ws_upgrade))
        .with_state(state);

    let addr: SocketAddr = config.http;
    let tls = crate::tls::load(&config).await?;
    let handle = axum_server::Handle::new();
    let shutdown = handle.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        shutdown.graceful_shutdown(Some(Duration::from_secs(2)));
    });
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

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn random_token() -> String {
    let mut buf = [0u8; 16];
    // Without an OS random source no session could be protected; there is nothing to fall back to.
    getrandom::fill(&mut buf).expect("the OS random number generator is available");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

async fn hub_loop(mut hub: Hub, mut rx: mpsc::UnboundedReceiver<HubIn>, mut media: MediaPlane) {
    let mut conns: std::collections::HashMap<ConnId, mpsc::Sender<Outbound>> =
        std::collections::HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
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
            }
        }
    }
}

async fn ws_upgrade(ws: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    // The transport's own cap is generous so that a too-large frame gets a clear error from us.
    let cap = state
        .limits
        .max_message_bytes
        .saturating_mul(16)
        .max(1 << 20);
    ws.max_message_size(cap)
        .max_frame_size(cap)
        .on_upgrade(move |socket| connection(socket, state))
}

async fn connection(mut socket: WebSocket, state: AppState) {
    let conn = ConnId(state.next_conn.fetch_add(1, Ordering::Relaxed));
    let (tx, mut rx) = mpsc::channel(CONN_QUEUE);
    if state.hub.send(HubIn::Open(conn, tx)).is_err() {
        return;
    }
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

async fn index(room: Option<Path<String>>) -> Response {
    let _ = room;
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX_HTML,
    )
        .into_response()
}

async fn app_asset(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "app.js" => asset("text/javascript; charset=utf-8", APP_JS),
        "style.css" => asset("text/css; charset=utf-8", STYLE_CSS),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn sdk_asset(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "parley.js" => asset("text/javascript; charset=utf-8", SDK_JS),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
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
