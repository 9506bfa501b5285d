//! The media plane's driver: the one UDP port, the clock and the channels to signaling around
//! the sans-IO [`Sfu`].
//!
//! The media plane runs on `workers` threads (by default one per core), each with its own
//! [`Sfu`] and its own rooms. A room lives on one worker, so forwarding never crosses threads;
//! a new room goes to the worker with the fewest sessions (placed by [`Router`], the table that
//! also places rooms on media nodes; on a tie, not worker 0). Worker 0 reads the media port and accepts ICE-TCP; it
//! hands the datagrams of the other workers' sessions to them in batches ([`dispatch`] knows
//! which session a datagram is for), and the batches' buffers come back to it for reuse. Every
//! worker sends its own packets on the shared socket.

mod batch;
mod dispatch;
mod tcp;

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use parley_proto::media::{MediaCommand, MediaEvent, SessionId};
use parley_sfu::{Sfu, SfuConfig};
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
use str0m::net::Protocol;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::nodes::{NodeKey, Route, Router};
use dispatch::Dispatch;

/// Handle to a running media plane.
pub struct MediaPlane {
    pub commands: mpsc::UnboundedSender<MediaCommand>,
    pub events: mpsc::UnboundedReceiver<MediaEvent>,
}

/// The number of media workers for a configured value: 0 is one per core this process may
/// run on.
pub fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Binds the media port and starts the media plane on `workers` threads of its own.
pub fn start(
    bind: SocketAddr,
    public_ips: &[IpAddr],
    workers: usize,
    metrics: Arc<Metrics>,
) -> anyhow::Result<MediaPlane> {
    let workers = workers.max(1);
    let std_sock = std::net::UdpSocket::bind(bind)
        .with_context(|| format!("binding the media port {bind} (UDP)"))?;
    std_sock.set_nonblocking(true)?;
    let local_addr = std_sock.local_addr()?;

    let ips: Vec<IpAddr> = if public_ips.is_empty() {
        host_addresses()
    } else {
        public_ips.to_vec()
    };
    let candidates: Vec<SocketAddr> = ips
        .iter()
        .map(|ip| SocketAddr::new(*ip, local_addr.port()))
        .collect();
    let local_ips: Vec<IpAddr> = candidates
        .iter()
        .map(|c| c.ip())
        .filter(|ip| std::net::UdpSocket::bind((*ip, 0)).is_ok())
        .collect();
    tracing::info!(
        port = local_addr.port(),
        ?candidates,
        workers,
        "media port ready"
    );

    // ICE-TCP on the same port, for networks that block UDP.
    let tcp_listener =
        std::net::TcpListener::bind(SocketAddr::new(bind.ip(), local_addr.port()))
            .with_context(|| format!("binding the media port {} (TCP)", local_addr.port()))?;
    tcp_listener.set_nonblocking(true)?;

    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let (worker_ev_tx, worker_ev_rx) = mpsc::unbounded_channel();
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let mut worker_cmds = Vec::new();
    let mut inboxes = Vec::new();
    let mut rest = Vec::new();
    for index in 0..workers {
        let (tx, rx) = mpsc::unbounded_channel();
        worker_cmds.push(tx);
        let (in_tx, in_rx) = mpsc::channel(INBOX);
        inboxes.push(in_tx);
        let socket = if index == 0 {
            None
        } else {
            Some(std_sock.try_clone().context("sharing the media socket")?)
        };
        rest.push((index, socket, rx, in_rx));
    }
    let shared = Shared {
        candidates,
        local_ips,
        local_addr,
        events: worker_ev_tx,
        metrics: metrics.clone(),
        multi: workers > 1,
    };
    let mut reader = Some(Reader {
        dispatch: Dispatch::default(),
        inboxes,
        pending: (0..workers).map(|_| None).collect(),
        spare: Vec::new(),
        tcp_links: HashMap::new(),
        metrics: metrics.clone(),
    });
    let mut router = Some((cmd_rx, worker_cmds, worker_ev_rx, ev_tx));
    let mut control_rx = Some(control_rx);
    let mut listener = Some(tcp_listener);
    let mut first_socket = Some(std_sock);
    for (index, socket, commands, inbox) in rest {
        let shared = shared.clone();
        let control = (index > 0).then(|| control_tx.clone());
        let socket = match socket {
            Some(s) => s,
            None => first_socket.take().context("the media socket")?,
        };
        // Worker 0 reads the port, accepts ICE-TCP and routes commands; the others only send.
        let lead = (index == 0).then(|| {
            (
                reader.take(),
                router.take(),
                control_rx.take(),
                listener.take(),
            )
        });
        std::thread::Builder::new()
            .name(format!("media-{index}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(err) => {
                        tracing::error!(%err, "cannot start a media runtime");
                        return;
                    }
                };
                rt.block_on(async move {
                    let interest = if lead.is_some() {
                        Interest::READABLE | Interest::WRITABLE
                    } else {
                        // A worker that does not read must not be woken by every datagram.
                        Interest::WRITABLE
                    };
                    let state = match UdpSocketState::new((&socket).into()) {
                        Ok(s) => s,
                        Err(err) => {
                            tracing::error!(%err, "cannot configure the media socket");
                            return;
                        }
                    };
                    // SAFETY: the AsyncFd owns the socket, whose descriptor stays open and the
                    // same until the AsyncFd is dropped.
                    let io = match unsafe { AsyncFd::register_with_interest(socket, interest) } {
                        Ok(io) => io,
                        Err(err) => {
                            tracing::error!(%err, "cannot register the media socket");
                            return;
                        }
                    };
                    let segments = state.max_gso_segments().min(batch::MAX_SEGMENTS);
                    let mut worker = Worker {
                        index,
                        sfu: Sfu::new(SfuConfig {
                            candidates: shared.candidates.clone(),
                            tcp: true,
                        }),
                        io,
                        state,
                        shared,
                        tcp_conns: HashMap::new(),
                        control,
                        ufrags: HashMap::new(),
                        reader: None,
                        out: Vec::with_capacity(SEND_BATCH),
                        segments,
                        sender: batch::Sender::new(),
                    };
                    let mut lead_rx = LeadChannels::default();
                    if let Some((reader, router, control_rx, listener)) = lead {
                        worker.reader = reader;
                        lead_rx.control = control_rx;
                        if let Some((cmd_rx, worker_cmds, worker_ev_rx, ev_tx)) = router {
                            tokio::spawn(route(cmd_rx, worker_cmds, worker_ev_rx, ev_tx));
                        }
                        if let Some(listener) = listener {
                            let (tcp_tx, tcp_rx) = mpsc::channel(TCP_QUEUE);
                            match tokio::net::TcpListener::from_std(listener) {
                                Ok(l) => {
                                    tokio::spawn(tcp::accept(l, tcp_tx));
                                }
                                Err(err) => {
                                    tracing::error!(%err, "cannot register the media TCP listener")
                                }
                            }
                            lead_rx.tcp = Some(tcp_rx);
                        }
                    }
                    worker.run(commands, inbox, lead_rx).await;
                });
            })
            .context("starting a media thread")?;
    }

    Ok(MediaPlane {
        commands: cmd_tx,
        events: ev_rx,
    })
}

