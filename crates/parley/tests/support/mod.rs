//! Helpers shared by the tests that run the real `parley` binary.
#![allow(dead_code)]

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
pub const REPLY: Duration = Duration::from_secs(5);
/// How long a whole test may take.
pub const TEST: Duration = Duration::from_secs(60);

static START_COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Where a child's stderr goes: a file of its own (read when it exits early), unless
/// PARLEY_TEST_LOG=1 asks for the log on the terminal.
fn log_to_file(cmd: &mut Command, what: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "parley-test-{what}-{}-{}.log",
        std::process::id(),
        START_COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    if std::env::var_os("PARLEY_TEST_LOG").is_none() {
        cmd.stderr(std::fs::File::create(&path).expect("create the child's log"));
    }
    path
}

/// A child's log, and whether it says the child lost a port race: tests run in parallel, so
/// a port found free can be taken (by another child, or as some connection's ephemeral port)
/// before the child binds it.
fn read_log(path: &std::path::Path) -> (String, bool) {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lost_port = log.to_ascii_lowercase().contains("address already in use");
    (log, lost_port)
}

/// A running `parley serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub http: SocketAddr,
    /// The media port (UDP and ICE-TCP), on 127.0.0.1.
    pub rtc: SocketAddr,
    /// Its stderr (removed on drop).
    log: std::path::PathBuf,
}

impl Server {
    /// Starts `parley serve` on fresh ports; a start that lost a port race is retried on new
    /// ones. Any other early exit fails with the server's log.
    pub async fn start(extra: &[&str]) -> Server {
        for attempt in 1.. {
            let http = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
            let rtc = SocketAddr::from(([127, 0, 0, 1], free_media_port()));
            let rtc_port = rtc.port().to_string();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
            cmd.args(["serve", "--http", &http.to_string()])
                .args(["--rtc-port", &rtc_port, "--public-ip", "127.0.0.1"])
                .args(extra)
                .env_remove("PARLEY_CONFIG")
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            let log_path = log_to_file(&mut cmd, "server");
            let child = cmd.spawn().expect("the parley binary starts");
            let mut server = Server {
                child,
                http,
                rtc,
                log: log_path,
            };
            match server.wait_healthy().await {
                Ok(()) => return server,
                Err(status) => {
                    let (log, lost_port) = read_log(&server.log);
                    if lost_port && attempt < 5 {
                        continue;
                    }
                    panic!("parley exited before it was ready: {status}\n{log}");
                }
            }
        }
        unreachable!()
    }

    /// Waits for `/healthz`; the exit status if the server stopped first.
    pub async fn wait_healthy(&mut self) -> Result<(), std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("child status") {
                return Err(status);
            }
            if healthz(self.http).await {
                return Ok(());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "parley did not answer /healthz within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn client(&self) -> Client {
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
        let _ = std::fs::remove_file(&self.log);
    }
}

pub fn free_tcp_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
    l.local_addr().expect("local address").port()
}

/// A port free for UDP and for TCP on every address: the media port also takes ICE-TCP. (A
/// free UDP port can be some TCP connection's ephemeral port.)
pub fn free_media_port() -> u16 {
    for _ in 0..50 {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
        let port = s.local_addr().expect("local address").port();
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP");
}

pub async fn healthz(addr: SocketAddr) -> bool {
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
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::Text(text.into().into()))
            .await
            .expect("send a frame");
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(v.to_string()).await;
    }

    /// The next JSON frame from Parley; fails on a close or after [`REPLY`].
    pub async fn recv(&mut self) -> Value {
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
    pub async fn expect(&mut self, ty: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(v["type"], ty, "expected {ty}, got {v}");
        v
    }

    /// The next frame, which must be an error with `code`.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let v = self.expect("error").await;
        assert_eq!(v["code"], code, "{v}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "errors explain themselves: {v}"
        );
        v
    }

    /// Pings and expects the pong as the very next frame: nothing else was pending.
    pub async fn ping_pong(&mut self) {
        self.send(json!({"type": "ping"})).await;
        let v = self.recv().await;
        assert_eq!(v["type"], "pong", "expected nothing but the pong, got {v}");
    }

    /// Joins with client seq 1; returns the `joined` frame.
    pub async fn join(&mut self, room: &str, name: &str) -> Value {
        self.send(json!({"seq": 1, "type": "join", "room": room, "name": name}))
            .await;
        self.expect("joined").await
    }

    /// Every frame until Parley closes the connection.
    pub async fn until_closed(&mut self) -> Vec<Value> {
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

pub fn types(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f["type"].as_str().unwrap_or("?"))
        .collect()
}

pub async fn within_time_limit(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(TEST, test)
        .await
        .expect("the test finishes in time");
}

/// A running `parley media` (a dedicated media node), killed on drop.
pub struct MediaNode {
    pub child: Child,
    /// Its /healthz, /readyz and /metrics.
    pub http: SocketAddr,
    /// Its stderr (removed on drop).
    log: std::path::PathBuf,
}

impl MediaNode {
    /// Starts a media node on free loopback ports that connects to `signaling`'s /media-node,
    /// and waits until it listens or exits. As with [`Server::start`], a start that lost a port
    /// race is retried on fresh ports; a node that exits for any other reason is returned as it
    /// is (a test may expect it to be refused).
    pub fn spawn(signaling: SocketAddr, secret: &str, id: &str) -> MediaNode {
        let url = format!("ws://{signaling}/media-node");
        for attempt in 1.. {
            let http = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
            let rtc = SocketAddr::from(([127, 0, 0, 1], free_media_port()));
            let rtc_port = rtc.port().to_string();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
            cmd.args([
                "media",
                "--http",
                &http.to_string(),
                "--signaling-url",
                &url,
            ])
            .args(["--node-secret", secret, "--node-id", id])
            .args(["--rtc-port", &rtc_port, "--rtc-bind", "127.0.0.1"])
            .args(["--public-ip", "127.0.0.1"])
            .env_remove("PARLEY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
            let log_path = log_to_file(&mut cmd, "node");
            let mut child = cmd.spawn().expect("the parley binary starts");
            // The node binds its media port before its HTTP port.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut lost_port = false;
            while std::time::Instant::now() < deadline {
                if child.try_wait().expect("child status").is_some() {
                    lost_port = read_log(&log_path).1;
                    break;
                }
                if std::net::TcpStream::connect_timeout(&http, Duration::from_millis(100)).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            if !lost_port || attempt == 5 {
                return MediaNode {
                    child,
                    http,
                    log: log_path,
                };
            }
            // It has exited already; this only keeps the process handling explicit.
            let _ = child.wait();
            let _ = std::fs::remove_file(&log_path);
        }
        unreachable!()
    }
}

impl Drop for MediaNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `GET path` over HTTP/1.0: the status code and the body (0 and "" if nothing answers).
pub async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, "GET", path, "").await
}

/// `method path` over HTTP/1.0 with extra header lines (each ending in `\r\n`): the status
/// code and the body (0 and "" if nothing answers).
pub async fn request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let req = format!("{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n{headers}\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(REPLY, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// The value of the metric line that starts with `series` (name and labels), if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}
