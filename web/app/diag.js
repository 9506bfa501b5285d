// The network check page (/diag): what this browser's network allows for calls on this server.
//
// 1. NAT mapping, from Parley's RFC 5780 STUN server (`GET /diag-info` → `nat_stun`, its two
//    addresses): one PeerConnection per address (did it answer, with which public address) and
//    one with both (do the two addresses see the same public port for the same local socket?).
// 2. The candidate types this browser gathers with the servers of `GET /ice-servers`.
// 3. A throwaway room `diag-<random>` with ParleyClient: the selected candidate pair says how
//    media reaches this server (UDP/TCP, direct or relayed); then once more relay-only.
//
// Results for tests: `window.parleyDiag` (`done` once everything is filled in).
import { ParleyClient, fetchIceServers } from "/sdk/parley.js";

/** How long to wait for ICE gathering. A STUN answer takes one round trip; blocked UDP never completes. */
const GATHER_MS = 5000;
/** How long the throwaway room's media may take to connect (ICE-TCP comes after UDP fails). */
const MEDIA_MS = 15000;
/** How long joining the throwaway room may take. */
const JOIN_MS = 8000;
/** How long `GET /diag-info` may take. */
const INFO_MS = 3000;

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const token = new URLSearchParams(location.search).get("token");
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;

function emptyResults() {
  return {
    done: false,
    running: true,
    natStun: [],
    turn: false,
    mapping: null,
    mappingText: "",
    servers: [],
    srflx: [],
    candidates: [],
    candidateTypes: [],
    media: { connected: false, protocol: null, localType: null, remoteType: null },
    relay: { tested: false, ok: false },
    verdict: "",
    verdictKind: "running",
    verdictDetail: "",
    error: null,
  };
}

window.parleyDiag = emptyResults();

