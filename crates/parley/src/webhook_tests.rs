//! Webhook delivery against real HTTP receivers on 127.0.0.1.

use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::*;

/// Longest wait for anything a test expects to arrive.
const WAIT: Duration = Duration::from_secs(10);

/// One request as a receiver saw it.
#[derive(Debug)]
struct Received {
    at: Instant,
    headers: HeaderMap,
    body: Bytes,
    json: serde_json::Value,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn id(&self) -> &str {
        self.json["id"].as_str().unwrap_or_default()
    }

    fn room(&self) -> &str {
        self.json["room"].as_str().unwrap_or_default()
    }
}

/// Decides the status of the receiver's `n`th request (0-based).
type Answer = Arc<dyn Fn(usize, &Received) -> StatusCode + Send + Sync>;

#[derive(Clone)]
struct ReceiverState {
    count: Arc<AtomicUsize>,
    answer: Answer,
    tx: mpsc::UnboundedSender<Received>,
}

async fn receive(
    State(state): State<ReceiverState>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let received = Received {
        at: Instant::now(),
        headers,
        body,
        json,
    };
    let n = state.count.fetch_add(1, Ordering::SeqCst);
    let status = (state.answer)(n, &received);
    let _ = state.tx.send(received);
    status
}

fn receiver_app(answer: Answer) -> (axum::Router, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = ReceiverState {
        count: Arc::new(AtomicUsize::new(0)),
        answer,
        tx,
    };
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(state);
    (app, rx)
}

/// Serves a receiver on `listener`; its URL is `http://<addr>/hook`.
fn serve(listener: TcpListener, answer: Answer) -> mpsc::UnboundedReceiver<Received> {
    let (app, rx) = receiver_app(answer);
    tokio::spawn(async move { axum::serve(listener, app).await });
    rx
}

async fn receiver(answer: Answer) -> (String, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    (url, serve(listener, answer))
}

fn always_ok() -> Answer {
    Arc::new(|_, _| StatusCode::OK)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a webhook request in time")
        .expect("receiver running")
}

/// Asserts nothing more arrives for a while.
async fn nothing_more(rx: &mut mpsc::UnboundedReceiver<Received>) {
    if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        panic!("unexpected request: {}", r.json);
    }
}

fn config(urls: Vec<String>) -> WebhookConfig {
    WebhookConfig {
        urls,
        secret: "s3cret".to_string(),
        max_attempts: 20,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        timeout: Duration::from_secs(2),
    }
}

fn room_started(room: &str) -> WebhookEvent {
    WebhookEvent::RoomStarted {
        room: room.to_string(),
    }
}

fn verify(secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Some(tag) = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::verify(&key, body, &tag).is_ok()
}

#[tokio::test]
async fn request_is_signed_json_with_id_and_timestamp() {
    let (url, mut rx) = receiver(always_ok()).await;
    let hooks = Webhooks::start(config(vec![url]));
    let before = unix_ms();
    hooks.send(WebhookEvent::ParticipantJoined {
        room: "demo".into(),
        participant: "p1".into(),
        name: "Ada".into(),
    });
    let r = next(&mut rx).await;

    assert_eq!(r.header("content-type"), "application/json");
    let signature = r.header("x-parley-signature");
    assert!(verify("s3cret", &r.body, signature), "{signature}");
    assert!(!verify("wrong", &r.body, signature));
    let mut tampered = r.body.to_vec();
    tampered[0] = b' ';
    assert!(!verify("s3cret", &tampered, signature));

    assert_eq!(r.json["event"], "participant_joined");
    assert_eq!(r.json["room"], "demo");
    assert_eq!(r.json["participant"], "p1");
    assert_eq!(r.json["name"], "Ada");
    assert_eq!(r.id().len(), 36, "{}", r.id());
    assert_eq!(r.header("x-parley-event-id"), r.id());
    let created_at = r.json["created_at"].as_u64().expect("created_at");
    assert!(created_at >= before && created_at <= unix_ms() + 1);
    assert_eq!(r.header("x-parley-timestamp"), created_at.to_string());
}

