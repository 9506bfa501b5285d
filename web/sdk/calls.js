// Parley browser SDK: direct (1:1) calls (docs/protocol.md, "Direct calls (1:1)").
// A plain ES module with no dependencies besides parley.js and no build step. See README.md.
//
// A CallClient is one device of a user: it registers on the reliable signaling connection of
// parley.js (ReliableSocket: seq/ack/resume/reconnect), calls and is called. Media goes
// peer-to-peer first; when that is not up `p2p_timeout_ms` after the answer, the call moves to the
// SFU (room `call-<call id>`, joined with the group SDK's ParleyClient).

import { ERROR_MESSAGES, ParleyClient, ParleyError, ReliableSocket } from "./parley.js";

const USER_RE = /^[A-Za-z0-9._-]{1,64}$/;
// Used when the server's `registered` carries no p2p_timeout_ms.
const DEFAULT_P2P_TIMEOUT_MS = 4000;
// A peer-to-peer connection that was up and stays "disconnected" this long moves to the SFU.
const P2P_DISCONNECTED_FALLBACK_MS = 2500;
// How often a call polls getStats for its first decoded remote video frame.
const FRAME_POLL_MS = 20;
// call_signals for a call id this device does not know (yet) are kept this long.
const ORPHAN_SIGNAL_TTL_MS = 30000;
const ORPHAN_SIGNALS_MAX = 256;
// Errors that refuse a registration: retrying the same one cannot succeed.
const FATAL_REGISTER_ERRORS = new Set(["invalid_name", "unauthorized", "already_joined", "draining", "unknown_type"]);

/** User-facing texts per call end reason; `{peer}` is the other user's name. */
export const CALL_END_MESSAGES = Object.freeze({
  cancelled: "Call cancelled.",
  declined: "{peer} declined the call.",
  answered_elsewhere: "Answered on another device.",
  busy: "{peer} is busy in another call.",
  unavailable: "{peer} is not online.",
  no_answer: "{peer} did not answer.",
  hangup: "{peer} hung up.",
  gone: "The connection to {peer} was lost.",
  disconnected: "The connection to the server was lost; the call ended.",
  error: "The call failed.",
  merged: "",
});

/** Whether `name` is a valid user name (1–64 characters from `A-Z a-z 0-9 - _ .`). */
export function isValidUserName(name) {
  return typeof name === "string" && USER_RE.test(name);
}

