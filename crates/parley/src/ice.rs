//! The ICE servers handed to clients: STUN, and TURN with short-lived credentials in the
//! TURN REST scheme (coturn's `use-auth-secret`): username `expiry:identity`, password
//! base64(HMAC-SHA1(shared secret, username)).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::{Value, json};

#[derive(Debug, Clone, Default)]
pub struct IceServers {
    pub stun: Vec<String>,
    pub turn: Vec<String>,
    pub turn_secret: Option<String>,
    pub turn_ttl: Duration,
}

impl IceServers {
    /// The `iceServers` for a client of `identity`, as RTCPeerConnection takes them.
    pub fn for_identity(&self, identity: &str) -> Vec<Value> {
        let mut out = Vec::new();
        if !self.stun.is_empty() {
            out.push(json!({ "urls": self.stun }));
        }
        if let (false, Some(secret)) = (self.turn.is_empty(), &self.turn_secret) {
            let expiry = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
                + self.turn_ttl.as_secs();
            let (username, credential) = turn_credential(secret, expiry, identity);
            out.push(json!({ "urls": self.turn, "username": username, "credential": credential }));
        }
        out
    }
}

/// TURN REST credentials valid until `expiry` (Unix seconds).
pub fn turn_credential(secret: &str, expiry: u64, identity: &str) -> (String, String) {
    let username = format!("{expiry}:{identity}");
    let key = aws_lc_rs::hmac::Key::new(
        aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        secret.as_bytes(),
    );
    let tag = aws_lc_rs::hmac::sign(&key, username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
    (username, password)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_follow_the_turn_rest_scheme() {
        // Expected value computed with Python's hmac/hashlib/base64.
        let (u, p) = turn_credential("coturn-shared-secret", 1_700_003_600, "ann");
        assert_eq!(u, "1700003600:ann");
        assert_eq!(p, "lVFdZfXfEMAGfZ/F9NNE8MynhME=");
    }

    #[test]
    fn servers_for_a_client() {
        let ice = IceServers {
            stun: vec!["stun:stun.example.org:3478".into()],
            turn: vec!["turn:turn.example.org:3478?transport=udp".into()],
            turn_secret: Some("s".into()),
            turn_ttl: Duration::from_secs(3600),
        };
        let v = ice.for_identity("bob");
        assert_eq!(v.len(), 2);
        assert_eq!(v[0]["urls"][0], "stun:stun.example.org:3478");
        assert!(
            v[1]["username"]
                .as_str()
                .is_some_and(|u| u.ends_with(":bob"))
        );
        assert!(IceServers::default().for_identity("x").is_empty());
    }
}
