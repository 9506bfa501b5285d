//! Which media worker a datagram belongs to (sans-IO).
//!
//! With several workers, worker 0 reads the media port and hands each datagram to the worker
//! whose room its session lives in. STUN names its session by the local ICE ufrag of its
//! USERNAME attribute (each worker announces its sessions' ufrags); a binding request teaches
//! the table its source address, by which every later packet (DTLS, SRTP, RTCP) is routed.
//! The owning worker's [`parley_sfu::Sfu`] checks the message itself; a forged request can
//! only steer its own source address.

use std::collections::HashMap;
use std::net::SocketAddr;

use parley_proto::media::SessionId;
use str0m::ice::StunMessage;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    worker: usize,
    session: SessionId,
}

#[derive(Debug, Default)]
pub struct Dispatch {
    by_ufrag: HashMap<String, Owner>,
    ufrag_of: HashMap<SessionId, String>,
    by_addr: HashMap<SocketAddr, Owner>,
}

impl Dispatch {
    /// The worker of the datagram, if any session is known for it.
    pub fn route(&mut self, source: SocketAddr, data: &[u8]) -> Option<usize> {
        // RFC 7983: a first byte of 0..=3 is STUN.
        if data.first().is_some_and(|b| *b < 4)
            && let Ok(msg) = StunMessage::parse(data)
            && let Some((local, _remote)) = msg.split_username()
        {
            let owner = *self.by_ufrag.get(local)?;
            if msg.is_binding_request() {
                self.by_addr.insert(source, owner);
            }
            return Some(owner.worker);
        }
        self.by_addr.get(&source).map(|o| o.worker)
    }

    /// `session` on `worker` answers STUN for `ufrag` (it replaces an earlier one: ICE restart).
    pub fn announce(&mut self, worker: usize, session: SessionId, ufrag: String) {
        if let Some(old) = self.ufrag_of.insert(session, ufrag.clone()) {
            self.by_ufrag.remove(&old);
        }
        self.by_ufrag.insert(ufrag, Owner { worker, session });
    }

    /// The session ended.
    pub fn forget(&mut self, session: SessionId) {
        if let Some(ufrag) = self.ufrag_of.remove(&session) {
            self.by_ufrag.remove(&ufrag);
        }
        self.by_addr.retain(|_, o| o.session != session);
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.by_ufrag.len(), self.by_addr.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::ice::TransId;

    /// A STUN binding request whose USERNAME is `local:remote`, with a MESSAGE-INTEGRITY
    /// that routing does not check (that is the owning session's business).
    fn binding_request(username: &str) -> Vec<u8> {
        let msg = StunMessage::binding_request(username, TransId::new(), true, 1, 1, false);
        let mut buf = vec![0u8; 1500];
        let n = msg
            .to_bytes(Some(b"password"), &mut buf, |_, _| [0; 20])
            .expect("serializes");
        buf.truncate(n);
        buf
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn stun_teaches_the_address_of_the_session() {
        let mut d = Dispatch::default();
        d.announce(1, SessionId(7), "abcd".into());
        d.announce(0, SessionId(8), "efgh".into());
        let srtp = [0x80u8, 0x6f, 0, 1, 0, 0, 0, 0];
        assert_eq!(d.route(addr(5000), &srtp), None, "unknown address");
        assert_eq!(
            d.route(addr(5000), &binding_request("abcd:remote")),
            Some(1)
        );
        assert_eq!(d.route(addr(5000), &srtp), Some(1));
        assert_eq!(d.route(addr(6000), &binding_request("efgh:x")), Some(0));
        assert_eq!(d.route(addr(6000), &srtp), Some(0));
        assert_eq!(d.route(addr(7000), &binding_request("zzzz:x")), None);
        assert_eq!(d.route(addr(7000), b"garbage"), None);
        assert_eq!(d.route(addr(7000), &[]), None);
    }

    #[test]
    fn ice_restart_and_end_forget_old_routes() {
        let mut d = Dispatch::default();
        d.announce(1, SessionId(7), "old1".into());
        d.route(addr(5000), &binding_request("old1:r"));
        d.announce(1, SessionId(7), "new1".into());
        assert_eq!(d.route(addr(5001), &binding_request("old1:r")), None);
        assert_eq!(d.route(addr(5001), &binding_request("new1:r")), Some(1));
        assert_eq!(d.len(), (1, 2));
        d.forget(SessionId(7));
        assert_eq!(d.len(), (0, 0));
        assert_eq!(d.route(addr(5000), &[0x80, 0, 0, 0]), None);
    }
}
