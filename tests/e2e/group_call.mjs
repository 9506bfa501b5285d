// Three people join one room in real headless Chromium (fake camera and microphone): everyone
// sees and hears the two others, a mute shows on the others' screens and stops the audio, a leave
// removes the tile and the rest keep talking, and a fourth who joins muted is heard once it
// unmutes. Prints join → first remote frame times.
//
//   node tests/e2e/group_call.mjs          (PARLEY_BIN, CHROMIUM override the binaries)
import { randomBytes } from "node:crypto";
import { launchChromium, log, runTest, sleep, startServer, waitFor } from "./harness.mjs";

const TOTAL_TIMEOUT_MS = 90000;
const MEDIA_TIMEOUT_MS = 20000;
const NAMES = ["User1", "User2", "User3"];

// Runs in every page before the app: polls getStats every 20 ms from the moment the client
// exists and records, per remote participant, when its first video frame was decoded.
function installFrameWatcher() {
  const w = (window.__e2e = { firstFrame: {}, video: {}, audio: {}, samples: 0 });
  const tick = async () => {
    const client = window.parley && window.parley.client;
    if (client && client.pc) {
      try {
        const stats = await client.pc.getStats();
        const byTrack = new Map();
        const byMid = new Map();
        for (const [id, info] of client.remoteTracks) {
          byTrack.set(id, info.participantId);
          if (info.mid != null) byMid.set(String(info.mid), info.participantId);
        }
        const video = {};
        const audio = {};
        stats.forEach((s) => {
          if (s.type !== "inbound-rtp") return;
          const pid = byTrack.get(s.trackIdentifier) ?? byMid.get(String(s.mid)) ?? `?${s.ssrc}`;
          if (s.kind === "video") {
            video[pid] = Math.max(video[pid] || 0, s.framesDecoded || 0);
            if (s.framesDecoded > 0 && !w.firstFrame[pid]) w.firstFrame[pid] = Date.now();
          } else if (s.kind === "audio") {
            audio[pid] = Math.max(audio[pid] || 0, s.packetsReceived || 0);
          }
        });
        w.video = video;
        w.audio = audio;
        w.samples++;
      } catch {}
    }
    setTimeout(tick, 20);
  };
  tick();
}

function pageSnapshot() {
  const c = window.parley && window.parley.client;
  const visible = (el) => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== "hidden";
  };
  return {
    participantId: c ? c.participantId : null,
    connectionState: c ? c.connectionState : null,
    mediaState: c ? c.mediaState : null,
    signalingState: c && c.pc ? c.pc.signalingState : null,
    joinStartedAt: window.parley ? window.parley.joinStartedAt : null,
    remoteTiles: [...document.querySelectorAll(".tile:not(.local)")].filter(visible).map((t) => t.dataset.participant),
    status: [...document.querySelectorAll("#status p")].map((p) => p.textContent),
    firstFrame: window.__e2e.firstFrame,
    video: window.__e2e.video,
    audio: window.__e2e.audio,
  };
}

const pct = (arr, p) => {
  const s = [...arr].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
};

let server = null;
let browser = null;
const consoleLines = [];
const users = [];

