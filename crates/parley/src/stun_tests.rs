use super::*;

const TXID: TransactionId = TransactionId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a socket address")
}

/// RFC 5769 §2.2, "Sample IPv4 Response".
const RFC5769_IPV4_RESPONSE: [u8; 80] = [
    0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
    0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63,
    0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
    0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3, 0x8c, 0x74, 0x89, 0xf9,
    0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96,
];

#[test]
fn reads_the_rfc_5769_sample_response() {
    let msg = Message::parse(&RFC5769_IPV4_RESPONSE).expect("parses");
    assert_eq!(msg.class, Class::Success);
    assert_eq!(msg.method, BINDING);
    assert_eq!(msg.xor_mapped, Some(addr("192.0.2.1:32853")));
    assert_eq!(msg.software.as_deref(), Some("test vector"));
    assert!(msg.unknown_required.is_empty());
}

#[test]
fn message_types_are_encoded_as_rfc_8489_says() {
    let request = Message::new(Class::Request, BINDING, TXID).encode();
    assert_eq!(&request[..4], &[0x00, 0x01, 0x00, 0x00]);
    assert_eq!(&request[4..8], &[0x21, 0x12, 0xa4, 0x42]);
    assert_eq!(&request[8..20], &TXID.0);
    let success = Message::new(Class::Success, BINDING, TXID).encode();
    assert_eq!(&success[..2], &[0x01, 0x01]);
    let error = Message::new(Class::Error, BINDING, TXID).encode();
    assert_eq!(&error[..2], &[0x01, 0x11]);
    let indication = Message::new(Class::Indication, BINDING, TXID).encode();
    assert_eq!(&indication[..2], &[0x00, 0x11]);
    // A method with high bits (TURN Allocate is 0x003; 0xABC exercises every bit group).
    let odd = Message::new(Class::Success, 0xABC, TXID).encode();
    let back = Message::parse(&odd).expect("parses");
    assert_eq!((back.class, back.method), (Class::Success, 0xABC));
}

#[test]
fn every_attribute_survives_a_round_trip() {
    for (mapped, origin, other) in [
        ("203.0.113.7:40000", "10.0.0.1:3478", "10.0.0.2:3479"),
        (
            "[2001:db8::1]:40000",
            "[2001:db8::a]:3478",
            "[2001:db8::b]:3479",
        ),
    ] {
        let mut msg = Message::new(Class::Success, BINDING, TXID);
        msg.xor_mapped = Some(addr(mapped));
        msg.mapped = Some(addr(mapped));
        msg.change = Some(Change::PORT);
        msg.response_origin = Some(addr(origin));
        msg.other_address = Some(addr(other));
        msg.error = Some((420, "Unknown Attribute".into()));
        msg.unknown_attributes = vec![0x0042, 0x0043, 0x0044];
        msg.software = Some("parley test".into());
        let bytes = msg.encode();
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(Message::parse(&bytes), Ok(msg));
    }
}

#[test]
fn xor_mapped_address_is_really_xored() {
    let mut msg = Message::new(Class::Success, BINDING, TXID);
    msg.xor_mapped = Some(addr("192.0.2.1:32853"));
    let bytes = msg.encode();
    // Type, length, reserved, family, then port 32853 ^ 0x2112 and 192.0.2.1 ^ cookie.
    assert_eq!(
        &bytes[20..32],
        &[
            0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43
        ]
    );
}

#[test]
fn malformed_messages_are_rejected() {
    let good = Message::new(Class::Request, BINDING, TXID).encode();
    assert_eq!(Message::parse(&good[..19]), Err(ParseError::TooShort));

    let mut bad_cookie = good.clone();
    bad_cookie[4] ^= 1;
    assert_eq!(Message::parse(&bad_cookie), Err(ParseError::NotStun));

    let mut rtp_like = good.clone();
    rtp_like[0] = 0x80;
    assert_eq!(Message::parse(&rtp_like), Err(ParseError::NotStun));

    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0; 4]);
    assert_eq!(Message::parse(&trailing), Err(ParseError::Length));

    let mut unaligned = good.clone();
    unaligned[3] = 2;
    unaligned.extend_from_slice(&[0; 2]);
    assert_eq!(Message::parse(&unaligned), Err(ParseError::Length));

    // An attribute claiming 8 bytes with only 4 present.
    let mut overrun = good.clone();
    overrun[3] = 8;
    overrun.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0, 1, 2, 3]);
    assert_eq!(
        Message::parse(&overrun),
        Err(ParseError::Truncated(attr::XOR_MAPPED_ADDRESS))
    );

    // An address of an unknown family.
    let mut family = good.clone();
    family[3] = 12;
    family.extend_from_slice(&[0x00, 0x01, 0x00, 0x08, 0, 3, 0, 80, 1, 2, 3, 4]);
    assert_eq!(
        Message::parse(&family),
        Err(ParseError::Malformed(attr::MAPPED_ADDRESS))
    );
}

