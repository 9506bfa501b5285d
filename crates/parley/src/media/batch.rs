//! Sending many datagrams to many addresses with one `sendmmsg` call (quinn-udp batches only
//! GSO segments to one destination). IPv4 only: each datagram may name its source address
//! (`IP_PKTINFO`), so a reply leaves from the address the peer sent to.
//!
//! With segmentation offload (UDP GSO), consecutive datagrams to one destination from one
//! source, all of one length but for a shorter last, go as one message that the kernel (or the
//! network card) splits: a video frame's packets to one viewer cross the stack once.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;

/// Most messages in one call.
pub const MAX: usize = 32;
/// Most datagrams in one call, each segment counted.
const MAX_DATAGRAMS: usize = 256;
/// Most segments in one message (the kernel's `UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes in one message of segments: one UDP datagram's payload over IPv4.
const MAX_MESSAGE_BYTES: usize = 65_507;

/// One datagram to send.
pub struct Datagram<'a> {
    pub destination: SocketAddrV4,
    /// The local address to send from (a candidate address of this host), if any.
    pub source: Option<Ipv4Addr>,
    pub contents: &'a [u8],
}

/// Room for one `in_pktinfo` and one `UDP_SEGMENT` control message, aligned for `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Control([u8; 64]);

/// One message: its first datagram and how many it carries.
#[derive(Clone, Copy, Default)]
struct Run {
    first: usize,
    count: usize,
}

/// The arrays one `sendmmsg` call describes its messages with, kept from call to call: set
/// up afresh for each call would mean clearing some 8 KB for a handful of datagrams.
pub struct Sender {
    iovs: [libc::iovec; MAX_DATAGRAMS],
    addrs: [libc::sockaddr_in; MAX],
    controls: [Control; MAX],
    headers: [libc::mmsghdr; MAX],
    runs: [Run; MAX],
}

// SAFETY: the raw pointers in the arrays are written by `send` before the call that reads
// them, and never read otherwise; between calls they are stale values that nothing uses.
unsafe impl Send for Sender {}

impl Sender {
    pub fn new() -> Box<Sender> {
        Box::new(Sender {
            // SAFETY: plain C structs, for which all-zero bytes are a valid value.
            iovs: unsafe { mem::zeroed() },
            addrs: unsafe { mem::zeroed() },
            controls: [Control([0; 64]); MAX],
            headers: unsafe { mem::zeroed() },
            runs: [Run::default(); MAX],
        })
    }

