//! Webhooks: room and call events POSTed as signed JSON to the configured URLs.
//!
//! One delivery task per URL, each with its own bounded queue: events reach a URL in the order
//! they were sent, each one retried with exponential backoff until it is accepted (2xx) or has
//! used all its attempts. Delivery is at least once: receivers dedupe by `id`.
//!
//! A request body is `{"id": "...", "created_at": <unix ms>, "event": "room_started", ...}`,
//! signed in `X-Parley-Signature: sha256=<hex HMAC-SHA256(secret, body)>`. `http://` and
//! `https://` URLs are supported; `https://` trusts the system's CA bundle
//! (`/etc/ssl/certs/ca-certificates.crt`, or the file named by `SSL_CERT_FILE`).

// The hub does not send events yet.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::http::uri::Scheme;
use hyper::{Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, pki_types::ServerName};

/// Events waiting for one URL; when full, the oldest is dropped.
const QUEUE_CAPACITY: usize = 10_000;
/// Most of a receiver's response body read (and ignored).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// CA bundles tried for `https://` URLs when `SSL_CERT_FILE` is not set.
const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Where webhooks go and how hard Parley tries.
#[derive(Clone)]
pub struct WebhookConfig {
    /// `http://` or `https://` URLs; each receives every event.
    pub urls: Vec<String>,
    /// Key of the HMAC-SHA256 signature in `X-Parley-Signature`.
    pub secret: String,
    /// Attempts per event and URL before the event is dropped.
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubles after each further one.
    pub initial_backoff: Duration,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
    /// Limit of one attempt: connecting, sending, and reading the response.
    pub timeout: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            urls: Vec::new(),
            secret: String::new(),
            max_attempts: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("urls", &self.urls)
            .field("secret", &"<redacted>")
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl WebhookConfig {
    /// Checks what can be checked before starting: URLs, secret, attempts.
    pub fn validate(&self) -> Result<(), WebhookConfigError> {
        for url in &self.urls {
            Endpoint::parse(url)?;
        }
        if !self.urls.is_empty() && self.secret.is_empty() {
            return Err(WebhookConfigError::EmptySecret);
        }
        if self.max_attempts == 0 {
            return Err(WebhookConfigError::NoAttempts);
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookConfigError {
    #[error("webhook URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("webhook secret: must be set when webhook URLs are configured")]
    EmptySecret,
    #[error("webhook max_attempts: must be at least 1")]
    NoAttempts,
}

/// Something that happened, as sent to webhook receivers (`event` is the type).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WebhookEvent {
    RoomStarted {
        room: String,
    },
    RoomFinished {
        room: String,
    },
    ParticipantJoined {
        room: String,
        participant: String,
        name: String,
    },
    ParticipantLeft {
        room: String,
        participant: String,
        name: String,
    },
    CallRinging {
        call: String,
        caller: String,
        callee: String,
    },
    CallAnswered {
        call: String,
        caller: String,
        callee: String,
        device: String,
    },
    /// The callee did not pick up: `reason` is cancelled, no_answer, busy, unavailable or gone.
    CallMissed {
        call: String,
        caller: String,
        callee: String,
        reason: parley_proto::signal::CallEndReason,
    },
    CallDeclined {
        call: String,
        caller: String,
        callee: String,
    },
}

/// A running webhook sender. Cheap to clone; the delivery tasks end once every clone is
/// dropped and their queues are empty.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    key: hmac::Key,
    queues: Vec<Arc<Queue>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for queue in &self.queues {
            queue.close();
        }
    }
}

impl fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<&str> = self.inner.queues.iter().map(|q| q.url.as_str()).collect();
        f.debug_struct("Webhooks").field("urls", &urls).finish()
    }
}

impl Webhooks {
    /// Starts one delivery task per URL on the current tokio runtime (panics outside one).
    /// A URL that does not pass [`WebhookConfig::validate`] is logged and skipped.
    pub fn start(config: WebhookConfig) -> Webhooks {
        let needs_tls = config.urls.iter().any(|u| u.starts_with("https:"));
        let tls = if needs_tls {
            match system_tls_config() {
                Ok(tls) => Some(tls),
                Err(e) => {
                    tracing::error!("webhooks: https URLs will fail: {e}");
                    None
                }
            }
        } else {
            None
        };
        Self::start_with_tls(config, tls)
    }

