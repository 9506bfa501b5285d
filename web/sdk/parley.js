// Parley browser SDK: signaling (docs/protocol.md) and the one PeerConnection of a participant.
// A plain ES module with no dependencies and no build step. See README.md beside this file.

const ROOM_RE = /^[A-Za-z0-9._-]{1,64}$/;
const RECONNECT_MIN_MS = 250;
const RECONNECT_MAX_MS = 5000;
// The protocol asks for an acknowledgement at least every second while receiving; acknowledging
// sooner lets the server drop its resend buffer sooner.
const ACK_DELAY_MS = 200;
const PING_INTERVAL_MS = 5000;
// No frame at all (not even a pong) for this long means the WebSocket is dead even if the
// browser has not noticed yet.
const DEAD_AFTER_MS = 15000;
const DISCONNECTED_RESTART_MS = 3000;
// Errors that refuse a join: retrying the same join cannot succeed.
const FATAL_JOIN_ERRORS = new Set(["invalid_room", "invalid_name", "room_full", "already_joined", "unauthorized", "draining"]);
// The subscriber's stream id of a screen share is `<participant id>.screen` (docs/protocol.md).
const SCREEN_SUFFIX = ".screen";
const SCREEN_MAX_BITRATE = 2_500_000;
// How many `view` sequence numbers to remember for matching `error` replies.
const VIEW_SEQS_KEPT = 64;

/**
 * The camera's simulcast encodings, low to high (docs/protocol.md, "Media and negotiation"):
 * Parley forwards one of them to each subscriber, by tile size and bandwidth.
 */
export const CAMERA_ENCODINGS = Object.freeze([
  Object.freeze({ rid: "q", scaleResolutionDownBy: 4, maxBitrate: 150_000 }),
  Object.freeze({ rid: "h", scaleResolutionDownBy: 2, maxBitrate: 500_000 }),
  Object.freeze({ rid: "f", maxBitrate: 1_500_000 }),
]);

/** Human-readable texts for error codes, for UIs that have nothing better to say. */
export const ERROR_MESSAGES = Object.freeze({
  room_full: "This room is full.",
  unauthorized: "This link's access token is missing, expired or not valid for this room. Ask for a new link.",
  draining: "This server is restarting and takes no new calls right now. Try again in a moment.",
  invalid_room:
    "Invalid room name. Use 1–64 characters: letters, digits, “-”, “_” or “.”.",
  invalid_name: "Invalid name. Use 1–64 characters.",
  permission_denied:
    "Camera and microphone access was denied. Allow access in your browser's site settings and reload.",
  no_device: "No camera or microphone found.",
  device_busy: "Your camera or microphone is in use by another application.",
  insecure_context: "Camera and microphone need a secure (https) connection.",
  media_error: "Could not start the camera or microphone.",
  rate_limited: "Too many messages; the connection was closed.",
  sdp_rejected: "The server refused the media description.",
  negotiation_failed: "Setting up the media connection failed.",
  screen_share_denied: "Screen sharing was cancelled or not allowed.",
  screen_share_unsupported: "This browser cannot share the screen.",
  screen_share_failed: "Could not start screen sharing.",
});

/** An error with a machine-readable `code` (a protocol error code or a media error code). */
export class ParleyError extends Error {
  constructor(code, message) {
    super(message || ERROR_MESSAGES[code] || code);
    this.name = "ParleyError";
    this.code = code;
  }
}

/** Whether `name` is a valid room name (1–64 characters from `A-Z a-z 0-9 - _ .`). */
export function isValidRoomName(name) {
  return typeof name === "string" && ROOM_RE.test(name);
}

/** Whether `name` is a valid display name (1–64 characters). */
export function isValidDisplayName(name) {
  if (typeof name !== "string") return false;
  const n = [...name].length;
  return n >= 1 && n <= 64;
}

function mediaError(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "SecurityError":
      return new ParleyError("permission_denied");
    case "NotFoundError":
    case "OverconstrainedError":
      return new ParleyError("no_device");
    case "NotReadableError":
    case "AbortError":
      return new ParleyError("device_busy");
    default: {
      const e = new ParleyError("media_error", `${ERROR_MESSAGES.media_error} (${err && (err.message || err.name)})`);
      e.cause = err;
      return e;
    }
  }
}

/**
 * Asks for the microphone and the camera. When one kind is missing (or busy), settles for the
 * other. Rejects with a ParleyError whose code is `permission_denied`, `no_device`,
 * `device_busy`, `insecure_context` or `media_error`.
 */
export async function getLocalMedia({ audio = true, video = true } = {}) {
  if (!globalThis.navigator || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new ParleyError("insecure_context");
  }
  const videoConstraints =
    video === true ? { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } } : video;
  const audioConstraints =
    audio === true ? { echoCancellation: true, noiseSuppression: true, autoGainControl: true } : audio;
  const attempts = [];
  if (audio && video) {
    attempts.push({ audio: audioConstraints, video: videoConstraints });
    attempts.push({ audio: audioConstraints, video: false });
    attempts.push({ audio: false, video: videoConstraints });
  } else if (audio || video) {
    attempts.push({ audio: audio ? audioConstraints : false, video: video ? videoConstraints : false });
  } else {
    return new MediaStream();
  }
  let first;
  for (const constraints of attempts) {
    try {
      return await navigator.mediaDevices.getUserMedia(constraints);
    } catch (err) {
      first = first || err;
      // Only a missing or busy device is worth a second try with fewer kinds.
      if (!["NotFoundError", "OverconstrainedError", "NotReadableError"].includes(err && err.name)) {
        throw mediaError(err);
      }
    }
  }
  throw mediaError(first);
}

