// Low bandwidth: a publisher and a viewer; then everything the SFU sends to the viewer is
// squeezed through 100 kbit/s (an htb class on the loopback interface for UDP from the media
// port to the viewer's port). The viewer's bandwidth estimate falls below what the lowest
// simulcast layer and the audio need: the publisher's tile must say that its video is paused
// for bandwidth while the audio keeps arriving. With the limit lifted, the label goes and video
// is decoded again. Needs root (tc); prints how long each step took. Chromium sends its audio as
// Opus with RED (RFC 2198), about 50 kbit/s on the wire with its RTCP, so the link has room for
// the audio and not for the lowest video layer next to it.
//
//   node tests/e2e/bandwidth.mjs           (PARLEY_BIN, CHROMIUM override the binaries)
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { closeAll, launchChromium, log, repoRoot, reportFailure, runTest, startServer, waitFor } from "./harness.mjs";

const TOTAL_TIMEOUT_MS = 150000;
const MEDIA_TIMEOUT_MS = 20000;
const PAUSE_TIMEOUT_MS = 40000;
const RESUME_TIMEOUT_MS = 40000;
const LIMIT = process.env.BW_LIMIT || "100kbit";

function tc(...args) {
  execFileSync("tc", args, { stdio: ["ignore", "ignore", "pipe"] });
}

/** Shapes UDP sent from `port` to `toPort` on the loopback interface; the rest of lo is untouched. */
function limit(port, toPort) {
  // htb passes unclassified traffic unshaped; the class holds half a second of queue.
  tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "0");
  tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", LIMIT, "ceil", LIMIT);
  tc("qdisc", "add", "dev", "lo", "parent", "1:10", "handle", "10:", "bfifo", "limit", "6000");
  tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip", "protocol", "17", "0xff", "match", "ip", "sport", String(port), "0xffff", "match", "ip", "dport", String(toPort), "0xffff", "flowid", "1:10");
}

function unlimit() {
  try {
    tc("qdisc", "del", "dev", "lo", "root");
  } catch {
    // Nothing was added.
  }
}

/** In a page: the publisher's tile state and what arrives from it. */
async function fromPublisher(pid) {
  const c = window.parley && window.parley.client;
  const tile = document.querySelector(`.tile[data-participant="${pid}"][data-source="camera"]`);
  const label = tile && tile.querySelector(".paused-label");
  const r = {
    paused: tile ? tile.dataset.videoPaused : null,
    labelShown: !!label && !label.hidden,
    frames: 0,
    audioPackets: 0,
  };
  if (c && c.pc) {
    (await c.pc.getStats()).forEach((s) => {
      if (s.type !== "inbound-rtp") return;
      if (s.kind === "video") r.frames += s.framesDecoded || 0;
      if (s.kind === "audio") r.audioPackets += s.packetsReceived || 0;
    });
  }
  return r;
}

/** In a page: the local UDP port of the transport's selected ICE candidate pair, or null. */
async function localMediaPort() {
  const stats = await window.parley.client.pc.getStats();
  let port = null;
  stats.forEach((s) => {
    if (s.type !== "transport" || !s.selectedCandidatePairId) return;
    const pair = stats.get(s.selectedCandidatePairId);
    const local = pair && stats.get(pair.localCandidateId);
    if (local && local.protocol === "udp") port = local.port;
  });
  return port;
}

let server = null;
let browser = null;
const pages = {};
const consoleLines = [];
const serverMsgs = [];
process.on("exit", unlimit);

await runTest("bandwidth", {
  timeoutMs: TOTAL_TIMEOUT_MS,
  async body() {
    unlimit();
    server = await startServer({ logFile: join(repoRoot, "tests/e2e/server-bandwidth.log") });
    browser = await launchChromium();
    const room = `e2e-bw-${randomBytes(4).toString("hex")}`;
    for (const name of ["Pub", "View"]) {
      const page = await (await browser.newContext({ viewport: { width: 1280, height: 720 } })).newPage();
      page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
      page.on("websocket", (ws) =>
        ws.on("framereceived", (f) => {
          try {
            const m = JSON.parse(f.payload);
            if (["video_paused", "error"].includes(m.type)) serverMsgs.push(`[${name}] ${f.payload}`);
          } catch {}
        }),
      );
      await page.goto(`${server.url}/r/${room}?name=${name}&autojoin=1`, { waitUntil: "domcontentloaded" });
      pages[name] = page;
    }
    const pubId = await pages.Pub.waitForFunction(() => window.parley && window.parley.client && window.parley.client.participantId, null, { timeout: 10000 }).then((h) => h.jsonValue());

    let s = null;
    await waitFor(
      async () => {
        s = await pages.View.evaluate(fromPublisher, pubId);
        return s.frames > 10 && s.audioPackets > 0 && s.paused === "false" && !s.labelShown;
      },
      { timeoutMs: MEDIA_TIMEOUT_MS, intervalMs: 200, message: `the viewer to decode the publisher's video (${JSON.stringify(s)})` },
    );
    log(`viewer decodes: ${JSON.stringify(s)}`);

    // The selected pair shows in the stats a little after the media does.
    let viewerPort = null;
    await waitFor(
      async () => {
        viewerPort = await pages.View.evaluate(localMediaPort);
        return viewerPort !== null;
      },
      { timeoutMs: 5000, intervalMs: 200, message: "the viewer's selected UDP candidate pair" },
    );
    limit(server.rtcPort, viewerPort);
    const limitedAt = Date.now();
    log(`UDP from the media port to the viewer (port ${viewerPort}) limited to ${LIMIT}`);
    await waitFor(
      async () => {
        s = await pages.View.evaluate(fromPublisher, pubId);
        return s.paused === "true" && s.labelShown;
      },
      { timeoutMs: PAUSE_TIMEOUT_MS, intervalMs: 250, message: `the tile to show "video paused" (${JSON.stringify(s)})` },
    );
    console.log(`VIDEO_PAUSED_AFTER_MS ${Date.now() - limitedAt}`);
    const before = s;
    await new Promise((r) => setTimeout(r, 3000));
    const after = await pages.View.evaluate(fromPublisher, pubId);
    log(`while paused, 3 s: audio packets ${before.audioPackets} -> ${after.audioPackets}, frames ${before.frames} -> ${after.frames}`);
    if (after.audioPackets - before.audioPackets < 75) {
      throw new Error(`audio did not keep flowing while the video was paused: ${after.audioPackets - before.audioPackets} packets in 3 s`);
    }

    unlimit();
    const liftedAt = Date.now();
    log("limit lifted");
    await waitFor(
      async () => {
        s = await pages.View.evaluate(fromPublisher, pubId);
        return s.paused === "false" && !s.labelShown && s.frames > after.frames + 10;
      },
      { timeoutMs: RESUME_TIMEOUT_MS, intervalMs: 250, message: `video to come back (${JSON.stringify(s)})` },
    );
    console.log(`VIDEO_RESUMED_AFTER_MS ${Date.now() - liftedAt}`);
  },
  async onFailure() {
    unlimit();
    if (serverMsgs.length) console.error(`--- video_paused/error received ---\n${serverMsgs.slice(-20).join("\n")}`);
    reportFailure(consoleLines, server, 60);
  },
  async cleanup() {
    unlimit();
    await closeAll([browser], server);
  },
});
