// Parley direct calls page (/u/NAME): this tab is a device of user NAME; it calls and is called.
// Built only on the SDKs' public APIs (/sdk/calls.js, /sdk/parley.js).
import { CallClient, CALL_END_MESSAGES, isValidUserName } from "/sdk/calls.js";
import { clearStatus, setStatus, startLocalMedia as startLocalMediaOnce } from "/app/ui.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

/** Exposed for tests and debugging. */
const state = {
  client: null,
  /** Every Call of this page, in order of creation. */
  calls: [],
  /** The call shown in the call view (outgoing, or answered), or null. */
  current: null,
  /** Incoming calls still ringing here, oldest first. */
  ringing: [],
  localStream: null,
  mediaError: null,
  user: null,
  registered: false,
  registeredAt: null,
  /** Date.now() of the last click on "Answer" / "Call". */
  answerClickedAt: null,
  callClickedAt: null,
  /** The last end message shown (for tests). */
  lastEnd: null,
};
window.parleyCalls = state;


function show(view) {
  $("idle").hidden = view !== "idle";
  $("in-call").hidden = view !== "call";
  document.body.dataset.view = view;
}

function userFromPath() {
  const m = location.pathname.match(/^\/u\/([^/]*)\/?$/);
  if (!m) return null;
  try {
    return decodeURIComponent(m[1]);
  } catch {
    return m[1];
  }
}

const initial = (name) => [...String(name || "?").trim()][0]?.toUpperCase() || "?";

// ---- local media ------------------------------------------------------------------------------

function startLocalMedia() {
  return startLocalMediaOnce(state, "No camera found; calls are audio only.");
}

function showPreview(stream) {
  const video = $("preview");
  const pip = $("local-video");
  if (stream && stream.getVideoTracks().length) {
    video.srcObject = stream;
    video.play().catch(() => {});
    pip.srcObject = stream;
    pip.play().catch(() => {});
  } else {
    $("preview-empty").hidden = false;
    $("preview-empty").textContent = stream ? "Camera unavailable" : "No camera or microphone";
  }
}

// ---- ringing sound: a WebAudio beep pattern (no asset files) -----------------------------------

const ringer = {
  ctx: null,
  timer: 0,
  start() {
    if (this.timer) return;
    try {
      this.ctx = this.ctx || new AudioContext();
      if (this.ctx.state === "suspended") this.ctx.resume().catch(() => {});
    } catch {
      return; // no WebAudio: the ringing stays visual
    }
    const ring = () => {
      const ctx = this.ctx;
      const t0 = ctx.currentTime + 0.02;
      // Two short double-tone bursts, then silence: 0.4 s on, 0.2 s off, 0.4 s on.
      for (const start of [0, 0.6]) {
        const gain = ctx.createGain();
        gain.gain.setValueAtTime(0, t0 + start);
        gain.gain.linearRampToValueAtTime(0.12, t0 + start + 0.02);
        gain.gain.setValueAtTime(0.12, t0 + start + 0.38);
        gain.gain.linearRampToValueAtTime(0, t0 + start + 0.4);
        gain.connect(ctx.destination);
        for (const f of [440, 480]) {
          const osc = ctx.createOscillator();
          osc.frequency.value = f;
          osc.connect(gain);
          osc.start(t0 + start);
          osc.stop(t0 + start + 0.42);
        }
      }
    };
    ring();
    this.timer = setInterval(ring, 3000);
    document.body.dataset.ringing = "true";
  },
  stop() {
    clearInterval(this.timer);
    this.timer = 0;
    if (this.ctx && this.ctx.state === "running") this.ctx.suspend().catch(() => {});
    document.body.dataset.ringing = "false";
  },
  get active() {
    return !!this.timer;
  },
};
state.ringer = ringer;

// ---- messages ---------------------------------------------------------------------------------

function endMessage(call, reason, by, detail = {}) {
  const peer = call.peer || "The other side";
  if (reason === "merged") return "";
  if (call.direction === "incoming" && !call.answeredAt) {
    // This device rang and never took the call.
    if (reason === "cancelled" || reason === "no_answer" || reason === "gone") return `Missed call from ${peer}.`;
    if (reason === "declined") return by === "local" ? "Call declined." : "Call declined on another device.";
    if (reason === "answered_elsewhere") return "Answered on another device.";
  }
  if (by === "local") {
    if (reason === "cancelled") return "Call cancelled.";
    if (reason === "hangup") return "Call ended.";
  }
  if (reason === "error") return `The call failed${detail.message ? `: ${detail.message}` : "."}`;
  const text = CALL_END_MESSAGES[reason] || "The call ended.";
  return text.replaceAll("{peer}", peer);
}

// ---- the call view ----------------------------------------------------------------------------

const STATE_TEXT = {
  calling: (c) => `Calling ${c.peer}…`,
  ringing: (c) => `Ringing ${c.peer}…`,
  connecting: () => "Connecting…",
  connected: () => "",
};