function screenShareError(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "SecurityError":
    case "AbortError":
      return new ParleyError("screen_share_denied");
    case "NotSupportedError":
      return new ParleyError("screen_share_unsupported");
    default: {
      const e = new ParleyError("screen_share_failed", `${ERROR_MESSAGES.screen_share_failed} (${err && (err.message || err.name)})`);
      e.cause = err;
      return e;
    }
  }
}

/** Splits a remote stream id into participant id and source (`<id>.screen` is a screen share). */
function sourceOfStream(streamId, kind) {
  if (typeof streamId === "string" && streamId.length > SCREEN_SUFFIX.length && streamId.endsWith(SCREEN_SUFFIX)) {
    return { participantId: streamId.slice(0, -SCREEN_SUFFIX.length), source: "screen" };
  }
  return { participantId: streamId, source: kind === "audio" ? "mic" : "camera" };
}

function viewTileFromApp(t) {
  const size = (v) => Math.max(0, Math.round(Number(v) || 0));
  return { id: String(t.id), source: t.source === "screen" ? "screen" : "camera", width: size(t.width), height: size(t.height) };
}

function participantFromWire(p) {
  return {
    id: String(p.id),
    name: typeof p.name === "string" ? p.name : "",
    audioMuted: !!p.audio_muted,
    videoMuted: !!p.video_muted,
    speaking: !!p.speaking,
  };
}

function defaultUrl() {
  if (typeof location === "undefined") throw new ParleyError("bad_url", "A Parley client needs a `url` outside a page");
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
}

/**
 * The signaling connection of docs/protocol.md without the room: one WebSocket at a time, `seq`
 * on every reliable message, `ack`s, dropping of duplicates, resending after `resume`, `ping`s,
 * and reconnection with backoff. `ParleyClient` (a room) and `CallClient` (calls.js, a device
 * of a user) are built on it.
 *
 * A subclass implements:
 * - `_startSession()`: called on an open socket when there is no session to resume (also after
 *   `resume_failed`); calls `this._resetSession()` and sends the session's first reliable
 *   message (`join`, `register`), whose reply sets `this.session`;
 * - `_handle(msg)`: every incoming message except `resumed`, `resume_failed`, `ack`, `pong`;
 * and may override `_onResumed()`, `_onResumeFailed(msg)` (default: emit `resumefailed`, then
 * `_startSession()`) and `_teardown()` (a terminal failure: release media).
 *
 * Events: `connectionstatechange` ({state}: connecting, connected, reconnecting, failed,
 * closed), `resumefailed` ({message}), `error` (from subclasses).
 */
export class ReliableSocket extends EventTarget {
  /**
   * @param {object} opts
   * @param {string} [opts.url] signaling URL, default `ws(s)://<this host>/ws`
   * @param {string|null} [opts.token] access token
   * @param {number} [opts.reconnectMinMs] first reconnection delay (250 ms)
   * @param {number} [opts.reconnectMaxMs] longest reconnection delay (5 s)
   */
  constructor({ url, token = null, reconnectMinMs, reconnectMaxMs } = {}) {
    super();
    /** Access token (`?token=` on links), required when the server has API keys. */
    this.token = token;
    this.url = url || defaultUrl();
    /** Session token (from `joined`/`registered`), used to resume. */
    this.session = null;
    /** "new" | "connecting" | "connected" | "reconnecting" | "failed" | "closed" */
    this.connectionState = "new";
    this._minDelay = reconnectMinMs ?? RECONNECT_MIN_MS;
    this._maxDelay = reconnectMaxMs ?? RECONNECT_MAX_MS;
    this._backoff = this._minDelay;
    this._ws = null;
    this._live = false; // may reliable messages be written to the socket now?
    this._closed = false;
    this._outSeq = 0;
    this._lastIn = 0;
    this._ackSent = 0;
    this._unacked = [];
    this._timers = { reconnect: 0, ack: 0, ping: 0 };
    this._lastRx = 0;
    this._onOnline = () => {
      if (!this._ws && !this._closed && this.connectionState === "reconnecting") this._connect();
    };
  }

  /** `client.on("name", (detail) => …)`; returns a function that unsubscribes. */
  on(type, fn) {
    const listener = (ev) => fn(ev.detail, ev);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  // ---- hooks for subclasses ----------------------------------------------------------------

  _startSession() {
    throw new Error("ReliableSocket subclasses implement _startSession()");
  }

  _handle(_msg) {}

  _onResumed() {}

  _onResumeFailed(msg) {
    this._emit("resumefailed", { message: msg.message || "" });
    // The server forgot us: start afresh on this socket (a new socket if it closes).
    this._startSession();
  }

  _teardown() {}

  // ---- connection --------------------------------------------------------------------------

  /** Reconnect at once when the browser comes back online. */
  _listenOnline() {
    if (typeof window !== "undefined") window.addEventListener("online", this._onOnline);
  }

  _connect() {
    clearTimeout(this._timers.reconnect);
    if (this._closed) return;
    if (this.connectionState !== "reconnecting") this._setState("connecting");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this._emitError("bad_url", String(err && err.message));
      this._fail();
      return;
    }
    this._ws = ws;
    this._live = false;
    ws.onopen = () => {
      if (ws !== this._ws) return;
      this._lastRx = Date.now();
      this._startPing();
      if (this.session) {
        this._writeRaw({ type: "resume", session: this.session, ack: this._lastIn });
      } else {
        this._startSession();
      }
    };
    ws.onmessage = (ev) => {
      if (ws !== this._ws) return;
      this._onFrame(ev.data);
    };
    ws.onclose = () => {
      if (ws !== this._ws) return;
      this._onDrop();
    };
    ws.onerror = () => {}; // a close event follows
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
  }

