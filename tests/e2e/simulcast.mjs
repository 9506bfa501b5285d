// Simulcast and view-driven layer choice: one publisher (720p fake camera, three encodings q/h/f)
// and two subscribers in the same room, one showing small remote tiles (?tile=small, 160×90 CSS
// px) and one large ones (?tile=large, 1280×720). Both decode the publisher's video; the small
// tile's subscriber must get a narrower layer than the large tile's. Prints both frame widths.
//
//   node tests/e2e/simulcast.mjs           (PARLEY_BIN, CHROMIUM override the binaries)
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { closeAll, launchChromium, log, repoRoot, reportFailure, runTest, startServer, waitFor } from "./harness.mjs";

const TOTAL_TIMEOUT_MS = 90000;
const MEDIA_TIMEOUT_MS = 20000;
const LAYER_TIMEOUT_MS = 15000;

/** In a page: the inbound video of participant `pid`'s camera, or null. */
async function cameraInbound(pid) {
  const c = window.parley && window.parley.client;
  if (!c || !c.pc) return null;
  const ids = new Set();
  const mids = new Set();
  for (const [id, info] of c.remoteTracks) {
    if (info.participantId !== pid || info.source !== "camera" || info.track.kind !== "video") continue;
    ids.add(id);
    if (info.mid != null) mids.add(String(info.mid));
  }
  let best = null;
  (await c.pc.getStats()).forEach((s) => {
    if (s.type !== "inbound-rtp" || s.kind !== "video") return;
    if (!ids.has(s.trackIdentifier) && !mids.has(String(s.mid))) return;
    if (!best || (s.framesDecoded || 0) > best.framesDecoded) {
      best = { framesDecoded: s.framesDecoded || 0, frameWidth: s.frameWidth || 0, frameHeight: s.frameHeight || 0, bytesReceived: s.bytesReceived || 0 };
    }
  });
  return best;
}

/** In a page: what the own camera sends, per rid. */
async function cameraOutbound() {
  const c = window.parley && window.parley.client;
  if (!c || !c.pc) return null;
  const out = {};
  (await c.pc.getStats()).forEach((s) => {
    if (s.type === "outbound-rtp" && s.kind === "video") {
      out[s.rid || s.mid] = { active: s.active, frameWidth: s.frameWidth || 0, framesEncoded: s.framesEncoded || 0, limitation: s.qualityLimitationReason };
    }
  });
  return out;
}

/** In a page: what helps to understand a failure. */
async function pageState() {
  const c = window.parley && window.parley.client;
  if (!c) return null;
  const r = {
    id: c.participantId,
    mediaState: c.mediaState,
    view: window.parley.view,
    tracks: [...c.remoteTracks.values()].map((i) => `${i.participantId}/${i.source}/${i.track.kind}/mid=${i.mid}/${i.track.muted ? "muted" : "live"}`),
    inbound: [],
  };
  if (c.pc) {
    (await c.pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") r.inbound.push({ mid: s.mid, packets: s.packetsReceived, frames: s.framesDecoded, width: s.frameWidth });
    });
  }
  return r;
}

let server = null;
let browser = null;
const pages = {};
const consoleLines = [];
const serverMsgs = [];

await runTest("simulcast", {
  timeoutMs: TOTAL_TIMEOUT_MS,
  async body() {
    server = await startServer({ logFile: join(repoRoot, "tests/e2e/server-simulcast.log") });
    browser = await launchChromium();
    const room = `e2e-sim-${randomBytes(4).toString("hex")}`;
    for (const [name, query, viewport] of [
      ["Pub", "", { width: 1280, height: 720 }],
      ["Small", "&tile=small", { width: 1280, height: 720 }],
      ["Large", "&tile=large", { width: 1400, height: 1000 }],
    ]) {
      const page = await (await browser.newContext({ viewport })).newPage();
      page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
      page.on("pageerror", (e) => consoleLines.push(`[${name}] pageerror: ${e.message}`));
      page.on("websocket", (ws) =>
        ws.on("framereceived", (f) => {
          try {
            const m = JSON.parse(f.payload);
            if (["layers", "video_paused", "dominant_speaker", "error"].includes(m.type)) serverMsgs.push(`[${name}] ${f.payload}`);
          } catch {}
        }),
      );
      await page.goto(`${server.url}/r/${room}?name=${name}&autojoin=1${query}`, { waitUntil: "domcontentloaded" });
      pages[name] = page;
    }
    const pubId = await pages.Pub.waitForFunction(() => window.parley && window.parley.client && window.parley.client.participantId, null, { timeout: 10000 }).then((h) => h.jsonValue());
    log(`publisher is ${pubId}`);

    let small = null;
    let large = null;
    await waitFor(
      async () => {
        [small, large] = await Promise.all([pages.Small.evaluate(cameraInbound, pubId), pages.Large.evaluate(cameraInbound, pubId)]);
        return small && large && small.framesDecoded > 0 && large.framesDecoded > 0;
      },
      { timeoutMs: MEDIA_TIMEOUT_MS, intervalMs: 100, message: `both subscribers to decode ${pubId}'s video (small: ${JSON.stringify(small)}, large: ${JSON.stringify(large)})` },
    );
    log(`both decode: small ${small.frameWidth}x${small.frameHeight}, large ${large.frameWidth}x${large.frameHeight}`);

    // What the subscribers reported (this is the client's side of the contract).
    const views = {};
    for (const name of ["Small", "Large"]) {
      views[name] = await pages[name].evaluate((id) => (window.parley.view || []).find((t) => t.id === id && t.source === "camera") || null, pubId);
      log(`${name} reports view ${JSON.stringify(views[name])}`);
    }
    if (!views.Small || views.Small.width > 200) throw new Error(`the small-tile page reported ${JSON.stringify(views.Small)} for ${pubId}'s camera`);
    if (!views.Large || views.Large.width < 1000) throw new Error(`the large-tile page reported ${JSON.stringify(views.Large)} for ${pubId}'s camera`);

    try {
      await waitFor(
        async () => {
          [small, large] = await Promise.all([pages.Small.evaluate(cameraInbound, pubId), pages.Large.evaluate(cameraInbound, pubId)]);
          return small && large && small.frameWidth > 0 && small.frameWidth < large.frameWidth;
        },
        { timeoutMs: LAYER_TIMEOUT_MS, intervalMs: 250, message: "the small-tile subscriber to receive a narrower layer than the large-tile one" },
      );
    } finally {
      console.log(`FRAME_WIDTH small_tile=${small && small.frameWidth} large_tile=${large && large.frameWidth}`);
      log(`publisher sends ${JSON.stringify(await pages.Pub.evaluate(cameraOutbound))}`);
    }
    log(`small tile gets ${small.frameWidth}x${small.frameHeight}, large tile ${large.frameWidth}x${large.frameHeight}`);
  },
  async onFailure() {
    for (const [name, page] of Object.entries(pages)) {
      console.error(`[${name}] ${JSON.stringify(await page.evaluate(pageState).catch((e) => String(e)))}`);
    }
    if (serverMsgs.length) console.error(`--- layers/video_paused/dominant_speaker/error received ---\n${serverMsgs.slice(-30).join("\n")}`);
    reportFailure(consoleLines, server, 60);
  },
  async cleanup() {
    await closeAll([browser], server);
  },
});
