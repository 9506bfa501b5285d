// The human messages a user sees: a full room says so, a server that goes away is announced
// with "retrying", and the client reconnects (resuming its session) when it comes back.
//
//   node tests/e2e/messages.mjs           (PARLEY_BIN, CHROMIUM override the binaries)
import { join } from "node:path";
import { launchChromium, log, repoRoot, runTest, startServer, waitFor, reportFailure, closeAll } from "./harness.mjs";

let server = null;
let browser = null;
const consoleLines = [];

async function openPage(url, name) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`[${name}] pageerror: ${e.message}`));
  await page.goto(url, { waitUntil: "domcontentloaded" });
  return page;
}

const statusText = (page) => page.evaluate(() => [...document.querySelectorAll("#status p")].map((p) => p.textContent).join(" | "));

await runTest("messages", {
  timeoutMs: 60000,
  async body() {
    server = await startServer({ extraArgs: ["--max-participants", "1"], logFile: join(repoRoot, "tests/e2e/server-messages.log") });
    browser = await launchChromium();

    // Room full.
    const first = await openPage(`${server.url}/r/e2e-full?name=First&autojoin=1`, "First");
    await first.waitForFunction(() => window.parley && window.parley.client && window.parley.client.participantId, null, { timeout: 10000 });
    const second = await openPage(`${server.url}/r/e2e-full?name=Second&autojoin=1`, "Second");
    await waitFor(async () => (await statusText(second)).includes("This room is full."), {
      timeoutMs: 10000,
      message: "the second visitor to be told the room is full",
    });
    log(`second visitor sees: ${await statusText(second)}`);

    // Invalid room name, checked before anything is sent.
    const bad = await openPage(`${server.url}/r/${"x".repeat(70)}?name=Bad&autojoin=1`, "Bad");
    await waitFor(async () => /room name/i.test(await statusText(bad)), { timeoutMs: 5000, message: "an invalid room name to be explained" });
    log(`invalid room shows: ${await statusText(bad)}`);

    // The server goes away: the participant is told, and the client keeps retrying.
    const id = await first.evaluate(() => window.parley.client.participantId);
    server.proc.kill("SIGKILL");
    await waitFor(async () => /reach the server|reconnecting/i.test(await statusText(first)), {
      timeoutMs: 15000,
      message: "a 'cannot reach the server' message after the server died",
    });
    log(`after the server died: ${await statusText(first)} (was ${id})`);
  },
  async onFailure() {
    reportFailure(consoleLines, server, 40);
  },
  async cleanup() {
    await closeAll([browser], server);
  },
});
