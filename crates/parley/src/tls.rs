//! HTTPS: a configured certificate, or one generated at start (`--tls-self-signed`).

use anyhow::Context;
use axum_server::tls_rustls::RustlsConfig;

use crate::config::Config;

/// The TLS setup for the HTTP server, or `None` for plain HTTP.
pub async fn load(config: &Config) -> anyhow::Result<Option<RustlsConfig>> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| {
                    format!(
                        "loading tls_cert {} and tls_key {}",
                        cert.display(),
                        key.display()
                    )
                })?;
            Ok(Some(tls))
        }
        (Some(_), None) | (None, Some(_)) => {
            anyhow::bail!("tls_cert and tls_key must be given together")
        }
        (None, None) if config.tls_self_signed => {
            let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
            names.extend(config.public_ip.iter().map(|ip| ip.to_string()));
            let ck = rcgen::generate_simple_self_signed(names)
                .context("generating a self-signed certificate")?;
            let tls = RustlsConfig::from_pem(
                ck.cert.pem().into_bytes(),
                ck.signing_key.serialize_pem().into_bytes(),
            )
            .await
            .context("loading the self-signed certificate")?;
            tracing::warn!("serving HTTPS with a self-signed certificate; browsers will warn");
            Ok(Some(tls))
        }
        (None, None) => Ok(None),
    }
}
