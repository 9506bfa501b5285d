// Parley call UI, built only on the SDK's public API.
import {
  ParleyClient,
  ParleyError,
  ERROR_MESSAGES,
  getLocalMedia,
  isValidRoomName,
  isValidDisplayName,
} from "/sdk/parley.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const NAME_KEY = "parley.name";

/** Exposed for tests and debugging: `window.parley.client` is the SDK client once created. */
const state = {
  client: null,
  localStream: null,
  room: null,
  joinStartedAt: null,
  mediaError: null,
};
window.parley = state;

// ---- status area ------------------------------------------------------------------------------

const status = $("status");

function setStatus(key, text, kind = "info") {
  let el = status.querySelector(`[data-key="${key}"]`);
  if (!el) {
    el = document.createElement("p");
    el.dataset.key = key;
    status.append(el);
  }
  el.dataset.kind = kind;
  el.textContent = text;
}

function clearStatus(key) {
  status.querySelector(`[data-key="${key}"]`)?.remove();
}

// ---- views ------------------------------------------------------------------------------------

function show(view) {
  for (const id of ["home", "lobby", "call", "left"]) $(id).hidden = id !== view;
  document.body.dataset.view = view;
}

function roomFromPath() {
  const m = location.pathname.match(/^\/r\/([^/]*)\/?$/);
  if (!m) return null;
  try {
    return decodeURIComponent(m[1]);
  } catch {
    return m[1];
  }
}

function initialName() {
  const fromUrl = params.get("name");
  if (fromUrl) return fromUrl;
  try {
    return localStorage.getItem(NAME_KEY) || "";
  } catch {
    return "";
  }
}