// ---- helpers ----------------------------------------------------------------------------------

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer within ${Math.round(ms / 1000)} s`)), ms);
    }),
  ]);
}

function randomId() {
  const bytes = new Uint8Array(6);
  crypto.getRandomValues(bytes);
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** `true` for an address Chromium hides behind an mDNS name (`<uuid>.local`). */
const isMdns = (address) => typeof address === "string" && address.endsWith(".local");

const hostPort = (address, port) => (address && address.includes(":") && !address.startsWith("[") ? `[${address}]:${port}` : `${address}:${port}`);

/** The fields of an RTCIceCandidate this page uses, or null for end-of-candidates. */
function describeCandidate(c, url) {
  if (!c || !c.candidate) return null;
  const text = c.candidate;
  const network = /\bnetwork-id (\d+)/.exec(text);
  const tcpType = c.tcpType || (/\btcptype (\w+)/.exec(text) || [])[1] || null;
  return {
    type: c.type || (/\btyp (\w+)/.exec(text) || [])[1] || null,
    protocol: (c.protocol || (/^candidate:\S+ \d+ (\w+)/.exec(text) || [])[1] || "").toLowerCase() || null,
    address: c.address ?? null,
    port: c.port ?? null,
    relatedAddress: c.relatedAddress ?? null,
    relatedPort: c.relatedPort ?? null,
    tcpType,
    relayProtocol: c.relayProtocol || null,
    networkId: network ? Number(network[1]) : null,
    url: url || null,
  };
}

/**
 * Gathers ICE candidates with `iceServers` (a data channel and an offer start it). `complete`
 * tells whether gathering finished within `timeoutMs`: it does not while a STUN or TURN server
 * stays silent.
 */
async function gather(iceServers, timeoutMs = GATHER_MS) {
  const pc = new RTCPeerConnection({ iceServers });
  const candidates = [];
  const t0 = performance.now();
  try {
    pc.createDataChannel("diag");
    const done = new Promise((resolve) => {
      pc.onicecandidate = (e) => {
        if (!e.candidate) return resolve();
        const c = describeCandidate(e.candidate, e.url);
        if (c) candidates.push(c);
      };
      pc.onicegatheringstatechange = () => {
        if (pc.iceGatheringState === "complete") resolve();
      };
    });
    await pc.setLocalDescription(await pc.createOffer());
    const complete = await Promise.race([done.then(() => true), sleep(timeoutMs).then(() => false)]);
    return { candidates, complete, ms: Math.round(performance.now() - t0) };
  } finally {
    pc.close();
  }
}

async function fetchDiagInfo() {
  try {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), INFO_MS);
    const r = await fetch(`/diag-info${token ? `?token=${encodeURIComponent(token)}` : ""}`, { signal: ctl.signal });
    clearTimeout(timer);
    if (!r.ok) return { nat_stun: [], turn: null };
    const info = await r.json();
    return {
      nat_stun: Array.isArray(info.nat_stun) ? info.nat_stun.filter((u) => typeof u === "string") : [],
      turn: typeof info.turn === "boolean" ? info.turn : null,
    };
  } catch {
    // An older server without /diag-info: no NAT test; TURN is known from /ice-servers.
    return { nat_stun: [], turn: null };
  }
}

// ---- 1. NAT mapping ---------------------------------------------------------------------------

/**
 * Chromium drops a server-reflexive candidate equal to its host address (when host addresses
 * are not hidden behind mDNS names). So a STUN server that answered shows up either as a srflx
 * candidate or, with no NAT in between, only as gathering completing quickly; a server that
 * never answers keeps gathering going until the timeout.
 */
async function checkMapping(natStun) {
  if (!natStun.length) {
    return {
      mapping: "not-configured",
      text: "Not checked: this server has no STUN server for the NAT test (its administrator can add one with parley serve --stun-listen).",
      servers: [],
      srflx: [],
    };
  }
  const [single, both] = await Promise.all([
    Promise.all(natStun.map((url) => gather([{ urls: url }]))),
    natStun.length > 1 ? gather([{ urls: natStun }]) : Promise.resolve(null),
  ]);
  const srflx = [];
  const servers = natStun.map((url, i) => {
    const g = single[i];
    const own = g.candidates.filter((c) => c.type === "srflx");
    for (const c of own) srflx.push({ ...c, server: url });
    const hosts = g.candidates.filter((c) => c.type === "host" && c.protocol === "udp");
    const visibleHosts = hosts.some((c) => !isMdns(c.address));
    // No srflx but a quick, complete gathering: the server saw this computer's own address.
    const ownAddress = !own.length && g.complete && visibleHosts;
    const sameAsHost = own.some((s) => hosts.some((h) => h.address === s.address && h.port === s.port));
    return {
      url,
      answered: own.length > 0 || ownAddress,
      mapped: own.length ? hostPort(own[0].address, own[0].port) : null,
      ownAddress: ownAddress || sameAsHost,
      ms: g.ms,
    };
  });

  // The same local socket, seen by both addresses: one public address, or one per address?
  let dependent = false;
  const groups = new Map();
  if (both) {
    for (const c of both.candidates) {
      if (c.type !== "srflx") continue;
      const key = c.relatedPort ? `${c.protocol} ${hostPort(c.relatedAddress, c.relatedPort)}` : `${c.protocol} net ${c.networkId ?? "?"}`;
      if (!groups.has(key)) groups.set(key, new Set());
      groups.get(key).add(hostPort(c.address, c.port));
    }
    dependent = [...groups.values()].some((s) => s.size > 1);
  }
  const answered = servers.filter((s) => s.answered);
  // One address saw this computer's own address and the other a different one: that also
  // depends on the destination.
  if (answered.length > 1 && answered.some((s) => s.ownAddress) && answered.some((s) => !s.ownAddress)) dependent = true;

  let mapping;
  let text;
  const publicAddr = answered.find((s) => s.mapped && !s.ownAddress);
  if (!answered.length) {
    mapping = "blocked";
    text = "No answer from Parley's STUN server: UDP to it is blocked on this network.";
  } else if (dependent) {
    mapping = "address-and-port-dependent";
    text =
      "Address-and-port-dependent mapping (symmetric NAT): your public port changes with every destination. " +
      "Peer-to-peer calls will need a TURN relay.";
  } else if (answered.length < natStun.length) {
    mapping = "unknown";
    text = `Only ${answered.length} of the STUN server's ${natStun.length} addresses answered, so the two mappings cannot be compared.`;
  } else if (answered.every((s) => s.ownAddress)) {
    mapping = "no-nat";
    text = "No NAT: the STUN server sees this computer's own address.";
  } else {
    mapping = "endpoint-independent";
    text =
      "Endpoint-independent mapping: your public address" +
      (publicAddr ? ` (${publicAddr.mapped})` : "") +
      " stays the same whoever you send to. This is the friendly kind of NAT for peer-to-peer calls.";
  }
  return { mapping, text, servers, srflx };
}

