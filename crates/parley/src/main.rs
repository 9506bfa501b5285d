//! Parley: self-hosted voice and video calls.

mod auth;
mod config;
mod hub;
mod ice;
mod lt;
mod media;
mod metrics;
mod nodes;
mod server;
mod stun;
mod tls;
mod webhook;

use std::io::Write;
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
    /// Run Parley: web client, signaling and the SFU in one process (with --no-local-media,
    /// the SFU runs on dedicated media nodes instead: `parley media`).
    Serve(ServeArgs),
    /// Run a dedicated media node: the SFU only, driven by a signaling server it connects to.
    Media(MediaArgs),
    /// Mint an access token (JWT, HS256) for a room and an identity.
    Token(TokenArgs),
    /// Load test: simulated users (real WebRTC clients) in many calls; a table and a JSON line.
    Lt(lt::LtArgs),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Find out how the NAT between here and a STUN server treats UDP (RFC 5780), and whether
    /// peer-to-peer calls are likely to work. The server needs an alternate address, like
    /// `parley stun-server`.
    NatCheck {
        /// The STUN server, like stun:stun.example.org:3478 or 192.0.2.1:3478.
        server: String,
        /// Seconds to wait for each answer (filtering tests wait this long for answers a
        /// NAT may never let through).
        #[arg(long, default_value = "3")]
        timeout_secs: u64,
    },
    /// Run a STUN server for NAT behaviour discovery (RFC 5780): it answers from the
    /// primary and an alternate address, each on two ports.
    StunServer {
        /// Primary address and port, like 192.0.2.1:3478.
        #[arg(long)]
        listen: SocketAddr,
        /// The second address of this host.
        #[arg(long)]
        alternate_ip: IpAddr,
        /// The second port, on both addresses.
        #[arg(long, default_value = "3479")]
        alternate_port: u16,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (file < environment < flags), secrets masked.
    Print(ServeArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The room the token admits to.
    #[arg(long)]
    room: String,
    /// The user's identity.
    #[arg(long)]
    identity: String,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// Allow publishing (sending audio/video). Without --publish or --subscribe both are allowed.
    #[arg(long)]
    publish: bool,
    /// Allow subscribing (receiving others' audio/video).
    #[arg(long)]
    subscribe: bool,
    /// Lifetime, like 90s, 15m, 1h, 2d.
    #[arg(long, default_value = "1h", value_parser = auth::parse_ttl)]
    ttl: std::time::Duration,
    /// API key to sign with (default: the first configured).
    #[arg(long)]
    key: Option<String>,
    /// Config file and overrides, to find the API keys.
    #[command(flatten)]
    serve: ServeArgs,
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
    /// Media worker threads; a room lives on one [default: 0, one per core].
    #[arg(long, env = "PARLEY_MEDIA_WORKERS")]
    media_workers: Option<usize>,
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
    /// API key and secret as KEY:SECRET (repeatable, or comma-separated in the environment).
    #[arg(long = "api-key", env = "PARLEY_API_KEYS", value_delimiter = ',')]
    api_keys: Option<Vec<String>>,
    /// Separate address for /metrics and the admin API.
    #[arg(long, env = "PARLEY_ADMIN_HTTP")]
    admin_http: Option<SocketAddr>,
    /// STUN server URL for clients, like stun:stun.example.org:3478 (repeatable).
    #[arg(
        long = "stun-server",
        env = "PARLEY_STUN_SERVERS",
        value_delimiter = ','
    )]
    stun_servers: Option<Vec<String>>,
    /// TURN server URL for clients, like turn:turn.example.org:3478?transport=udp (repeatable).
    #[arg(
        long = "turn-server",
        env = "PARLEY_TURN_SERVERS",
        value_delimiter = ','
    )]
    turn_servers: Option<Vec<String>>,
    /// Shared secret of the TURN servers (coturn `static-auth-secret`).
    #[arg(long, env = "PARLEY_TURN_SECRET")]
    turn_secret: Option<String>,
    /// Seconds a TURN credential is valid [default: 3600].
    #[arg(long, env = "PARLEY_TURN_TTL_SECS")]
    turn_ttl_secs: Option<u64>,
    /// Run an RFC 5780 STUN server on this address (NAT diagnosis).
    #[arg(long, env = "PARLEY_STUN_LISTEN")]
    stun_listen: Option<SocketAddr>,
    /// The second address of the RFC 5780 STUN server.
    #[arg(long, env = "PARLEY_STUN_ALTERNATE_IP")]
    stun_alternate_ip: Option<IpAddr>,
    /// The second port of the RFC 5780 STUN server [default: 3479].
    #[arg(long, env = "PARLEY_STUN_ALTERNATE_PORT")]
    stun_alternate_port: Option<u16>,
    /// Seconds a direct call rings before "no answer" [default: 45].
    #[arg(long, env = "PARLEY_RING_TIMEOUT_SECS")]
    ring_timeout_secs: Option<u64>,
    /// Milliseconds before a direct call without peer-to-peer media moves to the SFU [default: 4000].
    #[arg(long, env = "PARLEY_P2P_TIMEOUT_MS")]
    p2p_timeout_ms: Option<u64>,
    /// Seconds calls may go on after a drain starts [default: 18000].
    #[arg(long, env = "PARLEY_DRAIN_GRACE_SECS")]
    drain_grace_secs: Option<u64>,
    /// Webhook URL (repeatable, or comma-separated in the environment).
    #[arg(
        long = "webhook-url",
        env = "PARLEY_WEBHOOK_URLS",
        value_delimiter = ','
    )]
    webhook_urls: Option<Vec<String>>,
    /// Secret of the webhook signatures.
    #[arg(long, env = "PARLEY_WEBHOOK_SECRET")]
    webhook_secret: Option<String>,
    /// Run the SFU in this process [default: true]; false is --no-local-media.
    #[arg(
        long,
        env = "PARLEY_LOCAL_MEDIA",
        value_name = "BOOL",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    local_media: Option<bool>,
    /// Bind no media port: place calls on dedicated media nodes (`parley media`), which
    /// connect to /media-node with the node secret.
    #[arg(long)]
    no_local_media: bool,
    /// Shared secret of signaling and its media nodes (16 characters or more).
    #[arg(long, env = "PARLEY_NODE_SECRET")]
    node_secret: Option<String>,
}

