//! Sending many datagrams to many addresses with one `sendmmsg` call (quinn-udp batches only
//! GSO segments to one destination). IPv4 only: each datagram may name its source address
//! (`IP_PKTINFO`), so a reply leaves from the address the peer sent to.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;

/// Most datagrams in one call.
pub const MAX: usize = 32;

/// One datagram to send.
pub struct Datagram<'a> {
    pub destination: SocketAddrV4,
    /// The local address to send from (a candidate address of this host), if any.
    pub source: Option<Ipv4Addr>,
    pub contents: &'a [u8],
}

/// Room for one `in_pktinfo` control message, aligned for `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Control([u8; 32]);

/// Sends the first [`MAX`] of `datagrams` on `fd`; returns how many the kernel took, which is
/// fewer than all when one fails or the socket buffer is full (0 for none given). An error is
/// that of the first datagram (`WouldBlock` when the buffer is full).
pub fn send<'a>(fd: RawFd, datagrams: impl IntoIterator<Item = Datagram<'a>>) -> io::Result<usize> {
    // SAFETY: plain C structs, for which all-zero bytes are a valid value.
    let mut addrs: [libc::sockaddr_in; MAX] = unsafe { mem::zeroed() };
    let mut iovs: [libc::iovec; MAX] = unsafe { mem::zeroed() };
    let mut controls = [Control([0; 32]); MAX];
    let mut headers: [libc::mmsghdr; MAX] = unsafe { mem::zeroed() };
    let mut n = 0;
    for (i, d) in datagrams.into_iter().take(MAX).enumerate() {
        n = i + 1;
        addrs[i] = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: d.destination.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*d.destination.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        iovs[i] = libc::iovec {
            iov_base: d.contents.as_ptr() as *mut libc::c_void,
            iov_len: d.contents.len(),
        };
        let hdr = &mut headers[i].msg_hdr;
        hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
        hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        hdr.msg_iov = &mut iovs[i];
        hdr.msg_iovlen = 1;
        if let Some(source) = d.source {
            hdr.msg_control = controls[i].0.as_mut_ptr().cast();
            // SAFETY: the control buffer is large enough for one `in_pktinfo` message (test
            // `control_fits_pktinfo`) and aligned for `cmsghdr`; CMSG_FIRSTHDR/CMSG_DATA stay
            // inside it.
            unsafe {
                hdr.msg_controllen =
                    libc::CMSG_SPACE(mem::size_of::<libc::in_pktinfo>() as u32) as _;
                let cmsg = libc::CMSG_FIRSTHDR(hdr);
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<libc::in_pktinfo>() as u32) as _;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(source).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
            }
        }
    }
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: `headers[..n]` point into `addrs`, `iovs`, `controls` and the datagrams'
    // contents, all alive and unmoved for the duration of the call.
    let sent = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), n as libc::c_uint, 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn control_fits_pktinfo() {
        // SAFETY: a pure computation on a length.
        let space = unsafe { libc::CMSG_SPACE(mem::size_of::<libc::in_pktinfo>() as u32) };
        assert!(space as usize <= mem::size_of::<Control>());
    }

    #[test]
    fn sends_to_several_addresses_from_the_named_source() {
        let tx = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let port = tx.local_addr().expect("addr").port();
        let rx: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let payloads: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let datagrams: Vec<Datagram<'_>> = rx
            .iter()
            .zip(&payloads)
            .enumerate()
            .map(|(i, (r, p))| {
                let std::net::SocketAddr::V4(destination) = r.local_addr().expect("addr") else {
                    unreachable!("bound to IPv4")
                };
                Datagram {
                    destination,
                    // The first two name their source; the kernel picks for the third.
                    source: (i < 2).then_some(Ipv4Addr::new(127, 0, 0, 1)),
                    contents: p,
                }
            })
            .collect();
        assert_eq!(send(tx.as_raw_fd(), datagrams).expect("sent"), 3);
        for (r, p) in rx.iter().zip(&payloads) {
            let mut buf = [0u8; 64];
            let (n, from) = r.recv_from(&mut buf).expect("received");
            assert_eq!(&buf[..n], &p[..]);
            assert_eq!(from, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into());
        }
        assert_eq!(send(tx.as_raw_fd(), []).expect("nothing to send"), 0);
    }
}
