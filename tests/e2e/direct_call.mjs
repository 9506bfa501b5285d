// Direct (1:1) calls in real headless Chromium (fake camera and microphone), through the page at
// /u/NAME (web/app/call.html, web/sdk/calls.js):
//   1. ann calls bob, who has two devices: both ring; device 1 answers, device 2 stops ringing
//      ("answered on another device"); audio and video flow both ways peer-to-peer. Prints
//      ANSWER_TO_FIRST_FRAME_MS p2p=… (Answer click → first decoded remote frame, both sides).
//   5. ann hangs up: the call ends on both sides.
//   3. ann calls bob again (typing the name); a device declines: ann is told so.
//   4. calling a user with no device: "not online" at once.
//   2. dave calls carol with peer-to-peer made impossible (?p2p=0 on both): the call moves to
//      the SFU by itself and media flows both ways. Prints ANSWER_TO_FIRST_FRAME_MS sfu=….
//
//   node tests/e2e/direct_call.mjs       (PARLEY_BIN, CHROMIUM override the binaries;
//                                         PARLEY_E2E_WEB=disk serves the working tree's web/)
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { launchChromium, log, repoRoot, runTest, sleep, startServer, waitFor } from "./harness.mjs";

const TOTAL_TIMEOUT_MS = 150000;
const REGISTER_TIMEOUT_MS = 15000;
const RING_TIMEOUT_MS = 10000;
const MEDIA_TIMEOUT_MS = 20000;
// Enough for the SFU fallback: the server's p2p_timeout_ms (default 4 s) plus a room join.
const FALLBACK_TIMEOUT_MS = 30000;
// A person takes a moment to click "Answer": the ringing device prepares its answer meanwhile.
const HUMAN_ANSWER_DELAY_MS = 1000;

let server = null;
let browser = null;
const consoleLines = [];
const devices = new Map(); // label → {label, context, page}

/** In the page: what the test needs to know about the device and its current call. */
async function snapshot() {
  const s = window.parleyCalls;
  const c = s && s.current;
  const out = {
    registered: !!(s && s.registered),
    deviceId: s && s.client ? s.client.deviceId : null,
    connection: s && s.client ? s.client.connectionState : null,
    ringing: !!(s && s.ringer && s.ringer.active),
    ringingCalls: s ? s.ringing.map((r) => r.id) : [],
    call: null,
    answerClickedAt: s ? s.answerClickedAt : null,
    lastEnd: s ? s.lastEnd : null,
    status: [...document.querySelectorAll("#status p")].map((p) => p.textContent),
    mediaPath: document.querySelector("#media-path")?.hidden ? null : document.querySelector("#media-path")?.textContent || null,
    view: document.body.dataset.view,
  };
  if (c) {
    out.call = {
      id: c.id,
      peer: c.peer,
      direction: c.direction,
      state: c.state,
      media: c.media,
      p2pPcOpen: !!c.pc,
      firstFrameAt: c.firstFrameAt,
      firstFrameAtByMedia: { ...c.firstFrameAtByMedia },
      answeredAt: c.answeredAt,
      log: c.log.map(([t, e]) => `${t}:${e}`).join(" | "),
      video: 0,
      audio: 0,
    };
    try {
      const stats = await c.getStats();
      stats.forEach((r) => {
        if (r.type !== "inbound-rtp") return;
        if (r.kind === "video") out.call.video = Math.max(out.call.video, r.framesDecoded || 0);
        if (r.kind === "audio") out.call.audio = Math.max(out.call.audio, r.packetsReceived || 0);
      });
    } catch {}
  }
  return out;
}

async function openDevice(label, path) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on("console", (m) => consoleLines.push(`[${label}] ${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`[${label}] pageerror: ${e.message}`));
  const d = { label, context, page };
  devices.set(label, d);
  await page.goto(`${server.url}${path}`, { waitUntil: "domcontentloaded" });
  return d;
}

async function waitRegistered(d) {
  try {
    await d.page.waitForFunction(() => window.parleyCalls && window.parleyCalls.registered, null, { timeout: REGISTER_TIMEOUT_MS });
  } catch {
    const s = await d.page.evaluate(snapshot).catch(() => null);
    throw new Error(`${d.label} did not register within ${REGISTER_TIMEOUT_MS / 1000} s; status: ${JSON.stringify(s && s.status)}`);
  }
  const name = await d.page.evaluate(() => window.parleyCalls.user);
  await d.page.getByText(`You are ${name}`).first().waitFor({ timeout: 2000 });
}

const snap = (d) => d.page.evaluate(snapshot);

async function waitSnap(d, pred, message, timeoutMs) {
  let last = null;
  try {
    return await waitFor(
      async () => {
        last = await snap(d);
        return pred(last) ? last : null;
      },
      { timeoutMs, intervalMs: 50, message: `${d.label}: ${message}` },
    );
  } catch (err) {
    err.message += `\n  last snapshot of ${d.label}: ${JSON.stringify(last)}`;
    throw err;
  }
}

const button = (d, name) => d.page.getByRole("button", { name, exact: true });

async function waitStatus(d, re, timeoutMs, what) {
  return waitSnap(d, (s) => s.status.some((t) => re.test(t)), `status matching ${re} (${what})`, timeoutMs);
}

/** Clicks "Answer" from inside the page and returns the click time (Date.now(), shared clock). */
async function clickAnswer(d) {
  await button(d, "Answer").waitFor({ state: "visible", timeout: 2000 });
  return d.page.evaluate(() => {
    const t = Date.now();
    document.getElementById("answer").click();
    return t;
  });
}

/** Waits until both sides of a call decode video and receive audio on `media`. */
async function waitMediaBothWays(a, b, media, timeoutMs) {
  let snaps = [];
  try {
    await waitFor(
      async () => {
        snaps = await Promise.all([snap(a), snap(b)]);
        return snaps.every((s) => s.call && s.call.state === "connected" && s.call.media === media && s.call.video > 0 && s.call.audio > 0 && s.call.firstFrameAtByMedia[media]);
      },
      { timeoutMs, intervalMs: 50, message: `${a.label} and ${b.label} to decode each other's video and receive audio (${media})` },
    );
  } catch (err) {
    err.message += `\n  ${a.label}: ${JSON.stringify(snaps[0])}\n  ${b.label}: ${JSON.stringify(snaps[1])}`;
    throw err;
  }
  return snaps;
}

