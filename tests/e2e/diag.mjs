// The network check page (/diag) against Parley's own RFC 5780 STUN server (primary 127.0.0.1,
// alternate 127.0.0.2: loopback has all of 127/8) and a real coturn: the page works out the NAT
// mapping, lists candidate types, connects media to the server in a throwaway room (directly, and
// relay-only through coturn) and shows a verdict. Loopback has no NAT, so the mapping must come
// out as "no NAT" (or endpoint-independent, when Chromium hides its host addresses).
//
//   node tests/e2e/diag.mjs               (PARLEY_BIN, CHROMIUM override the binaries)
import { join } from "node:path";
import { CHROMIUM_ARGS, closeAll, freeMediaPort, launchChromium, log, repoRoot, reportFailure, runTest, startCoturn, startServer } from "./harness.mjs";

const SECRET = "turn-shared-secret-for-e2e";
let server = null;
let coturn = null;
const browsers = [];
const consoleLines = [];

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

/** Opens /diag (or clicks "Run again" on `page`) and waits for the page's results. */
async function runDiag(page, { again = false } = {}) {
  if (again) {
    await page.getByRole("button", { name: "Run again" }).click();
  } else {
    const res = await page.goto(`${server.url}/diag`, { waitUntil: "domcontentloaded" }).catch((err) => {
      throw new Error(`GET /diag failed (${err.message.split("\n")[0]}): rebuild parley, or run with PARLEY_E2E_WEB=disk`);
    });
    // The binary embeds web/ at build time: an older build has no page (PARLEY_E2E_WEB=disk
    // serves the working tree's web/ in front of it).
    assert(res && res.status() === 200, `GET /diag answered ${res && res.status()}: rebuild parley, or run with PARLEY_E2E_WEB=disk`);
  }
  await page.waitForFunction(() => window.parleyDiag && window.parleyDiag.done, null, { timeout: 30000 });
  return page.evaluate(() => JSON.parse(JSON.stringify(window.parleyDiag)));
}

function printFindings(label, d) {
  log(`${label}: verdict "${d.verdict}" (${d.verdictKind}) ${d.verdictDetail}`);
  log(`${label}: mapping ${d.mapping}: ${d.mappingText}`);
  for (const s of d.servers) log(`${label}:   ${s.url}: answered=${s.answered} mapped=${s.mapped} ownAddress=${s.ownAddress} (${s.ms} ms)`);
  log(`${label}: srflx ${JSON.stringify(d.srflx.map((c) => `${c.address}:${c.port} rel ${c.relatedAddress}:${c.relatedPort} from ${c.server}`))}`);
  log(`${label}: candidate types ${d.candidateTypes.join(", ")}`);
  log(`${label}: media ${JSON.stringify({ connected: d.media.connected, protocol: d.media.protocol, localType: d.media.localType, remoteType: d.media.remoteType, remote: d.media.remoteAddress })}`);
  log(`${label}: relay ${JSON.stringify({ tested: d.relay.tested, ok: d.relay.ok, protocol: d.relay.protocol, localType: d.relay.localType, relayProtocol: d.relay.relayProtocol, error: d.relay.error })}`);
}

function checkCommon(label, d) {
  assert(!d.error, `${label}: the check failed: ${d.error}`);
  assert(d.natStun.length === 2, `${label}: the page did not get the STUN server's two addresses: ${JSON.stringify(d.natStun)}`);
  assert(d.servers.length === 2 && d.servers.every((s) => s.answered), `${label}: not every STUN address answered: ${JSON.stringify(d.servers)}`);
  assert(d.candidateTypes.includes("host/udp"), `${label}: no host/udp candidate in ${d.candidateTypes}`);
  assert(d.candidateTypes.includes("relay/udp"), `${label}: no relay candidate from coturn in ${d.candidateTypes}`);
  assert(d.media.connected && ["udp", "tcp"].includes(d.media.protocol), `${label}: media did not connect: ${JSON.stringify(d.media)}`);
  assert(d.media.localType !== "relay", `${label}: media to a loopback server went through the relay`);
  assert(d.turn === true && d.relay.tested && d.relay.ok === true, `${label}: the TURN relay check failed: ${JSON.stringify(d.relay)}`);
  assert(d.relay.localType === "relay", `${label}: the relay-only check used a ${d.relay.localType} candidate`);
  assert(d.verdictKind === "ok" && d.verdict === "Calls should work here.", `${label}: verdict ${d.verdictKind}: ${d.verdict}`);
}