function renderCall() {
  const call = state.current;
  if (!call) return;
  $("peer-name").textContent = call.peer;
  $("remote-avatar").textContent = initial(call.peer);
  const stateText = STATE_TEXT[call.state] ? STATE_TEXT[call.state](call) : "";
  const hasVideo = call.remoteStream.getVideoTracks().some((t) => t.readyState === "live");
  const videoOff = call.remoteMuted.video;
  const showVideo = call.state === "connected" && hasVideo && !videoOff;
  $("call-state").textContent = call.state === "connected" && videoOff ? `${call.peer} turned the camera off` : stateText;
  $("remote-placeholder").hidden = showVideo;
  $("remote-video").style.visibility = showVideo ? "visible" : "hidden";
  $("remote-mic-off").hidden = !call.remoteMuted.audio;
  const path = $("media-path");
  const known = call.state === "connected" || call.media === "sfu";
  path.hidden = !known;
  path.dataset.media = known ? call.media : "none";
  path.textContent = call.media === "sfu" ? "via server" : "peer-to-peer";
  path.title = call.media === "sfu" ? "Media goes through the Parley server" : "Media goes directly between the two devices";
  document.body.dataset.callState = call.state;
  document.body.dataset.media = call.media;
}

function attachRemote(call) {
  const v = $("remote-video");
  // Re-attached on every change of tracks: the element picks up a swapped track at once.
  v.srcObject = null;
  v.srcObject = call.remoteStream;
  const p = v.play();
  if (p && p.catch) {
    p.catch((err) => {
      if (err && err.name === "NotAllowedError") {
        const btn = $("enable-audio");
        btn.hidden = false;
        btn.onclick = () => {
          btn.hidden = true;
          v.play().catch(() => {});
        };
      }
    });
  }
}

/** Shows `call` in the call view and follows its events. */
function showCall(call) {
  state.current = call;
  clearStatus("end");
  show("call");
  $("enable-audio").hidden = true;
  const v = $("remote-video");
  v.srcObject = null;
  if (state.localStream) {
    $("local-video").srcObject = state.localStream;
    $("local-video").play().catch(() => {});
  }
  renderCall();
  $("hangup").focus();
}

function watchCall(call) {
  const isCurrent = () => state.current === call;
  call.on("state", () => {
    if (isCurrent()) renderCall();
  });
  call.on("track", () => {
    if (!isCurrent()) return;
    attachRemote(call);
    renderCall();
  });
  call.on("trackremoved", () => {
    if (isCurrent()) renderCall();
  });
  call.on("remotemute", () => {
    if (isCurrent()) renderCall();
  });
  call.on("media", ({ media }) => {
    if (!isCurrent()) return;
    renderCall();
    if (media === "sfu") setStatus("path", "Peer-to-peer connection failed; the call goes through the server.", "info");
  });
  call.on("firstframe", () => {
    if (isCurrent()) renderCall();
  });
  call.on("error", ({ code, message }) => {
    if (isCurrent() && code !== "negotiation_failed") setStatus("call-error", message, "warn");
  });
  call.on("ended", ({ reason, by, mergedInto, message }) => {
    removeRinging(call);
    if (reason === "merged") {
      // Crossing calls became one: show the one that goes on.
      if (isCurrent() && mergedInto) showCall(mergedInto);
      return;
    }
    const text = endMessage(call, reason, by, { message });
    state.lastEnd = { id: call.id, reason, by, text };
    if (isCurrent()) {
      state.current = null;
      $("remote-video").srcObject = null;
      clearStatus("path");
      clearStatus("call-error");
      delete document.body.dataset.callState;
      show("idle");
      $("callee-input").focus();
    }
    const busyElsewhere = state.current && state.current !== call;
    if (text && !(busyElsewhere && reason === "answered_elsewhere")) {
      setStatus("end", text, ["declined", "busy", "unavailable", "no_answer", "error", "gone", "disconnected"].includes(reason) && by !== "local" ? "warn" : "info");
    }
  });
}

// ---- ringing ----------------------------------------------------------------------------------

function renderRinging() {
  const call = state.ringing[0] || null;
  const panel = $("ringing");
  if (!call) {
    panel.hidden = true;
    ringer.stop();
    return;
  }
  $("caller-name").textContent = call.peer;
  $("caller-avatar").textContent = initial(call.peer);
  panel.hidden = false;
  panel.dataset.call = call.id;
  ringer.start();
}

function removeRinging(call) {
  const i = state.ringing.indexOf(call);
  if (i < 0) return;
  state.ringing.splice(i, 1);
  renderRinging();
}

function onIncoming(call) {
  state.calls.push(call);
  watchCall(call);
  state.ringing.push(call);
  clearStatus("end");
  renderRinging();
  if (state.ringing[0] === call) $("answer").focus();
}

$("answer").onclick = () => {
  const call = state.ringing[0];
  if (!call) return;
  state.answerClickedAt = Date.now();
  call.answerClickedAt = state.answerClickedAt;
  if (state.current && state.current !== call) state.current.hangup();
  removeRinging(call);
  showCall(call);
  call.answer({ localStream: state.localStream });
};