#[tokio::test]
async fn retries_with_the_same_id_and_growing_gaps() {
    let answer: Answer = Arc::new(|n, _| {
        if n < 2 {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        }
    });
    let (url, mut rx) = receiver(answer).await;
    let mut c = config(vec![url]);
    c.initial_backoff = Duration::from_millis(60);
    c.max_backoff = Duration::from_secs(1);
    let hooks = Webhooks::start(c);
    hooks.send(room_started("a"));

    let r1 = next(&mut rx).await;
    let r2 = next(&mut rx).await;
    let r3 = next(&mut rx).await;
    nothing_more(&mut rx).await;
    assert_eq!(r1.id(), r2.id());
    assert_eq!(r2.id(), r3.id());
    assert_eq!(r1.body, r3.body, "the same body on every attempt");
    let gap1 = r2.at - r1.at;
    let gap2 = r3.at - r2.at;
    assert!(gap1 >= Duration::from_millis(50), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(100), "{gap2:?}");
    assert!(gap2 > gap1, "{gap1:?} then {gap2:?}");
}

#[tokio::test]
async fn a_failing_event_holds_back_the_next() {
    let answer: Answer = Arc::new(|n, _| {
        if n < 2 {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::NO_CONTENT
        }
    });
    let (url, mut rx) = receiver(answer).await;
    let hooks = Webhooks::start(config(vec![url]));
    hooks.send(room_started("a"));
    hooks.send(room_started("b"));

    let mut rooms = Vec::new();
    for _ in 0..4 {
        rooms.push(next(&mut rx).await.room().to_string());
    }
    nothing_more(&mut rx).await;
    assert_eq!(rooms, ["a", "a", "a", "b"]);
}

#[tokio::test]
async fn an_event_out_of_attempts_is_dropped_and_delivery_goes_on() {
    let answer: Answer = Arc::new(|_, r| {
        if r.room() == "a" {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        }
    });
    let (url, mut rx) = receiver(answer).await;
    let mut c = config(vec![url]);
    c.max_attempts = 3;
    let hooks = Webhooks::start(c);
    hooks.send(room_started("a"));
    hooks.send(room_started("b"));

    let mut rooms = Vec::new();
    for _ in 0..4 {
        rooms.push(next(&mut rx).await.room().to_string());
    }
    nothing_more(&mut rx).await;
    assert_eq!(rooms, ["a", "a", "a", "b"]);
}

#[tokio::test]
async fn a_receiver_that_comes_up_late_gets_the_events_in_order() {
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr")
    };
    let hooks = Webhooks::start(config(vec![format!("http://{addr}/hook")]));
    for room in ["a", "b", "c"] {
        hooks.send(room_started(room));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listener = TcpListener::bind(addr)
        .await
        .expect("rebind the closed port");
    let mut rx = serve(listener, always_ok());

    let mut rooms = Vec::new();
    for _ in 0..3 {
        rooms.push(next(&mut rx).await.room().to_string());
    }
    nothing_more(&mut rx).await;
    assert_eq!(rooms, ["a", "b", "c"]);
}

#[tokio::test]
async fn every_url_gets_every_event() {
    let (url1, mut rx1) = receiver(always_ok()).await;
    let (url2, mut rx2) = receiver(always_ok()).await;
    let hooks = Webhooks::start(config(vec![url1, url2]));
    hooks.send(room_started("a"));
    hooks.send(WebhookEvent::RoomFinished { room: "a".into() });

    for rx in [&mut rx1, &mut rx2] {
        let first = next(rx).await;
        let second = next(rx).await;
        assert_eq!(first.json["event"], "room_started");
        assert_eq!(second.json["event"], "room_finished");
    }
}

#[tokio::test]
async fn a_slow_receiver_times_out_and_is_retried() {
    let slow = Arc::new(AtomicBool::new(true));
    let answer: Answer = Arc::new(|_, _| StatusCode::OK);
    let (app, mut rx) = receiver_app(answer);
    let flag = slow.clone();
    let app = app.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let flag = flag.clone();
            async move {
                if flag.swap(false, Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                next.run(req).await
            }
        },
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut c = config(vec![url]);
    c.timeout = Duration::from_millis(200);
    let hooks = Webhooks::start(c);
    let start = Instant::now();
    hooks.send(room_started("a"));
    let r = next(&mut rx).await;
    assert_eq!(r.room(), "a");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn https_receiver() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        ck.cert.pem().into_bytes(),
        ck.signing_key.serialize_pem().into_bytes(),
    )
    .await
    .expect("server TLS");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let (app, mut rx) = receiver_app(always_ok());
    let server = axum_server::from_tcp_rustls(listener, tls).expect("server");
    tokio::spawn(server.serve(app.into_make_service()));

    let mut roots = RootCertStore::empty();
    roots.add(ck.cert.der().clone()).expect("root");
    let client_tls = tls_config(roots).expect("client TLS");
    let hooks = Webhooks::start_with_tls(
        config(vec![format!("https://localhost:{port}/hook")]),
        Some(client_tls),
    );
    hooks.send(room_started("a"));
    hooks.send(room_started("b"));
    assert_eq!(next(&mut rx).await.room(), "a");
    assert_eq!(next(&mut rx).await.room(), "b");
}