await runTest("diag", {
  timeoutMs: 120000,
  async body() {
    const turnPort = await freeMediaPort();
    coturn = await startCoturn({ port: turnPort, secret: SECRET });
    const stunPort = await freeMediaPort();
    const stunAltPort = await freeMediaPort();
    server = await startServer({
      extraArgs: [
        "--turn-server", `turn:127.0.0.1:${turnPort}?transport=udp`, "--turn-secret", SECRET,
        "--stun-listen", `127.0.0.1:${stunPort}`, "--stun-alternate-ip", "127.0.0.2", "--stun-alternate-port", String(stunAltPort),
      ],
      logFile: join(repoRoot, "tests/e2e/server-diag.log"),
    });

    const res = await fetch(`${server.url}/diag-info`);
    assert(res.status === 200, `GET /diag-info answered ${res.status}`);
    const info = await res.json();
    log(`/diag-info: ${JSON.stringify(info)}`);
    assert(
      JSON.stringify(info.nat_stun) === JSON.stringify([`stun:127.0.0.1:${stunPort}`, `stun:127.0.0.2:${stunAltPort}`]),
      `/diag-info nat_stun is ${JSON.stringify(info.nat_stun)}`,
    );
    assert(info.turn === true, "/diag-info says there is no TURN server");

    // 1. The test browser (--use-fake-ui-for-media-stream counts as media permission, so
    // Chromium shows real host addresses, here 192.0.2.2, instead of mDNS names). On loopback the
    // STUN server sees that very address and Chromium drops a srflx candidate equal to its host
    // address: no srflx at all, but gathering completes at once (a silent server would keep it
    // going), so both STUN addresses answered and the page reports "no NAT".
    const browser = await launchChromium();
    browsers.push(browser);
    const page = await (await browser.newContext()).newPage();
    page.on("console", (m) => consoleLines.push(`[diag] ${m.type()}: ${m.text()}`));
    let d = await runDiag(page);
    printFindings("visible host addresses", d);
    checkCommon("visible host addresses", d);
    assert(d.mapping === "no-nat", `mapping is ${d.mapping}, expected no-nat (loopback, real host addresses)`);
    await page.getByText("Calls should work here.", { exact: true }).first().waitFor({ state: "visible", timeout: 2000 });
    await page.getByText(/No NAT: the STUN server sees this computer's own address/).waitFor({ state: "visible", timeout: 2000 });
    await page.getByText(/Media connects to this server over (UDP|TCP)/).first().waitFor({ state: "visible", timeout: 2000 });
    await page.getByText(/The TURN relay works/).waitFor({ state: "visible", timeout: 2000 });

    // "Run again" runs everything once more.
    d = await runDiag(page, { again: true });
    checkCommon("run again", d);
    log("Run again: same verdict");

    // 2. A visitor who has not granted camera access: Chromium hides host addresses behind mDNS
    // names and then keeps the srflx candidate even when it equals the local address. Both STUN
    // addresses see 127.0.0.1 with the host candidate's own port, one public address per local
    // socket: endpoint-independent.
    const plain = await launchChromium({ args: CHROMIUM_ARGS.filter((a) => a !== "--use-fake-ui-for-media-stream") });
    browsers.push(plain);
    const page2 = await (await plain.newContext()).newPage();
    page2.on("console", (m) => consoleLines.push(`[diag-mdns] ${m.type()}: ${m.text()}`));
    const d2 = await runDiag(page2);
    printFindings("mDNS host addresses", d2);
    checkCommon("mDNS host addresses", d2);
    assert(d2.mapping === "endpoint-independent", `mapping is ${d2.mapping}, expected endpoint-independent (mDNS host addresses)`);
    assert(d2.srflx.length >= 2, `expected a srflx candidate from each STUN address: ${JSON.stringify(d2.srflx)}`);
    await page2.getByText("Calls should work here.", { exact: true }).first().waitFor({ state: "visible", timeout: 2000 });
  },
  async onFailure() {
    reportFailure(consoleLines, server, 40);
  },
  async cleanup() {
    await closeAll(browsers, server);
    if (coturn) coturn.kill("SIGKILL");
  },
});