function showHome(prefill = "") {
  show("home");
  const input = $("room-input");
  input.value = prefill;
  $("home-form").onsubmit = (ev) => {
    ev.preventDefault();
    const room = input.value.trim();
    if (!isValidRoomName(room)) {
      setStatus("room", ERROR_MESSAGES.invalid_room, "error");
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    location.href = `/r/${encodeURIComponent(room)}`;
  };
  input.oninput = () => {
    input.removeAttribute("aria-invalid");
    clearStatus("room");
  };
  input.focus();
}

// ---- local media ------------------------------------------------------------------------------

let mediaPromise = null;

function startLocalMedia() {
  if (!mediaPromise) {
    mediaPromise = getLocalMedia({ audio: true, video: true }).then(
      (stream) => {
        state.localStream = stream;
        clearStatus("media");
        if (!stream.getAudioTracks().length) setStatus("media", "No microphone found; others will not hear you.", "warn");
        else if (!stream.getVideoTracks().length) setStatus("media", "No camera found; joining with audio only.", "warn");
        return stream;
      },
      (err) => {
        state.mediaError = err;
        const text = err instanceof ParleyError ? err.message : ERROR_MESSAGES.media_error;
        setStatus("media", text, "error");
        return null;
      },
    );
  }
  return mediaPromise;
}

function showLobby(room) {
  show("lobby");
  $("lobby-room").textContent = room;
  const nameInput = $("name-input");
  nameInput.value = initialName();
  startLocalMedia().then((stream) => {
    const video = $("preview");
    if (stream && stream.getVideoTracks().length) {
      video.srcObject = stream;
      video.play().catch(() => {});
    } else {
      $("preview-empty").hidden = false;
      $("preview-empty").textContent = stream ? "Camera unavailable" : "No camera or microphone";
    }
  });
  $("lobby-form").onsubmit = (ev) => {
    ev.preventDefault();
    const name = nameInput.value.trim();
    if (!isValidDisplayName(name)) {
      setStatus("name", "Enter your name (1–64 characters).", "error");
      nameInput.focus();
      return;
    }
    clearStatus("name");
    try {
      localStorage.setItem(NAME_KEY, name);
    } catch {}
    startCall(room, name);
  };
  if (!nameInput.value) nameInput.focus();
  else $("join").focus();
}

// ---- tiles ------------------------------------------------------------------------------------

const grid = $("grid");
const tiles = new Map(); // participant id (or "local" before joined) → tile record

function updateGridCount() {
  const n = grid.children.length;
  grid.dataset.count = String(n);
  const cols = n <= 1 ? 1 : n <= 4 ? 2 : n <= 9 ? 3 : 4;
  grid.style.setProperty("--cols", String(cols));
  grid.style.setProperty("--rows", String(Math.max(1, Math.ceil(n / cols))));
}

function createTile(key, { name = "", local = false } = {}) {
  const node = $("tile-template").content.firstElementChild.cloneNode(true);
  const rec = {
    node,
    video: node.querySelector("video"),
    stream: new MediaStream(),
    local,
  };
  if (local) {
    node.classList.add("local");
    rec.video.muted = true;
  }
  node.dataset.participant = local ? "" : key;
  setTileName(rec, name);
  grid.append(node);
  tiles.set(key, rec);
  updateGridCount();
  updateVideoOff(rec);
  return rec;
}

function setTileName(rec, name) {
  const label = name || "Guest";
  rec.node.querySelector(".name").textContent = rec.local ? `${label} (you)` : label;
  rec.node.querySelector(".avatar").textContent = [...label.trim()][0]?.toUpperCase() || "?";
  rec.node.setAttribute("aria-label", rec.local ? `${label} (you)` : label);
}

function tileFor(id) {
  return tiles.get(id) || createTile(id);
}

function removeTile(id) {
  const rec = tiles.get(id);
  if (!rec) return;
  rec.video.srcObject = null;
  rec.node.remove();
  tiles.delete(id);
  updateGridCount();
}

function setTileMute(rec, audio, video) {
  rec.node.dataset.muted = String(!!audio);
  rec.node.dataset.videoMuted = String(!!video);
  rec.node.querySelector(".mic-off").hidden = !audio;
  updateVideoOff(rec);
}

function updateVideoOff(rec) {
  const hasVideo = rec.stream.getVideoTracks().length > 0;
  const off = rec.node.dataset.videoMuted === "true" || !hasVideo;
  rec.node.dataset.videoOff = String(off);
}

function playTile(rec) {
  // Attached only once there is a track: a media element waiting for data delays the page's
  // load event.
  if (rec.video.srcObject !== rec.stream) rec.video.srcObject = rec.stream;
  const p = rec.video.play();
  if (p && p.catch) {
    p.catch((err) => {
      if (err && err.name === "NotAllowedError") {
        // Autoplay with sound needs a user gesture (e.g. after ?autojoin=1).
        const btn = $("enable-audio");
        btn.hidden = false;
        btn.onclick = () => {
          btn.hidden = true;
          for (const r of tiles.values()) r.video.play().catch(() => {});
        };
      }
    });
  }
}

// ---- the call ---------------------------------------------------------------------------------

function startCall(room, name) {
  show("call");
  state.joinStartedAt = Date.now();
  const client = new ParleyClient({ room, name, localStream: state.localStream });
  state.client = client;

  const local = createTile("local", { name, local: true });
  const showLocal = (stream) => {
    if (!stream) return;
    for (const t of stream.getTracks()) if (t.kind === "video") local.stream.addTrack(t);
    updateVideoOff(local);
    playTile(local);
  };
  if (state.localStream) showLocal(state.localStream);
  else {
    // ?autojoin=1: join and start the devices at the same time; tracks are swapped in later.
    startLocalMedia().then((stream) => {
      if (client.connectionState === "closed" || client.connectionState === "failed") return;
      client.setLocalStream(stream).catch((err) => console.warn("setLocalStream", err));
      showLocal(stream);
    });
  }

  client.on("connectionstatechange", ({ state: s }) => {
    document.body.dataset.connection = s;
    if (s === "connecting") setStatus("conn", "Connecting…");
    else if (s === "reconnecting") setStatus("conn", "Cannot reach the server, retrying…", "warn");
    else clearStatus("conn");
  });
  client.on("mediastatechange", ({ state: s }) => {
    if (s === "failed" || s === "disconnected") setStatus("media-conn", "Media connection interrupted, reconnecting…", "warn");
    else if (s === "connected") clearStatus("media-conn");
  });
  client.on("joined", ({ participantId }) => {
    tiles.delete("local");
    tiles.set(participantId, local);
    local.node.dataset.participant = participantId;
  });
  client.on("participantjoined", (p) => {
    const rec = tileFor(p.id);
    setTileName(rec, p.name);
    setTileMute(rec, p.audioMuted, p.videoMuted);
    rec.node.dataset.speaking = String(!!p.speaking);
  });
  client.on("participantleft", ({ participantId }) => removeTile(participantId));
  client.on("track", ({ participantId, track }) => {
    if (!participantId) return;
    const rec = tileFor(participantId);
    for (const t of rec.stream.getTracks()) if (t.kind === track.kind && t !== track) rec.stream.removeTrack(t);
    if (!rec.stream.getTracks().includes(track)) rec.stream.addTrack(track);
    updateVideoOff(rec);
    playTile(rec);
  });
  client.on("trackremoved", ({ participantId, track }) => {
    const rec = tiles.get(participantId);
    if (!rec) return;
    rec.stream.removeTrack(track);
    updateVideoOff(rec);
  });
  client.on("mute", ({ participantId, audio, video }) => {
    const rec = tiles.get(participantId);
    if (rec && !rec.local) setTileMute(rec, audio, video);
  });
  client.on("speaking", ({ participantId, speaking }) => {
    const rec = tiles.get(participantId);
    if (rec) rec.node.dataset.speaking = String(speaking);
  });
  client.on("localmute", ({ audio, video }) => {
    setTileMute(local, audio, video);
    setToggle($("mute"), audio, "Unmute", "Mute");
    setToggle($("camera"), video, "Camera on", "Camera off");
  });
  client.on("error", ({ code, message }) => {
    if (code === "negotiation_failed") setStatus("negotiation", message, "warn");
    else setStatus("server", code === "room_full" ? "This room is full." : message, "error");
  });

  $("mute").onclick = () => client.setMuted({ audio: !client.muted.audio });
  $("camera").onclick = () => client.setMuted({ video: !client.muted.video });
  $("leave").onclick = () => leaveCall();

  client.join().then(
    () => clearStatus("server"),
    (err) => {
      setStatus("server", err.code === "room_full" ? "This room is full." : err.message, "error");
      for (const id of [...tiles.keys()]) removeTile(id);
      show("left");
      $("left").querySelector("h1").textContent = err.code === "room_full" ? "This room is full" : "Could not join";
      $("rejoin").textContent = "Try again";
    },
  );
}

function setToggle(btn, on, onLabel, offLabel) {
  btn.querySelector(".label").textContent = on ? onLabel : offLabel;
  btn.classList.toggle("off", on);
}

function leaveCall() {
  const client = state.client;
  if (client) client.leave();
  if (state.localStream) for (const t of state.localStream.getTracks()) t.stop();
  for (const id of [...tiles.keys()]) removeTile(id);
  for (const key of ["conn", "media-conn", "negotiation"]) clearStatus(key);
  show("left");
}

// ---- start ------------------------------------------------------------------------------------

$("rejoin").onclick = () => location.reload();
$("copy-link").onclick = async () => {
  const url = `${location.origin}/r/${encodeURIComponent(state.room)}`;
  try {
    await navigator.clipboard.writeText(url);
    setStatus("copy", "Invite link copied.");
  } catch {
    setStatus("copy", `Invite link: ${url}`);
  }
  setTimeout(() => clearStatus("copy"), 3000);
};

function main() {
  const room = roomFromPath();
  if (room === null) {
    showHome();
    return;
  }
  if (!isValidRoomName(room)) {
    setStatus("room", `“${room}” is not a valid room name. ${ERROR_MESSAGES.invalid_room.replace(/^Invalid room name\. /, "")}`, "error");
    showHome(room.replace(/[^A-Za-z0-9._-]/g, "-").slice(0, 64));
    return;
  }
  state.room = room;
  document.title = `${room} · Parley`;
  $("room-label").textContent = room;
  $("copy-link").hidden = false;
  if (params.get("autojoin") === "1") {
    const name = (params.get("name") || "").trim().slice(0, 64) || "Guest";
    startLocalMedia();
    startCall(room, name);
  } else {
    showLobby(room);
  }
}

main();