#[test]
fn full_queue_drops_the_oldest() {
    let queue = Queue::new("http://x/".into(), 2);
    let pending = |id: &str| {
        Arc::new(Pending {
            id: id.into(),
            created_at: 0,
            body: Bytes::new(),
            signature: String::new(),
        })
    };
    assert!(queue.push(pending("1")).is_none());
    assert!(queue.push(pending("2")).is_none());
    let dropped = queue.push(pending("3")).expect("one dropped");
    assert_eq!(dropped.id, "1");
    let left: Vec<String> = queue.lock().iter().map(|p| p.id.clone()).collect();
    assert_eq!(left, ["2", "3"]);
}

#[test]
fn event_json_shape() {
    let s = |v: &str| v.to_string();
    let events = [
        (
            WebhookEvent::RoomStarted { room: s("r") },
            r#"{"event":"room_started","room":"r"}"#,
        ),
        (
            WebhookEvent::RoomFinished { room: s("r") },
            r#"{"event":"room_finished","room":"r"}"#,
        ),
        (
            WebhookEvent::ParticipantJoined {
                room: s("r"),
                participant: s("p1"),
                name: s("Ada"),
            },
            r#"{"event":"participant_joined","room":"r","participant":"p1","name":"Ada"}"#,
        ),
        (
            WebhookEvent::ParticipantLeft {
                room: s("r"),
                participant: s("p1"),
                name: s("Ada"),
            },
            r#"{"event":"participant_left","room":"r","participant":"p1","name":"Ada"}"#,
        ),
    ];
    for (event, expected) in events {
        let body = serde_json::to_string(&Envelope {
            id: "x",
            created_at: 7,
            event: &event,
        })
        .expect("json");
        let expected = format!(r#"{{"id":"x","created_at":7,{}"#, &expected[1..]);
        assert_eq!(body, expected);
    }
}

#[test]
fn backoff_doubles_up_to_the_maximum() {
    let policy = RetryPolicy {
        max_attempts: 8,
        initial_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(30),
        timeout: Duration::from_secs(5),
    };
    let within = |d: Duration, base_ms: f64| {
        let ms = d.as_secs_f64() * 1000.0;
        ms >= base_ms * 0.9 && ms < base_ms * 1.1
    };
    for (attempt, base) in [
        (1, 500.0),
        (2, 1000.0),
        (3, 2000.0),
        (7, 30_000.0),
        (60, 30_000.0),
    ] {
        let d = policy.backoff(attempt);
        assert!(within(d, base), "attempt {attempt}: {d:?}");
    }
}

#[test]
fn ids_are_unique_uuids() {
    let a = event_id();
    let b = event_id();
    assert_ne!(a, b);
    assert_eq!(a.len(), 36);
    assert_eq!(a.as_bytes()[14], b'4');
}

#[test]
fn config_validation() {
    let ok = |urls: &[&str]| {
        WebhookConfig {
            urls: urls.iter().map(|u| u.to_string()).collect(),
            secret: "k".into(),
            ..WebhookConfig::default()
        }
        .validate()
    };
    assert!(ok(&[]).is_ok());
    assert!(ok(&["http://example.com/hook", "https://[::1]:8443/x?y=1"]).is_ok());
    for bad in [
        "example.com/hook",
        "ftp://example.com/",
        "http://user:pw@example.com/",
        "not a url",
    ] {
        let err = ok(&[bad]).expect_err(bad);
        assert!(err.to_string().contains(bad), "{err}");
    }
    let no_secret = WebhookConfig {
        urls: vec!["http://example.com/".into()],
        ..WebhookConfig::default()
    };
    assert!(matches!(
        no_secret.validate(),
        Err(WebhookConfigError::EmptySecret)
    ));
    assert!(format!("{no_secret:?}").contains("redacted"));
}

#[test]
fn endpoints_parse() {
    let e = Endpoint::parse("https://[::1]:8443/x?y=1").expect("valid");
    assert!(e.tls);
    assert_eq!(e.host, "::1");
    assert_eq!(e.port, 8443);
    assert_eq!(e.authority, "[::1]:8443");
    assert_eq!(e.path_and_query, "/x?y=1");
    let e = Endpoint::parse("http://hooks.example.com").expect("valid");
    assert_eq!((e.port, e.path_and_query.as_str()), (80, "/"));
}
