// Shared pieces of the end-to-end tests: the Parley server process, Debian's Chromium, cleanup.
import { spawn } from "node:child_process";
import { createWriteStream, existsSync, readFileSync, writeFileSync } from "node:fs";
import { createServer as createHttpServer, request as httpRequest } from "node:http";
import { connect as tcpConnect, createServer as createTcpServer } from "node:net";
import { createSocket } from "node:dgram";
import { dirname, extname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "../..");

export const CHROMIUM_ARGS = [
  "--use-fake-device-for-media-stream",
  "--use-fake-ui-for-media-stream",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--autoplay-policy=no-user-gesture-required",
];

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function log(...args) {
  console.log(`[e2e ${new Date().toISOString().slice(11, 23)}]`, ...args);
}

export function freeTcpPort() {
  return new Promise((res, rej) => {
    const s = createTcpServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

export function freeUdpPort() {
  return new Promise((res, rej) => {
    const s = createSocket("udp4");
    s.once("error", rej);
    s.bind(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

/** Whether a TCP listener can take `port` on every address. */
function tcpPortFree(port) {
  return new Promise((res) => {
    const s = createTcpServer();
    s.once("error", () => res(false));
    s.listen(port, () => s.close(() => res(true)));
  });
}

/**
 * A port free for UDP and for TCP: the media port also takes ICE-TCP, and coturn listens on both.
 * A free UDP port can be some TCP connection's ephemeral port (it failed a test run once).
 */
export async function freeMediaPort() {
  for (let i = 0; i < 50; i++) {
    const port = await freeUdpPort();
    if (await tcpPortFree(port)) return port;
  }
  throw new Error("no port free for both UDP and TCP");
}

/** Starts `parley serve` on free ports and waits for /healthz. */
export async function startServer({ logFile = join(repoRoot, "tests/e2e/server.log"), timeoutMs = 20000, extraArgs = [], scheme = "http", publicIp = "127.0.0.1", httpBind = "127.0.0.1" } = {}) {
  const bin = resolve(repoRoot, process.env.PARLEY_BIN || "target/release/parley");
  if (!existsSync(bin)) {
    throw new Error(`server binary not found at ${bin}: build it (cargo build --release) or set PARLEY_BIN`);
  }
  const httpPort = await freeTcpPort();
  const rtcPort = await freeMediaPort();
  const args = ["serve", "--http", `${httpBind}:${httpPort}`, "--rtc-port", String(rtcPort), ...(publicIp ? ["--public-ip", publicIp] : []), ...extraArgs];
  log(`starting ${bin} ${args.join(" ")} (log: ${logFile})`);
  const out = createWriteStream(logFile);
  const proc = spawn(bin, args, {
    cwd: repoRoot,
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "info" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  proc.stdout.pipe(out, { end: false });
  proc.stderr.pipe(out, { end: false });
  let exited = null;
  proc.on("exit", (code, signal) => {
    exited = { code, signal };
  });
  const server = {
    proc,
    url: `${scheme}://127.0.0.1:${httpPort}`,
    httpPort,
    rtcPort,
    logFile,
    get exited() {
      return exited;
    },
    logTail(lines = 80) {
      try {
        return readFileSync(logFile, "utf8").split("\n").slice(-lines).join("\n");
      } catch {
        return "(no server log)";
      }
    },
    async stop() {
      if (exited) return;
      proc.kill("SIGTERM");
      for (let i = 0; i < 30 && !exited; i++) await sleep(100);
      if (!exited) proc.kill("SIGKILL");
      for (let i = 0; i < 20 && !exited; i++) await sleep(50);
    },
  };
  process.on("exit", () => {
    if (!exited) proc.kill("SIGKILL");
  });
  const end = Date.now() + timeoutMs;
  while (true) {
    if (exited) throw new Error(`server exited during startup (${JSON.stringify(exited)})`);
    try {
      const r = await fetch(`${server.url}/healthz`);
      if (r.status === 200) break;
    } catch {}
    if (Date.now() > end) {
      await server.stop();
      throw new Error(`server did not answer GET /healthz with 200 within ${timeoutMs} ms`);
    }
    await sleep(100);
  }
  log(`server up at ${server.url} (rtc udp ${rtcPort})`);
  if (process.env.PARLEY_E2E_WEB === "disk") {
    // The binary embeds web/ at build time; this serves the working tree's web/ in front of it.
    if (scheme !== "http") {
      log("PARLEY_E2E_WEB=disk: only plain http is fronted; this test uses the embedded web/");
    } else {
      const front = await startWebFront(httpPort);
      server.url = front.url;
      const stop = server.stop;
      server.stop = async () => {
        await front.stop();
        await stop();
      };
      log(`PARLEY_E2E_WEB=disk: web/ from the working tree at ${front.url}, the rest proxied to ${httpPort}`);
    }
  }
  return server;
}

const MIME = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" };

/** The file of web/ the server serves at path `p`, "" for /healthz, null for anything else. */
function webRoute(p) {
  if (p === "/" || /^\/r\/[^/]*\/?$/.test(p)) return "web/app/index.html";
  if (/^\/u\/[^/]*\/?$/.test(p)) return "web/app/call.html";
  if (p === "/diag") return "web/app/diag.html";
  if (/^\/(app|sdk)\/[a-z]+\.(js|css)$/.test(p)) return `web${p}`;
  if (p === "/healthz") return "";
  return null;
}

/**
 * With PARLEY_E2E_WEB=disk: an HTTP front that serves the working tree's web/ and passes
 * everything else (the /ws upgrade included) to the server on `backendPort`, so web changes can
 * be tested without rebuilding the binary.
 */
async function startWebFront(backendPort) {
  const sockets = new Set();
  const srv = createHttpServer((req, res) => {
    const file = webRoute(new URL(req.url, "http://x").pathname);
    if (file) {
      res.writeHead(200, { "content-type": `${MIME[extname(file)]}; charset=utf-8`, "cache-control": "no-cache" });
      res.end(readFileSync(join(repoRoot, file)));
      return;
    }
    const up = httpRequest({ host: "127.0.0.1", port: backendPort, method: req.method, path: req.url, headers: req.headers }, (r) => {
      res.writeHead(r.statusCode, r.headers);
      r.pipe(res);
    });
    up.on("error", () => res.destroy());
    req.pipe(up);
  });
  srv.on("upgrade", (req, socket, head) => {
    const up = tcpConnect(backendPort, "127.0.0.1", () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
      up.write(lines.join("\r\n") + "\r\n\r\n");
      if (head && head.length) up.write(head);
      up.pipe(socket);
      socket.pipe(up);
    });
    for (const s of [socket, up]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
    }
    // Either side closing (or failing) closes the other: a dropped WebSocket must look dropped.
    const end = () => {
      socket.destroy();
      up.destroy();
    };
    up.on("error", end);
    socket.on("error", end);
    up.on("close", end);
    socket.on("close", end);
  });
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${srv.address().port}`,
    stop: () =>
      new Promise((r) => {
        for (const s of sockets) s.destroy();
        srv.closeAllConnections?.();
        srv.close(() => r());
      }),
  };
}

/**
 * Serves web/ with the server's routes (no WebSocket). For testing the UI without the server:
 * `node denied.mjs --static`.
 */
export async function startStaticServer() {
  const route = webRoute;
  const srv = createHttpServer((req, res) => {
    const file = route(new URL(req.url, "http://x").pathname);
    if (file === null) {
      res.writeHead(404).end("not found");
    } else if (file === "") {
      res.writeHead(200).end("ok");
    } else {
      res.writeHead(200, { "content-type": `${MIME[extname(file)]}; charset=utf-8` });
      res.end(readFileSync(join(repoRoot, file)));
    }
  });
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  const { port } = srv.address();
  return {
    url: `http://127.0.0.1:${port}`,
    logTail: () => "(static server, no log)",
    stop: () => new Promise((r) => srv.close(() => r())),
  };
}

/**
 * Starts Debian's coturn (`turnserver`) on 127.0.0.1:`port` with `use-auth-secret` (the TURN
 * REST credentials Parley hands out with `--turn-secret`); relays on 127.0.0.1, loopback peers
 * allowed. Returns the process; kill it with SIGKILL when done.
 */
export async function startCoturn({ port, secret, logFile = join(repoRoot, "tests/e2e/coturn.log") }) {
  const out = createWriteStream(logFile);
  const proc = spawn(
    "turnserver",
    [
      "-n", "--listening-ip=127.0.0.1", `--listening-port=${port}`, "--relay-ip=127.0.0.1",
      "--min-port=49160", "--max-port=49400", "--use-auth-secret", `--static-auth-secret=${secret}`,
      "--realm=parley.test", "--allow-loopback-peers", "--no-cli", "--no-tls", "--no-dtls",
      "--log-file=stdout", "--simple-log",
    ],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  proc.stdout.pipe(out);
  proc.stderr.pipe(out);
  process.on("exit", () => {
    if (proc.exitCode === null) proc.kill("SIGKILL");
  });
  await sleep(800);
  if (proc.exitCode !== null) throw new Error(`coturn exited at once (see ${logFile})`);
  return proc;
}

/** Launches Debian's Chromium (never a downloaded browser). */
export async function launchChromium({ args = CHROMIUM_ARGS } = {}) {
  const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
  if (!existsSync(executablePath)) {
    throw new Error(`Chromium not found at ${executablePath}: apt-get install chromium, or set CHROMIUM`);
  }
  return chromium.launch({ executablePath, headless: true, args });
}

/**
 * Runs `body` with a hard deadline; always runs `cleanup`; exits the process 0 or 1.
 * `onFailure` may print diagnostics (server log tail, browser console).
 */
export async function runTest(name, { timeoutMs, body, cleanup, onFailure }) {
  let finished = false;
  const finish = async (err) => {
    if (finished) return;
    finished = true;
    if (err) {
      console.error(`\nFAIL ${name}: ${err && err.message ? err.message : err}`);
      try {
        await onFailure?.(err);
      } catch (e) {
        console.error("(diagnostics failed:", e, ")");
      }
    }
    try {
      await Promise.race([cleanup(), sleep(10000)]);
    } catch (e) {
      console.error("cleanup failed:", e);
    }
    if (!err) console.log(`\nPASS ${name}\n1 passed, 0 failed`);
    else console.log("0 passed, 1 failed");
    process.exit(err ? 1 : 0);
  };
  const timer = setTimeout(() => finish(new Error(`total timeout of ${timeoutMs / 1000} s exceeded`)), timeoutMs);
  for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => finish(new Error(`interrupted (${sig})`)));
  try {
    await body();
    clearTimeout(timer);
    await finish(null);
  } catch (err) {
    clearTimeout(timer);
    await finish(err);
  }
}

/** Polls `fn` until it returns a truthy value or `timeoutMs` passes; then throws `message`. */
export async function waitFor(fn, { timeoutMs = 5000, intervalMs = 50, message = "condition" } = {}) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last) return last;
    await sleep(intervalMs);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${message}`);
}

/** Prints what helps to understand a failure: the browser console and the server log. */
export function reportFailure(consoleLines, server, lines = 40) {
  if (consoleLines.length) console.error(consoleLines.slice(-lines).join("\n"));
  if (server) console.error(server.logTail(lines));
}

/** Closes the browsers and stops the server, whatever state they are in. */
export async function closeAll(browsers, server) {
  for (const b of browsers) if (b) await b.close().catch(() => {});
  if (server) await server.stop();
}

/** A mono 16-bit 48 kHz WAV file: a 440 Hz tone at `amplitude` (0 = silence). */
export function wav(path, amplitude, seconds = 5) {
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


/** In a page: video frames decoded so far from participant `pid` (pass to page.evaluate). */
export function videoFramesFrom(pid) {
  return window.parley.client.pc.getStats().then((stats) => {
    let frames = 0;
    stats.forEach((s) => {
      if (s.type !== "inbound-rtp" || s.kind !== "video") return;
      for (const [id, info] of window.parley.client.remoteTracks) {
        if (id === s.trackIdentifier && info.participantId === pid) frames = Math.max(frames, s.framesDecoded || 0);
      }
    });
    return frames;
  });
}

/**
 * In a page: decoded video frames, and the local candidate of the selected pair (its type —
 * host, srflx, relay — and protocol) of `window.parley.client.pc` (pass to page.evaluate).
 */
export function selectedPath() {
  return window.parley.client.pc.getStats().then((stats) => {
    let frames = 0;
    let pairId = null;
    stats.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") frames += s.framesDecoded || 0;
      if (s.type === "transport" && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
    });
    const pair = pairId && stats.get(pairId);
    const local = pair && stats.get(pair.localCandidateId);
    return { frames, protocol: local ? local.protocol : null, type: local ? local.candidateType : null };
  });
}

/**
 * Starts a dedicated media node (`parley media`) on free loopback ports that dials
 * `signalingHttpPort`'s /media-node with `secret`, and waits for its /healthz. Returns
 * `{proc, id, httpPort, rtcPort, metricsUrl, exited, logTail(), kill(signal), stop()}`;
 * `kill("SIGKILL")` ends it at once (as a crashed machine would), `stop()` SIGTERM then SIGKILL.
 */
export async function startMediaNode({ signalingHttpPort, secret, id, logFile = join(repoRoot, `tests/e2e/media-${id}.log`), timeoutMs = 20000 }) {
  const bin = resolve(repoRoot, process.env.PARLEY_BIN || "target/release/parley");
  const httpPort = await freeTcpPort();
  const rtcPort = await freeMediaPort();
  const args = [
    "media", "--signaling-url", `ws://127.0.0.1:${signalingHttpPort}/media-node`, "--node-secret", secret,
    "--node-id", id, "--http", `127.0.0.1:${httpPort}`, "--rtc-port", String(rtcPort), "--rtc-bind", "127.0.0.1",
    "--public-ip", "127.0.0.1",
  ];
  log(`starting media node ${id}: ${bin} ${args.map((a) => (a === secret ? "***" : a)).join(" ")} (log: ${logFile})`);
  const out = createWriteStream(logFile);
  const env = { ...process.env, RUST_LOG: process.env.RUST_LOG || "info" };
  delete env.PARLEY_CONFIG;
  const proc = spawn(bin, args, { cwd: repoRoot, env, stdio: ["ignore", "pipe", "pipe"] });
  proc.stdout.pipe(out, { end: false });
  proc.stderr.pipe(out, { end: false });
  let exited = null;
  proc.on("exit", (code, signal) => {
    exited = { code, signal };
  });
  process.on("exit", () => {
    if (!exited) proc.kill("SIGKILL");
  });
  const node = {
    proc,
    id,
    httpPort,
    rtcPort,
    logFile,
    metricsUrl: `http://127.0.0.1:${httpPort}/metrics`,
    get exited() {
      return exited;
    },
    logTail(lines = 40) {
      try {
        return readFileSync(logFile, "utf8").split("\n").slice(-lines).join("\n");
      } catch {
        return "(no media node log)";
      }
    },
    kill(signal = "SIGKILL") {
      if (!exited) proc.kill(signal);
    },
    async stop() {
      if (exited) return;
      proc.kill("SIGTERM");
      for (let i = 0; i < 30 && !exited; i++) await sleep(100);
      if (!exited) proc.kill("SIGKILL");
      for (let i = 0; i < 20 && !exited; i++) await sleep(50);
    },
  };
  const end = Date.now() + timeoutMs;
  while (true) {
    if (exited) throw new Error(`media node ${id} exited during startup (${JSON.stringify(exited)}); see ${logFile}`);
    try {
      const r = await fetch(`http://127.0.0.1:${httpPort}/healthz`);
      if (r.status === 200) break;
    } catch {}
    if (Date.now() > end) {
      await node.stop();
      throw new Error(`media node ${id} did not answer GET /healthz with 200 within ${timeoutMs} ms`);
    }
    await sleep(100);
  }
  log(`media node ${id} up (http ${httpPort}, rtc udp ${rtcPort})`);
  return node;
}

/** Fetches a Prometheus text page; `value(name)` is the first sample named exactly `name` (with labels), NaN if none. */
export async function scrapeMetrics(url) {
  const text = await (await fetch(url)).text();
  const lines = text.split("\n");
  return {
    text,
    value(name) {
      const line = lines.find((l) => l.startsWith(name + " "));
      return line ? Number(line.split(" ").pop()) : NaN;
    },
  };
}
