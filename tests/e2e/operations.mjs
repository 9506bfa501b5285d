// Operations, as users and operators see them: a link with an access token joins, a missing or
// expired one is refused in words; a drain (SIGTERM) keeps the running call going, turns
// readiness off and tells a newcomer the server takes no new calls.
//
//   node tests/e2e/operations.mjs         (PARLEY_BIN, CHROMIUM override the binaries)
import { execFileSync } from "node:child_process";
import { join, resolve } from "node:path";
import { closeAll, launchChromium, log, repoRoot, reportFailure, runTest, sleep, startServer, waitFor } from "./harness.mjs";

const KEY = "ops:0123456789abcdef-e2e-secret";
const BIN = resolve(repoRoot, process.env.PARLEY_BIN || "target/release/parley");
let server = null;
let browser = null;
const consoleLines = [];

const token = (room, identity, ttl = "1h") =>
  execFileSync(BIN, ["token", "--api-key", KEY, "--room", room, "--identity", identity, "--ttl", ttl]).toString().trim();

async function open(url, name) {
  const page = await (await browser.newContext()).newPage();
  page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
  await page.goto(url, { waitUntil: "domcontentloaded" });
  return page;
}

const statusText = (page) => page.evaluate(() => [...document.querySelectorAll("#status p")].map((p) => p.textContent).join(" | "));

function framesDecoded() {
  return window.parley.client.pc.getStats().then((stats) => {
    let n = 0;
    stats.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") n += s.framesDecoded || 0;
    });
    return n;
  });
}

await runTest("operations", {
  timeoutMs: 75000,
  async body() {
    server = await startServer({ extraArgs: ["--api-key", KEY], logFile: join(repoRoot, "tests/e2e/server-operations.log") });
    browser = await launchChromium();

    const noToken = await open(`${server.url}/r/ops?name=Nobody&autojoin=1`, "Nobody");
    await waitFor(async () => /access token/i.test(await statusText(noToken)), { timeoutMs: 10000, message: "a missing token to be explained" });
    const expired = token("ops", "late", "0s");
    await sleep(6500); // past the 5 s leeway
    const late = await open(`${server.url}/r/ops?name=Late&autojoin=1&token=${expired}`, "Late");
    await waitFor(async () => /access token/i.test(await statusText(late)), { timeoutMs: 10000, message: "an expired token to be refused" });
    log(`refused: ${await statusText(late)}`);

    const ann = await open(`${server.url}/r/ops?name=Ann&autojoin=1&token=${token("ops", "ann")}`, "Ann");
    const ben = await open(`${server.url}/r/ops?name=Ben&autojoin=1&token=${token("ops", "ben")}`, "Ben");
    await waitFor(async () => (await ann.evaluate(framesDecoded)) > 0 && (await ben.evaluate(framesDecoded)) > 0, {
      timeoutMs: 20000,
      message: "Ann and Ben, admitted by their tokens, to see each other",
    });
    log("tokens admitted Ann and Ben; they see each other");

    server.proc.kill("SIGTERM");
    await waitFor(async () => (await fetch(`${server.url}/readyz`)).status === 503, { timeoutMs: 5000, message: "readiness off while draining" });
    const before = await ben.evaluate(framesDecoded);
    const newcomer = await open(`${server.url}/r/elsewhere?name=Cy&autojoin=1&token=${token("elsewhere", "cy")}`, "Cy");
    await waitFor(async () => /restarting|no new calls/i.test(await statusText(newcomer)), { timeoutMs: 10000, message: "a newcomer to be told about the drain" });
    await waitFor(async () => (await ben.evaluate(framesDecoded)) > before + 30, { timeoutMs: 10000, message: "the running call to go on during the drain" });
    log(`draining: newcomer told "${await statusText(newcomer)}"; the call went on`);
  },
  async onFailure() {
    reportFailure(consoleLines, server, 40);
  },
  async cleanup() {
    await closeAll([browser], server);
  },
});