/// The addresses of this host that browsers can reach: the one of the default route, and
/// loopback for clients on this machine.
pub fn host_addresses() -> Vec<IpAddr> {
    let mut ips = Vec::new();
    // Connecting a UDP socket sends nothing; it only asks the kernel for the route's source.
    if let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0")
        && s.connect("192.0.2.1:9").is_ok()
        && let Ok(addr) = s.local_addr()
        && !addr.ip().is_loopback()
        && !addr.ip().is_unspecified()
    {
        ips.push(addr.ip());
    }
    ips.push(IpAddr::from([127, 0, 0, 1]));
    ips
}

/// Passes signaling's commands to the worker of their room and the workers' events back.
async fn route(
    mut commands: mpsc::UnboundedReceiver<MediaCommand>,
    workers: Vec<mpsc::UnboundedSender<MediaCommand>>,
    mut events: mpsc::UnboundedReceiver<(usize, MediaEvent)>,
    out: mpsc::UnboundedSender<MediaEvent>,
) {
    // The router breaks ties between equally loaded workers by the lowest key. Worker 0 also
    // reads the port for everyone, so its key is the highest: a tie goes to another worker.
    let n = workers.len();
    let key = |worker: usize| NodeKey((n - 1 - worker) as u64);
    let mut router = Router::default();
    for i in 0..n {
        router.node_up(key(i), &format!("worker-{i}"));
    }
    loop {
        tokio::select! {
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                match router.command(cmd) {
                    Route::Node(NodeKey(k), cmd) => {
                        if let Some(w) = usize::try_from(k)
                            .ok()
                            .and_then(|k| (n - 1).checked_sub(k))
                            .and_then(|w| workers.get(w))
                        {
                            let _ = w.send(cmd);
                        }
                    }
                    Route::Hub(ev) => {
                        let _ = out.send(ev);
                    }
                    Route::Nowhere => {}
                }
            }
            Some((from, ev)) = events.recv() => {
                if let Some(ev) = router.event(key(from), ev)
                    && out.send(ev).is_err()
                {
                    break;
                }
            }
        }
    }
    // Dropping the workers' command channels stops them.
}