await runTest("group_call", {
  timeoutMs: TOTAL_TIMEOUT_MS,
  async body() {
    // No --public-ip: the host's own addresses, as with no configuration at all.
    server = await startServer({ publicIp: null });
    browser = await launchChromium();
    const room = `e2e-${randomBytes(4).toString("hex")}`;

    for (const name of NAMES) {
      const context = await browser.newContext();
      const page = await context.newPage();
      page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
      page.on("pageerror", (e) => consoleLines.push(`[${name}] pageerror: ${e.message}`));
      await page.addInitScript(installFrameWatcher);
      users.push({ name, context, page, id: null });
    }

    // User1 and User2 join by link (?autojoin=1, camera starting cold); User3 waits in the lobby
    // with its preview running and clicks "Join" once the two are in the call.
    const [a, b, c] = users;
    log(`room ${room}: ${a.name} and ${b.name} join by link`);
    await Promise.all(
      [a, b].map((u) => {
        u.gotoAt = Date.now();
        return u.page.goto(`${server.url}/r/${room}?name=${u.name}&autojoin=1`, { waitUntil: "domcontentloaded" });
      }),
    );
    await c.page.goto(`${server.url}/r/${room}?name=${c.name}`, { waitUntil: "domcontentloaded" });

    const seeEachOther = (snaps, group) =>
      group.every((u, i) => {
        const s = snaps[i];
        const others = group.filter((o) => o !== u).map((o) => snaps[group.indexOf(o)].participantId);
        return (
          others.every((id) => id) &&
          others.every((id) => s.video[id] > 0 && s.audio[id] > 0 && s.remoteTiles.includes(id)) &&
          s.remoteTiles.length === group.length - 1
        );
      });

    let snaps;
    try {
      await waitFor(
        async () => {
          snaps = await Promise.all([a, b].map((u) => u.page.evaluate(pageSnapshot)));
          return seeEachOther(snaps, [a, b]);
        },
        { timeoutMs: MEDIA_TIMEOUT_MS, intervalMs: 50, message: `${a.name} and ${b.name} to decode each other` },
      );
    } catch (err) {
      for (const [i, s] of (snaps || []).entries()) log(`${users[i].name}: ${JSON.stringify(s)}`);
      throw err;
    }
    const cold = [a, b].map((u, i) => {
      const other = i === 0 ? b : a;
      const s = snaps[i];
      return s.firstFrame[snaps[1 - i].participantId] - Math.max(s.joinStartedAt, snaps[1 - i].joinStartedAt);
    });
    console.log(`COLD_AUTOJOIN_TO_FIRST_FRAME_MS (camera starting at join) ${a.name}=${cold[0]} ${b.name}=${cold[1]}`);

    // User3's preview is live: now it joins by clicking "Join".
    await c.page.waitForFunction(() => {
      const v = document.querySelector("#preview");
      return v && v.videoWidth > 0;
    }, null, { timeout: 10000 });
    const joinClickAt = await c.page.evaluate(() => {
      const t = Date.now();
      document.querySelector("#join").click();
      return t;
    });

    try {
      await waitFor(
        async () => {
          snaps = await Promise.all(users.map((u) => u.page.evaluate(pageSnapshot)));
          return seeEachOther(snaps, users);
        },
        { timeoutMs: MEDIA_TIMEOUT_MS, intervalMs: 50, message: "every page to decode video and receive audio from both others" },
      );
    } catch (err) {
      for (const [i, s] of (snaps || []).entries()) log(`${users[i].name}: ${JSON.stringify(s)}`);
      throw err;
    }
    users.forEach((u, i) => (u.id = snaps[i].participantId));
    log(`participants: ${users.map((u) => `${u.name}=${u.id}`).join(" ")}`);

    // Join (click) → first decoded frame, in both directions between User3 and each of the others.
    const joinMs = [];
    for (const o of [a, b]) {
      const mine = snaps[2].firstFrame[o.id] - joinClickAt;
      const theirs = snaps[users.indexOf(o)].firstFrame[c.id] - joinClickAt;
      joinMs.push(mine, theirs);
      console.log(`${c.name} joins: first frame of ${o.name} after ${mine} ms; ${o.name} sees ${c.name} after ${theirs} ms`);
    }
    console.log(`JOIN_TO_FIRST_FRAME_MS p50=${pct(joinMs, 50)} max=${Math.max(...joinMs)}`);

    // Metrics after a real call: media counted both ways, three sessions, three sockets.
    await sleep(1500); // the media plane exports its counters every second
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    const value = (name) => {
      const line = metrics.split("\n").find((l) => l.startsWith(name + " "));
      return line ? Number(line.split(" ").pop()) : NaN;
    };
    const labelled = (name, labels) => {
      const line = metrics.split("\n").find((l) => l.startsWith(`${name}{${labels}}`));
      return line ? Number(line.split(" ").pop()) : NaN;
    };
    const checks = {
      sessions: value("parley_sessions_active"),
      participants: value("parley_participants_active"),
      ws: value("parley_ws_connections_active"),
      videoIn: labelled("parley_rtp_packets_total", 'direction="in",kind="video"'),
      videoOut: labelled("parley_rtp_packets_total", 'direction="out",kind="video"'),
      audioIn: labelled("parley_rtp_packets_total", 'direction="in",kind="audio"'),
      audioOut: labelled("parley_rtp_packets_total", 'direction="out",kind="audio"'),
    };
    log(`metrics: ${JSON.stringify(checks)}`);
    if (checks.sessions !== 3 || checks.participants !== 3 || checks.ws < 3) throw new Error(`implausible gauges: ${JSON.stringify(checks)}`);
    for (const k of ["videoIn", "videoOut", "audioIn", "audioOut"]) {
      if (!(checks[k] > 50)) throw new Error(`implausible ${k}: ${JSON.stringify(checks)}`);
    }

    // Mute on page 1 shows on pages 2 and 3.
    const [u1, u2, u3] = users;
    await u1.page.getByRole("button", { name: "Mute", exact: true }).click();
    await u1.page.getByRole("button", { name: "Unmute", exact: true }).waitFor({ timeout: 2000 });
    for (const u of [u2, u3]) {
      try {
        await u.page.waitForSelector(`.tile[data-participant="${u1.id}"][data-muted="true"]`, { timeout: 5000 });
      } catch {
        throw new Error(`${u.name} did not show ${u1.name} (${u1.id}) as muted within 5 s`);
      }
    }
    log(`mute of ${u1.name} shown on ${u2.name} and ${u3.name}`);

    // A muted microphone sends nothing (the SDK takes the track off its sender); unmuting
    // brings the audio back without renegotiation.
    const audioOf = async (u, other) => (await u.page.evaluate(pageSnapshot)).audio[other.id] || 0;
    await sleep(500); // packets already on their way
    const mutedAt = await audioOf(u2, u1);
    await sleep(1500);
    const whileMuted = (await audioOf(u2, u1)) - mutedAt;
    if (whileMuted > 5) throw new Error(`${u2.name} got ${whileMuted} audio packets of ${u1.name} in 1.5 s of mute`);
    // Unmuted through the client (what the button calls), to time it without the click's own
    // latency in a busy browser.
    const unmuteNow = (u) => u.page.evaluate(() => {
      const t = Date.now();
      window.parley.client.setMuted({ audio: false });
      return t;
    });
    const unmute1At = await unmuteNow(u1);
    await u1.page.getByRole("button", { name: "Mute", exact: true }).waitFor({ timeout: 2000 });
    await waitFor(async () => (await audioOf(u2, u1)) > mutedAt + whileMuted, { timeoutMs: 5000, intervalMs: 20, message: "audio after unmute" });
    console.log(`UNMUTE_TO_AUDIO_MS ${Date.now() - unmute1At} (a track already offered)`);
    await waitFor(async () => (await audioOf(u2, u1)) > mutedAt + whileMuted + 25, {
      timeoutMs: 5000,
      intervalMs: 100,
      message: `${u2.name} to receive ${u1.name}'s audio again after the unmute`,
    });
    log(`${u2.name} got ${whileMuted} audio packets of ${u1.name} in 1.5 s of mute, and audio again after the unmute`);

    // Camera off on page 2 shows on pages 1 and 3; camera on again clears it.
    await u2.page.getByRole("button", { name: "Camera off", exact: true }).click();
    await u2.page.getByRole("button", { name: "Camera on", exact: true }).waitFor({ timeout: 2000 });
    for (const u of [u1, u3]) {
      await u.page.waitForSelector(`.tile[data-participant="${u2.id}"][data-video-off="true"]`, { timeout: 5000 });
    }
    await u2.page.getByRole("button", { name: "Camera on", exact: true }).click();
    for (const u of [u1, u3]) {
      await u.page.waitForSelector(`.tile[data-participant="${u2.id}"][data-video-off="false"]`, { timeout: 5000 });
    }
    log(`camera off/on of ${u2.name} shown on ${u1.name} and ${u3.name}`);

    // Page 3 leaves: pages 1 and 2 drop its tile and keep decoding each other.
    await u3.page.getByRole("button", { name: "Leave", exact: true }).click();
    for (const u of [u1, u2]) {
      try {
        await u.page.waitForSelector(`.tile[data-participant="${u3.id}"]`, { state: "detached", timeout: 5000 });
      } catch {
        throw new Error(`${u.name} still shows ${u3.name} (${u3.id}) 5 s after it left`);
      }
    }
    log(`${u3.name} left; its tile is gone on ${u1.name} and ${u2.name}`);

    const framesOf = async (u, other) => (await u.page.evaluate(pageSnapshot)).video[other.id] || 0;
    const before = [await framesOf(u1, u2), await framesOf(u2, u1)];
    await waitFor(
      async () => (await framesOf(u1, u2)) > before[0] + 5 && (await framesOf(u2, u1)) > before[1] + 5,
      { timeoutMs: 5000, intervalMs: 200, message: `${u1.name} and ${u2.name} to keep decoding each other's video after ${u3.name} left` },
    );
    const after = [await framesOf(u1, u2), await framesOf(u2, u1)];
    log(`after leave: ${u1.name} decoded ${before[0]}→${after[0]} frames of ${u2.name}, ${u2.name} ${before[1]}→${after[1]} of ${u1.name}`);

    // RTCP reports have come in (every 5 s): loss, round-trip time and jitter histograms.
    await waitFor(
      async () => {
        const text = await (await fetch(`${server.url}/metrics`)).text();
        const count = (name) => Number((text.split("\n").find((l) => l.startsWith(`${name}_count `)) || " 0").split(" ").pop());
        return ["parley_rtcp_loss_ratio", "parley_rtcp_rtt_seconds", "parley_rtcp_jitter_seconds"].every((n) => count(n) > 0);
      },
      { timeoutMs: 12000, intervalMs: 500, message: "RTCP loss/RTT/jitter samples in /metrics" },
    );
    log("RTCP loss, RTT and jitter histograms have samples");

    // User4 joins with the microphone muted: the others see its video, and are offered no audio
    // track of it (nothing was sent) until it unmutes; then they hear it.
    const d = { name: "User4", id: null };
    d.context = await browser.newContext();
    d.page = await d.context.newPage();
    d.page.on("console", (m) => consoleLines.push(`[${d.name}] ${m.type()}: ${m.text()}`));
    await d.page.addInitScript(installFrameWatcher);
    users.push(d);
    await d.page.goto(`${server.url}/r/${room}?name=${d.name}&autojoin=1&muted=1`, { waitUntil: "domcontentloaded" });
    await waitFor(
      async () => {
        d.id = (await d.page.evaluate(pageSnapshot)).participantId;
        if (!d.id) return false;
        const s = await Promise.all([u1, u2].map((u) => u.page.evaluate(pageSnapshot)));
        const dSnap = await d.page.evaluate(pageSnapshot);
        return s.every((x) => x.video[d.id] > 0) && [u1, u2].every((u) => dSnap.audio[u.id] > 0);
      },
      { timeoutMs: MEDIA_TIMEOUT_MS, intervalMs: 100, message: `${d.name} (muted) and the others to exchange video, and ${d.name} to hear them` },
    );
    const audioTracksOf = (u, id) =>
      u.page.evaluate((pid) => [...window.parley.client.remoteTracks.values()].filter((i) => i.participantId === pid && i.track.kind === "audio").length, id);
    await sleep(1000);
    for (const u of [u1, u2]) {
      const n = await audioTracksOf(u, d.id);
      if (n !== 0) throw new Error(`${u.name} was offered ${n} audio track(s) of ${d.name}, who joined muted and sent none`);
      if ((await audioOf(u, d)) !== 0) throw new Error(`${u.name} received audio of ${d.name}, who joined muted`);
    }
    await d.page.getByRole("button", { name: "Unmute", exact: true }).waitFor({ timeout: 2000 });
    const unmuteAt = await unmuteNow(d);
    await waitFor(async () => (await audioOf(u1, d)) > 0 && (await audioOf(u2, d)) > 0, {
      timeoutMs: 5000,
      intervalMs: 20,
      message: `${u1.name} and ${u2.name} to hear ${d.name} after its first unmute`,
    });
    const firstAudioMs = Date.now() - unmuteAt;
    await waitFor(async () => (await audioOf(u1, d)) > 25 && (await audioOf(u2, d)) > 25, {
      timeoutMs: 5000,
      intervalMs: 50,
      message: `${u1.name} and ${u2.name} to keep hearing ${d.name} after its first unmute`,
    });
    log(`${d.name} joined muted: no audio track offered to the others; after its first unmute both hear it`);
    console.log(`FIRST_UNMUTE_TO_AUDIO_MS ${firstAudioMs} (the track's first offer to the others included)`);
  },
  async onFailure() {
    if (consoleLines.length) {
      console.error("\n--- browser console (last 60 lines) ---");
      console.error(consoleLines.slice(-60).join("\n"));
    }
    if (server) {
      console.error(`\n--- server log tail (${server.logFile}) ---`);
      console.error(server.logTail(80));
      if (server.exited) console.error(`server exited: ${JSON.stringify(server.exited)}`);
    }
  },
  async cleanup() {
    if (browser) await browser.close().catch(() => {});
    if (server) await server.stop();
  },
});
