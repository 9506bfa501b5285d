//! The floor of the benchmark: the least work a forwarder can do per packet. One UDP socket,
//! one thread, no crypto, no WebRTC; every datagram's first byte is its type:
//!
//! - `0x01` + room name: join that room (leaving any other) and get `0x01` back;
//! - `0x02` + anything: media, sent unchanged to every other member of the sender's room;
//! - `0x03`: leave;
//! - anything else is ignored, as is media from an address in no room.

use std::collections::HashMap;
use std::net::SocketAddr;

pub const JOIN: u8 = 0x01;
pub const MEDIA: u8 = 0x02;
pub const LEAVE: u8 = 0x03;

/// What to do with a datagram once the rooms are updated.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<'a> {
    Nothing,
    /// Reply `[JOIN]` to the sender.
    AckJoin,
    /// Send the datagram, unchanged, to each of these addresses.
    Forward(&'a [SocketAddr]),
}

/// Rooms and their members; the forwarding decision for each datagram, without I/O.
#[derive(Default)]
pub struct Rooms {
    members: HashMap<Vec<u8>, Vec<SocketAddr>>,
    room_of: HashMap<SocketAddr, Vec<u8>>,
    /// The current media datagram's recipients (reused so that forwarding does not allocate).
    scratch: Vec<SocketAddr>,
}

impl Rooms {
    pub fn handle(&mut self, from: SocketAddr, datagram: &[u8]) -> Action<'_> {
        match datagram.split_first() {
            Some((&JOIN, room)) => {
                self.join(from, room);
                Action::AckJoin
            }
            Some((&MEDIA, _)) => {
                let Some(room) = self.room_of.get(&from) else {
                    return Action::Nothing;
                };
                self.scratch.clear();
                if let Some(members) = self.members.get(room) {
                    self.scratch
                        .extend(members.iter().filter(|&&m| m != from).copied());
                }
                Action::Forward(&self.scratch)
            }
            Some((&LEAVE, _)) => {
                self.leave(from);
                Action::Nothing
            }
            _ => Action::Nothing,
        }
    }

    pub fn room_count(&self) -> usize {
        self.members.len()
    }

    pub fn member_count(&self) -> usize {
        self.room_of.len()
    }

    fn join(&mut self, from: SocketAddr, room: &[u8]) {
        if self.room_of.get(&from).is_some_and(|r| r == room) {
            return;
        }
        self.leave(from);
        self.members.entry(room.to_vec()).or_default().push(from);
        self.room_of.insert(from, room.to_vec());
    }

    fn leave(&mut self, from: SocketAddr) {
        let Some(room) = self.room_of.remove(&from) else {
            return;
        };
        if let Some(members) = self.members.get_mut(&room) {
            members.retain(|&m| m != from);
            if members.is_empty() {
                self.members.remove(&room);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn media_goes_to_the_other_members_of_the_room_only() {
        let mut rooms = Rooms::default();
        assert_eq!(rooms.handle(addr(1), b"\x01a"), Action::AckJoin);
        assert_eq!(rooms.handle(addr(2), b"\x01a"), Action::AckJoin);
        assert_eq!(rooms.handle(addr(3), b"\x01a"), Action::AckJoin);
        assert_eq!(rooms.handle(addr(4), b"\x01b"), Action::AckJoin);
        assert_eq!(
            rooms.handle(addr(1), b"\x02rtp"),
            Action::Forward(&[addr(2), addr(3)])
        );
        assert_eq!(rooms.handle(addr(4), b"\x02rtp"), Action::Forward(&[]));
        assert_eq!(rooms.handle(addr(5), b"\x02rtp"), Action::Nothing);
    }

    #[test]
    fn join_is_idempotent_and_moves_between_rooms() {
        let mut rooms = Rooms::default();
        rooms.handle(addr(1), b"\x01a");
        rooms.handle(addr(1), b"\x01a");
        rooms.handle(addr(2), b"\x01a");
        assert_eq!(rooms.handle(addr(2), b"\x02x"), Action::Forward(&[addr(1)]));
        rooms.handle(addr(1), b"\x01b");
        assert_eq!(rooms.handle(addr(2), b"\x02x"), Action::Forward(&[]));
        assert_eq!((rooms.room_count(), rooms.member_count()), (2, 2));
    }

    #[test]
    fn leave_removes_the_member_and_empty_rooms() {
        let mut rooms = Rooms::default();
        rooms.handle(addr(1), b"\x01a");
        rooms.handle(addr(2), b"\x01a");
        assert_eq!(rooms.handle(addr(1), b"\x03"), Action::Nothing);
        assert_eq!(rooms.handle(addr(2), b"\x02x"), Action::Forward(&[]));
        assert_eq!(rooms.handle(addr(1), b"\x02x"), Action::Nothing);
        rooms.handle(addr(2), b"\x03");
        assert_eq!((rooms.room_count(), rooms.member_count()), (0, 0));
    }

    #[test]
    fn unknown_and_empty_datagrams_are_ignored() {
        let mut rooms = Rooms::default();
        assert_eq!(rooms.handle(addr(1), b""), Action::Nothing);
        assert_eq!(rooms.handle(addr(1), b"\x7fjunk"), Action::Nothing);
        assert_eq!(rooms.handle(addr(1), b"\x03"), Action::Nothing);
        assert_eq!(rooms.member_count(), 0);
    }
}
