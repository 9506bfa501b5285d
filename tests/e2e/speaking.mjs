// The speaking participant is highlighted on the others' screens: one browser's microphone
// plays a steady tone, the other's plays silence; the SFU's speaking detection (RFC 6464 audio
// levels) marks the first one's tile, never the silent one's.
//
//   node tests/e2e/speaking.mjs           (PARLEY_BIN, CHROMIUM override the binaries)
import { writeFileSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CHROMIUM_ARGS, launchChromium, log, repoRoot, runTest, sleep, startServer, reportFailure, closeAll } from "./harness.mjs";

/** A mono 16-bit 48 kHz WAV file: a 440 Hz tone at `amplitude` (0 = silence). */
function wav(path, amplitude, seconds = 5) {
  const rate = 48000;
  const n = rate * seconds;
  const buf = Buffer.alloc(44 + n * 2);
  buf.write("RIFF", 0);
  buf.writeUInt32LE(36 + n * 2, 4);
  buf.write("WAVEfmt ", 8);
  buf.writeUInt32LE(16, 16);
  buf.writeUInt16LE(1, 20);
  buf.writeUInt16LE(1, 22);
  buf.writeUInt32LE(rate, 24);
  buf.writeUInt32LE(rate * 2, 28);
  buf.writeUInt16LE(2, 32);
  buf.writeUInt16LE(16, 34);
  buf.write("data", 36);
  buf.writeUInt32LE(n * 2, 40);
  for (let i = 0; i < n; i++) buf.writeInt16LE(Math.round(amplitude * 32767 * Math.sin((2 * Math.PI * 440 * i) / rate)), 44 + i * 2);
  writeFileSync(path, buf);
}

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
