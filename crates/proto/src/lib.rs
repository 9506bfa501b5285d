//! Wire types shared by Parley's server, clients and tools.
//!
//! - [`signal`]: the JSON signaling protocol between clients and the signaling plane
//!   (documented in `docs/protocol.md`).
//! - [`media`]: the typed commands and events between the signaling plane and the media plane
//!   (the SFU), so that the media plane can run in another process.

pub mod media;
pub mod signal;
