// Screen share: A clicks "Share screen" (Chromium's fake screen), B shows it in a separate large
// tile (.tile.screen[data-participant=A]) whose video decodes, next to A's camera tile; A clicks
// "Stop sharing" and B's screen tile goes away within 5 s.
//
//   node tests/e2e/screenshare.mjs          (PARLEY_BIN, CHROMIUM override the binaries)
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { CHROMIUM_ARGS, closeAll, launchChromium, log, repoRoot, reportFailure, runTest, startServer, waitFor } from "./harness.mjs";

const TOTAL_TIMEOUT_MS = 90000;

/** In a page: the inbound video of participant `pid`'s screen share, or null. */
async function screenInbound(pid) {
  const c = window.parley && window.parley.client;
  if (!c || !c.pc) return null;
  const ids = new Set();
  for (const [id, info] of c.remoteTracks) if (info.participantId === pid && info.source === "screen") ids.add(id);
  let best = null;
  (await c.pc.getStats()).forEach((s) => {
    if (s.type !== "inbound-rtp" || s.kind !== "video" || !ids.has(s.trackIdentifier)) return;
    if (!best || (s.framesDecoded || 0) > best.framesDecoded) best = { framesDecoded: s.framesDecoded || 0, frameWidth: s.frameWidth || 0 };
  });
  return best;
}

let server = null;
let browser = null;
const consoleLines = [];

await runTest("screenshare", {
  timeoutMs: TOTAL_TIMEOUT_MS,
  async body() {
    server = await startServer({ logFile: join(repoRoot, "tests/e2e/server-screenshare.log") });
    // --use-fake-device-for-media-stream (in CHROMIUM_ARGS) makes getDisplayMedia return a fake
    // screen; --use-fake-ui-for-media-stream skips the picker. The source flag is for good measure.
    browser = await launchChromium({ args: [...CHROMIUM_ARGS, "--auto-select-desktop-capture-source=Entire screen"] });
    const room = `e2e-screen-${randomBytes(4).toString("hex")}`;
    const pages = {};
    const offers = [];
    for (const name of ["A", "B"]) {
      const page = await (await browser.newContext()).newPage();
      page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
      page.on("pageerror", (e) => consoleLines.push(`[${name}] pageerror: ${e.message}`));
      if (name === "A") {
        page.on("websocket", (ws) =>
          ws.on("framesent", (f) => {
            try {
              const m = JSON.parse(f.payload);
              if (m.type === "offer") offers.push(m);
            } catch {}
          }),
        );
      }
      await page.goto(`${server.url}/r/${room}?name=${name}&autojoin=1`, { waitUntil: "domcontentloaded" });
      pages[name] = page;
    }
    const { A, B } = pages;
    const idOf = (p) => p.waitForFunction(() => window.parley && window.parley.client && window.parley.client.participantId, null, { timeout: 10000 }).then((h) => h.jsonValue());
    const aId = await idOf(A);
    const bId = await idOf(B);
    log(`A=${aId} B=${bId}`);
    for (const p of [A, B]) await p.waitForFunction(() => window.parley.client.mediaState === "connected", null, { timeout: 15000 });
    await B.waitForSelector(`.tile[data-participant="${aId}"][data-source="camera"]`, { timeout: 10000 });

    // A shares: a new transceiver, an offer whose `tracks` names it "screen".
    const offersBefore = offers.length;
    await A.getByRole("button", { name: "Share screen", exact: true }).click();
    await A.getByRole("button", { name: "Stop sharing", exact: true }).waitFor({ timeout: 5000 });
    const shareOffer = await waitFor(() => offers.slice(offersBefore).find((m) => m.tracks && Object.values(m.tracks).includes("screen")), {
      timeoutMs: 5000,
      message: "A to send an offer with tracks {<mid>: \"screen\"}",
    });
    const screenMid = Object.keys(shareOffer.tracks).find((mid) => shareOffer.tracks[mid] === "screen");
    log(`A offered its screen on mid ${screenMid}`);

    // B shows it in its own tile and decodes it; A's camera tile stays.
    const screenSel = `.tile.screen[data-participant="${aId}"][data-source="screen"]`;
    try {
      await B.waitForFunction(
        (sel) => {
          const v = document.querySelector(`${sel} video`);
          return v && v.videoWidth > 0;
        },
        screenSel,
        { timeout: 15000 },
      );
    } catch {
      throw new Error(`B did not show a decoding screen tile for ${aId} within 15 s (tiles: ${await B.evaluate(() => [...document.querySelectorAll(".tile")].map((t) => `${t.className}[${t.dataset.participant}/${t.dataset.source}]`).join(" "))})`);
    }
    const stats = await waitFor(() => B.evaluate(screenInbound, aId).then((s) => s && s.framesDecoded > 0 && s), { timeoutMs: 5000, message: "B's getStats to count decoded screen frames" });
    const size = await B.evaluate((sel) => {
      const v = document.querySelector(`${sel} video`);
      return `${v.videoWidth}x${v.videoHeight}`;
    }, screenSel);
    log(`B decodes A's screen: ${size}, ${stats.framesDecoded} frames`);
    if (!(await B.$(`.tile[data-participant="${aId}"][data-source="camera"]`))) throw new Error("B lost A's camera tile when A started sharing");

    // A stops: the transceiver goes inactive (a new offer), B's screen tile goes away.
    const offersBeforeStop = offers.length;
    await A.getByRole("button", { name: "Stop sharing", exact: true }).click();
    await A.getByRole("button", { name: "Share screen", exact: true }).waitFor({ timeout: 5000 });
    await waitFor(() => offers.length > offersBeforeStop, { timeoutMs: 5000, message: "A to offer again after stopping the share" });
    try {
      await B.waitForSelector(screenSel, { state: "hidden", timeout: 5000 });
    } catch {
      throw new Error(`B still shows A's screen tile 5 s after A stopped sharing`);
    }
    const detached = !(await B.$(screenSel));
    log(`B's screen tile for ${aId} is gone (${detached ? "removed" : "hidden"})`);
    if (!(await B.$(`.tile[data-participant="${aId}"][data-source="camera"]`))) throw new Error("B lost A's camera tile when A stopped sharing");
  },
  async onFailure() {
    reportFailure(consoleLines, server, 60);
  },
  async cleanup() {
    await closeAll([browser], server);
  },
});