#[derive(clap::Args)]
struct MediaArgs {
    /// TOML config file (see deploy/parley.sample.toml).
    #[arg(long, env = "PARLEY_CONFIG")]
    config: Option<PathBuf>,
    /// The signaling server's node endpoint, like ws://signaling:8080/media-node.
    #[arg(long, env = "PARLEY_SIGNALING_URL")]
    signaling_url: Option<String>,
    /// Shared secret of signaling and its media nodes.
    #[arg(long, env = "PARLEY_NODE_SECRET")]
    node_secret: Option<String>,
    /// This node's name towards signaling [default: the host name].
    #[arg(long, env = "PARLEY_NODE_ID")]
    node_id: Option<String>,
    /// HTTP address of /healthz, /readyz and /metrics [default: 0.0.0.0:8080].
    #[arg(long, env = "PARLEY_HTTP")]
    http: Option<SocketAddr>,
    /// The one UDP (and ICE-TCP) port for media [default: 8443].
    #[arg(long, env = "PARLEY_RTC_PORT")]
    rtc_port: Option<u16>,
    /// Address the media port binds to [default: 0.0.0.0].
    #[arg(long, env = "PARLEY_RTC_BIND")]
    rtc_bind: Option<IpAddr>,
    /// Media worker threads; a room lives on one [default: 0, one per core].
    #[arg(long, env = "PARLEY_MEDIA_WORKERS")]
    media_workers: Option<usize>,
    /// Address to announce in ICE candidates (repeatable); default: this host's addresses.
    #[arg(long, env = "PARLEY_PUBLIC_IP", value_delimiter = ',')]
    public_ip: Option<Vec<IpAddr>>,
    /// STUN server to learn the public address from when --public-ip is unset (repeatable).
    #[arg(
        long = "stun-server",
        env = "PARLEY_STUN_SERVERS",
        value_delimiter = ','
    )]
    stun_servers: Option<Vec<String>>,
    /// Seconds calls may go on after a drain starts [default: 18000].
    #[arg(long, env = "PARLEY_DRAIN_GRACE_SECS")]
    drain_grace_secs: Option<u64>,
}

