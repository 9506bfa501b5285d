//! STUN Binding (RFC 8489) and NAT behaviour discovery (RFC 5780): the message format, a
//! client with retransmissions, a server with an alternate address and port, discovery of
//! this host's public address, and `nat-check`'s classification of a NAT.
//!
//! Only what NAT discovery needs is understood: Binding requests and responses with
//! XOR-MAPPED-ADDRESS, MAPPED-ADDRESS, CHANGE-REQUEST, RESPONSE-ORIGIN, OTHER-ADDRESS,
//! ERROR-CODE, UNKNOWN-ATTRIBUTES and SOFTWARE. No authentication, no FINGERPRINT.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::UdpSocket;
use tokio::time::Instant;

const MAGIC_COOKIE: u32 = 0x2112_A442;
const HEADER_LEN: usize = 20;
const DEFAULT_PORT: u16 = 3478;
const BINDING: u16 = 0x001;
const SOFTWARE: &str = concat!("parley ", env!("CARGO_PKG_VERSION"));
/// First retransmission interval; it doubles up to `MAX_RTO`.
const FIRST_RTO: Duration = Duration::from_millis(100);
const MAX_RTO: Duration = Duration::from_millis(1600);
/// Larger than any response we understand; longer datagrams are truncated and then rejected.
const RECV_BUF: usize = 2048;

mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const CHANGE_REQUEST: u16 = 0x0003;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    pub const SOFTWARE: u16 = 0x8022;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    pub const OTHER_ADDRESS: u16 = 0x802C;

    /// Comprehension-required attributes we know and deliberately ignore (credentials and ICE
    /// attributes have no meaning to a server without authentication).
    pub const IGNORED: [u16; 8] = [
        USERNAME,
        MESSAGE_INTEGRITY,
        MESSAGE_INTEGRITY_SHA256,
        USERHASH,
        REALM,
        NONCE,
        PRIORITY,
        USE_CANDIDATE,
    ];
}

/// What a Binding request asks the server to change when it answers (RFC 5780
/// CHANGE-REQUEST): the source IP address, the source port, or both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Change {
    pub ip: bool,
    pub port: bool,
}

impl Change {
    pub const NONE: Change = Change {
        ip: false,
        port: false,
    };
    pub const PORT: Change = Change {
        ip: false,
        port: true,
    };
    pub const IP_AND_PORT: Change = Change {
        ip: true,
        port: true,
    };

    fn is_none(self) -> bool {
        !self.ip && !self.port
    }
}

/// A successful Binding response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingResponse {
    /// Our address as the server saw it (XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS).
    pub mapped: SocketAddr,
    /// The address the server says it answered from (RESPONSE-ORIGIN).
    pub response_origin: Option<SocketAddr>,
    /// The server's alternate address and port (OTHER-ADDRESS), if it has one.
    pub other_address: Option<SocketAddr>,
    /// Where the response actually came from.
    pub from: SocketAddr,
}

/// Why a STUN transaction failed.
#[derive(Debug, thiserror::Error)]
pub enum StunError {
    #[error("STUN socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("no STUN answer from {server} within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("STUN server {server} answered with error {code}: {reason}")]
    ErrorResponse {
        server: SocketAddr,
        code: u16,
        reason: String,
    },
    #[error("the answer of STUN server {server} has no mapped address")]
    NoMappedAddress { server: SocketAddr },
    #[error("{0:?} is not a STUN server address (like stun:host:3478 or host:3478)")]
    BadServer(String),
    #[error("cannot resolve STUN server {server:?}: {source}")]
    Resolve {
        server: String,
        source: std::io::Error,
    },
}

