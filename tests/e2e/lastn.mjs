// Last-N: with `--last-n 1`, a room of three shows (and receives) the camera of the most recent
// speaker only; the others appear as name cards and their video is not sent.
//
//   node tests/e2e/lastn.mjs              (PARLEY_BIN, CHROMIUM override the binaries)
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CHROMIUM_ARGS, closeAll, launchChromium, log, repoRoot, reportFailure, runTest, sleep, startServer, wav, waitFor, videoFramesFrom } from "./harness.mjs";

let server = null;
const browsers = [];
const consoleLines = [];


await runTest("lastn", {
  timeoutMs: 75000,
  async body() {
    const dir = mkdtempSync(join(tmpdir(), "parley-e2e-"));
    wav(join(dir, "tone.wav"), 0.5);
    wav(join(dir, "silence.wav"), 0);
    server = await startServer({ extraArgs: ["--last-n", "1"], logFile: join(repoRoot, "tests/e2e/server-lastn.log") });
    const pages = {};
    for (const [name, file] of [["Quiet1", "silence.wav"], ["Quiet2", "silence.wav"], ["Loud", "tone.wav"]]) {
      const browser = await launchChromium({ args: [...CHROMIUM_ARGS, `--use-file-for-fake-audio-capture=${join(dir, file)}`] });
      browsers.push(browser);
      const page = await (await browser.newContext()).newPage();
      page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
      await page.goto(`${server.url}/r/e2e-lastn?name=${name}&autojoin=1`, { waitUntil: "domcontentloaded" });
      pages[name] = page;
    }
    const idOf = (p) =>
      p.waitForFunction(() => window.parley && window.parley.client && window.parley.client.participantId, null, { timeout: 10000 }).then((h) => h.jsonValue());
    const loud = await idOf(pages.Loud);
    const quiet2 = await idOf(pages.Quiet2);
    const q1 = pages.Quiet1;
    // Quiet1 shows Loud's camera and a name card for Quiet2.
    await q1.waitForSelector(`.tile[data-participant="${loud}"][data-lastn-hidden="false"]`, { timeout: 20000 });
    await q1.waitForSelector(`.tile[data-participant="${quiet2}"][data-lastn-hidden="true"]`, { timeout: 20000 });
    await waitFor(async () => (await q1.evaluate(videoFramesFrom, loud)) > 0, { timeoutMs: 20000, message: "Quiet1 to decode Loud's video" });
    log("Quiet1 shows Loud's camera and a name card for Quiet2");
    // Quiet2's video is not sent to Quiet1 any more.
    await sleep(1500);
    const before = await q1.evaluate(videoFramesFrom, quiet2);
    const loudBefore = await q1.evaluate(videoFramesFrom, loud);
    await sleep(3000);
    const after = await q1.evaluate(videoFramesFrom, quiet2);
    const loudAfter = await q1.evaluate(videoFramesFrom, loud);
    if (after > before + 2) throw new Error(`Quiet2's video still reaches Quiet1 (${before} → ${after} frames)`);
    if (loudAfter <= loudBefore + 10) throw new Error(`Loud's video stalled on Quiet1 (${loudBefore} → ${loudAfter})`);
    log(`in 3 s Quiet1 decoded ${loudAfter - loudBefore} frames of Loud and ${after - before} of Quiet2`);
  },
  async onFailure() {
    reportFailure(consoleLines, server, 40);
  },
  async cleanup() {
    await closeAll(browsers, server);
  },
});
