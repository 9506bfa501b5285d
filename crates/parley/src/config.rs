//! Parley's configuration: a TOML file, overridden by `PARLEY_*` environment variables,
//! overridden by flags. Every key is documented in `deploy/parley.sample.toml`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP(S) server: web client, signaling (`/ws`), health.
    pub http: SocketAddr,
    /// The one UDP port for all media.
    pub rtc_port: u16,
    /// Address the media port binds to.
    pub rtc_bind: IpAddr,
    /// Media worker threads (a room lives on one); 0: one per core.
    pub media_workers: usize,
    /// Addresses announced in ICE candidates; empty means this host's own addresses.
    pub public_ip: Vec<IpAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Generate a certificate at start when none is configured.
    pub tls_self_signed: bool,
    /// Most participants in one room; unset is unlimited.
    pub max_participants: Option<usize>,
    /// In rooms with more participants, clients show video of the last N speakers only.
    pub last_n: Option<u32>,
    /// Seconds a participant whose connection dropped may resume.
    pub resume_window_secs: u64,
    /// Largest signaling message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Signaling messages per second a client may send before it is cut off.
    pub max_messages_per_sec: u32,
    /// API key → secret. Tokens signed with a secret admit to rooms; none: open mode.
    pub api_keys: BTreeMap<String, String>,
    /// Separate address for `/metrics` and the admin API; unset: the main address.
    pub admin_http: Option<SocketAddr>,
    /// STUN servers clients use to find their public addresses.
    pub stun_servers: Vec<String>,
    /// TURN servers clients may relay through (credentials: `turn_secret`).
    pub turn_servers: Vec<String>,
    /// Shared secret of the TURN servers (coturn `use-auth-secret`).
    pub turn_secret: Option<String>,
    /// Seconds a TURN credential handed to a client is valid.
    pub turn_ttl_secs: u64,
    /// Run an RFC 5780 STUN server (NAT behaviour discovery) on this address...
    pub stun_listen: Option<SocketAddr>,
    /// ...and this second address of the host (required with `stun_listen`)...
    pub stun_alternate_ip: Option<IpAddr>,
    /// ...each on `stun_listen`'s port and this one.
    pub stun_alternate_port: u16,
    /// Seconds a direct call rings before it ends with "no answer".
    pub ring_timeout_secs: u64,
    /// Milliseconds after the answer before a direct call that has no peer-to-peer media
    /// moves to the SFU.
    pub p2p_timeout_ms: u64,
    /// Seconds existing calls may go on after a drain starts (SIGTERM or the admin API).
    pub drain_grace_secs: u64,
    /// URLs that receive signed webhook POSTs.
    pub webhook_urls: Vec<String>,
    /// Secret of the webhook signatures (`X-Parley-Signature`).
    pub webhook_secret: Option<String>,
    /// Run the media plane in this process (the integrated mode); false: `parley serve` binds
    /// no media port and places calls on dedicated media nodes that connect to `/media-node`.
    pub local_media: bool,
    /// Shared secret of signaling and its media nodes (required with `local_media = false`
    /// and by `parley media`).
    pub node_secret: Option<String>,
    /// `parley media`: the signaling server's node endpoint, like ws://host:8080/media-node.
    pub signaling_url: Option<String>,
    /// `parley media`: this node's name towards signaling; unset: the host name.
    pub node_id: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http: SocketAddr::from(([0, 0, 0, 0], 8080)),
            rtc_port: 8443,
            rtc_bind: IpAddr::from([0, 0, 0, 0]),
            media_workers: 0,
            public_ip: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_self_signed: false,
            max_participants: None,
            last_n: None,
            resume_window_secs: 30,
            max_message_bytes: 256 * 1024,
            max_messages_per_sec: 50,
            api_keys: BTreeMap::new(),
            admin_http: None,
            stun_servers: Vec::new(),
            turn_servers: Vec::new(),
            turn_secret: None,
            turn_ttl_secs: 3600,
            stun_listen: None,
            stun_alternate_ip: None,
            stun_alternate_port: 3479,
            ring_timeout_secs: 45,
            p2p_timeout_ms: 4000,
            drain_grace_secs: 5 * 3600,
            webhook_urls: Vec::new(),
            webhook_secret: None,
            local_media: true,
            node_secret: None,
            signaling_url: None,
            node_id: None,
        }
    }
}