/// Why a datagram is not a STUN message we can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("shorter than a STUN header")]
    TooShort,
    #[error("not a STUN message (leading bits or magic cookie)")]
    NotStun,
    #[error("the length field disagrees with the datagram")]
    Length,
    #[error("attribute {0:#06x} runs past the end of the message")]
    Truncated(u16),
    #[error("attribute {0:#06x} is malformed")]
    Malformed(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TransactionId([u8; 12]);

impl TransactionId {
    fn random() -> TransactionId {
        let mut id = [0; 12];
        if getrandom::fill(&mut id).is_err() {
            // Transaction ids must be unpredictable to off-path attackers, but a NAT check
            // with a weaker id is still better than none: mix the clock in instead.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            id.copy_from_slice(&nanos.to_be_bytes()[4..]);
        }
        TransactionId(id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Request,
    Indication,
    Success,
    Error,
}

/// A STUN message with the attributes this module understands.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Message {
    class: Class,
    method: u16,
    transaction: TransactionId,
    mapped: Option<SocketAddr>,
    xor_mapped: Option<SocketAddr>,
    change: Option<Change>,
    response_origin: Option<SocketAddr>,
    other_address: Option<SocketAddr>,
    error: Option<(u16, String)>,
    unknown_attributes: Vec<u16>,
    software: Option<String>,
    /// Comprehension-required attributes (type < 0x8000) that this module does not know.
    unknown_required: Vec<u16>,
}

impl Message {
    fn new(class: Class, method: u16, transaction: TransactionId) -> Message {
        Message {
            class,
            method,
            transaction,
            mapped: None,
            xor_mapped: None,
            change: None,
            response_origin: None,
            other_address: None,
            error: None,
            unknown_attributes: Vec::new(),
            software: None,
            unknown_required: Vec::new(),
        }
    }

    fn parse(buf: &[u8]) -> Result<Message, ParseError> {
        if buf.len() < HEADER_LEN {
            return Err(ParseError::TooShort);
        }
        let msg_type = be16(buf, 0);
        if msg_type & 0xC000 != 0 || be32(buf, 4) != MAGIC_COOKIE {
            return Err(ParseError::NotStun);
        }
        let len = usize::from(be16(buf, 2));
        if len % 4 != 0 || HEADER_LEN + len != buf.len() {
            return Err(ParseError::Length);
        }
        let class = match msg_type & 0x0110 {
            0x0000 => Class::Request,
            0x0010 => Class::Indication,
            0x0100 => Class::Success,
            _ => Class::Error,
        };
        let method = (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2);
        let mut transaction = [0; 12];
        transaction.copy_from_slice(&buf[8..HEADER_LEN]);
        let mut msg = Message::new(class, method, TransactionId(transaction));

        // Attributes after MESSAGE-INTEGRITY (other than FINGERPRINT) and after FINGERPRINT
        // are to be ignored (RFC 8489 §14.5, §14.7); of repeated attributes the first counts.
        let mut after_integrity = false;
        let mut pos = HEADER_LEN;
        while pos < buf.len() {
            if buf.len() - pos < 4 {
                return Err(ParseError::Length);
            }
            let typ = be16(buf, pos);
            let alen = usize::from(be16(buf, pos + 2));
            let start = pos + 4;
            let padded = alen.div_ceil(4) * 4;
            if buf.len() - start < padded {
                return Err(ParseError::Truncated(typ));
            }
            let value = &buf[start..start + alen];
            pos = start + padded;
            if typ == attr::FINGERPRINT {
                break;
            }
            if after_integrity {
                continue;
            }
            let txid = msg.transaction;
            match typ {
                attr::MAPPED_ADDRESS if msg.mapped.is_none() => {
                    msg.mapped = Some(read_address(typ, value, None)?);
                }
                attr::XOR_MAPPED_ADDRESS if msg.xor_mapped.is_none() => {
                    msg.xor_mapped = Some(read_address(typ, value, Some(&txid))?);
                }
                attr::RESPONSE_ORIGIN if msg.response_origin.is_none() => {
                    msg.response_origin = Some(read_address(typ, value, None)?);
                }
                attr::OTHER_ADDRESS if msg.other_address.is_none() => {
                    msg.other_address = Some(read_address(typ, value, None)?);
                }
                attr::CHANGE_REQUEST if msg.change.is_none() => {
                    let [_, _, _, flags] = *value else {
                        return Err(ParseError::Malformed(typ));
                    };
                    msg.change = Some(Change {
                        ip: flags & 0x04 != 0,
                        port: flags & 0x02 != 0,
                    });
                }
                attr::ERROR_CODE if msg.error.is_none() => {
                    if value.len() < 4 {
                        return Err(ParseError::Malformed(typ));
                    }
                    let code = u16::from(value[2] & 0x07) * 100 + u16::from(value[3]);
                    let reason = String::from_utf8_lossy(&value[4..]).into_owned();
                    msg.error = Some((code, reason));
                }
                attr::UNKNOWN_ATTRIBUTES if msg.unknown_attributes.is_empty() => {
                    msg.unknown_attributes = value.chunks_exact(2).map(|c| be16(c, 0)).collect();
                }
                attr::SOFTWARE if msg.software.is_none() => {
                    msg.software = Some(String::from_utf8_lossy(value).into_owned());
                }
                attr::MESSAGE_INTEGRITY | attr::MESSAGE_INTEGRITY_SHA256 => {
                    after_integrity = true;
                }
                attr::MAPPED_ADDRESS
                | attr::XOR_MAPPED_ADDRESS
                | attr::RESPONSE_ORIGIN
                | attr::OTHER_ADDRESS
                | attr::CHANGE_REQUEST
                | attr::ERROR_CODE
                | attr::UNKNOWN_ATTRIBUTES
                | attr::SOFTWARE => {}
                // A peer can list many; a few are enough to answer with.
                t if t < 0x8000
                    && !attr::IGNORED.contains(&t)
                    && msg.unknown_required.len() < 16
                    && !msg.unknown_required.contains(&t) =>
                {
                    msg.unknown_required.push(t);
                }
                _ => {}
            }
        }
        Ok(msg)
    }

    fn encode(&self) -> Vec<u8> {
        let class_bits = match self.class {
            Class::Request => 0x0000,
            Class::Indication => 0x0010,
            Class::Success => 0x0100,
            Class::Error => 0x0110,
        };
        let m = self.method & 0x0FFF;
        let msg_type = (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | class_bits;
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&msg_type.to_be_bytes());
        out.extend_from_slice(&[0, 0]); // length, set below
        out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        out.extend_from_slice(&self.transaction.0);

        if let Some(a) = self.xor_mapped {
            put_attr(
                &mut out,
                attr::XOR_MAPPED_ADDRESS,
                &address_value(a, Some(&self.transaction)),
            );
        }
        if let Some(a) = self.mapped {
            put_attr(&mut out, attr::MAPPED_ADDRESS, &address_value(a, None));
        }
        if let Some(c) = self.change {
            let flags = (u8::from(c.ip) << 2) | (u8::from(c.port) << 1);
            put_attr(&mut out, attr::CHANGE_REQUEST, &[0, 0, 0, flags]);
        }
        if let Some(a) = self.response_origin {
            put_attr(&mut out, attr::RESPONSE_ORIGIN, &address_value(a, None));
        }
        if let Some(a) = self.other_address {
            put_attr(&mut out, attr::OTHER_ADDRESS, &address_value(a, None));
        }
        if let Some((code, reason)) = &self.error {
            let mut v = vec![0, 0, ((code / 100) & 0x07) as u8, (code % 100) as u8];
            v.extend_from_slice(reason.as_bytes());
            put_attr(&mut out, attr::ERROR_CODE, &v);
        }
        if !self.unknown_attributes.is_empty() {
            let v: Vec<u8> = self
                .unknown_attributes
                .iter()
                .flat_map(|t| t.to_be_bytes())
                .collect();
            put_attr(&mut out, attr::UNKNOWN_ATTRIBUTES, &v);
        }
        if let Some(s) = &self.software {
            put_attr(&mut out, attr::SOFTWARE, s.as_bytes());
        }
        // Our messages are a few hundred bytes at most, far below the 16-bit length field.
        let len = u16::try_from(out.len() - HEADER_LEN).unwrap_or(u16::MAX);
        out[2..4].copy_from_slice(&len.to_be_bytes());
        out
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put_attr(out: &mut Vec<u8>, typ: u16, value: &[u8]) {
    // Attribute values here are addresses, flags, short reasons and names: they fit.
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&value[..usize::from(len)]);
    out.resize(out.len().div_ceil(4) * 4, 0);
}

/// The XOR mask of an address: the magic cookie, then (IPv6) the transaction id.
fn xor_mask(txid: &TransactionId) -> [u8; 16] {
    let mut mask = [0; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    mask[4..].copy_from_slice(&txid.0);
    mask
}

/// An address attribute's value; XORed (XOR-MAPPED-ADDRESS) when `xor` has the transaction.
fn read_address(
    typ: u16,
    value: &[u8],
    xor: Option<&TransactionId>,
) -> Result<SocketAddr, ParseError> {
    let mask = xor.map(xor_mask).unwrap_or([0; 16]);
    let port_mask = u16::from_be_bytes([mask[0], mask[1]]);
    match (value.get(1), value.len()) {
        (Some(0x01), 8) => {
            let port = be16(value, 2) ^ port_mask;
            let mut ip = [0; 4];
            for (i, b) in ip.iter_mut().enumerate() {
                *b = value[4 + i] ^ mask[i];
            }
            Ok(SocketAddr::new(Ipv4Addr::from(ip).into(), port))
        }
        (Some(0x02), 20) => {
            let port = be16(value, 2) ^ port_mask;
            let mut ip = [0; 16];
            for (i, b) in ip.iter_mut().enumerate() {
                *b = value[4 + i] ^ mask[i];
            }
            Ok(SocketAddr::new(Ipv6Addr::from(ip).into(), port))
        }
        _ => Err(ParseError::Malformed(typ)),
    }
}

fn address_value(addr: SocketAddr, xor: Option<&TransactionId>) -> Vec<u8> {
    let mask = xor.map(xor_mask).unwrap_or([0; 16]);
    let port = addr.port() ^ u16::from_be_bytes([mask[0], mask[1]]);
    let (family, ip): (u8, Vec<u8>) = match addr.ip() {
        IpAddr::V4(ip) => (0x01, ip.octets().to_vec()),
        IpAddr::V6(ip) => (0x02, ip.octets().to_vec()),
    };
    let mut v = vec![0, family];
    v.extend_from_slice(&port.to_be_bytes());
    v.extend(ip.iter().zip(mask).map(|(b, m)| b ^ m));
    v
}

// ---------------------------------------------------------------------------------------
// Client

/// Sends a Binding request to `server` from `socket` and waits for the answer, resending
/// after 100 ms, 200 ms, 400 ms, … until `timeout` has passed. The answer may come from
/// any address (a CHANGE-REQUEST asks the server to answer from another one).
pub async fn binding(
    socket: &UdpSocket,
    server: SocketAddr,
    change: Change,
    timeout: Duration,
) -> Result<BindingResponse, StunError> {
    let transaction = TransactionId::random();
    let mut request = Message::new(Class::Request, BINDING, transaction);
    if !change.is_none() {
        request.change = Some(change);
    }
    let request = request.encode();

    let deadline = Instant::now() + timeout;
    let mut rto = FIRST_RTO;
    let mut buf = vec![0; RECV_BUF];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(StunError::Timeout { server, timeout });
        }
        socket.send_to(&request, server).await?;
        let resend_at = (now + rto).min(deadline);
        rto = (rto * 2).min(MAX_RTO);
        while let Ok(received) =
            tokio::time::timeout_at(resend_at, socket.recv_from(&mut buf)).await
        {
            let (n, from) = match received {
                Ok(r) => r,
                // ICMP errors of earlier datagrams (on some systems even on unconnected
                // sockets): the server may still answer a retransmission.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Ok(msg) = Message::parse(&buf[..n]) else {
                continue;
            };
            if msg.transaction != transaction || msg.method != BINDING {
                continue;
            }
            match msg.class {
                Class::Success => {
                    let mapped = msg
                        .xor_mapped
                        .or(msg.mapped)
                        .ok_or(StunError::NoMappedAddress { server })?;
                    return Ok(BindingResponse {
                        mapped,
                        response_origin: msg.response_origin,
                        other_address: msg.other_address,
                        from,
                    });
                }
                Class::Error => {
                    let (code, reason) = msg.error.unwrap_or((0, String::new()));
                    return Err(StunError::ErrorResponse {
                        server,
                        code,
                        reason,
                    });
                }
                Class::Request | Class::Indication => {}
            }
        }
    }
}

/// The addresses of a STUN server given as `stun:host:port`, `host:port` or `host` (port
/// 3478); a `?transport=udp` suffix is allowed.
pub async fn resolve(server: &str) -> Result<Vec<SocketAddr>, StunError> {
    let (host, port) = split_server(server).ok_or_else(|| StunError::BadServer(server.into()))?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| StunError::Resolve {
            server: server.into(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(StunError::Resolve {
            server: server.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
        });
    }
    Ok(addrs)
}

fn split_server(server: &str) -> Option<(&str, u16)> {
    let s = server.trim();
    let s = s.strip_prefix("stun:").unwrap_or(s);
    let s = s.split('?').next().unwrap_or(s);
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, DEFAULT_PORT),
            _ => (host, after.strip_prefix(':')?.parse().ok()?),
        }
    } else if s.parse::<Ipv6Addr>().is_ok() {
        (s, DEFAULT_PORT)
    } else if let Some((host, port)) = s.rsplit_once(':') {
        (host, port.parse().ok()?)
    } else {
        (s, DEFAULT_PORT)
    };
    let valid = !host.is_empty()
        && !host.contains(['/', ' ', '@'])
        && (!host.contains(':') || host.parse::<Ipv6Addr>().is_ok());
    (valid && port != 0).then_some((host, port))
}

fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// This host's public IP address as the first answering STUN server sees it; `None` when no
/// server answers within `timeout`. The servers are asked at the same time.
pub async fn discover_public_ip(servers: &[String], timeout: Duration) -> Option<IpAddr> {
    let mut asks = tokio::task::JoinSet::new();
    for server in servers {
        let server = server.clone();
        asks.spawn(async move {
            let addrs = match resolve(&server).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(%server, error = %e, "STUN server not resolved");
                    return None;
                }
            };
            for addr in addrs {
                let answer = match UdpSocket::bind(unspecified_like(addr)).await {
                    Ok(socket) => binding(&socket, addr, Change::NONE, timeout).await,
                    Err(e) => Err(e.into()),
                };
                match answer {
                    Ok(r) => return Some(r.mapped.ip()),
                    Err(e) => tracing::debug!(%server, %addr, error = %e, "STUN binding failed"),
                }
            }
            None
        });
    }
    let first = async {
        while let Some(done) = asks.join_next().await {
            if let Ok(Some(ip)) = done {
                return Some(ip);
            }
        }
        None
    };
    // Dropping the set aborts the questions still open.
    tokio::time::timeout(timeout, first).await.ok().flatten()
}

// ---------------------------------------------------------------------------------------
// NAT behaviour discovery (RFC 5780 §4.3, §4.4)