  _onDrop() {
    const ws = this._ws;
    if (ws) this._detach(ws);
    this._ws = null;
    this._live = false;
    clearInterval(this._timers.ping);
    clearTimeout(this._timers.ack);
    this._timers.ack = 0;
    if (this._closed || this.connectionState === "failed") return;
    this._setState("reconnecting");
    const delay = this._backoff;
    this._backoff = Math.min(this._backoff * 2, this._maxDelay);
    this._timers.reconnect = setTimeout(() => this._connect(), delay);
  }

  /** Forces a reconnection (as after a network drop); mostly for tests. */
  _dropConnection() {
    const ws = this._ws;
    if (!ws) return;
    this._detach(ws);
    try {
      ws.close();
    } catch {}
    this._onDrop();
  }

  _startPing() {
    clearInterval(this._timers.ping);
    this._timers.ping = setInterval(() => {
      if (!this._ws) return;
      if (Date.now() - this._lastRx > DEAD_AFTER_MS) {
        this._dropConnection();
        return;
      }
      if (this._ws.readyState === WebSocket.OPEN) this._writeRaw({ type: "ping" });
    }, PING_INTERVAL_MS);
  }

  _stopTimers() {
    clearTimeout(this._timers.reconnect);
    clearTimeout(this._timers.ack);
    clearInterval(this._timers.ping);
    this._timers.ack = 0;
  }

  /** Closes the socket for good (`leave`, `close`): no more reconnection. */
  _shutdown(reason) {
    this._closed = true;
    this._stopTimers();
    if (typeof window !== "undefined") window.removeEventListener("online", this._onOnline);
    const ws = this._ws;
    this._ws = null;
    this._live = false;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(1000, reason);
      } catch {}
    }
  }

  /** A terminal failure (e.g. the join was refused): stop reconnecting. */
  _fail() {
    this._stopTimers();
    const ws = this._ws;
    this._ws = null;
    this._live = false;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(1000);
      } catch {}
    }
    this._teardown();
    this._setState("failed");
  }

  // ---- reliability -------------------------------------------------------------------------

  /** Fresh sequence numbers for a new session on the open socket. */
  _resetSession() {
    this.session = null;
    this._outSeq = 0;
    this._lastIn = 0;
    this._ackSent = 0;
    this._unacked = [];
    this._live = true;
  }

  /** Sends a reliable message (now, or after the next `resumed`); returns its `seq`. */
  _sendReliable(msg) {
    const m = { seq: ++this._outSeq, ...msg };
    this._unacked.push(m);
    if (this._live) this._write(m);
    return m.seq;
  }

  _write(m) {
    const frame = this._lastIn > 0 ? { ...m, ack: this._lastIn } : m;
    if (this._writeRaw(frame)) this._ackSent = this._lastIn;
  }

  _writeRaw(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  _scheduleAck() {
    if (this._timers.ack) return;
    this._timers.ack = setTimeout(() => {
      this._timers.ack = 0;
      if (this._lastIn > this._ackSent && this._ws) {
        if (this._writeRaw({ type: "ack", ack: this._lastIn })) this._ackSent = this._lastIn;
      }
    }, ACK_DELAY_MS);
  }

  _onAck(n) {
    while (this._unacked.length && this._unacked[0].seq <= n) this._unacked.shift();
  }

  _onFrame(data) {
    this._lastRx = Date.now();
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      console.warn("parley: ignoring a frame that is not JSON");
      return;
    }
    if (!msg || typeof msg !== "object" || typeof msg.type !== "string") return;
    if (typeof msg.ack === "number") this._onAck(msg.ack);
    if (typeof msg.seq === "number") {
      this._scheduleAck();
      if (msg.seq <= this._lastIn) return; // a resent message already processed
      this._lastIn = msg.seq;
    }
    try {
      switch (msg.type) {
        case "resumed":
          this._live = true;
          for (const m of this._unacked) this._write(m);
          this._backoff = this._minDelay;
          this._setState("connected");
          this._onResumed(msg);
          return;
        case "resume_failed":
          this._onResumeFailed(msg);
          return;
        case "ack":
        case "pong":
          return;
        default:
          this._handle(msg);
      }
    } catch (err) {
      console.error("parley: handling", msg.type, err);
    }
  }

  // ---- events ------------------------------------------------------------------------------

  _setState(state) {
    if (this.connectionState === state) return;
    this.connectionState = state;
    this._emit("connectionstatechange", { state });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _emitError(code, message) {
    this._emit("error", { code, message: message || ERROR_MESSAGES[code] || code, serverMessage: "", inReplyTo: null });
  }
}

/**
 * One participant's connection to a Parley room: the signaling WebSocket (with sequence numbers,
 * acknowledgements, resume and reconnection) and one RTCPeerConnection.
 *
 * Events (CustomEvent, payload in `event.detail`; `client.on(name, fn)` passes the detail):
 * connectionstatechange, joined, participantjoined, participantleft, mute, speaking,
 * dominantspeaker, videopaused, layers, track, trackremoved, screensharechange,
 * mediastatechange, peerconnection, error, left.
 */
/**
 * The STUN/TURN servers Parley hands this client (TURN with short-lived credentials), from
 * `GET /ice-servers` next to the WebSocket URL. Resolves to [] on any failure, within 2 s.
 */
export async function fetchIceServers(wsUrl, token) {
  try {
    const u = new URL(wsUrl);
    u.protocol = u.protocol === "wss:" ? "https:" : "http:";
    u.pathname = "/ice-servers";
    u.search = token ? `?token=${encodeURIComponent(token)}` : "";
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 2000);
    const r = await fetch(u, { signal: ctl.signal });
    clearTimeout(timer);
    if (!r.ok) return [];
    const servers = await r.json();
    return Array.isArray(servers) ? servers : [];
  } catch {
    return [];
  }
}