impl Config {
    /// Reads a config file. It is validated once the environment and flags are applied, so
    /// that a key in the file may need another that comes from the environment (a secret).
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::parse_toml(&text).with_context(|| format!("in config file {}", path.display()))
    }

    #[cfg(test)]
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let config = Self::parse_toml(text)?;
        config.validate()?;
        Ok(config)
    }

    fn parse_toml(text: &str) -> anyhow::Result<Config> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.max_participants == Some(0) {
            anyhow::bail!("max_participants: must be at least 1 (leave it unset for no limit)");
        }
        if self.last_n == Some(0) {
            anyhow::bail!("last_n: must be at least 1 (leave it unset to show every video)");
        }
        if self.max_message_bytes < 1024 {
            anyhow::bail!("max_message_bytes: must be at least 1024 (an SDP offer is several KB)");
        }
        if !self.turn_servers.is_empty() && self.turn_secret.as_deref().is_none_or(str::is_empty) {
            anyhow::bail!("turn_secret: required when turn_servers are set");
        }
        if let Some(u) = self.stun_servers.iter().find(|u| !u.starts_with("stun:")) {
            anyhow::bail!("stun_servers: {u:?} does not start with stun:");
        }
        if let Some(u) = self
            .turn_servers
            .iter()
            .find(|u| !(u.starts_with("turn:") || u.starts_with("turns:")))
        {
            anyhow::bail!("turn_servers: {u:?} does not start with turn: or turns:");
        }
        if self.stun_listen.is_some() && self.stun_alternate_ip.is_none() {
            anyhow::bail!(
                "stun_alternate_ip: required with stun_listen (RFC 5780 needs a second address)"
            );
        }
        if self.ring_timeout_secs == 0 {
            anyhow::bail!("ring_timeout_secs: must be at least 1");
        }
        if self.max_messages_per_sec == 0 {
            anyhow::bail!("max_messages_per_sec: must be at least 1");
        }
        if let Some((key, _)) = self.api_keys.iter().find(|(_, s)| s.len() < 16) {
            anyhow::bail!("api_keys: the secret of key {key:?} is shorter than 16 characters");
        }
        if !self.webhook_urls.is_empty() && self.webhook_secret.as_deref().is_none_or(str::is_empty)
        {
            anyhow::bail!("webhook_secret: required when webhook_urls are set");
        }
        if let Some(url) = self
            .webhook_urls
            .iter()
            .find(|u| !(u.starts_with("http://") || u.starts_with("https://")))
        {
            anyhow::bail!("webhook_urls: {url:?} is not an http:// or https:// URL");
        }
        if self.public_ip.iter().any(|ip| ip.is_unspecified()) {
            anyhow::bail!(
                "public_ip: {} is not an address clients can reach",
                IpAddr::from([0, 0, 0, 0])
            );
        }
        if !self.local_media && self.node_secret.is_none() {
            anyhow::bail!(
                "node_secret: required when local_media = false (media nodes authenticate with it)"
            );
        }
        if self.node_secret.as_ref().is_some_and(|s| s.len() < 16) {
            anyhow::bail!("node_secret: shorter than 16 characters");
        }
        if let Some(url) = &self.signaling_url
            && !url.starts_with("ws://")
        {
            anyhow::bail!(
                "signaling_url: {url:?} is not a ws:// URL (like ws://signaling:8080/media-node; \
                 wss:// is not supported yet: keep this link on the internal network)"
            );
        }
        if let Some(id) = &self.node_id
            && (id.is_empty()
                || id.len() > 63
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            anyhow::bail!("node_id: {id:?} must be 1 to 63 letters, digits, '-', '_' or '.'");
        }
        Ok(())
    }

    /// What `parley media` needs beyond [`Config::validate`].
    pub fn validate_media_node(&self) -> anyhow::Result<()> {
        if self.signaling_url.is_none() {
            anyhow::bail!(
                "signaling_url: required by a media node (like ws://signaling:8080/media-node)"
            );
        }
        if self.node_secret.is_none() {
            anyhow::bail!("node_secret: required by a media node (the same as signaling's)");
        }
        Ok(())
    }
}

