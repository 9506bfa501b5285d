// The speaking participant is highlighted on the others' screens: one browser's microphone
// plays a steady tone, the other's plays silence; the SFU's speaking detection (RFC 6464 audio
// levels) marks the first one's tile, never the silent one's.
//
//   node tests/e2e/speaking.mjs           (PARLEY_BIN, CHROMIUM override the binaries)
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CHROMIUM_ARGS, launchChromium, log, repoRoot, runTest, sleep, startServer, reportFailure, closeAll, wav } from "./harness.mjs";

let server = null;
const browsers = [];
const consoleLines = [];

await runTest("speaking", {
  timeoutMs: 60000,
  async body() {
    const dir = mkdtempSync(join(tmpdir(), "parley-e2e-"));
    wav(join(dir, "tone.wav"), 0.5);
    wav(join(dir, "silence.wav"), 0);
    server = await startServer({ logFile: join(repoRoot, "tests/e2e/server-speaking.log") });
    const pages = {};
    for (const [name, file] of [["Loud", "tone.wav"], ["Quiet", "silence.wav"]]) {
      const browser = await launchChromium({ args: [...CHROMIUM_ARGS, `--use-file-for-fake-audio-capture=${join(dir, file)}`] });
      browsers.push(browser);
      const page = await (await browser.newContext()).newPage();
      page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
      await page.goto(`${server.url}/r/e2e-speaking?name=${name}&autojoin=1`, { waitUntil: "domcontentloaded" });
      pages[name] = page;
    }
    const idOf = (p) =>
      p.waitForFunction(() => window.parley && window.parley.client && window.parley.client.participantId, null, { timeout: 10000 }).then((h) => h.jsonValue());
    const loudId = await idOf(pages.Loud);
    const quietId = await idOf(pages.Quiet);
    await pages.Quiet.waitForSelector(`.tile[data-participant="${loudId}"][data-speaking="true"]`, { timeout: 15000 });
    log(`Quiet sees Loud (${loudId}) highlighted as speaking`);
    await pages.Quiet.waitForSelector(`.tile[data-participant="${loudId}"][data-dominant="true"]`, { timeout: 10000 });
    log(`Quiet sees Loud as the dominant speaker`);
    // The silent participant is never marked as speaking, on either screen.
    for (let i = 0; i < 10; i++) {
      const marked = await pages.Loud.evaluate((id) => document.querySelector(`.tile[data-participant="${id}"]`)?.dataset.speaking, quietId);
      if (marked === "true") throw new Error("the silent participant was marked as speaking");
      await sleep(200);
    }
    log(`Loud never sees Quiet (${quietId}) as speaking`);
  },
  async onFailure() {
    reportFailure(consoleLines, server, 40);
  },
  async cleanup() {
    await closeAll(browsers, server);
  },
});
