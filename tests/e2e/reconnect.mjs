// A participant's WebSocket drops in the middle of a call: the client reconnects and resumes
// its session (same participant, no new join), a message sent while disconnected is not lost,
// and media keeps flowing the whole time.
//
//   node tests/e2e/reconnect.mjs          (PARLEY_BIN, CHROMIUM override the binaries)
import { join } from "node:path";
import { launchChromium, log, repoRoot, runTest, startServer, waitFor, reportFailure, closeAll, videoFramesFrom } from "./harness.mjs";

let server = null;
let browser = null;
const consoleLines = [];


await runTest("reconnect", {
  timeoutMs: 60000,
  async body() {
    server = await startServer({ logFile: join(repoRoot, "tests/e2e/server-reconnect.log") });
    browser = await launchChromium();
    const pages = [];
    for (const name of ["Ann", "Ben"]) {
      const context = await browser.newContext();
      const page = await context.newPage();
      page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
      await page.goto(`${server.url}/r/e2e-reconnect?name=${name}&autojoin=1`, { waitUntil: "domcontentloaded" });
      pages.push(page);
    }
    const [ann, ben] = pages;
    const ids = await Promise.all(
      pages.map((p) =>
        p.waitForFunction(() => window.parley && window.parley.client && window.parley.client.participantId, null, { timeout: 10000 }).then((h) => h.jsonValue()),
      ),
    );
    const [annId, benId] = ids;
    await waitFor(async () => (await ben.evaluate(videoFramesFrom, annId)) > 0 && (await ann.evaluate(videoFramesFrom, benId)) > 0, {
      timeoutMs: 20000,
      message: "Ann and Ben to decode each other's video",
    });
    log(`in call: Ann=${annId} Ben=${benId}`);

    // Drop Ann's WebSocket and mute while it is down.
    await ann.evaluate(() => {
      window.__sessionBefore = window.parley.client.session;
      window.parley.client._ws.close();
    });
    await ann.getByRole("button", { name: "Mute", exact: true }).click();
    const framesBefore = await ben.evaluate(videoFramesFrom, annId);

    await waitFor(async () => (await ann.evaluate(() => window.parley.client.connectionState)) === "connected", {
      timeoutMs: 10000,
      message: "Ann's client to reconnect",
    });
    const same = await ann.evaluate(() => window.parley.client.session === window.__sessionBefore && window.parley.client.participantId);
    if (same !== annId) throw new Error(`Ann did not resume her session (participant now ${same}, was ${annId})`);
    await ben.waitForSelector(`.tile[data-participant="${annId}"][data-muted="true"]`, { timeout: 5000 });
    log("Ann resumed the same session; the mute sent while disconnected reached Ben");

    await waitFor(async () => (await ben.evaluate(videoFramesFrom, annId)) > framesBefore + 10, {
      timeoutMs: 5000,
      message: "Ben to keep decoding Ann's video across the reconnect",
    });
    const joins = (server.logTail(400).match(/ joined /g) || []).length;
    if (joins !== 2) throw new Error(`expected 2 joins in the server log (no rejoin), saw ${joins}`);
    log("media kept flowing; no rejoin");

    // ICE restart (what the SDK does when media fails): new credentials, media goes on.
    const ufragOf = (p) => p.evaluate(() => (window.parley.client.pc.localDescription?.sdp.match(/a=ice-ufrag:(\S+)/) || [])[1]);
    const ufragBefore = await ufragOf(ann);
    await ann.evaluate(() => window.parley.client.pc.restartIce());
    await waitFor(async () => (await ufragOf(ann)) !== ufragBefore && (await ann.evaluate(() => window.parley.client.pc.signalingState)) === "stable", {
      timeoutMs: 10000,
      message: "Ann's ICE restart to be negotiated",
    });
    const afterRestart = await ben.evaluate(videoFramesFrom, annId);
    const annSees = await ann.evaluate(videoFramesFrom, benId);
    await waitFor(async () => (await ben.evaluate(videoFramesFrom, annId)) > afterRestart + 10 && (await ann.evaluate(videoFramesFrom, benId)) > annSees + 10, {
      timeoutMs: 10000,
      message: "video both ways after Ann's ICE restart",
    });
    const errors = consoleLines.filter((l) => /negotiation step failed|demuxer/i.test(l));
    if (errors.length) throw new Error(`negotiation errors: ${errors.join(" | ")}`);
    log("ICE restart negotiated; video flows both ways");
  },
  async onFailure() {
    reportFailure(consoleLines, server, 60);
  },
  async cleanup() {
    await closeAll([browser], server);
  },
});