async function closeDevice(label) {
  const d = devices.get(label);
  if (!d) return;
  devices.delete(label);
  await d.context.close().catch(() => {});
}

await runTest("direct_call", {
  timeoutMs: TOTAL_TIMEOUT_MS,
  async body() {
    server = await startServer({ logFile: join(repoRoot, "tests/e2e/server-direct-call.log") });
    browser = await launchChromium();
    const tag = randomBytes(3).toString("hex");
    const ann = `ann-${tag}`;
    const bob = `bob-${tag}`;

    // ---- 1. two callee devices ring; one answers, the other stops; p2p media both ways ----
    const bob1 = await openDevice("bob-1", `/u/${bob}`);
    const bob2 = await openDevice("bob-2", `/u/${bob}`);
    await Promise.all([waitRegistered(bob1), waitRegistered(bob2)]);
    log(`${bob} registered twice: ${(await snap(bob1)).deviceId}, ${(await snap(bob2)).deviceId}`);
    const annD = await openDevice("ann", `/u/${ann}?call=${bob}`);
    await waitRegistered(annD);

    for (const d of [bob1, bob2]) {
      try {
        await button(d, "Answer").waitFor({ state: "visible", timeout: RING_TIMEOUT_MS });
      } catch {
        throw new Error(`${d.label} did not ring (no visible "Answer") within ${RING_TIMEOUT_MS / 1000} s: ${JSON.stringify(await snap(d))}`);
      }
      await button(d, "Decline").waitFor({ state: "visible", timeout: 1000 });
      await d.page.getByText(`${ann} is calling`).waitFor({ timeout: 1000 });
      await waitSnap(d, (s) => s.ringing, "ringing sound on", 2000);
    }
    await waitSnap(annD, (s) => s.call && s.call.state === "ringing", "the caller to see its call ringing", 5000);
    log(`both ${bob} devices ring; ${ann} sees "ringing"`);

    await sleep(HUMAN_ANSWER_DELAY_MS);
    const answerAt = await clickAnswer(bob1);
    // The other device stops ringing and says why.
    await waitStatus(bob2, /answered on another device/i, 5000, "bob-2 after bob-1 answered");
    await waitSnap(bob2, (s) => !s.ringing && s.ringingCalls.length === 0 && !s.call, "bob-2 to stop ringing", 2000);
    if (await button(bob2, "Answer").isVisible()) throw new Error('bob-2 still shows "Answer" after bob-1 answered');
    log('bob-2 stopped ringing: "answered on another device"');

    const [sa, sb] = await waitMediaBothWays(annD, bob1, "p2p", MEDIA_TIMEOUT_MS);
    const caller = sa.call.firstFrameAtByMedia.p2p - answerAt;
    const callee = sb.call.firstFrameAtByMedia.p2p - answerAt;
    console.log(`ANSWER_TO_FIRST_FRAME_MS p2p=${Math.max(caller, callee)} (caller ${caller}, callee ${callee})`);
    for (const [d, s] of [[annD, sa], [bob1, sb]]) {
      if (s.mediaPath !== "peer-to-peer") throw new Error(`${d.label} shows media path ${JSON.stringify(s.mediaPath)}, expected "peer-to-peer"`);
    }
    log(`p2p call ${sa.call.id}: ${ann} decoded ${sa.call.video} frames/${sa.call.audio} audio packets, bob-1 ${sb.call.video}/${sb.call.audio}`);

    // Mute shows on the other side (the call's own signaling), unmute clears it.
    await button(annD, "Mute").click();
    await button(annD, "Unmute").waitFor({ timeout: 2000 });
    await bob1.page.getByText("Microphone off").waitFor({ state: "visible", timeout: 5000 });
    await button(annD, "Unmute").click();
    await bob1.page.getByText("Microphone off").waitFor({ state: "hidden", timeout: 5000 });
    log("mute/unmute shown on the other side");

    // ---- 5. hang up ends the call on both sides ----
    await button(annD, "Hang up").click();
    await waitSnap(annD, (s) => !s.call && s.view === "idle", "ann back to idle after hanging up", 3000);
    await waitStatus(annD, /call ended/i, 2000, "ann after hanging up");
    await waitSnap(bob1, (s) => !s.call && s.view === "idle", "bob-1 back to idle after ann hung up", 5000);
    await waitStatus(bob1, /hung up/i, 2000, "bob-1 after ann hung up");
    log(`hang up: both sides ended ("${(await snap(bob1)).lastEnd.text}")`);

    // ---- 3. decline (ann types the name and clicks "Call") ----
    await annD.page.getByLabel("Call", { exact: true }).fill(bob);
    await button(annD, "Call").click();
    for (const d of [bob1, bob2]) await button(d, "Decline").waitFor({ state: "visible", timeout: RING_TIMEOUT_MS });
    await sleep(300);
    await button(bob2, "Decline").click();
    await waitStatus(annD, /declined/i, 5000, "ann after bob declined");
    await waitSnap(annD, (s) => !s.call && s.view === "idle", "ann back to idle after the decline", 2000);
    await waitSnap(bob1, (s) => !s.ringing && s.ringingCalls.length === 0, "bob-1 to stop ringing after bob-2 declined", 5000);
    log(`decline: ann sees ${JSON.stringify((await snap(annD)).lastEnd.text)}`);

    // ---- 4. unavailable: a user with no device ----
    const nobody = `nobody-${tag}`;
    await annD.page.getByLabel("Call", { exact: true }).fill(nobody);
    const unavailableClick = Date.now();
    await button(annD, "Call").click();
    await waitStatus(annD, /not online/i, 3000, "ann calling a user with no device");
    log(`unavailable: "${(await snap(annD)).lastEnd.text}" after ${Date.now() - unavailableClick} ms`);

    for (const l of ["ann", "bob-1", "bob-2"]) await closeDevice(l);

    // ---- 2. fallback to the SFU when peer-to-peer cannot connect ----
    const carol = `carol-${tag}`;
    const dave = `dave-${tag}`;
    const carolD = await openDevice("carol", `/u/${carol}?p2p=0`);
    await waitRegistered(carolD);
    const daveD = await openDevice("dave", `/u/${dave}?p2p=0&call=${carol}`);
    await waitRegistered(daveD);
    await button(carolD, "Answer").waitFor({ state: "visible", timeout: RING_TIMEOUT_MS });
    await sleep(HUMAN_ANSWER_DELAY_MS);
    const answerAt2 = await clickAnswer(carolD);
    const [sd, sc] = await waitMediaBothWays(daveD, carolD, "sfu", FALLBACK_TIMEOUT_MS);
    const caller2 = sd.call.firstFrameAtByMedia.sfu - answerAt2;
    const callee2 = sc.call.firstFrameAtByMedia.sfu - answerAt2;
    console.log(`ANSWER_TO_FIRST_FRAME_MS sfu=${Math.max(caller2, callee2)} (caller ${caller2}, callee ${callee2}; includes the p2p timeout)`);
    for (const [d, s] of [[daveD, sd], [carolD, sc]]) {
      if (s.call.p2pPcOpen) throw new Error(`${d.label} still has its peer-to-peer PeerConnection open after moving to the SFU`);
      if (s.mediaPath !== "via server") throw new Error(`${d.label} shows media path ${JSON.stringify(s.mediaPath)}, expected "via server"`);
    }
    log(`sfu call ${sd.call.id}: dave decoded ${sd.call.video} frames/${sd.call.audio} audio packets, carol ${sc.call.video}/${sc.call.audio}`);

    // Hang up from the callee this time.
    await button(carolD, "Hang up").click();
    await waitSnap(daveD, (s) => !s.call && s.view === "idle", "dave back to idle after carol hung up", 5000);
    await waitStatus(daveD, /hung up/i, 2000, "dave after carol hung up");
    log("sfu call hung up on both sides");
  },
  async onFailure() {
    for (const d of devices.values()) {
      const s = await d.page.evaluate(snapshot).catch((e) => `(no snapshot: ${e.message})`);
      console.error(`--- ${d.label}: ${JSON.stringify(s)}`);
    }
    if (consoleLines.length) {
      console.error("\n--- browser console (last 60 lines) ---");
      console.error(consoleLines.slice(-60).join("\n"));
    }
    if (server) {
      console.error(`\n--- server log tail (${server.logFile}) ---`);
      console.error(server.logTail(60));
      if (server.exited) console.error(`server exited: ${JSON.stringify(server.exited)}`);
    }
  },
  async cleanup() {
    if (browser) await browser.close().catch(() => {});
    if (server) await server.stop();
  },
});