/// What every worker knows of the media port.
#[derive(Clone)]
struct Shared {
    candidates: Vec<SocketAddr>,
    /// Candidate addresses that are this host's own, so replies can be sent from them.
    local_ips: Vec<IpAddr>,
    local_addr: SocketAddr,
    /// Events to the router, with the worker's index.
    events: mpsc::UnboundedSender<(usize, MediaEvent)>,
    metrics: Arc<Metrics>,
    /// More than one worker: datagrams and announcements go through worker 0's dispatch.
    multi: bool,
}

/// Worker 0's channels besides those every worker has.
#[derive(Default)]
struct LeadChannels {
    control: Option<mpsc::UnboundedReceiver<Control>>,
    tcp: Option<mpsc::Receiver<tcp::Event>>,
}

/// Worker → worker 0.
enum Control {
    /// A session of the worker answers STUN for this ufrag.
    Announce(usize, SessionId, String),
    Forget(SessionId),
    /// A handed-over batch, emptied, for reuse.
    Recycle(Batch),
}

/// Worker 0 → the worker of a session.
enum Inbound {
    Datagrams(Batch),
    TcpOpen(SocketAddr, tcp::Conn),
    TcpFrame(SocketAddr, Vec<u8>),
    TcpClosed(SocketAddr),
}

/// UDP datagrams for one worker, back to back in one buffer.
#[derive(Default)]
struct Batch {
    data: Vec<u8>,
    /// Source, the candidate address it was sent to, and where its bytes end in `data`.
    items: Vec<(SocketAddr, SocketAddr, usize)>,
}

/// Frames from ICE-TCP connections waiting for the media loop.
const TCP_QUEUE: usize = 4096;
/// Batches waiting for one worker; more are dropped, as a full socket buffer would.
const INBOX: usize = 1024;
/// Emptied batches kept for reuse.
const SPARE: usize = 64;

const BATCH: usize = 32;
/// Most datagrams gathered for one send: room for a video frame's packets to each of many
/// viewers, so that each viewer's can leave as one message.
const SEND_BATCH: usize = 512;
/// Timeouts handled back to back, each already due when the last finished, before the worker
/// looks at its socket and channels again.
const MAX_DUE_IN_A_ROW: u32 = 64;
/// One read: a datagram, or up to 64 that the kernel coalesced (quinn-udp turns `UDP_GRO` on;
/// a network card's GRO then merges a sender's burst, and a shorter buffer would cut it off).
/// One cache line more than 64 KB: with a power-of-two stride every buffer of a batch would
/// start in the same cache set, and the datagrams of one read would evict each other.
const BUF: usize = (1 << 16) + 64;