#[test]
fn unknown_attributes_are_skipped_or_reported() {
    let mut bytes = Message::new(Class::Request, BINDING, TXID).encode();
    // Comprehension-optional 0x8123 (3 bytes + padding), comprehension-required 0x0042,
    // an ignored USERNAME, then CHANGE-REQUEST twice: the first counts.
    bytes.extend_from_slice(&[0x81, 0x23, 0x00, 0x03, 9, 9, 9, 0]);
    bytes.extend_from_slice(&[0x00, 0x42, 0x00, 0x00]);
    bytes.extend_from_slice(&[0x00, 0x06, 0x00, 0x04, b'a', b'b', b'c', b'd']);
    bytes.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0x02]);
    bytes.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0x06]);
    let len = u16::try_from(bytes.len() - HEADER_LEN).expect("small");
    bytes[2..4].copy_from_slice(&len.to_be_bytes());
    let msg = Message::parse(&bytes).expect("parses");
    assert_eq!(msg.unknown_required, vec![0x0042]);
    assert_eq!(msg.change, Some(Change::PORT));
}

#[test]
fn attributes_after_message_integrity_are_ignored() {
    let mut bytes = Message::new(Class::Success, BINDING, TXID).encode();
    bytes.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
    bytes.extend_from_slice(&[0; 20]);
    bytes.extend_from_slice(&[0x00, 0x20, 0x00, 0x08]);
    bytes.extend_from_slice(&address_value(addr("1.2.3.4:5"), Some(&TXID)));
    let len = u16::try_from(bytes.len() - HEADER_LEN).expect("small");
    bytes[2..4].copy_from_slice(&len.to_be_bytes());
    let msg = Message::parse(&bytes).expect("parses");
    assert_eq!(msg.xor_mapped, None);
}

/// A small deterministic generator, so a failure can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn garbage_never_panics_the_parser_or_the_server() {
    let addrs = [
        addr("10.0.0.1:3478"),
        addr("10.0.0.1:3479"),
        addr("10.0.0.2:3478"),
        addr("10.0.0.2:3479"),
    ];
    let from = addr("192.0.2.9:5000");
    let mut seeds: Vec<Vec<u8>> = vec![RFC5769_IPV4_RESPONSE.to_vec()];
    let mut request = Message::new(Class::Request, BINDING, TXID);
    request.change = Some(Change::IP_AND_PORT);
    seeds.push(request.encode());
    let mut full = Message::new(Class::Success, BINDING, TXID);
    full.xor_mapped = Some(addr("[2001:db8::1]:1"));
    full.other_address = Some(addr("10.0.0.2:3479"));
    full.error = Some((500, "x".into()));
    full.unknown_attributes = vec![1, 2, 3];
    seeds.push(full.encode());

    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut parsed = 0;
    for round in 0..200_000 {
        let mut buf = if round % 4 == 0 {
            // Random bytes behind a valid-looking header.
            let len = rng.below(64) * 4;
            let mut b = vec![0x00, 0x01];
            b.extend_from_slice(&u16::try_from(len).expect("small").to_be_bytes());
            b.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
            b.extend((0..12 + len).map(|_| rng.next() as u8));
            b
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        for _ in 0..rng.below(6) {
            match rng.below(4) {
                0 if !buf.is_empty() => {
                    let i = rng.below(buf.len());
                    buf[i] = rng.next() as u8;
                }
                1 => buf.truncate(rng.below(buf.len() + 1)),
                2 => buf.push(rng.next() as u8),
                _ if buf.len() > 4 => {
                    // Aim at length fields: the header's or an attribute's.
                    let i = [2, 22, 26, 34, 42][rng.below(5)].min(buf.len() - 2);
                    buf[i + 1] = rng.next() as u8;
                }
                _ => {}
            }
        }
        if Message::parse(&buf).is_ok() {
            parsed += 1;
        }
        let _ = answer(&buf, from, rng.below(8), &addrs);
    }
    // The mutations left some messages intact, so the parser saw both kinds.
    assert!(parsed > 1000, "{parsed}");
}

