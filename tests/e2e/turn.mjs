// TURN through a real coturn (Debian's package) with `use-auth-secret`: a browser forced to
// relay-only (`iceTransportPolicy: "relay"`) joins a group call and a direct call through it,
// with the short-lived credentials Parley hands out; a wrong or expired credential is refused.
//
//   node tests/e2e/turn.mjs               (PARLEY_BIN, CHROMIUM override the binaries)
import { spawnSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { join } from "node:path";
import { closeAll, freeMediaPort, launchChromium, log, repoRoot, reportFailure, runTest, startCoturn, startServer, waitFor, selectedPath } from "./harness.mjs";

const SECRET = "turn-shared-secret-for-e2e";
let server = null;
let coturn = null;
let browser = null;
const consoleLines = [];

/** Allocates on coturn with `turnutils_uclient` (from the coturn package); true if accepted. */
function allocates(port, username, password) {
  const r = spawnSync(
    "turnutils_uclient",
    ["-p", String(port), "-u", username, "-w", password, "-e", "127.0.0.1", "-n", "1", "-c", "127.0.0.1"],
    { timeout: 8000, encoding: "utf8" },
  );
  const text = `${r.stdout || ""}${r.stderr || ""}`;
  if (/Cannot complete Allocation|error 401|Unauthorized/i.test(text)) return false;
  return /tot_send_msgs=1/.test(text);
}


await runTest("turn", {
  timeoutMs: 90000,
  async body() {
    const port = await freeMediaPort();
    coturn = await startCoturn({ port, secret: SECRET });
    server = await startServer({
      extraArgs: ["--turn-server", `turn:127.0.0.1:${port}?transport=udp`, "--turn-secret", SECRET],
      logFile: join(repoRoot, "tests/e2e/server-turn.log"),
    });

    // The credentials Parley hands out are accepted; tampered or expired ones are refused.
    const servers = await (await fetch(`${server.url}/ice-servers`)).json();
    const turn = servers.find((s) => String(s.urls).includes("turn:"));
    if (!turn) throw new Error(`no TURN server in ${JSON.stringify(servers)}`);
    if (!allocates(port, turn.username, turn.credential)) throw new Error("coturn refused Parley's credential");
    if (allocates(port, turn.username, `${turn.credential}x`)) throw new Error("coturn accepted a wrong password");
    const expiredUser = `${Math.floor(Date.now() / 1000) - 60}:ann`;
    const expiredPass = createHmac("sha1", SECRET).update(expiredUser).digest("base64");
    if (allocates(port, expiredUser, expiredPass)) throw new Error("coturn accepted an expired credential");
    log("coturn accepts Parley's credential and refuses a wrong and an expired one");

    browser = await launchChromium();
    // Group call: a relay-only browser and a normal one.
    const pages = [];
    for (const [name, relay] of [["Relayed", true], ["Direct", false]]) {
      const page = await (await browser.newContext()).newPage();
      page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
      await page.goto(`${server.url}/r/e2e-turn?name=${name}&autojoin=1${relay ? "&relay=1" : ""}`, { waitUntil: "domcontentloaded" });
      pages.push(page);
    }
    let last;
    await waitFor(
      async () => {
        last = await Promise.all(pages.map((p) => p.evaluate(selectedPath)));
        return last[0].frames > 0 && last[1].frames > 0;
      },
      { timeoutMs: 30000, intervalMs: 250, message: "video both ways with one browser relay-only" },
    );
    if (last[0].type !== "relay") throw new Error(`the relay-only browser's pair is ${last[0].type}, not relay`);
    log(`group call through coturn: Relayed uses a ${last[0].type} candidate`);

    // Direct call: the callee relay-only (p2p through TURN), the caller normal.
    const bob = await (await browser.newContext()).newPage();
    bob.on("console", (m) => consoleLines.push(`[bob] ${m.type()}: ${m.text()}`));
    await bob.goto(`${server.url}/u/bob?relay=1`, { waitUntil: "domcontentloaded" });
    await bob.waitForFunction(() => window.parleyCalls && window.parleyCalls.registered, null, { timeout: 15000 });
    const ann = await (await browser.newContext()).newPage();
    ann.on("console", (m) => consoleLines.push(`[ann] ${m.type()}: ${m.text()}`));
    await ann.goto(`${server.url}/u/ann?call=bob`, { waitUntil: "domcontentloaded" });
    await bob.getByRole("button", { name: "Answer", exact: true }).click({ timeout: 15000 });
    await waitFor(
      async () =>
        bob.evaluate(() => {
          const c = window.parleyCalls.current;
          return !!(c && c.firstFrameAt && c.media === "p2p");
        }),
      { timeoutMs: 20000, intervalMs: 250, message: "the relay-only callee to see the caller peer-to-peer through TURN" },
    );
    log("direct call through coturn: the relay-only callee decodes the caller's video");
  },
  async onFailure() {
    reportFailure(consoleLines, server, 40);
  },
  async cleanup() {
    await closeAll([browser], server);
    if (coturn) coturn.kill("SIGKILL");
  },
});
