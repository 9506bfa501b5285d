//! Parley's configuration: a TOML file, overridden by `PARLEY_*` environment variables,
//! overridden by flags. Every key is documented in `deploy/parley.sample.toml`.

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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http: SocketAddr::from(([0, 0, 0, 0], 8080)),
            rtc_port: 8443,
            rtc_bind: IpAddr::from([0, 0, 0, 0]),
            public_ip: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_self_signed: false,
            max_participants: None,
            last_n: None,
            resume_window_secs: 30,
            max_message_bytes: 256 * 1024,
            max_messages_per_sec: 50,
        }
    }
}

impl Config {
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in config file {}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.validate()?;
        Ok(config)
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
        if self.max_messages_per_sec == 0 {
            anyhow::bail!("max_messages_per_sec: must be at least 1");
        }
        if self.public_ip.iter().any(|ip| ip.is_unspecified()) {
            anyhow::bail!(
                "public_ip: {} is not an address clients can reach",
                IpAddr::from([0, 0, 0, 0])
            );
        }
        Ok(())
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