#[test]
fn the_server_answers_only_binding_requests() {
    let addrs = [
        addr("10.0.0.1:3478"),
        addr("10.0.0.1:3479"),
        addr("10.0.0.2:3478"),
        addr("10.0.0.2:3479"),
    ];
    let from = addr("192.0.2.9:5000");
    for class in [Class::Indication, Class::Success, Class::Error] {
        let msg = Message::new(class, BINDING, TXID).encode();
        assert_eq!(answer(&msg, from, 0, &addrs), None);
    }
    let allocate = Message::new(Class::Request, 0x003, TXID).encode();
    assert_eq!(answer(&allocate, from, 0, &addrs), None);

    let (out, bytes) = answer(
        &Message::new(Class::Request, BINDING, TXID).encode(),
        from,
        1,
        &addrs,
    )
    .expect("an answer");
    assert_eq!(out, 1);
    let response = Message::parse(&bytes).expect("parses");
    assert_eq!(response.class, Class::Success);
    assert_eq!(response.transaction, TXID);
    assert_eq!(response.xor_mapped, Some(from));
    assert_eq!(response.response_origin, Some(addrs[1]));
    // Arrived on primary IP, alternate port: the "other" is alternate IP, primary port.
    assert_eq!(response.other_address, Some(addrs[2]));
}

#[test]
fn unknown_required_attributes_get_error_420() {
    let mut bytes = Message::new(Class::Request, BINDING, TXID).encode();
    bytes.extend_from_slice(&[0x00, 0x42, 0x00, 0x00]);
    bytes[3] = 4;
    let addrs = [addr("10.0.0.1:1"); 4];
    let (_, response) = answer(&bytes, addr("192.0.2.9:5000"), 0, &addrs).expect("an answer");
    let response = Message::parse(&response).expect("parses");
    assert_eq!(response.class, Class::Error);
    assert_eq!(response.error.map(|e| e.0), Some(420));
    assert_eq!(response.unknown_attributes, vec![0x0042]);
}

#[test]
fn server_names_are_split_into_host_and_port() {
    assert_eq!(
        split_server("stun:stun.example.org:19302"),
        Some(("stun.example.org", 19302))
    );
    assert_eq!(
        split_server("stun.example.org"),
        Some(("stun.example.org", 3478))
    );
    assert_eq!(
        split_server("stun:1.2.3.4?transport=udp"),
        Some(("1.2.3.4", 3478))
    );
    assert_eq!(
        split_server("[2001:db8::1]:3479"),
        Some(("2001:db8::1", 3479))
    );
    assert_eq!(
        split_server("stun:[2001:db8::1]"),
        Some(("2001:db8::1", 3478))
    );
    assert_eq!(split_server("2001:db8::1"), Some(("2001:db8::1", 3478)));
    assert_eq!(split_server("turn:turn.example.org:3478"), None);
    assert_eq!(split_server("host:notaport"), None);
    assert_eq!(split_server("host:0"), None);
    assert_eq!(split_server(""), None);
    assert_eq!(split_server("stun:"), None);
    assert_eq!(split_server("[::1"), None);
}

// -----------------------------------------------------------------------------------------
// Over loopback: the server on 127.0.0.1 (primary) and 127.0.0.2 (alternate).

async fn loopback_server() -> (SocketAddr, SocketAddr) {
    let server = StunServer::bind(addr("127.0.0.1:0"), "127.0.0.2".parse().expect("ip"), 0)
        .await
        .expect("binds on 127.0.0.1 and 127.0.0.2");
    let (primary, other) = (server.primary(), server.other());
    tokio::spawn(server.run());
    (primary, other)
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.expect("binds")
}

const WAIT: Duration = Duration::from_secs(2);

#[tokio::test]
async fn binding_reports_the_mapped_address_and_the_servers_addresses() {
    let (primary, other) = loopback_server().await;
    let socket = client().await;
    let r = binding(&socket, primary, Change::NONE, WAIT)
        .await
        .expect("answered");
    assert_eq!(r.mapped, socket.local_addr().expect("bound"));
    assert_eq!(r.from, primary);
    assert_eq!(r.response_origin, Some(primary));
    assert_eq!(r.other_address, Some(other));
}

#[tokio::test]
async fn change_request_answers_from_the_other_address_and_port() {
    let (primary, other) = loopback_server().await;
    let socket = client().await;
    let cases = [
        (Change::PORT, SocketAddr::new(primary.ip(), other.port())),
        (
            Change {
                ip: true,
                port: false,
            },
            SocketAddr::new(other.ip(), primary.port()),
        ),
        (Change::IP_AND_PORT, other),
    ];
    for (change, expected) in cases {
        let r = binding(&socket, primary, change, WAIT)
            .await
            .expect("answered");
        assert_eq!(r.from, expected, "{change:?}");
        assert_eq!(r.response_origin, Some(expected), "{change:?}");
    }
    // Sent to the alternate address and port, "change both" answers from the primary.
    let r = binding(&socket, other, Change::IP_AND_PORT, WAIT)
        .await
        .expect("answered");
    assert_eq!(r.from, primary);
    assert_eq!(r.other_address, Some(primary));
}

