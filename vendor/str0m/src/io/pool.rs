//! PATCH(parley): a per-thread pool of buffers for encrypted RTP packets.
//!
//! Upstream allocates a zeroed buffer for every packet it encrypts, and the application frees
//! it once the datagram is sent: for a server that forwards each packet to many subscribers,
//! that was an allocation, a `memset` and a free per forwarded packet. The application hands
//! sent datagrams back with [`recycle`], and the next encryption on the same thread writes into
//! one of them. (What it saves: `vendor/str0m/PATCHES.md`, patch 15.)

use std::cell::RefCell;

/// Buffers kept per thread at most (about 1.5 MB of full-sized packets).
const MAX_POOLED: usize = 1024;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Gives back the contents of a sent [`Transmit`][crate::net::Transmit] (as
/// `Vec::from(transmit.contents)`) for the next packet encrypted on this thread. Optional: a
/// buffer not given back is simply freed.
pub fn recycle(buf: Vec<u8>) {
    // A buffer the size of an audio packet would mostly be regrown.
    if buf.capacity() < 256 {
        return;
    }
    let _ = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < MAX_POOLED {
            pool.push(buf);
        }
    });
}

/// A buffer of `len` bytes with unspecified contents: the caller overwrites every byte.
pub(crate) fn take(len: usize) -> Vec<u8> {
    let mut buf = POOL
        .try_with(|pool| pool.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default();
    if buf.len() >= len {
        buf.truncate(len);
    } else {
        buf.resize(len, 0);
    }
    buf
}