/// Worker 0's reading side: the dispatch table and the hand-over to the other workers.
struct Reader {
    dispatch: Dispatch,
    inboxes: Vec<mpsc::Sender<Inbound>>,
    /// The batch being filled for each worker.
    pending: Vec<Option<Batch>>,
    spare: Vec<Batch>,
    /// Every ICE-TCP connection, and the worker it was given to.
    tcp_links: HashMap<SocketAddr, (tcp::Conn, Option<usize>)>,
    metrics: Arc<Metrics>,
}

impl Reader {
    fn push(&mut self, worker: usize, source: SocketAddr, destination: SocketAddr, data: &[u8]) {
        let Some(slot) = self.pending.get_mut(worker) else {
            return;
        };
        let batch = slot.get_or_insert_with(|| self.spare.pop().unwrap_or_default());
        batch.data.extend_from_slice(data);
        batch.items.push((source, destination, batch.data.len()));
    }

    fn hand_over(&mut self) {
        for (worker, slot) in self.pending.iter_mut().enumerate() {
            let Some(batch) = slot.take() else { continue };
            let Some(inbox) = self.inboxes.get(worker) else {
                continue;
            };
            if let Err(err) = inbox.try_send(Inbound::Datagrams(batch)) {
                tracing::debug!(worker, "media worker is behind; datagrams dropped");
                self.metrics.error("media_worker_behind");
                if let mpsc::error::TrySendError::Full(Inbound::Datagrams(mut b)) = err {
                    b.data.clear();
                    b.items.clear();
                    self.spare.push(b);
                }
            }
        }
    }

    fn send(&self, worker: usize, msg: Inbound) {
        if let Some(inbox) = self.inboxes.get(worker)
            && inbox.try_send(msg).is_err()
        {
            self.metrics.error("media_worker_behind");
        }
    }

    fn control(&mut self, ctl: Control) {
        match ctl {
            Control::Announce(worker, session, ufrag) => {
                self.dispatch.announce(worker, session, ufrag)
            }
            Control::Forget(session) => self.dispatch.forget(session),
            Control::Recycle(batch) => {
                if self.spare.len() < SPARE {
                    self.spare.push(batch);
                }
            }
        }
    }
}

struct Worker {
    index: usize,
    sfu: Sfu,
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    shared: Shared,
    /// ICE-TCP connections of this worker's sessions, by the peer's address.
    tcp_conns: HashMap<SocketAddr, tcp::Conn>,
    /// To worker 0 (on the other workers).
    control: Option<mpsc::UnboundedSender<Control>>,
    /// The ufrag announced for each session (with several workers).
    ufrags: HashMap<SessionId, String>,
    /// On worker 0.
    reader: Option<Reader>,
    /// Datagrams being sent (kept for its buffer).
    out: Vec<parley_sfu::Transmit>,
    /// Most datagrams one message may carry as segments (UDP GSO; 1: none).
    segments: usize,
    sender: Box<batch::Sender>,
}