    /// Sends the leading datagrams of `items` on `fd`: those that `datagram` maps, up to the
    /// first it maps to `None`. Runs of up to `max_segments` datagrams (1: no segmentation)
    /// go as one message each. Returns how many datagrams the kernel took: fewer than all when
    /// one fails, when the socket buffer is full, or past what one call takes (0 for none
    /// given). An error is that of the first message (`WouldBlock` when the buffer is full;
    /// `EIO` or `EINVAL` for a run when the network device cannot segment).
    pub fn send<'a, T>(
        &mut self,
        fd: RawFd,
        items: &'a [T],
        datagram: impl Fn(&'a T) -> Option<Datagram<'a>>,
        max_segments: usize,
    ) -> io::Result<usize> {
        let max_segments = max_segments.clamp(1, MAX_SEGMENTS);
        let Sender {
            iovs,
            addrs,
            controls,
            headers,
            runs,
        } = self;
        let mut msgs = 0;
        // The current run's destination, source, segment size and bytes.
        let mut open: Option<(SocketAddrV4, Option<Ipv4Addr>, usize, usize)> = None;
        for (i, d) in items
            .iter()
            .take(MAX_DATAGRAMS)
            .map_while(datagram)
            .enumerate()
        {
            let len = d.contents.len();
            let joins = open.is_some_and(|(dest, src, seg, bytes)| {
                dest == d.destination
                    && src == d.source
                    && len <= seg
                    && runs[msgs - 1].count < max_segments
                    && bytes + len <= MAX_MESSAGE_BYTES
            });
            if joins {
                runs[msgs - 1].count += 1;
                open = open
                    .map(|(dest, src, seg, bytes)| (dest, src, seg, bytes + len))
                    // A shorter datagram ends its run: only the last segment may be shorter.
                    .filter(|&(_, _, seg, _)| len == seg);
            } else {
                if msgs == MAX {
                    break;
                }
                runs[msgs] = Run { first: i, count: 1 };
                addrs[msgs] = sockaddr(d.destination);
                let hdr = &mut headers[msgs].msg_hdr;
                hdr.msg_control = std::ptr::null_mut();
                hdr.msg_controllen = 0;
                hdr.msg_flags = 0;
                set_source(hdr, &mut controls[msgs], d.source);
                msgs += 1;
                open = (max_segments > 1 && len > 0).then_some((d.destination, d.source, len, len));
            }
            iovs[i] = libc::iovec {
                iov_base: d.contents.as_ptr() as *mut libc::c_void,
                iov_len: len,
            };
        }
        if msgs == 0 {
            return Ok(0);
        }
        for i in 0..msgs {
            let run = runs[i];
            let hdr = &mut headers[i].msg_hdr;
            hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
            hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            hdr.msg_iov = &mut iovs[run.first];
            hdr.msg_iovlen = run.count as _;
            if run.count > 1 {
                let segment = iovs[run.first].iov_len as u16;
                push_control(
                    hdr,
                    &mut controls[i],
                    libc::SOL_UDP,
                    libc::UDP_SEGMENT,
                    segment,
                );
            }
        }
        // SAFETY: `headers[..msgs]` were all set above, and point into `addrs`, `iovs`,
        // `controls` and the datagrams' contents, all alive and unmoved during the call.
        let sent = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), msgs as libc::c_uint, 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(runs[..sent as usize].iter().map(|r| r.count).sum())
    }

    /// Whether the first message of the last [`Sender::send`] that sent any carried segments
    /// (the one its error, if any, is about).
    pub fn first_was_segmented(&self) -> bool {
        self.runs[0].count > 1
    }

    /// Whether `err`, from the last [`Sender::send`], says that this path takes no segments
    /// (`EIO`: a route through IPsec, a device without checksum offload on older kernels;
    /// `EINVAL`: a socket without UDP checksums, a segment larger than the path's MTU). Only a
    /// message that carried segments tells that; a single datagram's `EINVAL` is its own.
    pub fn segmentation_refused(&self, err: &io::Error) -> bool {
        self.first_was_segmented() && matches!(err.raw_os_error(), Some(libc::EIO | libc::EINVAL))
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Names the address `hdr`'s message leaves from (`IP_PKTINFO`), if any.
fn set_source(hdr: &mut libc::msghdr, control: &mut Control, source: Option<Ipv4Addr>) {
    let Some(source) = source else {
        return;
    };
    let info = libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: libc::in_addr {
            s_addr: u32::from(source).to_be(),
        },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    push_control(hdr, control, libc::IPPROTO_IP, libc::IP_PKTINFO, info);
}

/// Appends one control message to `hdr`, whose control buffer is `control`.
fn push_control<V: Copy>(
    hdr: &mut libc::msghdr,
    control: &mut Control,
    level: libc::c_int,
    ty: libc::c_int,
    value: V,
) {
    // A `usize` with glibc, a `socklen_t` elsewhere.
    #[allow(clippy::unnecessary_cast)]
    let used = hdr.msg_controllen as usize;
    // SAFETY: a pure computation on a length.
    let space = unsafe { libc::CMSG_SPACE(mem::size_of::<V>() as u32) } as usize;
    assert!(
        used + space <= mem::size_of::<Control>(),
        "control messages fit their buffer"
    );
    hdr.msg_control = control.0.as_mut_ptr().cast();
    hdr.msg_controllen = (used + space) as _;
    // SAFETY: the control buffer holds `used + space` bytes (checked above) and is aligned for
    // `cmsghdr`; the new message starts at `used`, a multiple of the alignment since every
    // earlier message took a whole CMSG_SPACE, and its data lies within `space`.
    unsafe {
        let cmsg = control.0.as_mut_ptr().add(used).cast::<libc::cmsghdr>();
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = ty;
        (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<V>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<V>(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn control_fits_pktinfo_and_segment_size() {
        // SAFETY: a pure computation on lengths.
        let space = unsafe {
            libc::CMSG_SPACE(mem::size_of::<libc::in_pktinfo>() as u32)
                + libc::CMSG_SPACE(mem::size_of::<u16>() as u32)
        };
        assert!(space as usize <= mem::size_of::<Control>());
    }

    fn v4(s: &UdpSocket) -> SocketAddrV4 {
        match s.local_addr().expect("addr") {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => unreachable!("bound to IPv4"),
        }
    }

    /// Sets the integer socket option `level`/`name` of `socket` to 1.
    fn turn_on(socket: &UdpSocket, level: libc::c_int, name: libc::c_int) {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt with a pointer to an int and its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                name,
                (&on as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "setsockopt {level}/{name}: {}",
            io::Error::last_os_error()
        );
    }

    fn as_datagram(d: &(SocketAddrV4, Option<Ipv4Addr>, Vec<u8>)) -> Option<Datagram<'_>> {
        Some(Datagram {
            destination: d.0,
            source: d.1,
            contents: &d.2,
        })
    }

    #[test]
    fn sends_to_several_addresses_from_the_named_source() {
        let tx = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let port = tx.local_addr().expect("addr").port();
        let rx: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let items: Vec<_> = rx
            .iter()
            .enumerate()
            .map(|(i, r)| {
                // The first two name their source; the kernel picks for the third.
                let source = (i < 2).then_some(Ipv4Addr::new(127, 0, 0, 1));
                (v4(r), source, vec![i as u8; 10 + i])
            })
            .collect();
        // One sender throughout: what one call set up must not leak into the next.
        let mut sender = Sender::new();
        for segments in [1, MAX_SEGMENTS] {
            let sent = sender
                .send(tx.as_raw_fd(), &items, as_datagram, segments)
                .expect("sent");
            assert_eq!(sent, 3);
            for (r, item) in rx.iter().zip(&items) {
                let mut buf = [0u8; 64];
                let (n, from) = r.recv_from(&mut buf).expect("received");
                assert_eq!(&buf[..n], &item.2[..]);
                assert_eq!(from, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into());
            }
        }
        let none: &[(SocketAddrV4, Option<Ipv4Addr>, Vec<u8>)] = &[];
        assert_eq!(
            sender
                .send(tx.as_raw_fd(), none, as_datagram, 1)
                .expect("none"),
            0
        );
        // Sending stops at the first item that is not a datagram.
        let sent = sender.send(
            tx.as_raw_fd(),
            &items,
            |d| as_datagram(d).filter(|d| d.contents.len() < 11),
            1,
        );
        assert_eq!(sent.expect("sent"), 1);
    }

    /// A run to one destination leaves as one message of segments, which a receiver that
    /// accepts coalesced datagrams (`UDP_GRO`) reads in one piece; a plain receiver gets each
    /// datagram as it was, in order, with the runs split where a length changes.
    #[test]
    fn runs_to_one_destination_leave_as_segments() {
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let plain = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let coalescing = UdpSocket::bind("127.0.0.1:0").expect("bind");
        turn_on(&coalescing, libc::SOL_UDP, libc::UDP_GRO);
        let mut sender = Sender::new();
        let lens = [1000, 1000, 1000, 400, 1000, 1000];
        let mut items = Vec::new();
        for (i, len) in lens.iter().enumerate() {
            for r in [&plain, &coalescing] {
                items.push((v4(r), None, vec![i as u8; *len]));
            }
        }
        let sent = sender
            .send(tx.as_raw_fd(), &items, as_datagram, MAX_SEGMENTS)
            .expect("sent");
        assert_eq!(sent, items.len(), "the order is kept: every datagram goes");
        assert!(!sender.first_was_segmented());
        // Interleaved destinations make every datagram a message of its own.
        let mut buf = vec![0u8; 65_536];
        for (i, len) in lens.iter().enumerate() {
            for r in [&plain, &coalescing] {
                let n = r.recv(&mut buf).expect("received");
                assert_eq!(&buf[..n], &vec![i as u8; *len][..]);
            }
        }
        // Grouped by destination: two runs to each (the 400-byte datagram ends the first).
        items.sort_by_key(|d| d.0 != v4(&plain));
        let sent = sender
            .send(tx.as_raw_fd(), &items, as_datagram, MAX_SEGMENTS)
            .expect("sent");
        assert_eq!(sent, items.len());
        assert!(sender.first_was_segmented());
        for (i, len) in lens.iter().enumerate() {
            let n = plain.recv(&mut buf).expect("received");
            assert_eq!(&buf[..n], &vec![i as u8; *len][..], "datagram {i}");
        }
        let first = coalescing.recv(&mut buf).expect("received");
        assert_eq!(first, 3400, "the first run arrives in one piece");
        let second = coalescing.recv(&mut buf).expect("received");
        assert_eq!(second, 2000, "the second run too");
    }

    /// A socket without UDP checksums (`SO_NO_CHECK`) is one the kernel refuses segments on,
    /// as it does on an IPsec route: the refusal is told apart from a datagram's own error,
    /// and the same datagrams then go one by one, in order.
    #[test]
    fn a_path_that_refuses_segments_is_told_apart() {
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        turn_on(&tx, libc::SOL_SOCKET, libc::SO_NO_CHECK);
        let items: Vec<_> = (0..4u8).map(|i| (v4(&rx), None, vec![i; 500])).collect();
        let mut sender = Sender::new();
        let err = sender
            .send(tx.as_raw_fd(), &items, as_datagram, MAX_SEGMENTS)
            .expect_err("the kernel refuses segments without checksums");
        assert!(sender.segmentation_refused(&err), "{err}");
        let sent = sender
            .send(tx.as_raw_fd(), &items, as_datagram, 1)
            .expect("sent one by one");
        assert_eq!(sent, items.len());
        let mut buf = [0u8; 1024];
        for (i, item) in items.iter().enumerate() {
            let n = rx.recv(&mut buf).expect("received");
            assert_eq!(&buf[..n], &item.2[..], "datagram {i}");
        }
        // A single datagram's EINVAL (port 0) is not a refusal of segments.
        let bad = [(
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            None,
            vec![0u8; 10],
        )];
        let err = sender
            .send(tx.as_raw_fd(), &bad, as_datagram, MAX_SEGMENTS)
            .expect_err("port 0 is refused");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
        assert!(!sender.segmentation_refused(&err));
    }
}