impl MediaArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        // The file may be the one signaling reads too: only the keys a media node uses count.
        let mut c = Config {
            http: file.http,
            rtc_port: file.rtc_port,
            rtc_bind: file.rtc_bind,
            media_workers: file.media_workers,
            public_ip: file.public_ip,
            stun_servers: file.stun_servers,
            drain_grace_secs: file.drain_grace_secs,
            node_secret: file.node_secret,
            signaling_url: file.signaling_url,
            node_id: file.node_id,
            ..Config::default()
        };
        if self.signaling_url.is_some() {
            c.signaling_url = self.signaling_url;
        }
        if self.node_secret.is_some() {
            c.node_secret = self.node_secret;
        }
        if self.node_id.is_some() {
            c.node_id = self.node_id;
        }
        if let Some(v) = self.http {
            c.http = v;
        }
        if let Some(v) = self.rtc_port {
            c.rtc_port = v;
        }
        if let Some(v) = self.rtc_bind {
            c.rtc_bind = v;
        }
        if let Some(v) = self.media_workers {
            c.media_workers = v;
        }
        if let Some(v) = self.public_ip {
            c.public_ip = v;
        }
        if let Some(v) = self.stun_servers {
            c.stun_servers = v;
        }
        if let Some(v) = self.drain_grace_secs {
            c.drain_grace_secs = v;
        }
        c.validate()?;
        c.validate_media_node()?;
        Ok(c)
    }
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
        if let Some(v) = self.media_workers {
            c.media_workers = v;
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
        if let Some(pairs) = self.api_keys {
            c.api_keys.clear();
            for pair in pairs {
                let Some((key, secret)) = pair.split_once(':') else {
                    anyhow::bail!("api_keys: {pair:?} is not KEY:SECRET");
                };
                c.api_keys.insert(key.to_string(), secret.to_string());
            }
        }
        if self.admin_http.is_some() {
            c.admin_http = self.admin_http;
        }
        if let Some(v) = self.stun_servers {
            c.stun_servers = v;
        }
        if let Some(v) = self.turn_servers {
            c.turn_servers = v;
        }
        if self.turn_secret.is_some() {
            c.turn_secret = self.turn_secret;
        }
        if let Some(v) = self.turn_ttl_secs {
            c.turn_ttl_secs = v;
        }
        if self.stun_listen.is_some() {
            c.stun_listen = self.stun_listen;
        }
        if self.stun_alternate_ip.is_some() {
            c.stun_alternate_ip = self.stun_alternate_ip;
        }
        if let Some(v) = self.stun_alternate_port {
            c.stun_alternate_port = v;
        }
        if let Some(v) = self.ring_timeout_secs {
            c.ring_timeout_secs = v;
        }
        if let Some(v) = self.p2p_timeout_ms {
            c.p2p_timeout_ms = v;
        }
        if let Some(v) = self.drain_grace_secs {
            c.drain_grace_secs = v;
        }
        if let Some(v) = self.webhook_urls {
            c.webhook_urls = v;
        }
        if self.webhook_secret.is_some() {
            c.webhook_secret = self.webhook_secret;
        }
        if let Some(v) = self.local_media {
            c.local_media = v;
        }
        if self.no_local_media {
            c.local_media = false;
        }
        if self.node_secret.is_some() {
            c.node_secret = self.node_secret;
        }
        c.validate()?;
        Ok(c)
    }
}