$("decline").onclick = () => {
  const call = state.ringing[0];
  if (!call) return;
  removeRinging(call);
  call.decline();
};

// ---- calling ----------------------------------------------------------------------------------

async function placeCall(to) {
  const client = state.client;
  if (!client || !state.registered) return;
  to = String(to || "").trim();
  if (!isValidUserName(to)) {
    setStatus("callee", "Enter a user name: 1–64 characters, letters, digits, “-”, “_” or “.”.", "error");
    $("callee-input").setAttribute("aria-invalid", "true");
    $("callee-input").focus();
    return;
  }
  clearStatus("callee");
  clearStatus("end");
  $("callee-input").removeAttribute("aria-invalid");
  if (state.current) state.current.hangup();
  // The offer carries the camera and microphone when they are ready (they normally are).
  const stream = await startLocalMedia();
  state.callClickedAt = state.callClickedAt || Date.now();
  const call = client.call(to, { localStream: stream || undefined });
  state.calls.push(call);
  watchCall(call);
  showCall(call);
}

$("call-form").onsubmit = (ev) => {
  ev.preventDefault();
  state.callClickedAt = Date.now();
  placeCall($("callee-input").value);
};
$("callee-input").oninput = () => {
  $("callee-input").removeAttribute("aria-invalid");
  clearStatus("callee");
};

// ---- controls ---------------------------------------------------------------------------------

function setToggle(btn, on, onLabel, offLabel) {
  btn.querySelector(".label").textContent = on ? onLabel : offLabel;
  btn.classList.toggle("off", on);
}

$("hangup").onclick = () => {
  const call = state.current;
  if (call) call.hangup();
};
$("mute").onclick = () => state.client && state.client.setMuted({ audio: !state.client.muted.audio });
$("camera").onclick = () => state.client && state.client.setMuted({ video: !state.client.muted.video });

// ---- start ------------------------------------------------------------------------------------

function main() {
  const user = userFromPath();
  if (!user || !isValidUserName(user)) {
    $("you-are").textContent = "Invalid user name";
    setStatus("user", `“${user || ""}” is not a valid user name. Use 1–64 characters: letters, digits, “-”, “_” or “.”.`, "error");
    $("presence").textContent = "Not registered";
    $("presence").dataset.state = "failed";
    startLocalMedia().then(showPreview);
    return;
  }
  state.user = user;
  document.title = `${user} · Parley`;
  $("me").textContent = `You are ${user}`;
  $("you-are").textContent = `You are ${user}`;
  $("my-link").textContent = `${location.origin}/u/${encodeURIComponent(user)}`;

  const p2p = !(params.get("p2p") === "0" || params.get("p2p") === "false");
  const relay = params.get("relay") === "1";
  const client = new CallClient({ user, token: params.get("token"), p2p, iceTransportPolicy: relay ? "relay" : "all" });
  state.client = client;

  client.on("connectionstatechange", ({ state: s }) => {
    const presence = $("presence");
    presence.dataset.state = s;
    presence.textContent =
      s === "connected" ? "Online" : s === "reconnecting" ? "Reconnecting…" : s === "failed" ? "Offline" : s === "closed" ? "Offline" : "Connecting…";
    if (s === "reconnecting") setStatus("conn", "Cannot reach the server, retrying…", "warn");
    else clearStatus("conn");
  });
  client.on("incoming", ({ call }) => onIncoming(call));
  client.on("merged", ({ call }) => {
    // Crossing calls: the call with that person goes on as `call`.
    if (!state.calls.includes(call)) {
      state.calls.push(call);
      watchCall(call);
    }
    removeRinging(call);
    if (state.current !== call) showCall(call);
    else renderCall();
  });
  client.on("localmute", ({ audio, video }) => {
    setToggle($("mute"), audio, "Unmute", "Mute");
    setToggle($("camera"), video, "Camera on", "Camera off");
  });
  client.on("error", ({ message }) => {
    if (!state.registered) return; // shown by register() below
    setStatus("server", message, "warn");
    setTimeout(() => clearStatus("server"), 5000);
  });

  startLocalMedia().then((stream) => {
    showPreview(stream);
    if (stream) client.setLocalStream(stream).catch((err) => console.warn("setLocalStream", err));
  });

  client.register().then(
    async () => {
      state.registered = true;
      state.registeredAt = Date.now();
      $("call-button").disabled = false;
      clearStatus("server");
      const to = params.get("call");
      if (to) {
        $("callee-input").value = to;
        await placeCall(to);
      }
    },
    (err) => {
      $("presence").textContent = "Not registered";
      $("presence").dataset.state = "failed";
      setStatus("server", `Could not register as ${user}: ${err.message}`, "error");
    },
  );
}

window.addEventListener("pagehide", () => {
  if (state.client) state.client.close();
});

main();