export class ParleyClient extends ReliableSocket {
  /**
   * @param {object} opts
   * @param {string} opts.room room name
   * @param {string} opts.name display name
   * @param {string} [opts.url] signaling URL, default `ws(s)://<this host>/ws`
   * @param {MediaStream|null} [opts.localStream] microphone/camera to send; can be set later
   *   with setLocalStream() (until then the client joins and negotiates without sending media)
   * @param {RTCIceServer[]} [opts.iceServers] added to those the server hands out
   * @param {"all"|"relay"} [opts.iceTransportPolicy] "relay": media only through TURN
   * @param {number} [opts.reconnectMinMs] first reconnection delay (250 ms)
   * @param {number} [opts.reconnectMaxMs] longest reconnection delay (5 s)
   */
  constructor({ room, name, url, token = null, localStream = null, iceServers = [], iceTransportPolicy = "all", reconnectMinMs, reconnectMaxMs } = {}) {
    super({ url, token, reconnectMinMs, reconnectMaxMs });
    this.room = room;
    this.name = name;
    this.iceServers = iceServers;
    this.iceTransportPolicy = iceTransportPolicy;
    /** Servers from `GET /ice-servers` (TURN credentials), once fetched. */
    this._fetchedIceServers = null;
    /** The local MediaStream being sent, or null. */
    this.localStream = localStream;
    /** The current RTCPeerConnection (replaced when a session is started afresh). */
    this.pc = null;
    /** Own participant id, once joined. */
    this.participantId = null;
    /** Remote participants: id → {id, name, audioMuted, videoMuted, speaking}. */
    this.participants = new Map();
    /** Remote tracks: track id → {participantId, source, track, stream, mid}. */
    this.remoteTracks = new Map();
    /** The PeerConnection's connectionState, mirrored. */
    this.mediaState = "new";
    /** Own mute state (true = muted). */
    this.muted = { audio: false, video: false };
    /** The participant id of the dominant speaker (from `dominant_speaker`), or null. */
    this.dominantSpeaker = null;
    /** The screen-share track being sent, or null. */
    this.screenTrack = null;

    this._joinSeq = 0;
    this._joinMuted = null; // the mute state the last `join` carried
    this._joinWaiters = [];
    this._timers.disconnected = 0;
    this._sdpChain = Promise.resolve();
    this._makingOffer = false;
    this._offerQueued = false;
    this._needOffer = false;
    this._sessionOffered = false;
    this._transceivers = { audio: null, video: null };
    // Every transceiver ever used for a screen share on this PeerConnection (a stopped share
    // leaves its transceiver inactive; a new share gets a new one). Their mids go in `tracks`.
    this._screenTransceivers = [];
    this._layers = new Map(); // mid → rids Parley asked for (`layers`)
    this._layerChain = Promise.resolve();
    this._senderChain = Promise.resolve(); // replaceTrack calls of mute changes, in order
    this._view = null; // the last tiles passed to setView(), normalized
    this._viewSent = null; // JSON of the last `view` sent in this session
    this._viewSeqs = []; // seqs of the `view` messages sent, to recognize error replies
    this._viewUnsupported = false; // the server answered `unknown_type` to `view`
    this._onScreenEnded = (ev) => {
      if (ev.target === this.screenTrack) this.stopScreenShare().catch((err) => console.warn("parley: stopScreenShare", err));
    };
  }

  // ---- public API ----------------------------------------------------------------------------

  /**
   * Connects and joins the room. Resolves with the `joined` detail; rejects with a ParleyError
   * when the server refuses the join (room_full, invalid_room, invalid_name). While the server
   * cannot be reached it keeps retrying (and the promise stays pending).
   */
  join() {
    if (!isValidRoomName(this.room)) return Promise.reject(new ParleyError("invalid_room"));
    if (!isValidDisplayName(this.name)) return Promise.reject(new ParleyError("invalid_name"));
    if (this._closed) return Promise.reject(new ParleyError("closed", "This client has left; create a new one."));
    const p = new Promise((resolve, reject) => this._joinWaiters.push({ resolve, reject }));
    if (!this._ws && this.connectionState === "new") {
      this._listenOnline();
      this._createPc();
      // STUN/TURN servers (TURN with short-lived credentials) come from the server over HTTP,
      // fetched while the WebSocket connects; gathering starts only after they are in.
      const ice = fetchIceServers(this.url, this.token);
      // Prepare the first offer while the WebSocket connects: it goes out right behind `join`.
      this._chain(async () => {
        const servers = await ice;
        if (servers.length) this._fetchedIceServers = servers;
        const pc = this.pc;
        if (!pc || pc.signalingState !== "stable") return;
        if (servers.length) {
          pc.setConfiguration({ ...pc.getConfiguration(), iceServers: [...this.iceServers, ...servers] });
        }
        this._makingOffer = true;
        try {
          await pc.setLocalDescription();
        } finally {
          this._makingOffer = false;
        }
        if (this._live && this._joinSeq && !this._sessionOffered) this._negotiate();
      });
      this._connect();
    }
    return p;
  }

  /**
   * Sets (or replaces) the local microphone/camera stream. Works before or after joining; the
   * tracks are swapped in without renegotiation when the kinds stay the same.
   */
  async setLocalStream(stream) {
    this.localStream = stream || null;
    if (this.pc) await this._applyLocalTracks();
    this._applyMuteToTracks();
  }

