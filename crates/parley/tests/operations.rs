//! Running Parley in production, against the real binary: access tokens, config precedence,
//! metrics, readiness and graceful drain, webhooks.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "0123456789abcdef-test-secret";

fn parley(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("parley runs")
}

fn mint(room: &str, identity: &str, extra: &[&str]) -> String {
    let key = format!("k1:{SECRET}");
    let mut args = vec![
        "token",
        "--api-key",
        &key,
        "--room",
        room,
        "--identity",
        identity,
    ];
    args.extend_from_slice(extra);
    let out = parley(&args, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    get_text(addr, path).await
}

async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> (u16, String) {
    let reply = request(addr, method, path, headers).await;
    assert_ne!(reply.0, 0, "{method} {path}: no HTTP reply");
    reply
}

async fn join_with(c: &mut Client, room: &str, token: Option<&str>) -> Value {
    let mut msg = json!({"seq": 1, "type": "join", "room": room, "name": "Guest"});
    if let Some(t) = token {
        msg["token"] = json!(t);
    }
    c.send(msg).await;
    c.recv().await
}

#[tokio::test]
async fn tokens_admit_their_room_and_refuse_the_rest_clearly() {
    within_time_limit(async {
        let key = format!("k1:{SECRET}");
        let server = Server::start(&["--api-key", &key]).await;

        let mut c = server.client().await;
        let v = join_with(&mut c, "demo", None).await;
        assert_eq!((v["code"].as_str(), v["type"].as_str()), (Some("unauthorized"), Some("error")));
        assert!(v["message"].as_str().is_some_and(|m| m.contains("required")), "{v}");

        let other_room = mint("elsewhere", "ada", &[]);
        let mut c = server.client().await;
        let v = join_with(&mut c, "demo", Some(&other_room)).await;
        assert!(v["message"].as_str().is_some_and(|m| m.contains("elsewhere")), "{v}");

        let good = mint("demo", "ada", &["--name", "Ada Lovelace"]);
        let (head, rest) = good.rsplit_once('.').expect("a JWT");
        let forged = format!("{head}.{}", rest.chars().rev().collect::<String>());
        let mut c = server.client().await;
        let v = join_with(&mut c, "demo", Some(&forged)).await;
        assert_eq!(v["code"], "unauthorized", "{v}");

        // Expired an hour ago, properly signed.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
        let claims = json!({"iss": "k1", "sub": "ada", "room": "demo", "exp": now - 3600, "nbf": now - 7200});
        let header = jsonwebtoken::Header {
            kid: Some("k1".into()),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
        };
        let expired = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("encode");
        let mut c = server.client().await;
        let v = join_with(&mut c, "demo", Some(&expired)).await;
        assert!(v["message"].as_str().is_some_and(|m| m.contains("expired")), "{v}");

        let mut c = server.client().await;
        let v = join_with(&mut c, "demo", Some(&good)).await;
        assert_eq!(v["type"], "joined", "{v}");
        let mut d = server.client().await;
        let other = mint("demo", "bob", &[]);
        let _ = join_with(&mut d, "demo", Some(&other)).await;
        let seen = c.expect("participant_joined").await;
        assert_eq!(seen["participant"]["name"], "Guest");
        let _ = d;
    })
    .await;
}

#[tokio::test]
async fn config_file_env_and_flags_apply_in_that_order() {
    let dir = std::env::temp_dir().join(format!("parley-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let file = dir.join("parley.toml");
    std::fs::write(
        &file,
        "rtc_port = 1111\nmax_participants = 3\nresume_window_secs = 7\n[api_keys]\nmain = \"a-secret-of-some-length\"\n",
    )
    .expect("write config");
    let f = file.to_string_lossy().to_string();
    let out = parley(
        &["config", "print", "--config", &f, "--max-participants", "5"],
        &[
            ("PARLEY_RTC_PORT", "2222"),
            ("PARLEY_MAX_PARTICIPANTS", "4"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rtc_port = 2222"), "env over file: {text}");
    assert!(
        text.contains("max_participants = 5"),
        "flag over env and file: {text}"
    );
    assert!(
        text.contains("resume_window_secs = 7"),
        "file over default: {text}"
    );
    assert!(
        !text.contains("a-secret-of-some-length"),
        "secrets masked: {text}"
    );

    std::fs::write(&file, "rtc_port = \"eighty\"\n").expect("write config");
    let out = parley(&["config", "print", "--config", &f], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rtc_port"), "the wrong key is named: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn metrics_and_readiness() {
    within_time_limit(async {
        let server = Server::start(&[]).await;
        let mut c = server.client().await;
        c.join("m", "Ada").await;
        let (code, body) = http_get(server.http, "/readyz").await;
        assert_eq!(code, 200, "{body}");
        let (code, body) = http_get(server.http, "/metrics").await;
        assert_eq!(code, 200);
        for needle in [
            "parley_participants_active 1",
            "parley_rooms_active 1",
            "parley_ws_connections_active 1",
            "parley_ws_messages_total{direction=\"in\"}",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(body.contains(needle), "{needle} missing from:\n{body}");
        }
    })
    .await;
}

/// A burst that the kernel hands over coalesced is split again, each datagram handled: the
/// media socket takes coalesced reads (`UDP_GRO`, as a network card's GRO merges a sender's
/// burst), which a 2 KB read buffer used to cut off after the first datagram or two. Here the
/// burst is one message of ten segments (UDP GSO), which loopback delivers whole; each is
/// garbage, and each is counted as a datagram for no session.
#[tokio::test]
async fn a_coalesced_burst_is_read_datagram_by_datagram() {
    within_time_limit(async {
        let server = Server::start(&[]).await;
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let segment = [0xffu8; 1000];
        let segments = [std::io::IoSlice::new(&segment); 10];
        send_segmented(&sock, &segments, server.rtc);
        let series = "parley_errors_total{kind=\"datagram_unrouted\"}";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let counted = loop {
            let (_, body) = http_get(server.http, "/metrics").await;
            let n = metric(&body, series).unwrap_or(0.0);
            // The metrics are exported once a second; wait for a second export after the first
            // count, so that a late part of the burst would show.
            if n > 0.0 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let (_, body) = http_get(server.http, "/metrics").await;
                break metric(&body, series).unwrap_or(0.0);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nothing counted:\n{body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(counted, 10.0, "each of the ten datagrams is handled");
    })
    .await;
}

/// Sends `segments` (all of one length) to `to` as one message of UDP GSO segments.
fn send_segmented(
    sock: &std::net::UdpSocket,
    segments: &[std::io::IoSlice<'_>],
    to: std::net::SocketAddr,
) {
    use std::os::fd::AsRawFd;
    let std::net::SocketAddr::V4(to) = to else {
        panic!("an IPv4 address")
    };
    let mut addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    #[repr(C, align(8))]
    struct Control([u8; 32]);
    let mut control = Control([0; 32]);
    // SAFETY: a zeroed msghdr is valid; it points at `addr`, `segments` and `control`, alive
    // for the call, and the one control message (a u16) fits the 32-byte aligned buffer.
    let sent = unsafe {
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
        hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        hdr.msg_iov = segments.as_ptr() as *mut libc::iovec;
        hdr.msg_iovlen = segments.len() as _;
        hdr.msg_control = control.0.as_mut_ptr().cast();
        hdr.msg_controllen = libc::CMSG_SPACE(2) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&hdr);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(
            libc::CMSG_DATA(cmsg).cast::<u16>(),
            segments[0].len() as u16,
        );
        libc::sendmsg(sock.as_raw_fd(), &hdr, 0)
    };
    let total: usize = segments.iter().map(|s| s.len()).sum();
    assert_eq!(
        sent,
        total as isize,
        "sendmsg: {}",
        std::io::Error::last_os_error()
    );
}

#[tokio::test]
async fn drain_keeps_calls_refuses_new_rooms_and_exits_when_done() {
    within_time_limit(async {
        let mut server = Server::start(&[]).await;
        let mut a = server.client().await;
        a.join("ongoing", "Ada").await;
        let pid = server.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        // Readiness turns false.
        let deadline = tokio::time::Instant::now() + REPLY;
        loop {
            let (code, _) = http_get(server.http, "/readyz").await;
            if code == 503 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/readyz still {code}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A new room is refused with a clear error; the existing room takes a newcomer.
        let mut b = server.client().await;
        let v = join_with(&mut b, "fresh", None).await;
        assert_eq!(v["code"], "draining", "{v}");
        let mut c = server.client().await;
        let v = join_with(&mut c, "ongoing", None).await;
        assert_eq!(v["type"], "joined", "{v}");
        let seen = a.expect("participant_joined").await;
        assert_eq!(seen["participant"]["name"], "Guest");
        // When the last participant leaves, Parley exits by itself.
        a.send(json!({"seq": 2, "type": "leave"})).await;
        c.send(json!({"seq": 2, "type": "leave"})).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = server.child.try_wait().expect("status") {
                assert!(status.success(), "exit status {status}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "parley did not exit after the drain"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once() {
    within_time_limit(async {
        let mut server = Server::start(&[]).await;
        let mut a = server.client().await;
        a.join("busy", "Ada").await;
        let pid = server.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            server.child.try_wait().expect("status").is_none(),
            "the call is still on"
        );
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while server.child.try_wait().expect("status").is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no exit after the second SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// A minimal HTTP receiver: records (headers, body) of every POST and answers 200.
async fn receiver() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            let _ = tx.send((head.to_string(), body[..len].to_string()));
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                                .await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn webhooks_report_rooms_and_participants_signed_and_in_order() {
    within_time_limit(async {
        let (addr, mut rx) = receiver().await;
        let url = format!("http://{addr}/hook");
        let server = Server::start(&["--webhook-url", &url, "--webhook-secret", SECRET]).await;
        let mut a = server.client().await;
        a.join("hooks", "Ada").await;
        a.send(json!({"seq": 2, "type": "leave"})).await;
        let mut events = Vec::new();
        while events.len() < 4 {
            let (head, body) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("a webhook in time")
                .expect("receiver alive");
            let sig = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("x-parley-signature: ")
                        .or_else(|| l.strip_prefix("X-Parley-Signature: "))
                })
                .expect("signature header")
                .trim()
                .to_string();
            let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, SECRET.as_bytes());
            let tag = aws_lc_rs::hmac::sign(&key, body.as_bytes());
            let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(sig, format!("sha256={hex}"), "signature of {body}");
            let v: Value = serde_json::from_str(&body).expect("JSON body");
            events.push(v["event"].as_str().unwrap_or("?").to_string());
        }
        assert_eq!(
            events,
            [
                "room_started",
                "participant_joined",
                "participant_left",
                "room_finished"
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn the_admin_api_drains_with_an_api_secret_and_metrics_can_move_to_the_admin_address() {
    within_time_limit(async {
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let key = format!("k1:{SECRET}");
        let server = Server::start(&["--api-key", &key, "--admin-http", &admin.to_string()]).await;
        // A call in progress, so the drain has something to wait for.
        let mut c = server.client().await;
        let v = join_with(&mut c, "demo", Some(&mint("demo", "ada", &[]))).await;
        assert_eq!(v["type"], "joined", "{v}");
        let (code, _) = http_get(server.http, "/metrics").await;
        assert_eq!(code, 404, "metrics moved to the admin address");
        let (code, body) = http_get(admin, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("parley_draining 0"), "{body}");

        let (code, _) = http(admin, "POST", "/admin/drain", "").await;
        assert_eq!(code, 401, "no secret, no drain");
        let (code, _) = http(
            admin,
            "POST",
            "/admin/drain",
            "Authorization: Bearer wrong-secret-xxxxxxx\r\n",
        )
        .await;
        assert_eq!(code, 401);
        let auth = format!("Authorization: Bearer {SECRET}\r\n");
        let (code, _) = http(admin, "POST", "/admin/drain", &auth).await;
        assert_eq!(code, 202);
        let deadline = tokio::time::Instant::now() + REPLY;
        loop {
            let (code, _) = http_get(server.http, "/readyz").await;
            let (_, metrics) = http_get(admin, "/metrics").await;
            if code == 503 && metrics.contains("parley_draining 1") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not draining: readyz {code}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_call_moved_to_the_sfu_admits_its_two_users_only() {
    within_time_limit(async {
        let key = format!("k1:{SECRET}");
        let server = Server::start(&["--api-key", &key]).await;
        let mut devices = Vec::new();
        for user in ["ann", "bob", "cy"] {
            let mut c = server.client().await;
            let token = mint("any", user, &[]);
            c.send(json!({"seq": 1, "type": "register", "user": user, "token": token}))
                .await;
            c.expect("registered").await;
            devices.push((c, token));
        }
        let (ann, ann_token) = &mut devices[0];
        ann.send(json!({"seq": 2, "type": "call", "call": "k9", "to": "bob"}))
            .await;
        ann.expect("call_ringing").await;
        let ann_token = ann_token.clone();
        let bob_token = devices[1].1.clone();
        let cy_token = devices[2].1.clone();
        for (token, admitted) in [(ann_token, true), (bob_token, true), (cy_token, false)] {
            let mut c = server.client().await;
            let v = join_with(&mut c, "call-k9", Some(&token)).await;
            if admitted {
                assert_eq!(v["type"], "joined", "{v}");
            } else {
                assert_eq!(v["code"], "unauthorized", "{v}");
            }
        }
    })
    .await;
}

/// Starts `parley serve` with `args` and returns its log up to "ready" (the server is killed);
/// a start that lost a port race is retried on new ports.
fn serve_log(args: &[&str]) -> String {
    for _ in 0..4 {
        let log = serve_log_once(args);
        if log.contains("Parley is ready")
            || !log.to_ascii_lowercase().contains("address already in use")
        {
            return log;
        }
    }
    serve_log_once(args)
}

fn serve_log_once(args: &[&str]) -> String {
    use std::io::BufRead;
    let http = format!("127.0.0.1:{}", free_tcp_port());
    let rtc = free_media_port().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["serve", "--http", &http, "--rtc-port", &rtc])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("parley starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let ready = line.contains("Parley is ready");
            if tx.send(line).is_err() || ready {
                return;
            }
        }
    });
    let mut log = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while let Ok(line) =
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        log.push_str(&line);
        log.push('\n');
        if line.contains("Parley is ready") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    log
}

#[test]
fn the_public_address_is_learnt_from_stun_unless_configured() {
    let stun_port = free_media_port();
    let listen = format!("127.0.0.1:{stun_port}");
    let mut stun = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args([
            "stun-server",
            "--listen",
            &listen,
            "--alternate-ip",
            "127.0.0.2",
        ])
        .args(["--alternate-port", &free_media_port().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("stun server starts");
    std::thread::sleep(Duration::from_millis(300));
    let server = format!("stun:{listen}");
    let log = serve_log(&["--stun-server", &server]);
    assert!(log.contains("public address learnt from STUN"), "{log}");
    assert!(log.contains("127.0.0.1"), "{log}");
    // --public-ip wins: no STUN lookup at all.
    let log = serve_log(&["--stun-server", &server, "--public-ip", "192.0.2.77"]);
    assert!(!log.contains("learnt from STUN"), "{log}");
    assert!(log.contains("192.0.2.77"), "{log}");
    let _ = stun.kill();
    let _ = stun.wait();
    // Nobody answers: a clear line, and the host's own addresses.
    let silent = format!("stun:127.0.0.1:{}", free_media_port());
    let log = serve_log(&["--stun-server", &silent]);
    assert!(log.contains("no STUN server answered"), "{log}");
}

#[test]
fn serve_runs_the_rfc5780_stun_server_that_nat_check_uses() {
    // A start that lost a race for one of its four ports exits at once: again on new ones.
    for attempt in 1.. {
        if let Some(text) = nat_check_against_serve() {
            assert!(text.contains("no NAT"), "{text}");
            assert!(text.contains("peer-to-peer likely"), "{text}");
            return;
        }
        assert!(attempt < 5, "parley serve kept exiting at start");
    }
}

/// `nat-check`'s output against the STUN server of a fresh `parley serve`; `None` if the
/// server exited before the check (a port taken meanwhile).
fn nat_check_against_serve() -> Option<String> {
    let stun_port = free_media_port();
    let listen = format!("127.0.0.1:{stun_port}");
    let alt_port = free_media_port().to_string();
    let http = format!("127.0.0.1:{}", free_tcp_port());
    let rtc = free_media_port().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args([
            "serve",
            "--http",
            &http,
            "--rtc-port",
            &rtc,
            "--public-ip",
            "127.0.0.1",
        ])
        .args(["--stun-listen", &listen, "--stun-alternate-ip", "127.0.0.2"])
        .args(["--stun-alternate-port", &alt_port])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("parley starts");
    std::thread::sleep(Duration::from_millis(800));
    if child.try_wait().expect("child status").is_some() {
        return None;
    }
    let out = parley(&["nat-check", &listen, "--timeout-secs", "1"], &[]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}
