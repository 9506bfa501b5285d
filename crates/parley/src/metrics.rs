//! Prometheus metrics (`GET /metrics`), through `prometheus-client`.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use parley_sfu::{AUDIO, ICE_STATES, Sample, SfuStats, VIDEO};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RtpLabels {
    pub direction: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: String,
}

pub struct Metrics {
    registry: Registry,
    pub sessions_active: Gauge,
    pub worker_sessions: Family<WorkerLabel, Gauge>,
    pub rooms_active: Gauge,
    pub participants_active: Gauge,
    pub state_changes: Family<StateLabel, Counter>,
    pub errors: Family<KindLabel, Counter>,
    /// Media sessions advanced by their timer, and polled in all.
    pub session_timeouts: Counter,
    pub session_polls: Counter,
    pub rtp_packets: Family<RtpLabels, Counter>,
    pub rtp_bytes: Family<RtpLabels, Counter>,
    pub ws_connections_active: Gauge,
    pub ws_messages: Family<DirectionLabel, Counter>,
    /// The two series of `ws_messages`, created once: counting a message takes no lock.
    ws_in: Counter,
    ws_out: Counter,
    pub rtcp_loss: Histogram,
    pub rtcp_rtt: Histogram,
    pub rtcp_jitter: Histogram,
    pub draining: Gauge,
    cpu_seconds: Counter<f64, AtomicU64>,
    rss_bytes: Gauge,
    open_fds: Gauge,
    /// Per media worker: its sessions and the counters already exported (to add only what
    /// is new).
    exported: Mutex<Vec<(usize, SfuStats)>>,
    cpu_exported: Mutex<f64>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            sessions_active: Gauge::default(),
            worker_sessions: Family::default(),
            rooms_active: Gauge::default(),
            participants_active: Gauge::default(),
            state_changes: Family::default(),
            errors: Family::default(),
            session_timeouts: Counter::default(),
            session_polls: Counter::default(),
            rtp_packets: Family::default(),
            rtp_bytes: Family::default(),
            ws_connections_active: Gauge::default(),
            ws_messages: Family::default(),
            rtcp_loss: Histogram::new([0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]),
            rtcp_rtt: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]),
            rtcp_jitter: Histogram::new([0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16]),
            draining: Gauge::default(),
            cpu_seconds: Counter::default(),
            rss_bytes: Gauge::default(),
            open_fds: Gauge::default(),
            ws_in: Counter::default(),
            ws_out: Counter::default(),
            exported: Mutex::new(Vec::new()),
            cpu_exported: Mutex::new(0.0),
            registry: Registry::default(),
        };
        registry.register(
            "process_cpu_seconds",
            "CPU time used by the process",
            m.cpu_seconds.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory",
            m.rss_bytes.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            m.open_fds.clone(),
        );
        let p = registry.sub_registry_with_prefix("parley");
        p.register(
            "sessions_active",
            "Media sessions (PeerConnections)",
            m.sessions_active.clone(),
        );
        p.register(
            "media_worker_sessions",
            "Media sessions on each media worker (thread)",
            m.worker_sessions.clone(),
        );
        p.register(
            "rooms_active",
            "Rooms with participants",
            m.rooms_active.clone(),
        );
        p.register(
            "participants_active",
            "Participants in rooms (including those within the resume window)",
            m.participants_active.clone(),
        );
        p.register(
            "connection_state_changes",
            "ICE connection state changes",
            m.state_changes.clone(),
        );
        p.register("errors", "Errors by kind", m.errors.clone());
        p.register(
            "media_session_timeouts",
            "Media sessions advanced because their timer was due",
            m.session_timeouts.clone(),
        );
        p.register(
            "media_session_polls",
            "Media session polls (timer, datagram or command)",
            m.session_polls.clone(),
        );
        p.register("rtp_packets", "RTP packets", m.rtp_packets.clone());
        p.register("rtp_bytes", "RTP payload bytes", m.rtp_bytes.clone());
        p.register(
            "ws_connections_active",
            "Open signaling WebSocket connections",
            m.ws_connections_active.clone(),
        );
        p.register("ws_messages", "Signaling messages", m.ws_messages.clone());
        p.register(
            "rtcp_loss_ratio",
            "Fraction lost, from RTCP reports",
            m.rtcp_loss.clone(),
        );
        p.register(
            "rtcp_rtt_seconds",
            "Round-trip time, from RTCP reports",
            m.rtcp_rtt.clone(),
        );
        p.register(
            "rtcp_jitter_seconds",
            "Interarrival jitter, from RTCP reports",
            m.rtcp_jitter.clone(),
        );
        p.register("draining", "1 while draining", m.draining.clone());
        let ws_in = m
            .ws_messages
            .get_or_create(&DirectionLabel {
                direction: "in".into(),
            })
            .clone();
        let ws_out = m
            .ws_messages
            .get_or_create(&DirectionLabel {
                direction: "out".into(),
            })
            .clone();
        Metrics {
            registry,
            ws_in,
            ws_out,
            ..m
        }
    }

    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// Counts one signaling message; `incoming` from the client, else to it.
    pub fn ws_message(&self, incoming: bool) {
        let c = if incoming { &self.ws_in } else { &self.ws_out };
        c.inc();
    }

    /// Adds what media worker `worker` counted since its last export.
    pub fn export_media(
        &self,
        worker: usize,
        sessions: usize,
        stats: &SfuStats,
        samples: &[Sample],
    ) {
        let Ok(mut exported) = self.exported.lock() else {
            return;
        };
        if exported.len() <= worker {
            exported.resize_with(worker + 1, Default::default);
        }
        exported[worker].0 = sessions;
        let total: usize = exported.iter().map(|(s, _)| s).sum();
        self.sessions_active.set(total as i64);
        self.worker_sessions
            .get_or_create(&WorkerLabel {
                worker: worker.to_string(),
            })
            .set(sessions as i64);
        let last = &mut exported[worker].1;
        for (k, name) in [(AUDIO, "audio"), (VIDEO, "video")] {
            for (dir, packets, bytes, last_p, last_b) in [
                (
                    "in",
                    stats.rtp_in_packets[k],
                    stats.rtp_in_bytes[k],
                    last.rtp_in_packets[k],
                    last.rtp_in_bytes[k],
                ),
                (
                    "out",
                    stats.rtp_out_packets[k],
                    stats.rtp_out_bytes[k],
                    last.rtp_out_packets[k],
                    last.rtp_out_bytes[k],
                ),
            ] {
                let labels = RtpLabels {
                    direction: dir.into(),
                    kind: name.into(),
                };
                self.rtp_packets
                    .get_or_create(&labels)
                    .inc_by(packets.saturating_sub(last_p));
                self.rtp_bytes
                    .get_or_create(&labels)
                    .inc_by(bytes.saturating_sub(last_b));
            }
        }
        for (i, state) in ICE_STATES.iter().enumerate() {
            let delta = stats.state_changes[i].saturating_sub(last.state_changes[i]);
            if delta > 0 {
                self.state_changes
                    .get_or_create(&StateLabel {
                        state: (*state).into(),
                    })
                    .inc_by(delta);
            }
        }
        for (kind, now, before) in [
            (
                "datagram_unrouted",
                stats.datagrams_unrouted,
                last.datagrams_unrouted,
            ),
            (
                "media_input_refused",
                stats.inputs_refused,
                last.inputs_refused,
            ),
            ("sdp_rejected", stats.sdp_rejected, last.sdp_rejected),
        ] {
            if now > before {
                self.errors
                    .get_or_create(&KindLabel { kind: kind.into() })
                    .inc_by(now - before);
            }
        }
        self.session_timeouts
            .inc_by(stats.session_timeouts.saturating_sub(last.session_timeouts));
        self.session_polls
            .inc_by(stats.session_polls.saturating_sub(last.session_polls));
        *last = stats.clone();
        for s in samples {
            match s {
                Sample::Loss(l) => self.rtcp_loss.observe(*l),
                Sample::Rtt(r) => self.rtcp_rtt.observe(r.as_secs_f64()),
                Sample::Jitter(j) => self.rtcp_jitter.observe(*j),
            }
        }
    }

    /// The text exposition, with process figures read now.
    pub fn render(&self) -> String {
        self.read_process();
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(%err, "cannot encode metrics");
        }
        out
    }

    fn read_process(&self) {
        // Fields 14 and 15 of /proc/self/stat: user and system time in clock ticks (USER_HZ,
        // 100 on Linux); the command name in parentheses may hold spaces, so split after it.
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
        {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
            if let (Some(u), Some(s)) = (ticks(11), ticks(12)) {
                let cpu = (u + s) / 100.0;
                if let Ok(mut last) = self.cpu_exported.lock()
                    && cpu > *last
                {
                    self.cpu_seconds.inc_by(cpu - *last);
                    *last = cpu;
                }
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status")
            && let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        {
            self.rss_bytes.set(kb * 1024);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_deltas_and_process_figures() {
        let m = Metrics::new();
        let mut s = SfuStats::default();
        s.rtp_in_packets[VIDEO] = 10;
        s.rtp_in_bytes[VIDEO] = 1000;
        m.export_media(0, 2, &s, &[Sample::Loss(0.01)]);
        s.rtp_in_packets[VIDEO] = 15;
        m.export_media(0, 2, &s, &[]);
        // A second worker's counters add to the first's.
        let mut other = SfuStats::default();
        other.rtp_in_packets[VIDEO] = 5;
        m.export_media(1, 1, &other, &[]);
        m.ws_message(true);
        let text = m.render();
        assert!(
            text.contains("parley_rtp_packets_total{direction=\"in\",kind=\"video\"} 20"),
            "{text}"
        );
        assert!(text.contains("parley_sessions_active 3"), "{text}");
        assert!(
            text.contains("parley_media_worker_sessions{worker=\"1\"} 1"),
            "{text}"
        );
        assert!(text.contains("parley_rtcp_loss_ratio_count 1"), "{text}");
        assert!(
            text.contains("parley_ws_messages_total{direction=\"in\"} 1"),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(text.contains("process_open_fds"), "{text}");
    }
}