    /// [`Webhooks::start`] with the given TLS setup for `https://` URLs.
    fn start_with_tls(config: WebhookConfig, tls: Option<Arc<ClientConfig>>) -> Webhooks {
        let policy = RetryPolicy {
            max_attempts: config.max_attempts.max(1),
            initial_backoff: config.initial_backoff,
            max_backoff: config.max_backoff.max(config.initial_backoff),
            timeout: config.timeout,
        };
        let tls = tls.map(TlsConnector::from);
        let mut queues = Vec::new();
        for url in &config.urls {
            let endpoint = match Endpoint::parse(url) {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    tracing::error!("webhooks: skipping: {e}");
                    continue;
                }
            };
            let queue = Arc::new(Queue::new(url.clone(), QUEUE_CAPACITY));
            let deliverer = Deliverer {
                endpoint,
                tls: tls.clone(),
                policy: policy.clone(),
                conn: None,
                failing: false,
            };
            tokio::spawn(deliverer.run(queue.clone()));
            queues.push(queue);
        }
        Webhooks {
            inner: Arc::new(Inner {
                key: hmac::Key::new(hmac::HMAC_SHA256, config.secret.as_bytes()),
                queues,
            }),
        }
    }

    /// Enqueues `event` for every URL. Never blocks and never fails: when a URL's queue is
    /// full, its oldest event is dropped (with a warning).
    pub fn send(&self, event: WebhookEvent) {
        if self.inner.queues.is_empty() {
            return;
        }
        let id = event_id();
        let created_at = unix_ms();
        let body = match serde_json::to_vec(&Envelope {
            id: &id,
            created_at,
            event: &event,
        }) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                tracing::warn!(?event, "webhooks: cannot serialize event: {e}");
                return;
            }
        };
        let signature = signature_header(&self.inner.key, &body);
        let pending = Arc::new(Pending {
            id,
            created_at,
            body,
            signature,
        });
        for queue in &self.inner.queues {
            if let Some(dropped) = queue.push(pending.clone()) {
                tracing::warn!(
                    url = %queue.url,
                    event_id = %dropped.id,
                    "webhooks: queue full, dropped the oldest event"
                );
            }
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    created_at: u64,
    #[serde(flatten)]
    event: &'a WebhookEvent,
}

/// An event ready to send: its body and signature are the same for every URL and attempt.
#[derive(Debug)]
struct Pending {
    id: String,
    created_at: u64,
    body: Bytes,
    signature: String,
}

/// `sha256=<lowercase hex HMAC-SHA256(key, body)>`.
fn signature_header(key: &hmac::Key, body: &[u8]) -> String {
    let tag = hmac::sign(key, body);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag.as_ref() {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
    out
}

/// A random UUID (version 4), formatted as usual.
fn event_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // Unique enough without the OS generator: time and a process-wide counter.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        b[..8].copy_from_slice(&t.to_be_bytes());
        b[8..].copy_from_slice(&n.to_be_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// One URL's queue: filled by [`Webhooks::send`], emptied by its delivery task.
struct Queue {
    url: String,
    capacity: usize,
    events: Mutex<VecDeque<Arc<Pending>>>,
    notify: Notify,
    closed: AtomicBool,
}

impl Queue {
    fn new(url: String, capacity: usize) -> Queue {
        Queue {
            url,
            capacity,
            events: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Appends `event`; returns the event dropped to make room, if any.
    fn push(&self, event: Arc<Pending>) -> Option<Arc<Pending>> {
        let dropped = {
            let mut events = self.lock();
            let dropped = if events.len() >= self.capacity {
                events.pop_front()
            } else {
                None
            };
            events.push_back(event);
            dropped
        };
        self.notify.notify_one();
        dropped
    }

    /// The next event; `None` once the queue is closed and empty.
    async fn pop(&self) -> Option<Arc<Pending>> {
        loop {
            if let Some(event) = self.lock().pop_front() {
                return Some(event);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            self.notify.notified().await;
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Pending>>> {
        // A panic while holding the lock cannot leave the deque inconsistent.
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone)]
struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    timeout: Duration,
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based): doubling from the initial backoff up
    /// to the maximum, times a random factor in [0.9, 1.1).
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let r = getrandom::u32().unwrap_or(u32::MAX / 2);
        let factor = 0.9 + 0.2 * (f64::from(r) / (f64::from(u32::MAX) + 1.0));
        base.mul_f64(factor)
    }
}

/// A parsed webhook URL.
#[derive(Debug, Clone, PartialEq)]
struct Endpoint {
    url: String,
    tls: bool,
    /// Host name or IP address, without IPv6 brackets.
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    path_and_query: String,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Endpoint, WebhookConfigError> {
        let invalid = |reason| WebhookConfigError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
        let tls = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => false,
            Some(s) if *s == Scheme::HTTPS => true,
            Some(_) => return Err(invalid("the scheme must be http or https")),
            None => return Err(invalid("missing http:// or https://")),
        };
        let authority = uri.authority().ok_or_else(|| invalid("missing host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("credentials in the URL are not supported"));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Endpoint {
            url: url.to_string(),
            tls,
            host: host.to_string(),
            port,
            authority: authority.as_str().to_string(),
            path_and_query: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        })
    }
}

/// The TLS client setup for `https://` URLs, trusting the system's CA bundle.
fn system_tls_config() -> Result<Arc<ClientConfig>, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};

    let env = std::env::var("SSL_CERT_FILE").ok();
    let paths: Vec<&str> = match &env {
        Some(path) => vec![path.as_str()],
        None => CA_BUNDLES.to_vec(),
    };
    let mut roots = RootCertStore::empty();
    for path in &paths {
        let Ok(certs) = CertificateDer::pem_file_iter(path) else {
            continue;
        };
        let (added, _ignored) = roots.add_parsable_certificates(certs.flatten());
        if added > 0 {
            tracing::debug!(path, added, "webhooks: loaded CA certificates");
            break;
        }
    }
    if roots.is_empty() {
        return Err(format!(
            "no CA certificates found in {} (install ca-certificates or set SSL_CERT_FILE)",
            paths.join(", ")
        ));
    }
    tls_config(roots).map_err(|e| format!("TLS setup: {e}"))
}

fn tls_config(roots: RootCertStore) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("https is not available (no CA certificates)")]
    NoTls,
    #[error("invalid TLS server name")]
    ServerName,
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("reading the response: {0}")]
    Body(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("answered {0}")]
    Status(StatusCode),
}