/// How a NAT maps or filters, by what it depends on (RFC 4787 terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
    /// The tests could not tell (no alternate address, or no answers).
    Unknown,
}

impl fmt::Display for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Behaviour::EndpointIndependent => "endpoint-independent",
            Behaviour::AddressDependent => "address-dependent",
            Behaviour::AddressAndPortDependent => "address-and-port-dependent",
            Behaviour::Unknown => "unknown",
        })
    }
}

/// What `nat_check` found out about the network between this host and a STUN server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatReport {
    pub server: SocketAddr,
    pub local: SocketAddr,
    pub mapped: SocketAddr,
    pub mapping: Behaviour,
    pub filtering: Behaviour,
    /// Peer-to-peer media between two such hosts is likely to work: the NAT (if any) keeps
    /// one public address per local socket, so ICE candidates learnt by STUN stay valid.
    pub p2p_likely: bool,
    /// Why a behaviour is unknown, and other things worth saying.
    pub notes: Vec<String>,
}

impl NatReport {
    pub fn behind_nat(&self) -> bool {
        self.mapped != self.local
    }
}

impl fmt::Display for NatReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "STUN server:     {}", self.server)?;
        writeln!(f, "local address:   {}", self.local)?;
        if self.behind_nat() {
            writeln!(f, "mapped address:  {} (behind a NAT)", self.mapped)?;
        } else {
            writeln!(
                f,
                "mapped address:  {} (no NAT: the same as the local address)",
                self.mapped
            )?;
        }
        writeln!(f, "mapping:         {}", self.mapping)?;
        writeln!(f, "filtering:       {}", self.filtering)?;
        for note in &self.notes {
            writeln!(f, "note:            {note}")?;
        }
        if self.p2p_likely {
            writeln!(f, "verdict:         peer-to-peer likely")
        } else {
            writeln!(
                f,
                "verdict:         peer-to-peer unlikely: a TURN relay will be needed"
            )
        }
    }
}

