//! Parley: self-hosted voice and video calls.

mod config;
mod hub;
mod media;
mod server;
mod tls;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use config::Config;

#[derive(Parser)]
#[command(name = "parley", version, about = "Self-hosted voice and video calls")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run Parley: web client, signaling and the SFU in one process.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file (see deploy/parley.sample.toml).
    #[arg(long, env = "PARLEY_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP(S) address: web client, WebSocket signaling, health [default: 0.0.0.0:8080].
    #[arg(long, env = "PARLEY_HTTP")]
    http: Option<SocketAddr>,
    /// The one UDP port for media [default: 8443].
    #[arg(long, env = "PARLEY_RTC_PORT")]
    rtc_port: Option<u16>,
    /// Address the media port binds to [default: 0.0.0.0].
    #[arg(long, env = "PARLEY_RTC_BIND")]
    rtc_bind: Option<IpAddr>,
    /// Address to announce in ICE candidates (repeatable); default: this host's addresses.
    #[arg(long, env = "PARLEY_PUBLIC_IP", value_delimiter = ',')]
    public_ip: Option<Vec<IpAddr>>,
    /// PEM certificate for HTTPS.
    #[arg(long, env = "PARLEY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS.
    #[arg(long, env = "PARLEY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Serve HTTPS with a certificate generated at start.
    #[arg(long, env = "PARLEY_TLS_SELF_SIGNED")]
    tls_self_signed: bool,
    /// Most participants in one room [default: unlimited].
    #[arg(long, env = "PARLEY_MAX_PARTICIPANTS")]
    max_participants: Option<usize>,
    /// In rooms larger than N, show video of the last N speakers only [default: every video].
    #[arg(long, env = "PARLEY_LAST_N")]
    last_n: Option<u32>,
    /// Seconds a dropped client may resume its session [default: 30].
    #[arg(long, env = "PARLEY_RESUME_WINDOW_SECS")]
    resume_window_secs: Option<u64>,
    /// Largest signaling message in bytes [default: 262144].
    #[arg(long, env = "PARLEY_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,
    /// Signaling messages per second before a client is cut off [default: 50].
    #[arg(long, env = "PARLEY_MAX_MESSAGES_PER_SEC")]
    max_messages_per_sec: Option<u32>,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.http {
            c.http = v;
        }
        if let Some(v) = self.rtc_port {
            c.rtc_port = v;
        }
        if let Some(v) = self.rtc_bind {
            c.rtc_bind = v;
        }
        if let Some(v) = self.public_ip {
            c.public_ip = v;
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert;
        }
        if self.tls_key.is_some() {
            c.tls_key = self.tls_key;
        }
        c.tls_self_signed |= self.tls_self_signed;
        if self.max_participants.is_some() {
            c.max_participants = self.max_participants;
        }
        if self.last_n.is_some() {
            c.last_n = self.last_n;
        }
        if let Some(v) = self.resume_window_secs {
            c.resume_window_secs = v;
        }
        if let Some(v) = self.max_message_bytes {
            c.max_message_bytes = v;
        }
        if let Some(v) = self.max_messages_per_sec {
            c.max_messages_per_sec = v;
        }
        c.validate()?;
        Ok(c)
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = args.into_config()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async move {
                let media = media::start(
                    SocketAddr::new(config.rtc_bind, config.rtc_port),
                    &config.public_ip,
                )?;
                server::run(config, media).await
            })
        }
    }
}