// ---- 2. candidate types -----------------------------------------------------------------------

const TYPE_WORDS = {
  host: "this computer's own address",
  srflx: "your public address, as a STUN server sees it",
  prflx: "an address learned from the other side",
  relay: "an address on the TURN relay",
};

async function checkCandidates(iceServers) {
  const g = await gather(iceServers);
  const candidates = g.candidates.map((c) => ({
    type: c.type,
    protocol: c.protocol,
    address: c.address,
    port: c.port,
    relayProtocol: c.relayProtocol || (c.type === "relay" && c.url ? (/transport=(\w+)/.exec(c.url) || [, "udp"])[1] : null),
    tcpType: c.tcpType,
  }));
  const types = [];
  for (const c of candidates) {
    const t = `${c.type}/${c.protocol}`;
    if (!types.includes(t)) types.push(t);
  }
  return { candidates, candidateTypes: types, complete: g.complete };
}

// ---- 3. media to this server ------------------------------------------------------------------

function mediaPorts(pc) {
  const ports = { udp: new Set(), tcp: new Set() };
  const sdp = pc && pc.remoteDescription ? pc.remoteDescription.sdp : "";
  for (const m of sdp.matchAll(/^a=candidate:\S+ \d+ (\w+) \d+ \S+ (\d+) typ/gim)) {
    const proto = m[1].toLowerCase();
    if (ports[proto]) ports[proto].add(Number(m[2]));
  }
  return { udp: [...ports.udp], tcp: [...ports.tcp] };
}

async function selectedPair(pc) {
  const stats = await pc.getStats();
  let pair = null;
  stats.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId) || pair;
  });
  if (!pair) {
    stats.forEach((s) => {
      if (s.type === "candidate-pair" && s.state === "succeeded" && s.nominated) pair = pair || s;
    });
  }
  if (!pair) return null;
  const local = stats.get(pair.localCandidateId);
  const remote = stats.get(pair.remoteCandidateId);
  return {
    localType: local ? local.candidateType : null,
    remoteType: remote ? remote.candidateType : null,
    // For a relayed pair, the path to the relay; otherwise the path to the server.
    protocol: local ? (local.candidateType === "relay" ? remote && remote.protocol : local.protocol) : null,
    relayProtocol: local && local.candidateType === "relay" ? local.relayProtocol || null : null,
    localAddress: local ? hostPort(local.address, local.port) : null,
    remoteAddress: remote ? hostPort(remote.address, remote.port) : null,
    rttMs: typeof pair.currentRoundTripTime === "number" ? Math.round(pair.currentRoundTripTime * 1000) : null,
  };
}

/** Joins a throwaway room without camera or microphone and reports the selected candidate pair. */
async function checkMedia({ relay = false } = {}) {
  const client = new ParleyClient({
    room: `diag-${randomId()}`,
    name: "Network check",
    token,
    iceTransportPolicy: relay ? "relay" : "all",
  });
  const result = { joined: false, connected: false, protocol: null, localType: null, remoteType: null, ports: { udp: [], tcp: [] }, error: null };
  try {
    await withTimeout(client.join(), JOIN_MS, "signaling");
    result.joined = true;
    const end = Date.now() + MEDIA_MS;
    while (Date.now() < end) {
      const pc = client.pc;
      if (pc && pc.connectionState === "connected") {
        const pair = await selectedPair(pc);
        if (pair && pair.localType) {
          Object.assign(result, pair, { connected: true });
          break;
        }
      }
      await sleep(100);
    }
    result.ports = mediaPorts(client.pc);
    if (!result.connected) result.error = `no media connection within ${MEDIA_MS / 1000} s`;
  } catch (err) {
    result.error = (err && err.message) || String(err);
  } finally {
    try {
      client.leave();
    } catch {}
  }
  return result;
}