  /** Mutes/unmutes the local microphone and/or camera (true = muted) and tells the room. */
  setMuted({ audio, video } = {}) {
    if (typeof audio === "boolean") this.muted.audio = audio;
    if (typeof video === "boolean") this.muted.video = video;
    this._applyMuteToTracks();
    if (this.participantId && !this._closed) {
      this._sendReliable({ type: "mute", audio: this.muted.audio, video: this.muted.video });
    }
    this._emit("localmute", { ...this.muted });
  }

  /**
   * Tells Parley which remote videos are shown and how big: `tiles` is a list of
   * `{id, source, width, height}` (participant id, "camera" or "screen", size in device pixels).
   * Videos not listed are not sent. Sent only when it changed; re-sent after a fresh join.
   */
  setView(tiles) {
    this._view = (Array.isArray(tiles) ? tiles : []).filter((t) => t && t.id != null).map(viewTileFromApp);
    this._sendView();
  }

  /**
   * Starts sharing the screen: asks the browser for a screen (`getDisplayMedia`) unless a
   * `track` is given, and sends it on a new video transceiver (stream `<id>.screen` for the
   * others). Resolves with the track; rejects with a ParleyError (`screen_share_denied`,
   * `screen_share_unsupported`, `screen_share_failed`). Sharing stops with stopScreenShare() or
   * when the track ends (the browser's own "Stop sharing").
   */
  async startScreenShare({ track = null, constraints = { video: true } } = {}) {
    if (this._closed) throw new ParleyError("closed", "This client has left; create a new one.");
    let t = track;
    if (!t) {
      const md = globalThis.navigator && navigator.mediaDevices;
      if (!md || !md.getDisplayMedia) throw new ParleyError("screen_share_unsupported");
      let stream;
      try {
        stream = await md.getDisplayMedia(constraints);
      } catch (err) {
        throw screenShareError(err);
      }
      t = stream.getVideoTracks()[0] || null;
      for (const other of stream.getTracks()) if (other !== t) other.stop();
      if (!t) throw new ParleyError("screen_share_failed");
    }
    if (this._closed) {
      t.stop();
      throw new ParleyError("closed", "This client has left; create a new one.");
    }
    const old = this.screenTrack;
    if (old === t) return t;
    if (old) {
      old.removeEventListener("ended", this._onScreenEnded);
      old.stop();
    }
    if ("contentHint" in t && !t.contentHint) t.contentHint = "detail";
    this.screenTrack = t;
    t.addEventListener("ended", this._onScreenEnded);
    if (this.pc) await this._applyScreenTrack();
    this._emit("screensharechange", { active: true, track: t });
    return t;
  }

  /** Stops sharing the screen (stops the track; the transceiver becomes inactive). */
  async stopScreenShare() {
    const t = this.screenTrack;
    if (!t) return;
    this.screenTrack = null;
    t.removeEventListener("ended", this._onScreenEnded);
    t.stop();
    if (this.pc) await this._applyScreenTrack();
    this._emit("screensharechange", { active: false, track: null });
  }

  /** Leaves the room: sends `leave`, closes the PeerConnection and the WebSocket. */
  leave() {
    if (this._closed) return;
    if (this._ws && this._live && this.participantId) this._sendReliable({ type: "leave" });
    this._shutdown("leave");
    const screen = this.screenTrack;
    if (screen) {
      this.screenTrack = null;
      screen.removeEventListener("ended", this._onScreenEnded);
      screen.stop();
    }
    this._closePc();
    this._forgetParticipants();
    this._rejectJoin(new ParleyError("closed", "Left the room."));
    this._setState("closed");
    if (screen) this._emit("screensharechange", { active: false, track: null });
    this._emit("left", {});
  }

  /** Shortcut for `client.pc.getStats()`. */
  getStats(selector) {
    return this.pc ? this.pc.getStats(selector) : Promise.resolve(new Map());
  }

  // ---- signaling: the session (the connection itself is ReliableSocket's) ----------------

  _stopTimers() {
    super._stopTimers();
    clearTimeout(this._timers.disconnected);
  }

  /** Starts a new session on the open socket: fresh sequence numbers and a `join`. */
  _startSession() {
    const hadSession = this.participantId !== null || this._joinSeq !== 0;
    this._resetSession();
    this.participantId = null;
    this._viewSeqs = [];
    this._viewSent = null;
    if (hadSession) {
      // The old session's negotiation state is meaningless to the new one.
      this._forgetParticipants();
      if (this.pc && (this.pc.localDescription || this.pc.remoteDescription)) {
        this._closePc();
        this._createPc();
      }
    }
    this._needOffer = true;
    this._sessionOffered = false;
    const join = { type: "join", room: this.room, name: this.name };
    if (this.token) join.token = this.token;
    // The mute state goes with the join: the first offer follows at once, before the reply,
    // and the room must not be offered a microphone (or camera) that is muted.
    if (this.muted.audio) join.audio_muted = true;
    if (this.muted.video) join.video_muted = true;
    this._joinMuted = { ...this.muted };
    this._joinSeq = this._sendReliable(join);
    // Parley processes messages in order, so the offer may follow `join` at once.
    this._negotiate();
  }