/// Classifies the NAT between this host and `server` (which must have an alternate address
/// and port, like `parley stun-server`): mapping by RFC 5780 §4.3, filtering by §4.4. Each
/// STUN transaction may take up to `timeout`; filtering tests wait for answers that a
/// filtering NAT never lets through, so a check can take about three times `timeout`.
pub async fn nat_check(server: SocketAddr, timeout: Duration) -> anyhow::Result<NatReport> {
    let local_ip = local_ip_towards(server)
        .await
        .with_context(|| format!("no route to {server}"))?;
    let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0))
        .await
        .context("binding a UDP socket")?;
    let local = socket.local_addr()?;
    let mut notes = Vec::new();

    // Mapping, test I.
    let first = binding(&socket, server, Change::NONE, timeout)
        .await
        .context("mapping test I (a plain Binding request)")?;
    let mapped = first.mapped;
    let other = first.other_address.filter(|o| o.ip() != server.ip());
    if other.is_none() {
        notes.push(format!(
            "{server} has no alternate address (OTHER-ADDRESS), so mapping and filtering \
             cannot be tested; use a server that supports RFC 5780, like `parley stun-server`"
        ));
    }

    let mapping = match other {
        _ if mapped == local => Behaviour::EndpointIndependent,
        None => Behaviour::Unknown,
        Some(other) => mapping_behaviour(&socket, mapped, server, other, timeout, &mut notes).await,
    };

    let filtering = match other {
        None => Behaviour::Unknown,
        Some(_) => {
            // A fresh socket: the mapping tests opened the NAT towards the alternate
            // address from the first one, which would let the filtering answers in.
            let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0))
                .await
                .context("binding a UDP socket")?;
            filtering_behaviour(&socket, server, timeout, &mut notes).await
        }
    };

    let p2p_likely = !matches!(
        mapping,
        Behaviour::AddressDependent | Behaviour::AddressAndPortDependent
    );
    Ok(NatReport {
        server,
        local,
        mapped,
        mapping,
        filtering,
        p2p_likely,
        notes,
    })
}