impl Config {
    /// The effective configuration as TOML, with secrets masked.
    pub fn to_masked_toml(&self) -> anyhow::Result<String> {
        let mut masked = self.clone();
        for secret in masked.api_keys.values_mut() {
            *secret = "********".into();
        }
        if masked.turn_secret.is_some() {
            masked.turn_secret = Some("********".into());
        }
        if masked.webhook_secret.is_some() {
            masked.webhook_secret = Some("********".into());
        }
        if masked.node_secret.is_some() {
            masked.node_secret = Some("********".into());
        }
        Ok(toml::to_string(&masked)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_loads_and_matches_defaults() {
        let text = include_str!("../../../deploy/parley.sample.toml");
        let config = Config::from_toml(text).expect("the sample config is valid");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn wrong_values_name_the_key() {
        let err = Config::from_toml("rtc_port = \"x\"").expect_err("wrong type");
        assert!(format!("{err:#}").contains("rtc_port"), "{err:#}");
        let err = Config::from_toml("max_participants = 0").expect_err("zero");
        assert!(format!("{err:#}").contains("max_participants"), "{err:#}");
        let err = Config::from_toml("no_such_key = 1").expect_err("unknown key");
        assert!(format!("{err:#}").contains("no_such_key"), "{err:#}");
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn secrets_are_masked_when_printed() {
        let mut c = Config::default();
        c.api_keys
            .insert("main".into(), "a-long-enough-secret".into());
        c.webhook_urls.push("http://127.0.0.1:9/hook".into());
        c.webhook_secret = Some("another-secret".into());
        let text = c.to_masked_toml().expect("printable");
        assert!(!text.contains("a-long-enough-secret") && !text.contains("another-secret"));
        assert!(text.contains("main = \"********\""), "{text}");
    }

    #[test]
    fn short_secrets_and_webhooks_without_secret_are_refused() {
        let err = Config::from_toml("[api_keys]\nk = \"short\"").expect_err("short");
        assert!(format!("{err:#}").contains("api_keys"), "{err:#}");
        let err = Config::from_toml("webhook_urls = [\"http://x/\"]").expect_err("no secret");
        assert!(format!("{err:#}").contains("webhook_secret"), "{err:#}");
    }

    #[test]
    fn split_mode_needs_a_node_secret_which_is_masked() {
        let err = Config::from_toml("local_media = false").expect_err("no secret");
        assert!(format!("{err:#}").contains("node_secret"), "{err:#}");
        let err = Config::from_toml("local_media = false\nnode_secret = \"short\"")
            .expect_err("short secret");
        assert!(format!("{err:#}").contains("node_secret"), "{err:#}");
        let c = Config::from_toml("local_media = false\nnode_secret = \"0123456789abcdef-node\"")
            .expect("valid");
        let text = c.to_masked_toml().expect("printable");
        assert!(!text.contains("0123456789abcdef-node"), "{text}");
        assert!(text.contains("node_secret = \"********\""), "{text}");
        let err = Config::from_toml("signaling_url = \"http://x/\"").expect_err("not ws");
        assert!(format!("{err:#}").contains("signaling_url"), "{err:#}");
        let err = Config::default().validate_media_node().expect_err("no URL");
        assert!(format!("{err:#}").contains("signaling_url"), "{err:#}");
    }
}