  _handle(msg) {
    switch (msg.type) {
      case "joined":
        return this._onJoined(msg);
      case "participant_joined": {
        if (!msg.participant) return;
        const p = participantFromWire(msg.participant);
        if (p.id === this.participantId) return;
        this.participants.set(p.id, p);
        this._emit("participantjoined", { ...p });
        return;
      }
      case "participant_left":
        if (String(msg.id) === this.participantId) return;
        return this._removeParticipant(String(msg.id));
      case "answer":
        return this._onAnswer(msg.sdp);
      case "offer":
        return this._onOffer(msg.sdp, msg.id);
      case "mute": {
        const id = String(msg.id);
        const p = this.participants.get(id);
        if (p) {
          p.audioMuted = !!msg.audio;
          p.videoMuted = !!msg.video;
        }
        this._emit("mute", { participantId: id, audio: !!msg.audio, video: !!msg.video, local: id === this.participantId });
        return;
      }
      case "speaking": {
        const id = String(msg.id);
        const p = this.participants.get(id);
        if (p) p.speaking = !!msg.speaking;
        this._emit("speaking", { participantId: id, speaking: !!msg.speaking, local: id === this.participantId });
        return;
      }
      case "dominant_speaker": {
        const id = msg.id == null ? null : String(msg.id);
        this.dominantSpeaker = id;
        this._emit("dominantspeaker", { participantId: id, local: id !== null && id === this.participantId });
        return;
      }
      case "video_paused":
        if (msg.id == null) return;
        this._emit("videopaused", {
          participantId: String(msg.id),
          source: msg.source === "screen" ? "screen" : "camera",
          paused: !!msg.paused,
          reason: typeof msg.reason === "string" ? msg.reason : null,
        });
        return;
      case "layers":
        return this._onLayers(msg);
      case "media_closed":
        // The server lost our media session (a media node went away): a new PeerConnection
        // offers afresh and is placed on a working node; the room goes on meanwhile.
        if (!this.pc || this._closed) return;
        this._closePc();
        this._viewSent = null; // the new session learns the tile sizes again
        this._sessionOffered = false;
        this._createPc();
        return;
      case "error":
        return this._onServerError(msg);
      default:
        return; // unknown types are ignored (newer server)
    }
  }

  _onJoined(msg) {
    // A new session: the view is sent again (at the latest below, after the events).
    this._viewSent = null;
    this._viewUnsupported = false;
    this.participantId = String(msg.participant);
    this.session = msg.session;
    /** Show video of the last N speakers only in rooms larger than this (null: all). */
    this.lastN = Number.isInteger(msg.last_n) && msg.last_n > 0 ? msg.last_n : null;
    if (typeof msg.room === "string") this.room = msg.room;
    this._backoff = this._minDelay;
    this.participants.clear();
    const list = Array.isArray(msg.participants) ? msg.participants.map(participantFromWire) : [];
    for (const p of list) if (p.id !== this.participantId) this.participants.set(p.id, p);
    this._setState("connected");
    const detail = {
      participantId: this.participantId,
      room: this.room,
      participants: [...this.participants.values()].map((p) => ({ ...p })),
    };
    for (const w of this._joinWaiters.splice(0)) w.resolve(detail);
    this._emit("joined", detail);
    for (const p of this.participants.values()) this._emit("participantjoined", { ...p });
    // Toggled while the join was on its way (`setMuted` tells only a joined room).
    const told = this._joinMuted || this.muted;
    if (this.muted.audio !== told.audio || this.muted.video !== told.video) {
      this._sendReliable({ type: "mute", audio: this.muted.audio, video: this.muted.video });
    }
    this._sendView();
    if (!this._sessionOffered) this._negotiate();
  }

  _sendView() {
    if (!this._view || !this.participantId || this._closed || this._viewUnsupported) return;
    const json = JSON.stringify(this._view);
    if (json === this._viewSent) return;
    this._viewSent = json;
    this._viewSeqs.push(this._sendReliable({ type: "view", tiles: this._view.map((t) => ({ ...t })) }));
    if (this._viewSeqs.length > VIEW_SEQS_KEPT) this._viewSeqs.shift();
  }

  _onServerError(msg) {
    const code = typeof msg.code === "string" ? msg.code : "internal";
    const detail = {
      code,
      message: ERROR_MESSAGES[code] && FATAL_JOIN_ERRORS.has(code) ? ERROR_MESSAGES[code] : msg.message || ERROR_MESSAGES[code] || code,
      serverMessage: msg.message || "",
      inReplyTo: msg.in_reply_to ?? null,
    };
    const aboutView =
      detail.inReplyTo !== null
        ? this._viewSeqs.includes(detail.inReplyTo)
        : code === "unknown_type" && /\bview\b/.test(detail.serverMessage);
    if (aboutView) {
      // A `view` is advice; a server that does not know it (older Parley, whose errors carry no
      // `in_reply_to`) still works. Not an error for the user.
      if (code === "unknown_type") this._viewUnsupported = true;
      console.debug("parley: view refused:", code, detail.serverMessage);
      return;
    }
    const refusesJoin =
      !this.participantId &&
      (FATAL_JOIN_ERRORS.has(code) || (detail.inReplyTo !== null && detail.inReplyTo === this._joinSeq));
    this._emit("error", detail);
    if (refusesJoin) {
      this._rejectJoin(new ParleyError(code, detail.message));
      this._fail();
      return;
    }
    if (code === "sdp_rejected") {
      this._chain(async () => {
        const pc = this.pc;
        if (pc && pc.signalingState === "have-local-offer") await pc.setLocalDescription({ type: "rollback" });
      });
    }
  }

  _rejectJoin(err) {
    for (const w of this._joinWaiters.splice(0)) w.reject(err);
  }

  /** A terminal failure (ReliableSocket._fail): the PeerConnection goes too. */
  _teardown() {
    this._closePc();
  }

  // ---- participants ------------------------------------------------------------------------

  _removeParticipant(id) {
    for (const [trackId, info] of this.remoteTracks) {
      if (info.participantId === id) {
        this.remoteTracks.delete(trackId);
        this._emit("trackremoved", { ...info });
      }
    }
    const p = this.participants.get(id);
    this.participants.delete(id);
    if (this.dominantSpeaker === id) this.dominantSpeaker = null;
    this._emit("participantleft", { participantId: id, name: p ? p.name : "" });
  }