async fn mapping_behaviour(
    socket: &UdpSocket,
    mapped: SocketAddr,
    server: SocketAddr,
    other: SocketAddr,
    timeout: Duration,
    notes: &mut Vec<String>,
) -> Behaviour {
    // Test II: the alternate address, the primary port.
    let second = match binding(
        socket,
        SocketAddr::new(other.ip(), server.port()),
        Change::NONE,
        timeout,
    )
    .await
    {
        Ok(r) => r.mapped,
        Err(e) => {
            notes.push(format!("mapping test II failed: {e}"));
            return Behaviour::Unknown;
        }
    };
    if second == mapped {
        return Behaviour::EndpointIndependent;
    }
    // Test III: the alternate address and port.
    match binding(socket, other, Change::NONE, timeout).await {
        Ok(r) if r.mapped == second => Behaviour::AddressDependent,
        Ok(_) => Behaviour::AddressAndPortDependent,
        Err(e) => {
            notes.push(format!("mapping test III failed: {e}"));
            Behaviour::Unknown
        }
    }
}

async fn filtering_behaviour(
    socket: &UdpSocket,
    server: SocketAddr,
    timeout: Duration,
    notes: &mut Vec<String>,
) -> Behaviour {
    // Test I opens the NAT towards the server's primary address and port.
    if let Err(e) = binding(socket, server, Change::NONE, timeout).await {
        notes.push(format!("filtering test I failed: {e}"));
        return Behaviour::Unknown;
    }
    let ignored = |from: SocketAddr| {
        format!("{server} ignored CHANGE-REQUEST (answered from {from}): filtering unknown")
    };
    // Test II: answered from the alternate address and port.
    match binding(socket, server, Change::IP_AND_PORT, timeout).await {
        Ok(r) if r.from.ip() == server.ip() || r.from.port() == server.port() => {
            notes.push(ignored(r.from));
            return Behaviour::Unknown;
        }
        Ok(_) => return Behaviour::EndpointIndependent,
        Err(StunError::Timeout { .. }) => {}
        Err(e) => {
            notes.push(format!("filtering test II failed: {e}"));
            return Behaviour::Unknown;
        }
    }
    // Test III: answered from the primary address, alternate port.
    match binding(socket, server, Change::PORT, timeout).await {
        Ok(r) if r.from.port() == server.port() => {
            notes.push(ignored(r.from));
            Behaviour::Unknown
        }
        Ok(_) => Behaviour::AddressDependent,
        Err(StunError::Timeout { .. }) => Behaviour::AddressAndPortDependent,
        Err(e) => {
            notes.push(format!("filtering test III failed: {e}"));
            Behaviour::Unknown
        }
    }
}

