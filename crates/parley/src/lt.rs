//! `parley lt`: the load-test tool. Every simulated user is a real WebRTC client
//! (`parley-client`: ICE, DTLS, SRTP); receivers check sequence continuity, loss and one-way
//! delay (measured fully on a sample of receivers, counted on the rest).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use parley_client::{ClientConfig, ClientStats, Target};

/// Receivers that record every packet's delay; the others only count.
const MEASURED_USERS: usize = 10;

#[derive(clap::Args)]
pub struct LtArgs {
    /// Number of calls (rooms).
    #[arg(long, default_value = "1")]
    calls: usize,
    /// Users in each call.
    #[arg(long, default_value = "2")]
    users_per_call: usize,
    /// Users per call who send audio (50 packets/s, Opus-sized).
    #[arg(long, default_value = "1")]
    unmuted: usize,
    /// Users per call who share a screen (VP8, ~1.6 Mbit/s, 15 fps, a keyframe every 3 s).
    #[arg(long, default_value = "0")]
    screen_sharing: usize,
    /// Users per call who send camera video (VP8 simulcast in three layers, 30 fps).
    #[arg(long, default_value = "0")]
    video: usize,
    /// Seconds of steady load after everyone joined.
    #[arg(long, default_value = "10")]
    duration: u64,
    /// Seconds over which the users join.
    #[arg(long, default_value = "2")]
    join_duration: u64,
    /// Server URL: ws://HOST:PORT/ws (parley), ws://HOST:PORT (janus's WebSocket API),
    /// udp://HOST:PORT (the floor forwarder of bench/floor).
    #[arg(long)]
    url: String,
    /// Server adapter: parley, janus (VideoRoom plugin) or floor (plain UDP fan-out).
    #[arg(long, default_value = "parley")]
    target: Target,
    /// The server's process id, for its CPU time and memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// CPU time (user + system) of a process in microseconds, from /proc/PID/stat (USER_HZ = 100).
fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000)
}

fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub async fn run(args: LtArgs) -> anyhow::Result<()> {
    for (flag, n) in [
        ("--unmuted", args.unmuted),
        ("--screen-sharing", args.screen_sharing),
        ("--video", args.video),
    ] {
        if n > args.users_per_call {
            bail!(
                "{flag} {n} is more than --users-per-call {}",
                args.users_per_call
            );
        }
    }
    let total = args.calls * args.users_per_call;
    let rx = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let join_window = Duration::from_secs(args.join_duration);
    let mut tasks = Vec::new();
    let mut n = 0usize;
    for call in 0..args.calls {
        for user in 0..args.users_per_call {
            let cfg = ClientConfig {
                target: args.target,
                url: args.url.clone(),
                room: format!("lt-{call}"),
                room_number: 7_000 + call as u64,
                name: format!("user-{call}-{user}"),
                send_audio: user < args.unmuted,
                send_video: user < args.video,
                send_screen: user < args.screen_sharing,
                measure: n < MEASURED_USERS,
                rx_counter: Some(rx.clone()),
            };
            let delay = join_window.mul_f64(n as f64 / total.max(1) as f64);
            let stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                parley_client::run(cfg, stop).await
            }));
            n += 1;
        }
    }

    let started = Instant::now();
    let mut err = std::io::stderr();
    while started.elapsed() < join_window {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = write!(
            err,
            "\rjoining {:>5.1}s / {}s",
            started.elapsed().as_secs_f64(),
            args.join_duration
        );
    }
    // Steady window: packets and server CPU counted from here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let steady = Instant::now();
    let rx0 = rx.load(Ordering::Relaxed);
    let cpu0 = args.server_pid.and_then(cpu_us);
    let window = Duration::from_secs(args.duration);
    while steady.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let done = (steady.elapsed().as_secs_f64() / window.as_secs_f64()).min(1.0);
        let bar = "#".repeat((done * 30.0) as usize);
        let pps = (rx.load(Ordering::Relaxed) - rx0) as f64 / steady.elapsed().as_secs_f64();
        let _ = write!(
            err,
            "\r[{bar:<30}] {:>5.1}s  rx {pps:>8.0} pkt/s",
            steady.elapsed().as_secs_f64()
        );
    }
    let elapsed = steady.elapsed().as_secs_f64();
    let rx_window = rx.load(Ordering::Relaxed) - rx0;
    let cpu1 = args.server_pid.and_then(cpu_us);
    let rss = args.server_pid.and_then(rss_mb);
    let _ = writeln!(err);
    let _ = stop_tx.send(true);

    let mut stats: Vec<ClientStats> = Vec::new();
    let mut failures = Vec::new();
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(10), t).await {
            Ok(Ok(Ok(s))) => {
                if s.join.is_none() {
                    failures.push("media never connected".into());
                }
                stats.push(s);
            }
            Ok(Ok(Err(e))) => failures.push(format!("{e:#}")),
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(_) => failures.push("a user did not stop in time".into()),
        }
    }
    let mut joins: Vec<f64> = stats
        .iter()
        .filter_map(|s| s.join.map(|d| d.as_secs_f64() * 1000.0))
        .collect();
    joins.sort_by(f64::total_cmp);
    let mut delays: Vec<f64> = stats
        .iter()
        .flat_map(|s| s.delays_us.iter().map(|d| f64::from(*d) / 1000.0))
        .collect();
    delays.sort_by(f64::total_cmp);
    let received: u64 = stats.iter().map(|s| s.rx_packets).sum();
    let lost: u64 = stats.iter().map(|s| s.lost).sum();
    let loss_pct = if received + lost == 0 {
        0.0
    } else {
        lost as f64 * 100.0 / (received + lost) as f64
    };
    let rx_pps = rx_window as f64 / elapsed;
    let cpu_per_pkt = match (cpu0, cpu1) {
        (Some(a), Some(b)) if rx_window > 0 => Some((b - a) as f64 / rx_window as f64),
        _ => None,
    };
    let measured = stats.len().min(MEASURED_USERS);
    let mut out = std::io::stdout();
    writeln!(out, "target                 {}", args.target)?;
    writeln!(
        out,
        "calls × users          {} × {} (each: {} unmuted, {} camera, {} screen)",
        args.calls, args.users_per_call, args.unmuted, args.video, args.screen_sharing
    )?;
    writeln!(
        out,
        "users connected        {} of {total} ({} failed)",
        joins.len(),
        failures.len()
    )?;
    writeln!(
        out,
        "join p50 / p99         {:.0} / {:.0} ms",
        percentile(&joins, 50.0),
        percentile(&joins, 99.0)
    )?;
    writeln!(
        out,
        "received               {rx_pps:.0} packets/s ({received} in all)"
    )?;
    writeln!(out, "loss                   {loss_pct:.2} %")?;
    writeln!(
        out,
        "one-way delay p50/p99  {:.1} / {:.1} ms (measured on {measured} receivers; the others only counted)",
        percentile(&delays, 50.0),
        percentile(&delays, 99.0)
    )?;
    if let Some(c) = cpu_per_pkt {
        writeln!(out, "server CPU             {c:.2} µs per forwarded packet")?;
    }
    if let Some(r) = rss {
        writeln!(out, "server memory          {r:.1} MB resident")?;
    }
    for f in failures.iter().take(5) {
        writeln!(out, "failure: {f}")?;
    }
    let json = serde_json::json!({
        "target": args.target.to_string(),
        "calls": args.calls,
        "users": total,
        "join_ms_p50": percentile(&joins, 50.0),
        "join_ms_p99": percentile(&joins, 99.0),
        "rx_pps": rx_pps,
        "loss_pct": loss_pct,
        "delay_ms_p99": percentile(&delays, 99.0),
        "server_cpu_us_per_pkt": cpu_per_pkt,
        "server_rss_mb": rss,
    });
    writeln!(out, "{json}")?;
    if !failures.is_empty() {
        bail!("{} of {total} users failed", failures.len());
    }
    Ok(())
}