impl Worker {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<MediaCommand>,
        mut inbox: mpsc::Receiver<Inbound>,
        mut lead: LeadChannels,
    ) {
        // On the heap (2 MB), as an array so that a read's slices need no allocation.
        let Ok(mut bufs) = <Box<[[u8; BUF]; BATCH]>>::try_from(vec![[0u8; BUF]; BATCH]) else {
            unreachable!("a vector of BATCH buffers");
        };
        let mut metas = vec![RecvMeta::default(); BATCH];
        let reads = self.reader.is_some();
        let has_control = lead.control.is_some();
        let has_tcp = lead.tcp.is_some();
        let mut export = tokio::time::interval(Duration::from_secs(1));
        let mut due_in_a_row = 0;
        // One timer for the whole loop, moved only when the deadline moves: a new one each
        // round was a registration in the runtime's wheel and a removal, per wakeup.
        let sleep = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(sleep);
        loop {
            let timeout = self
                .sfu
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            // A timeout already due runs at once. str0m's pacer asks for a turn a microsecond
            // after each video packet it releases; the runtime's timer counts in milliseconds,
            // so through it a 30-packet keyframe to one viewer took 30 ms. A bounded number in
            // a row, so the socket and the commands are still served.
            if timeout <= Instant::now() && due_in_a_row < MAX_DUE_IN_A_ROW {
                due_in_a_row += 1;
                self.sfu.handle_timeout(Instant::now());
                self.flush().await;
                continue;
            }
            due_in_a_row = 0;
            let deadline = tokio::time::Instant::from_std(timeout);
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            tokio::select! {
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    self.command(cmd);
                }
                Some(msg) = inbox.recv() => {
                    self.inbound(msg);
                    self.sfu.handle_timeout(Instant::now());
                }
                ready = self.io.readable(), if reads => {
                    match ready {
                        // Cleared before reading to the end: a datagram that arrives meanwhile
                        // is read now or wakes the next round.
                        Ok(mut guard) => guard.clear_ready(),
                        Err(err) => {
                            tracing::error!(%err, "media socket failed");
                            break;
                        }
                    }
                    self.receive(&mut bufs, &mut metas);
                    // Timeouts that may run late and are due run with these datagrams.
                    self.sfu.handle_timeout(Instant::now());
                }
                Some(ctl) = async { lead.control.as_mut()?.recv().await }, if has_control => {
                    if let Some(reader) = self.reader.as_mut() {
                        reader.control(ctl);
                    }
                }
                Some(ev) = async { lead.tcp.as_mut()?.recv().await }, if has_tcp => self.tcp_event(ev),
                _ = &mut sleep => {
                    self.sfu.handle_timeout(Instant::now());
                }
                _ = export.tick() => {
                    let samples = self.sfu.drain_samples();
                    self.shared.metrics.export_media(
                        self.index,
                        self.sfu.session_count(),
                        self.sfu.stats(),
                        &samples,
                    );
                }
            }
            self.flush().await;
        }
        tracing::info!(worker = self.index, "media worker stopped");
    }

    fn command(&mut self, cmd: MediaCommand) {
        let offered = match &cmd {
            MediaCommand::Offer { session, .. } => Some(*session),
            _ => None,
        };
        self.sfu.handle_command(cmd, Instant::now());
        if let Some(session) = offered.filter(|_| self.shared.multi)
            && let Some(ufrag) = self.sfu.ice_ufrag(session)
            && self.ufrags.get(&session) != Some(&ufrag)
        {
            self.ufrags.insert(session, ufrag.clone());
            self.tell_dispatch(Control::Announce(self.index, session, ufrag));
        }
    }

    /// Tells worker 0's dispatch table (directly on worker 0).
    fn tell_dispatch(&mut self, ctl: Control) {
        if let Some(reader) = self.reader.as_mut() {
            reader.control(ctl);
        } else if let Some(control) = &self.control {
            let _ = control.send(ctl);
        }
    }

    fn inbound(&mut self, msg: Inbound) {
        match msg {
            Inbound::Datagrams(mut batch) => {
                let now = Instant::now();
                let mut start = 0;
                for (source, destination, end) in &batch.items {
                    let Some(data) = batch.data.get(start..*end) else {
                        break;
                    };
                    self.sfu
                        .handle_datagram(now, Protocol::Udp, *source, *destination, data);
                    start = *end;
                }
                batch.data.clear();
                batch.items.clear();
                self.tell_dispatch(Control::Recycle(batch));
            }
            Inbound::TcpOpen(peer, conn) => {
                self.tcp_conns.insert(peer, conn);
            }
            Inbound::TcpFrame(peer, frame) => self.tcp_frame(peer, &frame),
            Inbound::TcpClosed(peer) => {
                self.tcp_conns.remove(&peer);
            }
        }
    }

    fn receive(&mut self, bufs: &mut [[u8; BUF]; BATCH], metas: &mut [RecvMeta]) {
        loop {
            let mut slices = bufs.each_mut().map(|b| IoSliceMut::new(&mut b[..]));
            let res = self
                .state
                .recv(UdpSockRef::from(self.io.get_ref()), &mut slices, metas);
            let n = match res {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) => {
                    // ICMP errors and the like surface here; they concern one peer only.
                    tracing::debug!(%err, "media recv error");
                    return;
                }
            };
            let now = Instant::now();
            for (meta, buf) in metas.iter().zip(slices.iter()).take(n) {
                let destination = self.destination(meta.dst_ip);
                let stride = meta.stride.max(1);
                for chunk in buf[..meta.len].chunks(stride) {
                    let worker = match self.reader.as_mut() {
                        Some(r) if self.shared.multi => {
                            r.dispatch.route(meta.addr, chunk).unwrap_or(0)
                        }
                        _ => 0,
                    };
                    if worker == 0 {
                        self.sfu
                            .handle_datagram(now, Protocol::Udp, meta.addr, destination, chunk);
                    } else if let Some(r) = self.reader.as_mut() {
                        r.push(worker, meta.addr, destination, chunk);
                    }
                }
            }
            if let Some(r) = self.reader.as_mut() {
                r.hand_over();
            }
        }
    }

    /// The candidate address a datagram was sent to.
    fn destination(&self, dst_ip: Option<IpAddr>) -> SocketAddr {
        let candidates = &self.shared.candidates;
        if let Some(ip) = dst_ip
            && let Some(c) = candidates.iter().find(|c| c.ip() == ip)
        {
            return *c;
        }
        // Behind a 1:1 NAT the packet's destination is a private address: use the public one.
        candidates
            .first()
            .copied()
            .unwrap_or(self.shared.local_addr)
    }

    /// ICE-TCP, on worker 0: each connection goes to the worker of its session.
    fn tcp_event(&mut self, ev: tcp::Event) {
        let Some(reader) = self.reader.as_mut() else {
            return;
        };
        match ev {
            tcp::Event::Open(peer, conn) => {
                tracing::debug!(%peer, "ICE-TCP connection");
                reader.tcp_links.insert(peer, (conn, None));
            }
            tcp::Event::Frame(peer, frame) => {
                let worker = if self.shared.multi {
                    reader.dispatch.route(peer, &frame).unwrap_or(0)
                } else {
                    0
                };
                let Some((conn, owner)) = reader.tcp_links.get_mut(&peer) else {
                    return;
                };
                let moved = (*owner != Some(worker)).then(|| (owner.replace(worker), conn.clone()));
                if let Some((old, conn)) = moved {
                    match old {
                        Some(0) => {
                            self.tcp_conns.remove(&peer);
                        }
                        Some(old) => reader.send(old, Inbound::TcpClosed(peer)),
                        None => {}
                    }
                    if worker == 0 {
                        self.tcp_conns.insert(peer, conn);
                    } else {
                        reader.send(worker, Inbound::TcpOpen(peer, conn));
                    }
                }
                if worker == 0 {
                    self.tcp_frame(peer, &frame);
                } else {
                    reader.send(worker, Inbound::TcpFrame(peer, frame));
                }
            }
            tcp::Event::Closed(peer) => match reader.tcp_links.remove(&peer) {
                Some((_, Some(0))) => {
                    self.tcp_conns.remove(&peer);
                }
                Some((_, Some(worker))) => reader.send(worker, Inbound::TcpClosed(peer)),
                _ => {}
            },
        }
    }

    fn tcp_frame(&mut self, peer: SocketAddr, frame: &[u8]) {
        let Some(local_ip) = self.tcp_conns.get(&peer).map(|c| c.local.ip()) else {
            return;
        };
        let destination = self.destination(Some(local_ip));
        self.sfu
            .handle_datagram(Instant::now(), Protocol::Tcp, peer, destination, frame);
    }

    async fn flush(&mut self) {
        loop {
            // What the last round produced, up to a bound: the first datagram leaves soon
            // after str0m stamped its send time.
            while self.out.len() < SEND_BATCH {
                let Some(t) = self.sfu.poll_transmit() else {
                    break;
                };
                if t.proto == Protocol::Tcp {
                    match self.tcp_conns.get(&t.destination) {
                        Some(conn) => conn.send(&t.contents),
                        None => tracing::trace!(dest = %t.destination, "no ICE-TCP connection"),
                    }
                    continue;
                }
                self.out.push(t);
            }
            if self.out.is_empty() {
                break;
            }
            self.send_out().await;
        }
        while let Some(ev) = self.sfu.poll_event() {
            if let MediaEvent::Closed { session } = ev
                && self.ufrags.remove(&session).is_some()
            {
                self.tell_dispatch(Control::Forget(session));
            }
            if self.shared.events.send((self.index, ev)).is_err() {
                return;
            }
        }
    }

    /// Sends `self.out`: runs of IPv4 datagrams with one `sendmmsg` each, others one by one.
    /// With segmentation, a destination's datagrams go together (in their order), so that a
    /// frame's packets to one viewer can leave as one message.
    async fn send_out(&mut self) {
        let mut out = std::mem::take(&mut self.out);
        if self.segments > 1 {
            // Stable: each destination's datagrams keep their order.
            out.sort_by_key(|t| t.destination);
        }
        let mut next = 0;
        while next < out.len() {
            let res = if batchable(&self.shared, &out[next]).is_some() {
                let fd = self.io.get_ref().as_raw_fd();
                let shared = &self.shared;
                self.sender
                    .send(fd, &out[next..], |t| batchable(shared, t), self.segments)
            } else {
                self.send_one(&out[next]).map(|()| 1)
            };
            match res {
                Ok(n) => next += n.max(1),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match self.io.writable().await {
                    Ok(mut guard) => guard.clear_ready(),
                    Err(_) => break,
                },
                // A network device that cannot segment fails a message of segments: without
                // segmentation from now on, and the same datagrams again.
                Err(err) if self.segments > 1 && self.sender.segmentation_refused(&err) => {
                    tracing::info!(%err, "sending segmented datagrams failed; sending them one by one");
                    self.segments = 1;
                }
                Err(err) => {
                    // This datagram only (an unreachable peer and the like); go on after it.
                    tracing::debug!(%err, dest = %out[next].destination, "media send error");
                    next += 1;
                }
            }
        }
        // The sent datagrams' buffers go back to str0m for the next packets it encrypts.
        for t in out.drain(..) {
            str0m::net::recycle(t.contents.into());
        }
        self.out = out;
    }

    /// One datagram through quinn-udp (IPv6).
    fn send_one(&self, t: &parley_sfu::Transmit) -> io::Result<()> {
        let transmit = quinn_udp::Transmit {
            destination: t.destination,
            ecn: None,
            contents: &t.contents,
            segment_size: None,
            src_ip: reply_from(&self.shared, t),
        };
        self.state
            .try_send(UdpSockRef::from(self.io.get_ref()), &transmit)
    }
}

/// `t` as a datagram for `sendmmsg`: IPv4 to IPv4 only.
fn batchable<'t>(shared: &Shared, t: &'t parley_sfu::Transmit) -> Option<batch::Datagram<'t>> {
    let SocketAddr::V4(destination) = t.destination else {
        return None;
    };
    let source = match reply_from(shared, t) {
        None => None,
        Some(IpAddr::V4(ip)) => Some(ip),
        Some(IpAddr::V6(_)) => return None,
    };
    shared.local_addr.is_ipv4().then_some(batch::Datagram {
        destination,
        source,
        contents: &t.contents,
    })
}

/// The address a reply leaves from: the one the peer sent to, as a browser matches responses
/// by it (when it is this host's own).
fn reply_from(shared: &Shared, t: &parley_sfu::Transmit) -> Option<IpAddr> {
    Some(t.source.ip()).filter(|ip| shared.local_ips.contains(ip))
}