function describePath(m) {
  const proto = (m.protocol || "?").toUpperCase();
  if (m.localType === "relay") {
    const rp = m.relayProtocol ? ` (to the relay over ${m.relayProtocol.toUpperCase()})` : "";
    return `through the TURN relay${rp}`;
  }
  const how = m.localType === "srflx" ? "directly, from your public address (srflx)" : m.localType === "prflx" ? "directly (prflx)" : `directly (${m.localType})`;
  return `over ${proto}, ${how}`;
}

// ---- the run ----------------------------------------------------------------------------------

let running = false;

function setProgress(text) {
  $("progress").textContent = text;
}

function setResult(id, state, text) {
  const el = $(id);
  el.hidden = false;
  el.dataset.state = state;
  el.textContent = text;
}

function fillList(id, items) {
  const ul = $(id);
  ul.replaceChildren(
    ...items.map((text) => {
      const li = document.createElement("li");
      li.textContent = text;
      return li;
    }),
  );
}

function decideVerdict(r) {
  const m = r.media;
  const portList = (ps) => (ps.length ? ps.join(", ") : "?");
  if (!m.joined) {
    return {
      kind: "blocked",
      text: "This page cannot reach the Parley server.",
      detail: `Joining a test room failed: ${m.error || "unknown error"}. Check the address, or the access link.`,
    };
  }
  if (!m.connected) {
    const udp = portList(m.ports.udp);
    const tcp = portList(m.ports.tcp);
    const ports = udp === tcp ? `port ${udp}` : `port ${udp} (UDP) and ${tcp} (TCP)`;
    if (r.relay.ok) {
      return {
        kind: "needs-relay",
        text: "Calls will need the TURN relay.",
        detail: `Media cannot reach the server directly (UDP and TCP to ${ports}), but the TURN relay works.`,
      };
    }
    return {
      kind: "blocked",
      text: `Media cannot reach the server: UDP and TCP to ${ports} are blocked.`,
      detail: r.relay.tested
        ? "The TURN relay does not work from here either. Ask your network administrator to allow this port."
        : "This server has no TURN relay to fall back to. Ask your network administrator to allow this port.",
    };
  }
  if (m.localType === "relay") {
    return {
      kind: "needs-relay",
      text: "Calls will need the TURN relay.",
      detail: `Media reaches this server only ${describePath(m)}. Calls work, with a little more delay.`,
    };
  }
  const details = [`Media connects to this server ${describePath(m)}.`];
  if (m.protocol === "tcp") details.push("UDP seems blocked; TCP works but may add delay on a poor connection.");
  if (r.mapping === "address-and-port-dependent") {
    details.push(
      r.turn
        ? "Direct calls cannot go peer-to-peer from behind this NAT; they will use the TURN relay."
        : "Direct calls cannot go peer-to-peer from behind this NAT; they will go through this server instead.",
    );
  }
  return { kind: "ok", text: "Calls should work here.", detail: details.join(" ") };
}