#[tokio::test]
async fn garbage_is_ignored_and_the_server_keeps_answering() {
    let (primary, other) = loopback_server().await;
    let socket = client().await;
    let mut rng = XorShift(42);
    let response = Message::new(Class::Success, BINDING, TXID).encode();
    let mut junk: Vec<Vec<u8>> = vec![vec![], vec![0; 1], vec![0xff; 1500], response];
    junk.extend((0..50).map(|_| (0..rng.below(200)).map(|_| rng.next() as u8).collect()));
    for to in [primary, other] {
        for j in &junk {
            socket.send_to(j, to).await.expect("sent");
        }
    }
    // None of that is answered: the next datagram is the answer to a real request.
    let r = binding(&socket, primary, Change::NONE, WAIT)
        .await
        .expect("still answering");
    assert_eq!(r.mapped, socket.local_addr().expect("bound"));
    let mut buf = [0; 64];
    let late = tokio::time::timeout(Duration::from_millis(200), socket.recv_from(&mut buf)).await;
    assert!(late.is_err(), "the server answered garbage");
}

#[tokio::test]
async fn lost_requests_are_retransmitted() {
    // A server that drops the first two requests.
    let lossy = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
    let lossy_addr = lossy.local_addr().expect("bound");
    let addrs = [lossy_addr; 4];
    tokio::spawn(async move {
        let mut buf = [0; 1500];
        let mut seen = 0;
        while let Ok((n, from)) = lossy.recv_from(&mut buf).await {
            seen += 1;
            if seen <= 2 {
                continue;
            }
            if let Some((_, response)) = answer(&buf[..n], from, 0, &addrs) {
                let _ = lossy.send_to(&response, from).await;
            }
        }
    });
    let socket = client().await;
    let started = Instant::now();
    let r = binding(&socket, lossy_addr, Change::NONE, WAIT)
        .await
        .expect("answered after retransmissions");
    assert_eq!(r.mapped, socket.local_addr().expect("bound"));
    // Sent at 0, 100 and 300 ms.
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
    let socket = client().await;
    let started = Instant::now();
    let err = binding(
        &socket,
        silent.local_addr().expect("bound"),
        Change::NONE,
        Duration::from_millis(500),
    )
    .await
    .expect_err("nobody answers");
    assert!(matches!(err, StunError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_millis(900));
}

#[tokio::test]
async fn nat_check_on_loopback_finds_no_nat() {
    let (primary, _) = loopback_server().await;
    let report = nat_check(primary, WAIT).await.expect("a report");
    assert!(!report.behind_nat());
    assert_eq!(report.mapping, Behaviour::EndpointIndependent);
    assert_eq!(report.filtering, Behaviour::EndpointIndependent);
    assert!(report.p2p_likely);
    let text = report.to_string();
    assert!(text.contains("no NAT"), "{text}");
    assert!(text.contains("peer-to-peer likely"), "{text}");
}

/// A plain RFC 8489 server: it ignores CHANGE-REQUEST, and claims `other` as its alternate.
async fn plain_server(other: Option<SocketAddr>) -> SocketAddr {
    let plain = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
    let plain_addr = plain.local_addr().expect("bound");
    tokio::spawn(async move {
        let mut buf = [0; 1500];
        while let Ok((n, from)) = plain.recv_from(&mut buf).await {
            let Ok(request) = Message::parse(&buf[..n]) else {
                continue;
            };
            let mut response = Message::new(Class::Success, BINDING, request.transaction);
            response.xor_mapped = Some(from);
            response.other_address = other;
            let _ = plain.send_to(&response.encode(), from).await;
        }
    });
    plain_addr
}

#[tokio::test]
async fn nat_check_says_so_when_the_server_has_no_alternate_address() {
    let report = nat_check(plain_server(None).await, WAIT)
        .await
        .expect("a report");
    assert_eq!(report.filtering, Behaviour::Unknown);
    let text = report.to_string();
    assert!(text.contains("no alternate address"), "{text}");
}

#[tokio::test]
async fn a_server_ignoring_change_request_does_not_pass_for_an_open_nat() {
    let report = nat_check(plain_server(Some(addr("127.0.0.2:9"))).await, WAIT)
        .await
        .expect("a report");
    assert_eq!(report.filtering, Behaviour::Unknown);
    let text = report.to_string();
    assert!(text.contains("ignored CHANGE-REQUEST"), "{text}");
}

#[tokio::test]
async fn public_ip_comes_from_the_first_server_that_answers() {
    let (primary, _) = loopback_server().await;
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
    let servers = vec![
        "not a server".to_string(),
        format!("stun:{}", silent.local_addr().expect("bound")),
        format!("stun:{primary}?transport=udp"),
    ];
    let ip = discover_public_ip(&servers, WAIT).await;
    assert_eq!(ip, Some("127.0.0.1".parse().expect("ip")));

    let nobody = vec![format!("{}", silent.local_addr().expect("bound"))];
    assert_eq!(
        discover_public_ip(&nobody, Duration::from_millis(300)).await,
        None
    );
}