/// Delivers one URL's events, one at a time, over one kept-alive connection.
struct Deliverer {
    endpoint: Endpoint,
    tls: Option<TlsConnector>,
    policy: RetryPolicy,
    conn: Option<SendRequest<Full<Bytes>>>,
    /// The last attempt failed (to warn once per outage rather than once per attempt).
    failing: bool,
}

impl Deliverer {
    async fn run(mut self, queue: Arc<Queue>) {
        while let Some(event) = queue.pop().await {
            self.deliver(&event).await;
        }
        tracing::debug!(url = %self.endpoint.url, "webhooks: delivery task ends");
    }

    /// Tries `event` until it is accepted or out of attempts.
    async fn deliver(&mut self, event: &Pending) {
        let url = self.endpoint.url.clone();
        for attempt in 1..=self.policy.max_attempts {
            let result = match tokio::time::timeout(self.policy.timeout, self.attempt(event)).await
            {
                Ok(Ok(status)) if status.is_success() => Ok(()),
                Ok(Ok(status)) => Err(AttemptError::Status(status)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(AttemptError::Timeout(self.policy.timeout)),
            };
            match result {
                Ok(()) => {
                    if self.failing {
                        tracing::info!(%url, "webhooks: delivering again");
                        self.failing = false;
                    }
                    tracing::debug!(%url, event_id = %event.id, attempt, "webhooks: delivered");
                    return;
                }
                Err(e) => {
                    if !self.failing {
                        tracing::warn!(%url, event_id = %event.id, "webhooks: delivery failed, retrying: {e}");
                        self.failing = true;
                    } else {
                        tracing::debug!(%url, event_id = %event.id, attempt, "webhooks: delivery failed: {e}");
                    }
                    if attempt == self.policy.max_attempts {
                        tracing::warn!(
                            %url,
                            event_id = %event.id,
                            attempts = attempt,
                            "webhooks: giving up on an event: {e}"
                        );
                        return;
                    }
                    tokio::time::sleep(self.policy.backoff(attempt)).await;
                }
            }
        }
    }

    /// One attempt: returns the receiver's status. A kept-alive connection that turns out to be
    /// closed is replaced once, within the attempt.
    async fn attempt(&mut self, event: &Pending) -> Result<StatusCode, AttemptError> {
        let mut fresh = false;
        loop {
            let request = self.request(event)?;
            let mut sender = match self.conn.take() {
                Some(sender) if !sender.is_closed() => sender,
                _ => {
                    fresh = true;
                    self.connect().await?
                }
            };
            let sent = match sender.ready().await {
                Ok(()) => sender.send_request(request).await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(response) => {
                    let status = response.status();
                    // Read the body so the connection can be reused.
                    Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                        .collect()
                        .await
                        .map_err(|e| AttemptError::Body(e.to_string()))?;
                    self.conn = Some(sender);
                    return Ok(status);
                }
                Err(e) if !fresh => {
                    tracing::debug!(url = %self.endpoint.url, "webhooks: kept-alive connection failed, reconnecting: {e}");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn request(&self, event: &Pending) -> Result<Request<Full<Bytes>>, AttemptError> {
        Ok(Request::post(self.endpoint.path_and_query.as_str())
            .header(header::HOST, self.endpoint.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("parley/", env!("CARGO_PKG_VERSION")),
            )
            .header("x-parley-signature", event.signature.as_str())
            .header("x-parley-timestamp", event.created_at)
            .header("x-parley-event-id", event.id.as_str())
            .body(Full::new(event.body.clone()))?)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, AttemptError> {
        let ep = &self.endpoint;
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(AttemptError::Connect)?;
        // Best effort: a request is one small write.
        let _ = tcp.set_nodelay(true);
        if !ep.tls {
            return handshake(tcp).await;
        }
        let tls = self.tls.as_ref().ok_or(AttemptError::NoTls)?;
        let name = ServerName::try_from(ep.host.clone()).map_err(|_| AttemptError::ServerName)?;
        let stream = tls.connect(name, tcp).await.map_err(AttemptError::Tls)?;
        handshake(stream).await
    }
}

async fn handshake<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, AttemptError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("webhooks: connection ended: {e}");
        }
    });
    Ok(sender)
}

#[cfg(test)]
#[path = "webhook_tests.rs"]
mod tests;