/** A fresh call id (a UUID). */
function newCallId() {
  if (globalThis.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The `data` of a call_signal for an ICE candidate (RTCIceCandidate.toJSON(), flattened). */
function candidateData(c) {
  const j = typeof c.toJSON === "function" ? c.toJSON() : c;
  return {
    type: "candidate",
    candidate: j.candidate,
    sdpMid: j.sdpMid ?? null,
    sdpMLineIndex: j.sdpMLineIndex ?? null,
    usernameFragment: j.usernameFragment ?? null,
  };
}

/**
 * One direct call, as seen by this device. An EventTarget; `call.on(type, fn)` passes the
 * event's detail.
 *
 * Events: `state` ({state, reason?, by?}), `track` ({track, stream, media}), `trackremoved`
 * ({track, media}), `media` ({media: "p2p"|"sfu", reason?}), `firstframe` ({at, media}),
 * `remotemute` ({audio, video}), `ended` ({reason, by, mergedInto}), `error` ({code, message}).
 */
export class Call extends EventTarget {
  constructor(client, { id, peer, direction }) {
    super();
    this.client = client;
    /** The call id (a UUID; may change once, when crossing calls are merged). */
    this.id = id;
    /** The other user's name. */
    this.peer = peer;
    /** "outgoing" (this device called) or "incoming" (this device was called). */
    this.direction = direction;
    /** "calling" | "ringing" | "connecting" | "connected" | "ended" */
    this.state = direction === "outgoing" ? "calling" : "ringing";
    /** Why the call ended (a protocol reason or "disconnected", "error", "merged"), or null. */
    this.reason = null;
    /** Who ended it: "local" (this device) or "remote", once ended. */
    this.endedBy = null;
    /** When merged by glare: the Call that goes on instead of this one. */
    this.mergedInto = null;
    /** "p2p" until the call moves to the SFU, then "sfu". */
    this.media = "p2p";
    /** The peer-to-peer RTCPeerConnection (null once closed, e.g. after moving to the SFU). */
    this.pc = null;
    /** The ParleyClient of the SFU room, once the call moved there. */
    this.sfu = null;
    /** The remote audio and video, whatever the path (tracks are swapped when it changes). */
    this.remoteStream = new MediaStream();
    /** The other side's mute state, as it last told us. */
    this.remoteMuted = { audio: false, video: false };
    /** The device that answered (from `call_answered`). */
    this.answeredBy = null;
    /** Timestamps (Date.now()): created, answered (answer() here or call_answered), connected, first remote video frame decoded, ended. */
    this.createdAt = Date.now();
    this.answeredAt = null;
    this.connectedAt = null;
    this.firstFrameAt = null;
    /** First decoded remote video frame per media path: {p2p, sfu}. */
    this.firstFrameAtByMedia = { p2p: null, sfu: null };
    this.endedAt = null;
    /** What happened, for debugging: [[ms since created, text], …] (bounded). */
    this.log = [];

    this._answered = false; // this device's side is past ringing (answered or merged)
    this._chain = Promise.resolve();
    this._pendingCandidates = []; // remote candidates waiting for the remote description
    this._sentSignals = []; // this device's signals (offer/answer and candidates), to resend on merge
    this._offerSent = false;
    this._earlyCandidates = []; // local candidates gathered before the offer went out
    this._transceivers = { audio: null, video: null };
    this._timers = { p2p: 0, disconnected: 0, frames: 0 };
    this._p2pFailed = false;
    this._p2pEverConnected = false;
    this._peerMovedToSfu = false; // the other side said {"type":"sfu"} before our answer was in
  }

  /** `call.on("state", ({state}) => …)`; returns a function that unsubscribes. */
  on(type, fn) {
    const listener = (ev) => fn(ev.detail, ev);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  get ended() {
    return this.state === "ended";
  }

  /** The caller gives up before an answer (`call_cancel`). */
  cancel() {
    if (this.ended || this.direction !== "outgoing") return;
    this.client._send({ type: "call_cancel", call: this.id });
    this._end("cancelled", "local");
  }

  /**
   * Answers a ringing incoming call (`call_answer`). `localStream`, when given and the client
   * has none yet, becomes the client's local stream (swapped into the prepared answer).
   */
  answer({ localStream = null } = {}) {
    if (this.ended || this.direction !== "incoming" || this._answered) return;
    if (localStream && localStream !== this.client.localStream) {
      this.client.setLocalStream(localStream).catch((err) => console.warn("parley calls: setLocalStream", err));
    }
    this._answered = true;
    this.answeredAt = Date.now();
    this.client._send({ type: "call_answer", call: this.id }, this);
    this._setState("connecting");
    this._startFrameWatch();
  }

  /** Declines a ringing incoming call (`call_decline`): the call ends for everyone. */
  decline() {
    if (this.ended || this.direction !== "incoming") return;
    if (this._answered) return this.hangup();
    this.client._send({ type: "call_decline", call: this.id });
    this._end("declined", "local");
  }

  /** Ends the call whatever its state: cancel (calling), decline (ringing here), or `call_hangup`. */
  hangup() {
    if (this.ended) return;
    if (!this._answered) {
      if (this.direction === "outgoing") return this.cancel();
      return this.decline();
    }
    this.client._send({ type: "call_hangup", call: this.id });
    this._end("hangup", "local");
  }

  /** `getStats()` of the current media path's PeerConnection. */
  getStats() {
    const pc = this._mediaPc();
    return pc ? pc.getStats() : Promise.resolve(new Map());
  }

  // ---- internals ---------------------------------------------------------------------------

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _log(text) {
    if (this.log.length < 200) this.log.push([Date.now() - this.createdAt, text]);
  }

  _setState(state, extra = {}) {
    if (this.state === state || this.ended) return;
    this._log(`state ${state}`);
    this.state = state;
    if (state === "connected" && !this.connectedAt) this.connectedAt = Date.now();
    this._emit("state", { state, ...extra });
  }

  _mediaPc() {
    return this.media === "sfu" ? (this.sfu && this.sfu.pc) || null : this.pc;
  }

  /** Sends a call_signal and remembers it (for a resend under a merged id). */
  _signal(data) {
    if (this.ended) return;
    this._log(`tx ${data.type}`);
    this._sentSignals.push(data);
    this.client._send({ type: "call_signal", call: this.id, data });
  }

  _runChain(fn) {
    const next = this._chain.then(fn).catch((err) => {
      if (this.ended) return;
      console.warn("parley calls: signaling step failed", err);
      this._emit("error", { code: "negotiation_failed", message: `${ERROR_MESSAGES.negotiation_failed} (${err && err.message})` });
    });
    this._chain = next;
    return next;
  }

  _pcConfig() {
    const config = { bundlePolicy: "max-bundle", rtcpMuxPolicy: "require", iceServers: this.client._iceServers() };
    if (!this.client.p2p) {
      // Test hook: relay only, and no relay, so the peer-to-peer path can never connect.
      config.iceTransportPolicy = "relay";
      config.iceServers = [];
    } else if (this.client.iceTransportPolicy === "relay") {
      config.iceTransportPolicy = "relay";
    }
    return config;
  }

  /** Creates the peer-to-peer PeerConnection; the caller adds its transceivers, the callee gets them from the offer. */
  _createPc() {
    const pc = new RTCPeerConnection(this._pcConfig());
    this.pc = pc;
    this._offerSent = false;
    this._earlyCandidates = [];
    this._pendingCandidates = [];
    this._transceivers = { audio: null, video: null };
    pc.onicecandidate = (ev) => {
      if (pc !== this.pc || !ev.candidate || !ev.candidate.candidate) return;
      const data = candidateData(ev.candidate);
      if (this.direction === "outgoing" && !this._offerSent) this._earlyCandidates.push(data);
      else this._signal(data);
    };
    pc.ontrack = (ev) => {
      if (pc === this.pc) this._addRemoteTrack(ev.track, "p2p");
    };
    pc.onconnectionstatechange = () => {
      if (pc === this.pc) this._onPcState(pc);
    };
    return pc;
  }

  _localTrack(kind) {
    const s = this.client.localStream;
    return s ? s.getTracks().find((t) => t.kind === kind && t.readyState !== "ended") || null : null;
  }

  /** Caller: transceivers with the local tracks, the offer and the candidates, sent at once. */
  _startOffer() {
    const pc = this._createPc();
    const stream = this.client.localStream || new MediaStream();
    for (const kind of ["audio", "video"]) {
      this._transceivers[kind] = pc.addTransceiver(this._localTrack(kind) || kind, { direction: "sendrecv", streams: [stream] });
    }
    this._runChain(async () => {
      await pc.setLocalDescription();
      if (pc !== this.pc || this.ended) return;
      this._offerSent = true;
      this._signal({ type: "offer", sdp: pc.localDescription.sdp });
      for (const c of this._earlyCandidates.splice(0)) this._signal(c);
    });
  }

  /** Callee: a PeerConnection that waits for the caller's offer. */
  _prepareAnswerer() {
    this._createPc();
  }

  _onSignal(data) {
    if (!data || typeof data !== "object" || this.ended) return;
    this._log(`rx ${data.type}`);
    switch (data.type) {
      case "offer":
      case "answer":
        if (typeof data.sdp === "string") this._runChain(() => this._onDescription(data.type, data.sdp));
        return;
      case "candidate":
        this._runChain(() => this._onCandidate(data));
        return;
      case "sfu":
        // The other side moved the call to the SFU: follow at once.
        if (this._answered) this._fallback("peer");
        else this._peerMovedToSfu = true;
        return;
      case "mute":
        this.remoteMuted = { audio: !!data.audio, video: !!data.video };
        this._emit("remotemute", { ...this.remoteMuted });
        return;
      default:
        if (typeof data.candidate === "string") this._runChain(() => this._onCandidate(data));
    }
  }

  async _onDescription(type, sdp) {
    const pc = this.pc;
    if (!pc || pc.signalingState === "closed" || this.media !== "p2p") return;
    if (type === "answer") {
      if (pc.signalingState !== "have-local-offer") return; // duplicate or stale
      await pc.setRemoteDescription({ type, sdp });
      await this._flushCandidates(pc);
      return;
    }
    // An offer. A resent copy of the offer we already answered is ignored.
    if (pc.remoteDescription && pc.remoteDescription.type === "offer" && pc.remoteDescription.sdp === sdp) return;
    if (pc.signalingState === "have-local-offer") {
      // Only a merged call's callee gets here: it answers the other side's offer.
      if (this.direction === "outgoing") return;
      await pc.setLocalDescription({ type: "rollback" });
    }
    await pc.setRemoteDescription({ type, sdp });
    if (pc !== this.pc) return;
    await this._applyLocalTracks();
    const answer = await pc.createAnswer();
    if (/^a=setup:actpass\r?$/m.test(sdp)) {
      // The ringing device is the DTLS server: its ICE can come up long before the person
      // answers (the caller replies to its checks), and a DTLS client would by then have backed
      // off its ClientHello retransmissions for seconds. As server it just waits; the caller
      // starts the handshake the moment the answer reaches it.
      answer.sdp = answer.sdp.replace(/^a=setup:active(\r?)$/gm, "a=setup:passive$1");
    }
    await pc.setLocalDescription(answer);
    if (pc !== this.pc || this.ended) return;
    this._signal({ type: "answer", sdp: pc.localDescription.sdp });
    await this._flushCandidates(pc);
  }

  async _onCandidate(data) {
    const pc = this.pc;
    if (!pc || pc.signalingState === "closed" || this.media !== "p2p") return;
    const init = { candidate: data.candidate, sdpMid: data.sdpMid ?? null, sdpMLineIndex: data.sdpMLineIndex ?? null };
    if (data.usernameFragment) init.usernameFragment = data.usernameFragment;
    if (!pc.remoteDescription) {
      this._pendingCandidates.push(init);
      return;
    }
    try {
      await pc.addIceCandidate(init);
    } catch (err) {
      console.debug("parley calls: candidate refused", err && err.message);
    }
  }

  async _flushCandidates(pc) {
    for (const init of this._pendingCandidates.splice(0)) {
      try {
        await pc.addIceCandidate(init);
      } catch (err) {
        console.debug("parley calls: candidate refused", err && err.message);
      }
    }
  }

  /** Puts the client's local tracks on the peer-to-peer senders (no renegotiation) or into the SFU client. */
  async _applyLocalTracks() {
    if (this.ended) return;
    if (this.sfu) {
      await this.sfu.setLocalStream(this.client.localStream);
      return;
    }
    const pc = this.pc;
    if (!pc || pc.signalingState === "closed") return;
    const stream = this.client.localStream;
    for (const kind of ["audio", "video"]) {
      let tx = this._transceivers[kind];
      if (!tx) {
        // Callee: the offer's first transceiver of this kind, made sendrecv.
        tx = pc.getTransceivers().find((t) => !t.stopped && t.receiver.track && t.receiver.track.kind === kind) || null;
        if (!tx) continue;
        this._transceivers[kind] = tx;
        if (tx.direction !== "sendrecv") tx.direction = "sendrecv";
      }
      const t = this._localTrack(kind);
      if (tx.sender.track !== t) await tx.sender.replaceTrack(t);
      if (stream && typeof tx.sender.setStreams === "function") {
        try {
          tx.sender.setStreams(stream);
        } catch {}
      }
    }
  }

  _addRemoteTrack(track, media) {
    if (this.ended) return;
    for (const t of this.remoteStream.getTracks()) {
      if (t.kind === track.kind && t !== track) {
        this.remoteStream.removeTrack(t);
        this._emit("trackremoved", { track: t, media: this.media });
      }
    }
    if (!this.remoteStream.getTracks().includes(track)) this.remoteStream.addTrack(track);
    this._emit("track", { track, stream: this.remoteStream, media });
  }

  _removeRemoteTrack(track) {
    if (!this.remoteStream.getTracks().includes(track)) return;
    this.remoteStream.removeTrack(track);
    this._emit("trackremoved", { track, media: this.media });
  }

  _onPcState(pc) {
    const s = pc.connectionState;
    this._log(`p2p ${s} (ice ${pc.iceConnectionState})`);
    clearTimeout(this._timers.disconnected);
    if (this.ended || this.media !== "p2p") return;
    if (s === "connected") {
      this._p2pEverConnected = true;
      clearTimeout(this._timers.p2p);
      this._emit("media", { media: "p2p" });
      if (this._answered) this._setState("connected");
    } else if (s === "failed") {
      this._p2pFailed = true;
      if (this._answered) this._fallback("failed");
    } else if (s === "disconnected" && this._p2pEverConnected) {
      this._timers.disconnected = setTimeout(() => {
        if (this.pc === pc && pc.connectionState !== "connected") this._fallback("disconnected");
      }, P2P_DISCONNECTED_FALLBACK_MS);
    }
  }

  /** From `call_answered` (or a merge): the answer is in; peer-to-peer has p2p_timeout_ms to connect. */
  _onAnswered(device) {
    if (this.ended) return;
    if (device != null) this.answeredBy = String(device);
    const first = !this._answered || !this._timers.p2p;
    if (!this._answered) {
      this._answered = true;
      this.answeredAt = Date.now();
    }
    if (this.state !== "connected") this._setState("connecting");
    this._startFrameWatch();
    if (!first || this.media !== "p2p") return;
    if (this._peerMovedToSfu) return this._fallback("peer");
    if (this.pc && this.pc.connectionState === "connected") return this._setState("connected");
    if (this._p2pFailed) return this._fallback("failed");
    this._timers.p2p = setTimeout(() => {
      if (this.media === "p2p" && (!this.pc || this.pc.connectionState !== "connected")) this._fallback("timeout");
    }, this.client.p2pTimeoutMs);
  }

  /**
   * Moves the call to the SFU: closes the peer-to-peer PeerConnection and joins the room
   * `call-<id>` with the same local stream. Tells the other side (`{"type":"sfu"}`) so that it
   * follows at once instead of waiting for its own timer.
   */
  _fallback(reason) {
    if (this.ended || this.media === "sfu") return;
    this._log(`to sfu: ${reason}`);
    clearTimeout(this._timers.p2p);
    clearTimeout(this._timers.disconnected);
    if (reason !== "peer") this._signal({ type: "sfu" });
    this._closePc();
    this.media = "sfu";
    this._emit("media", { media: "sfu", reason });
    const client = this.client;
    const sfu = new ParleyClient({
      room: `call-${this.id}`,
      name: client.user,
      token: client.token,
      url: client.url,
      localStream: client.localStream,
      iceServers: client.iceServers,
    });
    this.sfu = sfu;
    if (client.muted.audio || client.muted.video) sfu.setMuted({ ...client.muted });
    sfu.on("track", ({ source, track }) => {
      if (sfu === this.sfu && source !== "screen") this._addRemoteTrack(track, "sfu");
    });
    sfu.on("trackremoved", ({ track }) => {
      if (sfu === this.sfu) this._removeRemoteTrack(track);
    });
    sfu.on("mediastatechange", ({ state }) => {
      if (sfu === this.sfu && state === "connected") this._setState("connected");
    });
    sfu.on("mute", ({ local, audio, video }) => {
      if (sfu !== this.sfu || local) return;
      this.remoteMuted = { audio, video };
      this._emit("remotemute", { ...this.remoteMuted });
    });
    sfu.on("error", ({ code, message }) => {
      if (sfu === this.sfu) this._emit("error", { code, message });
    });
    this._startFrameWatch();
    sfu.join().catch((err) => {
      if (sfu !== this.sfu || this.ended) return;
      console.warn("parley calls: joining the call's SFU room failed", err);
      this._emit("error", { code: err.code || "sfu_failed", message: err.message });
      this.client._send({ type: "call_hangup", call: this.id });
      this._end("error", "local");
    });
  }

  _closePc() {
    const pc = this.pc;
    if (!pc) return;
    this.pc = null;
    pc.onicecandidate = pc.ontrack = pc.onconnectionstatechange = null;
    try {
      pc.close();
    } catch {}
    for (const t of this.remoteStream.getTracks()) this._removeRemoteTrack(t);
  }

  /** Polls getStats until the current path has decoded a remote video frame. */
  _startFrameWatch() {
    if (this._timers.frames || this.ended) return;
    const tick = async () => {
      this._timers.frames = 0;
      if (this.ended) return;
      const media = this.media;
      if (!this.firstFrameAtByMedia[media]) {
        const pc = this._mediaPc();
        if (pc) {
          try {
            const stats = await pc.getStats();
            let decoded = false;
            stats.forEach((s) => {
              if (s.type === "inbound-rtp" && s.kind === "video" && s.framesDecoded > 0) decoded = true;
            });
            if (decoded && !this.ended && media === this.media && !this.firstFrameAtByMedia[media]) {
              const at = Date.now();
              this.firstFrameAtByMedia[media] = at;
              if (!this.firstFrameAt) this.firstFrameAt = at;
              this._emit("firstframe", { at, media });
            }
          } catch {}
        }
      }
      if (this.ended || this.firstFrameAtByMedia[this.media]) {
        // Found for this path; look again if the call moves to the SFU.
        if (!this.ended && this.media === "p2p") this._timers.frames = setTimeout(tick, 250);
        return;
      }
      this._timers.frames = setTimeout(tick, FRAME_POLL_MS);
    };
    this._timers.frames = setTimeout(tick, 0);
  }

  /** Ends the call on this device (no message sent: the callers of _end did that). */
  _end(reason, by, extra = {}) {
    if (this.ended) return;
    this._log(`ended ${reason} (${by})`);
    this.reason = reason;
    this.endedBy = by;
    this.endedAt = Date.now();
    for (const k of Object.keys(this._timers)) {
      clearTimeout(this._timers[k]);
      this._timers[k] = 0;
    }
    this._closePc();
    const sfu = this.sfu;
    this.sfu = null;
    if (sfu) sfu.leave();
    this.client._forget(this);
    this.state = "ended";
    this._emit("state", { state: "ended", reason, by, ...extra });
    this._emit("ended", { reason, by, mergedInto: this.mergedInto, ...extra });
  }
}

/**
 * A device of a user for direct calls: registers, calls and is called (docs/protocol.md).
 *
 * Events (`client.on(type, fn)` passes the detail): `registered` ({device, user, p2pTimeoutMs,
 * iceServers}), `incoming` ({call}), `call` ({call}: any new Call, outgoing or incoming),
 * `merged` ({call, replaced}), `connectionstatechange` ({state}), `resumefailed`, `error`
 * ({code, message, serverMessage, inReplyTo}).
 */
export class CallClient extends ReliableSocket {
  /**
   * @param {object} opts
   * @param {string} opts.user the user this device belongs to (1–64 of `A-Z a-z 0-9 - _ .`)
   * @param {string} [opts.token] access token (its identity must be `user` when the server has API keys)
   * @param {string} [opts.url] signaling URL, default `ws(s)://<this host>/ws`
   * @param {RTCIceServer[]} [opts.iceServers] added to the server's `ice_servers`
   * @param {MediaStream|null} [opts.localStream] microphone/camera for calls (or setLocalStream() later)
   * @param {boolean} [opts.p2p] false (test hook): the peer-to-peer path can never connect, so calls go to the SFU
   * @param {boolean} [opts.forceRelay] same as `p2p: false`
   */
  constructor({ user, token = null, url, iceServers = [], iceTransportPolicy = "all", localStream = null, p2p = true, forceRelay = false, reconnectMinMs, reconnectMaxMs } = {}) {
    super({ url, token, reconnectMinMs, reconnectMaxMs });
    this.user = user;
    /** ICE servers given to the constructor (the server's come with `registered`). */
    this.iceServers = iceServers;
    /** ICE servers from the server's `registered`. */
    this.serverIceServers = [];
    this.localStream = localStream;
    /** false: peer-to-peer is made impossible (test hook for the SFU fallback). */
    this.p2p = p2p !== false && !forceRelay;
    /** "relay": peer-to-peer media only through the TURN servers Parley hands out. */
    this.iceTransportPolicy = iceTransportPolicy;
    /** This device's id, once registered. */
    this.deviceId = null;
    this.p2pTimeoutMs = DEFAULT_P2P_TIMEOUT_MS;
    /** Own mute state (true = muted), applied to the local tracks of every call. */
    this.muted = { audio: false, video: false };
    /** The calls not ended yet: id → Call. */
    this.calls = new Map();
    this._registerSeq = 0;
    this._registerWaiters = [];
    this._callSeqs = new Map(); // seq of a call message → Call, to match error replies
    this._aliases = new Map(); // an old call id → the Call it was merged into
    this._orphans = new Map(); // call id → [{data, at}]: signals for a call not known (yet)
  }

  // ---- public API ----------------------------------------------------------------------------

  /**
   * Connects and registers this device. Resolves with the `registered` detail; rejects with a
   * ParleyError when the server refuses (`invalid_name`, `unauthorized`, `unknown_type` from a
   * server without direct calls). While the server cannot be reached it keeps retrying.
   */
  register() {
    if (!isValidUserName(this.user)) return Promise.reject(new ParleyError("invalid_name", "Invalid user name. Use 1–64 characters: letters, digits, “-”, “_” or “.”."));
    if (this._closed) return Promise.reject(new ParleyError("closed", "This client was closed; create a new one."));
    if (this.deviceId) return Promise.resolve(this._registeredDetail());
    const p = new Promise((resolve, reject) => this._registerWaiters.push({ resolve, reject }));
    if (!this._ws && this.connectionState === "new") {
      this._listenOnline();
      this._connect();
    }
    return p;
  }

  /**
   * Calls `user`. Returns the Call at once; the offer and the ICE candidates go out right behind
   * `call`, without waiting for any reply. `localStream` (optional) becomes the client's local
   * stream.
   */
  call(user, { localStream = null } = {}) {
    if (!this.deviceId) throw new ParleyError("not_registered", "Register this device before calling.");
    if (localStream && localStream !== this.localStream) {
      this.localStream = localStream;
      this._applyMuteToTracks();
    }
    const call = new Call(this, { id: newCallId(), peer: String(user), direction: "outgoing" });
    this.calls.set(call.id, call);
    this._send({ type: "call", call: call.id, to: call.peer }, call);
    this._emit("call", { call });
    call._startOffer();
    return call;
  }

  /** Sets (or replaces) the local stream: swapped into every call without renegotiation. */
  async setLocalStream(stream) {
    this.localStream = stream || null;
    this._applyMuteToTracks();
    await Promise.all([...this.calls.values()].map((c) => c._runChain(() => c._applyLocalTracks())));
  }

  /** Mutes/unmutes the microphone and/or camera (true = muted) and tells the other side of each call. */
  setMuted({ audio, video } = {}) {
    if (typeof audio === "boolean") this.muted.audio = audio;
    if (typeof video === "boolean") this.muted.video = video;
    this._applyMuteToTracks();
    for (const c of this.calls.values()) {
      if (c.sfu) c.sfu.setMuted({ ...this.muted });
      c._signal({ type: "mute", audio: this.muted.audio, video: this.muted.video });
    }
    this._emit("localmute", { ...this.muted });
  }

  /** Ends every call and closes the connection (the device is gone for the server). */
  close() {
    if (this._closed) return;
    for (const c of [...this.calls.values()]) c.hangup();
    this._shutdown("close");
    for (const w of this._registerWaiters.splice(0)) w.reject(new ParleyError("closed", "The client was closed."));
    this._setState("closed");
  }

  // ---- internals -----------------------------------------------------------------------------

  _registeredDetail() {
    return { device: this.deviceId, user: this.user, p2pTimeoutMs: this.p2pTimeoutMs, iceServers: [...this.serverIceServers] };
  }

  _iceServers() {
    return [...this.iceServers, ...this.serverIceServers];
  }

  _applyMuteToTracks() {
    if (!this.localStream) return;
    for (const t of this.localStream.getAudioTracks()) t.enabled = !this.muted.audio;
    for (const t of this.localStream.getVideoTracks()) t.enabled = !this.muted.video;
  }

  /** Sends a reliable message; `call` (optional) is the Call an error reply would be about. */
  _send(msg, call = null) {
    if (this._closed) return 0;
    const seq = this._sendReliable(msg);
    if (call) {
      this._callSeqs.set(seq, call);
      if (this._callSeqs.size > 256) this._callSeqs.delete(this._callSeqs.keys().next().value);
    }
    return seq;
  }

  _forget(call) {
    if (this.calls.get(call.id) === call) this.calls.delete(call.id);
    for (const [id, c] of this._aliases) if (c === call) this._aliases.delete(id);
  }

  _startSession() {
    const hadSession = this.deviceId !== null || this._registerSeq !== 0;
    this._resetSession();
    this.deviceId = null;
    this._callSeqs.clear();
    if (hadSession) {
      // A new session is a new device for the server: its calls are over.
      for (const c of [...this.calls.values()]) c._end("disconnected", "remote");
    }
    const msg = { type: "register", user: this.user };
    if (this.token) msg.token = this.token;
    this._registerSeq = this._sendReliable(msg);
  }

  _teardown() {
    for (const c of [...this.calls.values()]) c._end("disconnected", "remote");
  }

  _handle(msg) {
    const id = msg.call == null ? null : String(msg.call);
    switch (msg.type) {
      case "registered":
        return this._onRegistered(msg);
      case "call_ringing": {
        const c = this.calls.get(id);
        if (c && c.direction === "outgoing" && c.state === "calling") c._setState("ringing");
        return;
      }
      case "call_incoming":
        return this._onIncoming(id, msg.from);
      case "call_answered": {
        const c = this.calls.get(id);
        if (c) c._onAnswered(msg.device);
        return;
      }
      case "call_ended": {
        const c = this.calls.get(id);
        if (c) c._end(typeof msg.reason === "string" ? msg.reason : "hangup", "remote");
        this._orphans.delete(id);
        return;
      }
      case "call_signal": {
        const c = this.calls.get(id) || this._aliases.get(id);
        if (c) c._onSignal(msg.data);
        else this._keepOrphan(id, msg.data);
        return;
      }
      case "call_merged":
        return this._onMerged(id, msg.role === "caller" ? "caller" : "callee");
      case "error":
        return this._onServerError(msg);
      default:
        return; // unknown types are ignored (newer server)
    }
  }

  _onRegistered(msg) {
    this.deviceId = String(msg.device);
    this.session = msg.session;
    if (typeof msg.user === "string") this.user = msg.user;
    if (Number.isFinite(msg.p2p_timeout_ms) && msg.p2p_timeout_ms > 0) this.p2pTimeoutMs = msg.p2p_timeout_ms;
    this.serverIceServers = Array.isArray(msg.ice_servers) ? msg.ice_servers.filter((s) => s && typeof s === "object") : [];
    this._backoff = this._minDelay;
    this._setState("connected");
    const detail = this._registeredDetail();
    for (const w of this._registerWaiters.splice(0)) w.resolve(detail);
    this._emit("registered", detail);
  }

  _onIncoming(id, from) {
    if (!id || this.calls.has(id)) return;
    const call = new Call(this, { id, peer: String(from ?? ""), direction: "incoming" });
    this.calls.set(id, call);
    // Prepare the answer while ringing: the PeerConnection exists before the offer arrives.
    call._prepareAnswerer();
    this._emit("call", { call });
    this._emit("incoming", { call });
    this._replayOrphans(id, call);
  }

  /**
   * Glare: the call we made and the call made to us are one call `id`. The Call that goes on is
   * the one this device already has with that id (its PeerConnection may have prepared or sent
   * the offer/answer); the other one ends with reason "merged" (`mergedInto` = the survivor).
   * Without one, our outgoing call takes the id (a caller resends its offer and candidates
   * under it; a callee starts over with a fresh PeerConnection that answers the other's offer).
   */
  _onMerged(id, role) {
    if (!id) return;
    let survivor = this.calls.get(id) || null;
    const pending = [...this.calls.values()].filter((c) => c !== survivor && !c._answered && !c.ended);
    const outgoing = pending.filter((c) => c.direction === "outgoing" && (!survivor || c.peer === survivor.peer));
    const mine = outgoing[outgoing.length - 1] || null;
    let replaced = null;
    if (!survivor) {
      if (!mine) return;
      survivor = mine;
      const oldId = survivor.id;
      this.calls.delete(oldId);
      this._aliases.set(oldId, survivor);
      survivor.id = id;
      this.calls.set(id, survivor);
      if (role === "callee") {
        survivor.direction = "incoming";
        survivor._closePc();
        survivor._sentSignals = [];
        survivor._prepareAnswerer();
      } else {
        // Our offer and candidates went out under the old id: again under the merged one.
        for (const data of survivor._sentSignals.splice(0)) survivor._signal(data);
      }
      this._replayOrphans(id, survivor);
    } else {
      replaced = mine;
      if (role === "callee" && survivor.direction === "outgoing") survivor.direction = "incoming";
    }
    // Any other ringing call from the same person is the same conversation.
    for (const c of pending) {
      if (c === survivor || c.peer !== survivor.peer) continue;
      c.mergedInto = survivor;
      if (c === mine) replaced = c;
      c._end("merged", "remote");
    }
    survivor._onAnswered(null);
    this._emit("merged", { call: survivor, replaced });
  }

  _keepOrphan(id, data) {
    if (!id) return;
    const now = Date.now();
    for (const [k, list] of this._orphans) {
      if (!list.length || now - list[list.length - 1].at > ORPHAN_SIGNAL_TTL_MS) this._orphans.delete(k);
    }
    const list = this._orphans.get(id) || [];
    if (list.length < ORPHAN_SIGNALS_MAX) list.push({ data, at: now });
    this._orphans.set(id, list);
  }

  _replayOrphans(id, call) {
    const list = this._orphans.get(id);
    this._orphans.delete(id);
    if (list) for (const { data } of list) call._onSignal(data);
  }

  _onServerError(msg) {
    const code = typeof msg.code === "string" ? msg.code : "internal";
    const inReplyTo = msg.in_reply_to ?? null;
    const detail = {
      code,
      message: msg.message || ERROR_MESSAGES[code] || code,
      serverMessage: msg.message || "",
      inReplyTo,
    };
    if (!this.deviceId && (FATAL_REGISTER_ERRORS.has(code) || (inReplyTo !== null && inReplyTo === this._registerSeq))) {
      if (code === "unknown_type") detail.message = "This server does not support direct calls.";
      else if (code === "unauthorized") detail.message = ERROR_MESSAGES.unauthorized.replace("for this room", "for this user");
      this._emit("error", detail);
      const err = new ParleyError(code, detail.message);
      for (const w of this._registerWaiters.splice(0)) w.reject(err);
      this._fail();
      return;
    }
    const call = inReplyTo !== null ? this._callSeqs.get(inReplyTo) : null;
    if (call && !call.ended) {
      call._emit("error", detail);
      call._end("error", "remote", { code, message: detail.message });
      return;
    }
    this._emit("error", detail);
  }
}

export { ParleyError };
export default CallClient;
