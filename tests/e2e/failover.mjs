// Media-node failover in real headless Chromium (fake camera and microphone), split mode:
// signaling (`parley serve --no-local-media`) and media node A; two pages join one room and
// decode each other's video through A. Media node B starts, then A is SIGKILLed: signaling
// tells both participants `media_closed`, their SDKs make new PeerConnections whose offers are
// placed on B, and both pages decode each other's video again, without a reload. Prints the
// recovery time (kill → frames decoded again on both pages).
//
//   node tests/e2e/failover.mjs          (PARLEY_BIN, CHROMIUM override the binaries)
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { launchChromium, log, repoRoot, runTest, scrapeMetrics, startMediaNode, startServer, waitFor } from "./harness.mjs";

const TOTAL_TIMEOUT_MS = 90000;
const MEDIA_TIMEOUT_MS = 20000;
const RECOVERY_TIMEOUT_MS = 15000;
const NAMES = ["User1", "User2"];
const SECRET = `e2e-failover-${randomBytes(12).toString("hex")}`;

// Runs in every page before the app: every 50 ms, the video frames decoded per remote
// participant on the client's current PeerConnection, and when the first one was decoded.
// A new PeerConnection starts the counts over (`pcs` counts them).
function installFrameWatcher() {
  const w = (window.__e2e = { pc: null, pcs: 0, pcAt: 0, video: {}, firstFrame: {} });
  const tick = async () => {
    const client = window.parley && window.parley.client;
    const pc = client && client.pc;
    if (pc) {
      if (pc !== w.pc) {
        w.pc = pc;
        w.pcs++;
        w.pcAt = Date.now();
        w.video = {};
        w.firstFrame = {};
      }
      try {
        const stats = await pc.getStats();
        if (pc === w.pc) {
          const byTrack = new Map();
          const byMid = new Map();
          for (const [id, info] of client.remoteTracks) {
            byTrack.set(id, info.participantId);
            if (info.mid != null) byMid.set(String(info.mid), info.participantId);
          }
          const video = {};
          stats.forEach((s) => {
            if (s.type !== "inbound-rtp" || s.kind !== "video") return;
            const pid = byTrack.get(s.trackIdentifier) ?? byMid.get(String(s.mid)) ?? `?${s.ssrc}`;
            video[pid] = Math.max(video[pid] || 0, s.framesDecoded || 0);
            if (s.framesDecoded > 0 && !w.firstFrame[pid]) w.firstFrame[pid] = Date.now();
          });
          w.video = video;
        }
      } catch {}
    }
    setTimeout(tick, 50);
  };
  tick();
}

function pageSnapshot() {
  const c = window.parley && window.parley.client;
  const visible = (el) => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== "hidden";
  };
  return {
    participantId: c ? c.participantId : null,
    connectionState: c ? c.connectionState : null,
    mediaState: c ? c.mediaState : null,
    signalingState: c && c.pc ? c.pc.signalingState : null,
    remoteTiles: [...document.querySelectorAll(".tile:not(.local)")].filter(visible).map((t) => t.dataset.participant),
    pcs: window.__e2e.pcs,
    pcAt: window.__e2e.pcAt,
    video: window.__e2e.video,
    firstFrame: window.__e2e.firstFrame,
    navigations: performance.getEntriesByType("navigation").length,
    loadedAt: performance.timeOrigin,
  };
}

/**
 * Waits (up to 5 s: the media plane exports its counters every second) until `node`'s /metrics
 * shows the two sessions and video forwarded both ways; returns those numbers.
 */
async function carriesTheCall(node) {
  let seen;
  try {
    await waitFor(
      async () => {
        const m = await scrapeMetrics(node.metricsUrl);
        seen = {
          sessions: m.value("parley_sessions_active"),
          videoIn: m.value('parley_rtp_packets_total{direction="in",kind="video"}'),
          videoOut: m.value('parley_rtp_packets_total{direction="out",kind="video"}'),
        };
        return seen.sessions === 2 && seen.videoIn > 50 && seen.videoOut > 50;
      },
      { timeoutMs: 5000, intervalMs: 250, message: `${node.id}'s /metrics to show 2 sessions and video in and out` },
    );
  } catch (err) {
    throw new Error(`${err.message}: ${JSON.stringify(seen)}`);
  }
  return seen;
}