  _forgetParticipants() {
    for (const id of [...this.participants.keys()]) this._removeParticipant(id);
    for (const [trackId, info] of this.remoteTracks) {
      this.remoteTracks.delete(trackId);
      this._emit("trackremoved", { ...info });
    }
  }

  // ---- media: PeerConnection and negotiation -----------------------------------------------

  _createPc() {
    const pc = new RTCPeerConnection({
      bundlePolicy: "max-bundle",
      rtcpMuxPolicy: "require",
      iceServers: [...this.iceServers, ...(this._fetchedIceServers || [])],
      iceTransportPolicy: this.iceTransportPolicy,
    });
    this.pc = pc;
    this.mediaState = pc.connectionState;
    this._sdpChain = Promise.resolve();
    this._makingOffer = false;
    this._offerQueued = false;
    this._layers = new Map();
    this._screenTransceivers = [];
    const sendStream = this.localStream || new MediaStream();
    const track = (kind) => (this.localStream ? this.localStream.getTracks().find((t) => t.kind === kind) : null);
    for (const kind of ["audio", "video"]) {
      const t = track(kind);
      // Without a stream yet (media still starting), offer both kinds and swap tracks in later.
      const direction = t || !this.localStream ? "sendonly" : "inactive";
      const init = { direction, streams: [sendStream] };
      // The camera publishes simulcast; the encodings stay when a track is swapped in later.
      if (kind === "video") init.sendEncodings = CAMERA_ENCODINGS.map((e) => ({ ...e }));
      // A muted track is not sent at all (see `_applyMuteToTracks`).
      this._transceivers[kind] = pc.addTransceiver((!this.muted[kind] && t) || kind, init);
    }
    if (this.screenTrack && this.screenTrack.readyState === "live") this._addScreenTransceiver(pc, this.screenTrack);
    this._applyMuteToTracks();

    pc.onnegotiationneeded = () => {
      if (pc === this.pc) this._negotiate();
    };
    pc.ontrack = (ev) => {
      if (pc === this.pc) this._onTrack(ev);
    };
    pc.onconnectionstatechange = () => {
      if (pc !== this.pc) return;
      const state = pc.connectionState;
      this.mediaState = state;
      clearTimeout(this._timers.disconnected);
      if (state === "failed") {
        this._restartIce();
      } else if (state === "disconnected") {
        this._timers.disconnected = setTimeout(() => {
          if (pc === this.pc && pc.connectionState === "disconnected") this._restartIce();
        }, DISCONNECTED_RESTART_MS);
      }
      this._emit("mediastatechange", { state });
    };
    this._emit("peerconnection", { pc });
    return pc;
  }

  _closePc() {
    clearTimeout(this._timers.disconnected);
    const pc = this.pc;
    if (!pc) return;
    this.pc = null;
    pc.onnegotiationneeded = pc.ontrack = pc.onconnectionstatechange = null;
    try {
      pc.close();
    } catch {}
    for (const [trackId, info] of this.remoteTracks) {
      this.remoteTracks.delete(trackId);
      this._emit("trackremoved", { ...info });
    }
    this.mediaState = "closed";
  }

  async _applyLocalTracks() {
    const pc = this.pc;
    for (const kind of ["audio", "video"]) {
      const tx = this._transceivers[kind];
      if (!tx || pc.signalingState === "closed") continue;
      const t = this.localStream ? this.localStream.getTracks().find((x) => x.kind === kind) || null : null;
      const sent = this.muted[kind] ? null : t;
      if (tx.sender.track !== sent) await tx.sender.replaceTrack(sent);
      // A kind we have no device for is not offered as a track (others would get an empty tile).
      const direction = t ? "sendonly" : "inactive";
      if (tx.direction !== direction) tx.direction = direction; // negotiationneeded follows
    }
  }

  _addScreenTransceiver(pc, t) {
    const tx = pc.addTransceiver(t, {
      direction: "sendonly",
      streams: [new MediaStream([t])],
      sendEncodings: [{ maxBitrate: SCREEN_MAX_BITRATE }],
    });
    this._screenTransceivers.push(tx);
    return tx;
  }

  /** Sends `screenTrack` on a new transceiver, or makes the sharing transceiver inactive. */
  async _applyScreenTrack() {
    const pc = this.pc;
    if (!pc || pc.signalingState === "closed") return;
    const t = this.screenTrack;
    const current = this._screenTransceivers.find((tx) => !tx.stopped && tx.direction !== "inactive") || null;
    if (t) {
      if (current) {
        if (current.sender.track !== t) await current.sender.replaceTrack(t);
      } else {
        this._addScreenTransceiver(pc, t); // negotiationneeded follows
      }
      return;
    }
    if (!current) return;
    current.direction = "inactive"; // negotiationneeded follows
    await current.sender.replaceTrack(null);
  }

  /** The offer's `tracks`: mids of the transceivers that are not the microphone or the camera. */
  _trackSources() {
    const tracks = {};
    for (const tx of this._screenTransceivers) if (tx.mid != null) tracks[tx.mid] = "screen";
    return tracks;
  }

  _onLayers(msg) {
    if (msg.mid == null || !Array.isArray(msg.active)) return;
    const mid = String(msg.mid);
    const active = msg.active.map(String);
    this._layers.set(mid, active);
    this._emit("layers", { mid, active: [...active] });
    const pc = this.pc;
    // One setParameters at a time; a failed one (e.g. during a negotiation) is retried once
    // the SDP steps have settled.
    this._layerChain = this._layerChain
      .then(() => this._applyLayers(pc, mid))
      .catch(async () => {
        await this._sdpChain;
        await this._applyLayers(pc, mid);
      })
      .catch((err) => console.warn("parley: applying layers for mid", mid, err));
  }