/// The local address the system would send from to reach `server` (no packet is sent).
async fn local_ip_towards(server: SocketAddr) -> std::io::Result<IpAddr> {
    let probe = UdpSocket::bind(unspecified_like(server)).await?;
    probe.connect(server).await?;
    Ok(probe.local_addr()?.ip())
}

// ---------------------------------------------------------------------------------------
// Server

/// An RFC 5780 STUN server: four sockets, primary and alternate IP × primary and alternate
/// port. Index bit 1 is "alternate IP", bit 0 "alternate port".
pub struct StunServer {
    sockets: Arc<[UdpSocket; 4]>,
    addrs: [SocketAddr; 4],
}

impl StunServer {
    /// Binds the four sockets; port 0 (primary or alternate) picks a free port.
    pub async fn bind(
        primary: SocketAddr,
        alternate_ip: IpAddr,
        alternate_port: u16,
    ) -> anyhow::Result<StunServer> {
        anyhow::ensure!(
            !primary.ip().is_unspecified() && !alternate_ip.is_unspecified(),
            "the STUN server needs two specific addresses (not {} or {alternate_ip}): \
             responses say which address they come from",
            primary.ip()
        );
        anyhow::ensure!(
            primary.is_ipv4() == alternate_ip.is_ipv4(),
            "the primary ({}) and alternate ({alternate_ip}) addresses must be of one family",
            primary.ip()
        );
        anyhow::ensure!(
            primary.ip() != alternate_ip,
            "the alternate address must differ from the primary address"
        );
        anyhow::ensure!(
            primary.port() == 0 || primary.port() != alternate_port,
            "the alternate port must differ from the primary port"
        );
        async fn bind_one(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
            UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding STUN socket {addr}"))
        }
        let pp = bind_one(primary).await?;
        let port = pp.local_addr()?.port();
        let pa = bind_one(SocketAddr::new(primary.ip(), alternate_port)).await?;
        let alt_port = pa.local_addr()?.port();
        let ap = bind_one(SocketAddr::new(alternate_ip, port)).await?;
        let aa = bind_one(SocketAddr::new(alternate_ip, alt_port)).await?;
        let sockets = [pp, pa, ap, aa];
        let mut addrs = [primary; 4];
        for (a, s) in addrs.iter_mut().zip(&sockets) {
            *a = s.local_addr()?;
        }
        Ok(StunServer {
            sockets: Arc::new(sockets),
            addrs,
        })
    }