/// The addresses to announce in ICE candidates: `public_ip` when configured; otherwise the
/// address the STUN servers see (if any answers in time) and this host's own addresses.
async fn public_addresses(config: &Config) -> Vec<IpAddr> {
    if !config.public_ip.is_empty() || config.stun_servers.is_empty() {
        return config.public_ip.clone();
    }
    let timeout = std::time::Duration::from_secs(2);
    let mut ips = media::host_addresses();
    match stun::discover_public_ip(&config.stun_servers, timeout).await {
        Some(ip) => {
            tracing::info!(%ip, servers = ?config.stun_servers, "public address learnt from STUN");
            ips.retain(|i| *i != ip);
            ips.insert(0, ip);
        }
        None => tracing::warn!(
            servers = ?config.stun_servers,
            ?timeout,
            "no STUN server answered; announcing this host's own addresses (set --public-ip behind a NAT)"
        ),
    }
    ips
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
        Command::Lt(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(lt::run(args))
        }
        Command::Config(ConfigCommand::Print(args)) => {
            let config = args.into_config()?;
            std::io::stdout().write_all(config.to_masked_toml()?.as_bytes())?;
            Ok(())
        }
        Command::Token(args) => {
            let config = args.serve.into_config()?;
            let (key, secret) = match &args.key {
                Some(k) => (
                    k.clone(),
                    config
                        .api_keys
                        .get(k)
                        .with_context(|| format!("no API key {k:?} is configured"))?
                        .clone(),
                ),
                None => config
                    .api_keys
                    .iter()
                    .next()
                    .map(|(k, s)| (k.clone(), s.clone()))
                    .context(
                        "no API keys are configured (api_keys, PARLEY_API_KEYS or --api-key)",
                    )?,
            };
            let both = !args.publish && !args.subscribe;
            let grant = auth::Grant {
                room: &args.room,
                identity: &args.identity,
                name: args.name.as_deref(),
                publish: both || args.publish,
                subscribe: both || args.subscribe,
                ttl: args.ttl,
            };
            parley_proto::signal::validate_room_name(&args.room).map_err(anyhow::Error::msg)?;
            writeln!(std::io::stdout(), "{}", auth::mint(&key, &secret, &grant)?)?;
            Ok(())
        }
        Command::NatCheck {
            server,
            timeout_secs,
        } => {
            let report = current_thread_runtime()?.block_on(async {
                let addr = stun::resolve(&server)
                    .await?
                    .into_iter()
                    .next()
                    .context("the STUN server has no address")?;
                stun::nat_check(addr, std::time::Duration::from_secs(timeout_secs)).await
            })?;
            write!(std::io::stdout(), "{report}")?;
            Ok(())
        }
        Command::StunServer {
            listen,
            alternate_ip,
            alternate_port,
        } => current_thread_runtime()?.block_on(stun::run_stun_server(
            listen,
            alternate_ip,
            alternate_port,
        )),
        Command::Serve(args) => {
            let config = args.into_config()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async move {
                let metrics = std::sync::Arc::new(metrics::Metrics::new());
                if let (Some(listen), Some(alt)) = (config.stun_listen, config.stun_alternate_ip) {
                    let server = stun::StunServer::bind(listen, alt, config.stun_alternate_port)
                        .await
                        .context("starting the RFC 5780 STUN server")?;
                    tracing::info!(primary = %server.primary(), other = %server.other(), "STUN server (RFC 5780)");
                    tokio::spawn(async move {
                        if let Err(err) = server.run().await {
                            tracing::error!(%err, "STUN server stopped");
                        }
                    });
                }
                if !config.local_media {
                    let secret = config.node_secret.clone().unwrap_or_default();
                    let (media, nodes) = nodes::router(secret, metrics.clone());
                    tracing::info!("no local media: calls go to media nodes on /media-node");
                    return server::run(config, media, Some(nodes), metrics).await;
                }
                let public_ips = public_addresses(&config).await;
                let media = media::start(
                    SocketAddr::new(config.rtc_bind, config.rtc_port),
                    &public_ips,
                    media::worker_count(config.media_workers),
                    metrics.clone(),
                )?;
                server::run(config, media, None, metrics).await
            })
        }
        Command::Media(args) => {
            let config = args.into_config()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async move {
                let metrics = std::sync::Arc::new(metrics::Metrics::new());
                let public_ips = public_addresses(&config).await;
                let media = media::start(
                    SocketAddr::new(config.rtc_bind, config.rtc_port),
                    &public_ips,
                    media::worker_count(config.media_workers),
                    metrics.clone(),
                )?;
                nodes::run_node(config, media, metrics).await
            })
        }
    }
}

fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}