async function run() {
  if (running) return;
  running = true;
  const r = emptyResults();
  window.parleyDiag = r;
  $("run-again").disabled = true;
  $("verdict").dataset.kind = "running";
  $("verdict-text").textContent = "Checking…";
  $("verdict-detail").textContent = "";
  for (const id of ["mapping-result", "candidates-result", "media-result"]) setResult(id, "pending", "Waiting…");
  $("relay-result").hidden = true;
  fillList("mapping-servers", []);
  fillList("candidates-list", []);
  try {
    setProgress("Asking the server what to test…");
    const [info, iceServers] = await Promise.all([fetchDiagInfo(), fetchIceServers(wsUrl, token)]);
    r.natStun = info.nat_stun;
    const hasTurnServer = iceServers.some((s) => [].concat(s.urls || []).some((u) => /^turns?:/i.test(String(u))));
    r.turn = info.turn ?? hasTurnServer;

    // 1 and 2 only gather candidates: run them side by side.
    setProgress("Checking how your NAT maps your address, and which addresses this browser has…");
    setResult("mapping-result", "running", "Checking…");
    setResult("candidates-result", "running", "Checking…");
    const [mapping, cands] = await Promise.all([checkMapping(r.natStun), checkCandidates(iceServers)]);
    Object.assign(r, { mapping: mapping.mapping, mappingText: mapping.text, servers: mapping.servers, srflx: mapping.srflx });
    const mappingState = { "endpoint-independent": "ok", "no-nat": "ok", "address-and-port-dependent": "warn", blocked: "bad" }[mapping.mapping] || "info";
    setResult("mapping-result", mappingState, mapping.text);
    fillList(
      "mapping-servers",
      mapping.servers.map((s) =>
        !s.answered
          ? `${s.url}: no answer.`
          : s.ownAddress
            ? `${s.url}: answered; it sees this computer's own address.`
            : `${s.url}: answered; it sees you as ${s.mapped}.`,
      ),
    );

    Object.assign(r, { candidates: cands.candidates, candidateTypes: cands.candidateTypes });
    const kinds = ["host", "srflx", "relay"].filter((t) => cands.candidates.some((c) => c.type === t));
    setResult(
      "candidates-result",
      kinds.length ? "ok" : "bad",
      kinds.length
        ? `This browser offers: ${kinds.map((t) => `${t} (${TYPE_WORDS[t]})`).join("; ")}.`
        : "This browser gathered no addresses at all: WebRTC may be disabled or restricted.",
    );
    fillList(
      "candidates-list",
      cands.candidateTypes.map((t) => {
        const [type, protocol] = t.split("/");
        const list = cands.candidates.filter((c) => c.type === type && c.protocol === protocol);
        const relayVia = [...new Set(list.map((c) => c.relayProtocol).filter(Boolean))];
        const via = type === "relay" && relayVia.length ? `, to the relay over ${relayVia.join("/").toUpperCase()}` : "";
        return `${type} over ${protocol.toUpperCase()}${via}: ${list.length} candidate${list.length === 1 ? "" : "s"} (${list
          .slice(0, 4)
          .map((c) => hostPort(c.address, c.port))
          .join(", ")}${list.length > 4 ? ", …" : ""})`;
      }),
    );
    if (!hasTurnServer) {
      const li = document.createElement("li");
      li.textContent = "This server hands out no TURN relay.";
      $("candidates-list").append(li);
    }

    // 3: media to this server, then through the relay only.
    setProgress("Connecting media to this server in a test room…");
    setResult("media-result", "running", "Connecting…");
    const media = await checkMedia();
    r.media = media;
    setResult(
      "media-result",
      media.connected ? "ok" : "bad",
      media.connected
        ? `Media connects to this server ${describePath(media)}.`
        : media.joined
          ? `Media did not connect to this server (${media.error}).`
          : `Could not join a test room: ${media.error}.`,
    );
    if (r.turn && media.joined) {
      setProgress("Connecting media through the TURN relay only…");
      setResult("relay-result", "running", "Trying the TURN relay…");
      const relay = await checkMedia({ relay: true });
      r.relay = { tested: true, ok: relay.connected && relay.localType === "relay", ...relay };
      setResult(
        "relay-result",
        r.relay.ok ? "ok" : "bad",
        r.relay.ok ? `The TURN relay works: media connects ${describePath(relay)}.` : `The TURN relay does not work from here (${relay.error || "no relayed connection"}).`,
      );
    } else {
      r.relay = { tested: false, ok: false, reason: r.turn ? "not tried: the server could not be joined" : "this server has no TURN relay" };
      setResult("relay-result", "info", r.turn ? "The TURN relay was not tried." : "This server has no TURN relay.");
    }

    const v = decideVerdict(r);
    Object.assign(r, { verdict: v.text, verdictKind: v.kind, verdictDetail: v.detail });
  } catch (err) {
    console.error("diag:", err);
    r.error = (err && err.message) || String(err);
    Object.assign(r, { verdict: "The check could not finish.", verdictKind: "error", verdictDetail: r.error });
  } finally {
    $("verdict").dataset.kind = r.verdictKind;
    $("verdict-text").textContent = r.verdict;
    $("verdict-detail").textContent = r.verdictDetail;
    setProgress(`Done: ${r.verdict}`);
    r.running = false;
    r.done = true;
    running = false;
    $("run-again").disabled = false;
  }
}

$("run-again").addEventListener("click", () => run());
run();
