// A visitor who denies camera and microphone access is told so, in words, on the lobby page.
//
//   node tests/e2e/denied.mjs            against the real server (PARLEY_BIN)
//   node tests/e2e/denied.mjs --static   against a static file server (no Parley binary needed)
import { CHROMIUM_ARGS, launchChromium, log, runTest, startServer, startStaticServer } from "./harness.mjs";

const DENIED = "Camera and microphone access was denied";

let server = null;
let browser = null;
const consoleLines = [];

await runTest("denied", {
  timeoutMs: 45000,
  async body() {
    server = process.argv.includes("--static") ? await startStaticServer() : await startServer();
    const args = CHROMIUM_ARGS.filter((a) => a !== "--use-fake-ui-for-media-stream").concat("--deny-permission-prompts");
    browser = await launchChromium({ args });
    const context = await browser.newContext({ permissions: [] });
    const page = await context.newPage();
    page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
    await page.goto(`${server.url}/r/e2e-denied?name=Denied`);
    const status = page.getByRole("status");
    await status.getByText(DENIED).waitFor({ timeout: 10000 });
    log(`status says: ${JSON.stringify(await status.innerText())}`);
    // The lobby stays usable: the Join button is there.
    await page.getByRole("button", { name: "Join", exact: true }).waitFor({ timeout: 2000 });
  },
  async onFailure() {
    if (consoleLines.length) console.error(`--- browser console ---\n${consoleLines.slice(-40).join("\n")}`);
    if (server) console.error(`--- server log tail ---\n${server.logTail(40)}`);
  },
  async cleanup() {
    if (browser) await browser.close().catch(() => {});
    if (server) await server.stop();
  },
});
