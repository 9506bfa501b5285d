// A browser whose network drops all UDP still joins a call: it reaches Parley's media port
// over ICE-TCP (RFC 6544 passive candidate on the same port, RFC 4571 framing).
//
// The UDP-less browser runs in a network namespace this test creates (root needed; CI runs as
// root), with iptables dropping every UDP packet in and out. The other browser is normal.
//
//   node tests/e2e/ice_tcp.mjs            (PARLEY_BIN, CHROMIUM override the binaries)
import { execFileSync } from "node:child_process";
import { chmodSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { CHROMIUM_ARGS, closeAll, launchChromium, log, repoRoot, reportFailure, runTest, startServer, waitFor, selectedPath } from "./harness.mjs";

const id = process.pid % 200;
const NS = `ptcp${process.pid}`;
const HOST_IF = `ptcpa${id}`;
const NS_IF = `ptcpb${id}`;
const HOST_IP = `10.89.${id}.1`;
const NS_IP = `10.89.${id}.2`;

const sh = (...args) => execFileSync(args[0], args.slice(1), { stdio: ["ignore", "pipe", "pipe"] }).toString();
const tryRun = (...args) => {
  try {
    sh(...args);
  } catch {}
};

function setupNamespace() {
  sh("ip", "netns", "add", NS);
  sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF);
  sh("ip", "link", "set", NS_IF, "netns", NS);
  sh("ip", "addr", "add", `${HOST_IP}/24`, "dev", HOST_IF);
  sh("ip", "link", "set", HOST_IF, "up");
  sh("ip", "-n", NS, "addr", "add", `${NS_IP}/24`, "dev", NS_IF);
  sh("ip", "-n", NS, "link", "set", NS_IF, "up");
  sh("ip", "-n", NS, "link", "set", "lo", "up");
  sh("ip", "netns", "exec", NS, "iptables", "-A", "OUTPUT", "-p", "udp", "!", "-o", "lo", "-j", "DROP");
  sh("ip", "netns", "exec", NS, "iptables", "-A", "INPUT", "-p", "udp", "!", "-i", "lo", "-j", "DROP");
}

function teardownNamespace() {
  tryRun("ip", "link", "del", HOST_IF);
  tryRun("ip", "netns", "del", NS);
}

let server = null;
const browsers = [];
const consoleLines = [];


await runTest("ice_tcp", {
  timeoutMs: 75000,
  async body() {
    if (process.getuid && process.getuid() !== 0) throw new Error("this test creates a network namespace: run it as root");
    teardownNamespace();
    setupNamespace();
    server = await startServer({ publicIp: HOST_IP, httpBind: "0.0.0.0", logFile: join(repoRoot, "tests/e2e/server-ice-tcp.log") });
    const url = `${server.url.replace("127.0.0.1", HOST_IP)}/r/e2e-tcp`;

    const dir = mkdtempSync(join(tmpdir(), "parley-ns-"));
    const wrapper = join(dir, "chromium-in-ns");
    writeFileSync(wrapper, `#!/bin/sh\nexec ip netns exec ${NS} ${process.env.CHROMIUM || "/usr/bin/chromium"} "$@"\n`);
    chmodSync(wrapper, 0o755);
    // Camera and microphone need a secure context; this origin is not localhost.
    const origin = new URL(url).origin;
    const args = [...CHROMIUM_ARGS, `--unsafely-treat-insecure-origin-as-secure=${origin}`];
    const nsBrowser = await chromium.launch({ executablePath: wrapper, args });
    browsers.push(nsBrowser);
    const plain = await launchChromium({ args });
    browsers.push(plain);

    const pages = [];
    for (const [name, browser] of [["NoUdp", nsBrowser], ["Plain", plain]]) {
      const page = await (await browser.newContext()).newPage();
      page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
      await page.goto(`${url}?name=${name}&autojoin=1`, { waitUntil: "domcontentloaded" });
      pages.push(page);
    }
    const [noUdp, plainPage] = pages;
    let last;
    try {
    await waitFor(
      async () => {
        last = [await noUdp.evaluate(selectedPath), await plainPage.evaluate(selectedPath)];
        return last[0].frames > 0 && last[1].frames > 0;
      },
      { timeoutMs: 30000, intervalMs: 250, message: "both browsers to decode each other's video" },
    );
    } catch (err) {
      log(`last stats: ${JSON.stringify(last)}`);
      throw err;
    }
    log(`NoUdp connected over ${last[0].protocol}, Plain over ${last[1].protocol}`);
    if (last[0].protocol !== "tcp") throw new Error(`the UDP-less browser's media should use TCP, it uses ${last[0].protocol}`);
  },
  async onFailure() {
    reportFailure(consoleLines, server, 40);
  },
  async cleanup() {
    await closeAll(browsers, server);
    teardownNamespace();
  },
});
