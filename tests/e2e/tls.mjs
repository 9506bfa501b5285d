// `parley serve --tls-self-signed`: the page, the SDK and signaling (wss://) work over HTTPS
// with a certificate generated at start, and two participants see each other.
//
//   node tests/e2e/tls.mjs                (PARLEY_BIN, CHROMIUM override the binaries)
import { join } from "node:path";
import { launchChromium, log, repoRoot, runTest, startServer, waitFor, reportFailure, closeAll } from "./harness.mjs";

// The certificate is self-signed by design; only this test's own requests trust it.
process.env.NODE_TLS_REJECT_UNAUTHORIZED = "0";

let server = null;
let browser = null;
const consoleLines = [];

await runTest("tls", {
  timeoutMs: 60000,
  async body() {
    server = await startServer({
      extraArgs: ["--tls-self-signed"],
      scheme: "https",
      logFile: join(repoRoot, "tests/e2e/server-tls.log"),
    });
    browser = await launchChromium();
    const pages = [];
    for (const name of ["Tess", "Lee"]) {
      const context = await browser.newContext({ ignoreHTTPSErrors: true });
      const page = await context.newPage();
      page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
      await page.goto(`${server.url}/r/e2e-tls?name=${name}&autojoin=1`, { waitUntil: "domcontentloaded" });
      pages.push(page);
    }
    const decoding = (page) =>
      page.evaluate(async () => {
        const c = window.parley && window.parley.client;
        if (!c || !c.pc || !c._ws || !c._ws.url.startsWith("wss://")) return 0;
        let frames = 0;
        (await c.pc.getStats()).forEach((s) => {
          if (s.type === "inbound-rtp" && s.kind === "video") frames += s.framesDecoded || 0;
        });
        return frames;
      });
    await waitFor(async () => (await decoding(pages[0])) > 0 && (await decoding(pages[1])) > 0, {
      timeoutMs: 20000,
      message: "both participants to decode video over an https page and wss signaling",
    });
    log("https page, wss signaling, video decoded both ways");
  },
  async onFailure() {
    reportFailure(consoleLines, server, 40);
  },
  async cleanup() {
    await closeAll([browser], server);
  },
});