  async _applyLayers(pc, mid) {
    if (!pc || pc !== this.pc || pc.signalingState === "closed") return;
    const active = this._layers.get(mid);
    const tx = pc.getTransceivers().find((t) => t.mid === mid);
    if (!active || !tx || !tx.sender) return;
    const params = tx.sender.getParameters();
    if (!params.encodings || !params.encodings.length) return;
    let changed = false;
    for (const enc of params.encodings) {
      if (!enc.rid) continue;
      const on = active.includes(enc.rid);
      if (enc.active !== on) {
        enc.active = on;
        changed = true;
      }
    }
    if (changed) await tx.sender.setParameters(params);
  }

  /**
   * A muted track is disabled (the local preview goes dark) and taken off its sender, so that
   * nothing is sent at all: Parley offers a track to the others only once it carries media, so a
   * participant who joins muted costs the room no media section until they unmute (Parley then
   * offers the track on the `mute` message, and the first unmute may wait for that round trip).
   * Swapping the track needs no renegotiation.
   */
  _applyMuteToTracks() {
    if (!this.localStream) return;
    for (const t of this.localStream.getAudioTracks()) t.enabled = !this.muted.audio;
    for (const t of this.localStream.getVideoTracks()) t.enabled = !this.muted.video;
    const pc = this.pc;
    if (!pc) return;
    this._senderChain = this._senderChain
      .then(() => (pc === this.pc && pc.signalingState !== "closed" ? this._applyLocalTracks() : undefined))
      .catch((err) => console.warn("parley: applying mute to senders", err));
  }

  _restartIce() {
    const pc = this.pc;
    if (!pc || !this.participantId || pc.signalingState === "closed") return;
    pc.restartIce(); // fires negotiationneeded; the offer carries new ICE credentials
  }

  /** Runs SDP operations one at a time. */
  _chain(fn) {
    const next = this._sdpChain.then(fn).catch((err) => {
      console.warn("parley: negotiation step failed", err);
      this._emitError("negotiation_failed", `${ERROR_MESSAGES.negotiation_failed} (${err && err.message})`);
    });
    this._sdpChain = next;
    return next;
  }

  _negotiate() {
    if (!this.pc || this._closed || !this._live || (!this.participantId && !this._joinSeq)) {
      this._needOffer = true;
      return;
    }
    if (this._offerQueued) return;
    this._offerQueued = true;
    this._chain(async () => {
      this._offerQueued = false;
      const pc = this.pc;
      if (!pc || pc.signalingState === "closed") return;
      if (!this._sessionOffered && pc.signalingState === "have-local-offer" && pc.localDescription) {
        // The offer prepared while connecting.
        this._needOffer = false;
        this._sessionOffered = true;
        this._sendReliable({ type: "offer", sdp: pc.localDescription.sdp, tracks: this._trackSources() });
        return;
      }
      if (pc.signalingState !== "stable") {
        this._needOffer = true; // offer again once the outstanding exchange completes
        return;
      }
      this._needOffer = false;
      this._makingOffer = true;
      try {
        await pc.setLocalDescription();
      } finally {
        this._makingOffer = false;
      }
      if (pc !== this.pc || !pc.localDescription || pc.localDescription.type !== "offer") return;
      this._sessionOffered = true;
      this._sendReliable({ type: "offer", sdp: pc.localDescription.sdp, tracks: this._trackSources() });
    });
  }

  _onAnswer(sdp) {
    if (typeof sdp !== "string") return;
    this._chain(async () => {
      const pc = this.pc;
      if (!pc || pc.signalingState !== "have-local-offer") return; // stale answer
      await pc.setRemoteDescription({ type: "answer", sdp });
      if (this._needOffer) this._negotiate();
    });
  }

  _onOffer(sdp, id) {
    if (typeof sdp !== "string") return;
    // Perfect negotiation, impolite side: with our own offer outstanding, Parley's offer is
    // ignored (Parley rolls back, answers ours, and offers again with a new id).
    this._chain(async () => {
      const pc = this.pc;
      if (!pc || this._makingOffer || pc.signalingState !== "stable") return;
      await pc.setRemoteDescription({ type: "offer", sdp });
      await pc.setLocalDescription();
      if (pc !== this.pc || !pc.localDescription) return;
      this._sendReliable({ type: "answer", id, sdp: pc.localDescription.sdp });
      if (this._needOffer) this._negotiate();
    });
  }

  _onTrack(ev) {
    const track = ev.track;
    const stream = ev.streams && ev.streams[0];
    const { participantId, source } = sourceOfStream(stream ? stream.id : null, track.kind);
    const old = this.remoteTracks.get(track.id);
    if (old) {
      // The server reused this m-line for another track/participant.
      if (old.participantId === participantId && old.source === source && old.stream === stream) return;
      this.remoteTracks.delete(track.id);
      this._emit("trackremoved", { ...old });
    }
    const info = { participantId, source, track, stream: stream || null, mid: ev.transceiver ? ev.transceiver.mid : null };
    this.remoteTracks.set(track.id, info);
    const removed = () => {
      if (this.remoteTracks.get(track.id) !== info) return;
      this.remoteTracks.delete(track.id);
      this._emit("trackremoved", { ...info });
    };
    track.addEventListener("ended", removed);
    if (stream) {
      stream.addEventListener("removetrack", (e) => {
        if (e.track === track) removed();
      });
    }
    this._emit("track", { ...info });
  }
}

export default ParleyClient;