    /// The primary address and port.
    pub fn primary(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The alternate address and port.
    pub fn other(&self) -> SocketAddr {
        self.addrs[3]
    }

    /// Answers Binding requests until a socket fails.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..4 {
            let sockets = self.sockets.clone();
            let addrs = self.addrs;
            tasks.spawn(async move { serve(&sockets, addrs, index).await });
        }
        match tasks.join_next().await {
            Some(Ok(result)) => result,
            Some(Err(e)) => Err(e).context("STUN server task"),
            None => Ok(()),
        }
    }
}

/// Runs an RFC 5780 STUN server on `primary` with `alternate_ip` and `alternate_port`.
pub async fn run_stun_server(
    primary: SocketAddr,
    alternate_ip: IpAddr,
    alternate_port: u16,
) -> anyhow::Result<()> {
    let server = StunServer::bind(primary, alternate_ip, alternate_port).await?;
    tracing::info!(
        primary = %server.primary(),
        alternate = %server.other(),
        "STUN server listening"
    );
    server.run().await
}

async fn serve(
    sockets: &[UdpSocket; 4],
    addrs: [SocketAddr; 4],
    index: usize,
) -> anyhow::Result<()> {
    let mut buf = vec![0; RECV_BUF];
    loop {
        let (n, from) = match sockets[index].recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("receiving on {}", addrs[index])),
        };
        let Some((out, response)) = answer(&buf[..n], from, index, &addrs) else {
            tracing::trace!(%from, len = n, "ignored a datagram that is not a Binding request");
            continue;
        };
        if let Err(e) = sockets[out].send_to(&response, from).await {
            tracing::debug!(%from, error = %e, "sending a STUN response failed");
        }
    }
}

/// The response to a datagram that arrived on socket `arrived_on` from `from`: which
/// socket sends it, and its bytes. `None` for anything but a Binding request.
fn answer(
    request: &[u8],
    from: SocketAddr,
    arrived_on: usize,
    addrs: &[SocketAddr; 4],
) -> Option<(usize, Vec<u8>)> {
    let request = Message::parse(request).ok()?;
    if request.class != Class::Request || request.method != BINDING {
        return None;
    }
    let arrived_on = arrived_on & 3;
    if !request.unknown_required.is_empty() {
        let mut response = Message::new(Class::Error, BINDING, request.transaction);
        response.error = Some((420, "Unknown Attribute".into()));
        response.unknown_attributes = request.unknown_required;
        response.software = Some(SOFTWARE.into());
        return Some((arrived_on, response.encode()));
    }
    let change = request.change.unwrap_or_default();
    let out = arrived_on ^ (usize::from(change.ip) << 1) ^ usize::from(change.port);
    let mut response = Message::new(Class::Success, BINDING, request.transaction);
    response.xor_mapped = Some(from);
    response.response_origin = Some(addrs[out]);
    // OTHER-ADDRESS is where a "change IP and port" answer would come from.
    response.other_address = Some(addrs[arrived_on ^ 3]);
    response.software = Some(SOFTWARE.into());
    Some((out, response.encode()))
}

#[cfg(test)]
#[path = "stun_tests.rs"]
mod tests;