let server = null;
let browser = null;
const nodes = [];
const consoleLines = [];
const users = [];

await runTest("failover", {
  timeoutMs: TOTAL_TIMEOUT_MS,
  async body() {
    server = await startServer({
      logFile: join(repoRoot, "tests/e2e/server-failover.log"),
      extraArgs: ["--no-local-media", "--node-secret", SECRET],
    });
    const signalingMetrics = () => scrapeMetrics(`${server.url}/metrics`);
    const nodeA = await startMediaNode({ signalingHttpPort: server.httpPort, secret: SECRET, id: "node-a", logFile: join(repoRoot, "tests/e2e/media-failover-a.log") });
    nodes.push(nodeA);
    await waitFor(async () => (await signalingMetrics()).value("parley_media_nodes") === 1, {
      timeoutMs: 10000,
      intervalMs: 100,
      message: "signaling to report parley_media_nodes 1 (node A connected)",
    });
    log("signaling has 1 media node (node-a)");

    browser = await launchChromium();
    const room = `e2e-${randomBytes(4).toString("hex")}`;
    for (const name of NAMES) {
      const context = await browser.newContext();
      const page = await context.newPage();
      page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
      page.on("pageerror", (e) => consoleLines.push(`[${name}] pageerror: ${e.message}`));
      await page.addInitScript(installFrameWatcher);
      users.push({ name, context, page, id: null });
    }
    const [a, b] = users;
    log(`room ${room}: ${a.name} and ${b.name} join by link`);
    await Promise.all(users.map((u) => u.page.goto(`${server.url}/r/${room}?name=${u.name}&autojoin=1`, { waitUntil: "domcontentloaded" })));

    // Both decode each other's video, with frames increasing.
    let snaps;
    const snapshot = async () => (snaps = await Promise.all(users.map((u) => u.page.evaluate(pageSnapshot))));
    const decodeEachOther = (min) =>
      snaps.every((s, i) => {
        const other = snaps[1 - i].participantId;
        return other && s.participantId && s.video[other] >= min && s.remoteTiles.includes(other);
      });
    const framesEach = () => snaps.map((s, i) => s.video[snaps[1 - i].participantId] || 0);
    const expectIncreasing = async (what) => {
      const before = framesEach();
      try {
        await waitFor(
          async () => {
            await snapshot();
            return framesEach().every((f, i) => f > before[i] + 10);
          },
          { timeoutMs: 5000, intervalMs: 100, message: `frames to keep increasing on both pages (${what})` },
        );
      } catch (err) {
        for (const [i, s] of snaps.entries()) log(`${users[i].name}: ${JSON.stringify(s)}`);
        throw err;
      }
      log(`${what}: ${a.name} decoded ${before[0]}→${framesEach()[0]} frames of ${b.name}, ${b.name} ${before[1]}→${framesEach()[1]} of ${a.name}`);
    };
    try {
      await waitFor(async () => (await snapshot(), decodeEachOther(1)), {
        timeoutMs: MEDIA_TIMEOUT_MS,
        intervalMs: 100,
        message: `${a.name} and ${b.name} to decode each other's video through node A`,
      });
    } catch (err) {
      for (const [i, s] of (snaps || []).entries()) log(`${users[i].name}: ${JSON.stringify(s)}`);
      throw err;
    }
    users.forEach((u, i) => (u.id = snaps[i].participantId));
    log(`participants: ${users.map((u) => `${u.name}=${u.id}`).join(" ")}`);
    await expectIncreasing("through node A");
    const loadedAt = snaps.map((s) => s.loadedAt);
    const pcsBefore = snaps.map((s) => s.pcs);

    // The media went through node A: its two sessions, video in and out.
    log(`node A metrics: ${JSON.stringify(await carriesTheCall(nodeA))}`);
    const sigBefore = await signalingMetrics();
    if (sigBefore.value('parley_media_node_sessions{node="node-a"}') !== 2) {
      throw new Error(`signaling does not count 2 sessions on node-a:\n${sigBefore.text.split("\n").filter((l) => l.includes("media_node")).join("\n")}`);
    }

    // Node B joins; then node A dies without a word.
    const nodeB = await startMediaNode({ signalingHttpPort: server.httpPort, secret: SECRET, id: "node-b", logFile: join(repoRoot, "tests/e2e/media-failover-b.log") });
    nodes.push(nodeB);
    await waitFor(async () => (await signalingMetrics()).value("parley_media_nodes") === 2, {
      timeoutMs: 10000,
      intervalMs: 100,
      message: "signaling to report parley_media_nodes 2 (node B connected)",
    });
    log("signaling has 2 media nodes; SIGKILL node A");
    const killedAt = Date.now();
    nodeA.kill("SIGKILL");

    // Both pages recover on node B: a new PeerConnection each, decoding the other's video again.
    try {
      await waitFor(
        async () => {
          await snapshot();
          return snaps.every((s, i) => s.pcs > pcsBefore[i] && s.pcAt >= killedAt) && decodeEachOther(1);
        },
        { timeoutMs: RECOVERY_TIMEOUT_MS, intervalMs: 50, message: `${a.name} and ${b.name} to decode each other's video again within ${RECOVERY_TIMEOUT_MS / 1000} s of node A's death` },
      );
    } catch (err) {
      for (const [i, s] of (snaps || []).entries()) log(`${users[i].name}: ${JSON.stringify(s)}`);
      throw err;
    }
    const recovered = snaps.map((s, i) => s.firstFrame[snaps[1 - i].participantId] - killedAt);
    const newPcAfter = snaps.map((s) => s.pcAt - killedAt);
    console.log(`new PeerConnection after kill: ${a.name}=${newPcAfter[0]} ms ${b.name}=${newPcAfter[1]} ms`);
    console.log(`FAILOVER_RECOVERY_MS (SIGKILL of node A → first frame of the other on node B) ${a.name}=${recovered[0]} ${b.name}=${recovered[1]} both=${Math.max(...recovered)}`);
    await expectIncreasing("through node B");
    if (snaps.some((s, i) => s.loadedAt !== loadedAt[i] || s.connectionState !== "connected")) {
      throw new Error(`a page reloaded or its signaling connection is not "connected": ${JSON.stringify(snaps.map((s) => [s.loadedAt, s.connectionState]))}`);
    }
    log(`PeerConnections per page: ${snaps.map((s, i) => `${users[i].name}=${s.pcs}`).join(" ")}; no reload`);

    // Node B carries the call now, and signaling knows node A is gone.
    log(`node B metrics: ${JSON.stringify(await carriesTheCall(nodeB))}`);
    const sig = await signalingMetrics();
    const sigCheck = {
      nodes: sig.value("parley_media_nodes"),
      onB: sig.value('parley_media_node_sessions{node="node-b"}'),
      participants: sig.value("parley_participants_active"),
    };
    log(`signaling metrics: ${JSON.stringify(sigCheck)}`);
    if (sigCheck.nodes !== 1 || sigCheck.onB !== 2 || sigCheck.participants !== 2) throw new Error(`implausible signaling metrics after failover: ${JSON.stringify(sigCheck)}`);
  },
  async onFailure() {
    if (consoleLines.length) {
      console.error("\n--- browser console (last 60 lines) ---");
      console.error(consoleLines.slice(-60).join("\n"));
    }
    if (server) {
      console.error(`\n--- signaling log tail (${server.logFile}) ---`);
      console.error(server.logTail(60));
      if (server.exited) console.error(`signaling exited: ${JSON.stringify(server.exited)}`);
    }
    for (const n of nodes) {
      console.error(`\n--- media node ${n.id} log tail (${n.logFile}) ---`);
      console.error(n.logTail(30));
    }
  },
  async cleanup() {
    if (browser) await browser.close().catch(() => {});
    for (const n of nodes) n.kill("SIGKILL");
    if (server) await server.stop();
  },
});
