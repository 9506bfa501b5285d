// Parley call UI, built only on the SDK's public API.
import {
  ParleyClient,
  ERROR_MESSAGES,
  isValidRoomName,
  isValidDisplayName,
} from "/sdk/parley.js";
import { clearStatus, setStatus, startLocalMedia as startLocalMediaOnce } from "/app/ui.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const NAME_KEY = "parley.name";
// Size changes of the shown videos are reported this long after they settle.
const VIEW_DEBOUNCE_MS = 200;

/** Exposed for tests and debugging: `window.parley.client` is the SDK client once created. */
const state = {
  client: null,
  localStream: null,
  room: null,
  joinStartedAt: null,
  mediaError: null,
  /** The participant id of the dominant speaker, or null. */
  dominant: null,
  /** The last `view` reported: [{id, source, width, height}]. */
  view: [],
  /** Remote participants, most recent speaker first (then in order of joining): last-N. */
  speakers: [],
};
window.parley = state;


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

function startLocalMedia() {
  return startLocalMediaOnce(state, "No camera found; joining with audio only.");
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
const stage = $("stage");
const tiles = new Map(); // participant id (or "local" before joined) → tile record
const screens = new Map(); // participant id → screen-share tile record
const pausedVideos = new Set(); // "<participant id>/<source>" whose video Parley paused

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
  node.dataset.dominant = String(!local && key === state.dominant);
  setTileName(rec, name);
  grid.append(node);
  tiles.set(key, rec);
  updateGridCount();
  updateVideoOff(rec);
  if (!local) {
    setTilePaused(rec, pausedVideos.has(`${key}/camera`));
    observeTile(node);
  }
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
  unobserveTile(rec.node);
  rec.video.srcObject = null;
  rec.node.remove();
  tiles.delete(id);
  updateGridCount();
  scheduleView();
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
  if (!rec.local) scheduleView();
}

function setTilePaused(rec, paused) {
  rec.node.dataset.videoPaused = String(!!paused);
  rec.node.querySelector(".paused-label").hidden = !paused;
}

function setDominant(id) {
  state.dominant = id;
  for (const [key, rec] of tiles) rec.node.dataset.dominant = String(id !== null && key === id);
}

// ---- screen-share tiles: large, on the stage above the grid ------------------------------------

function participantName(id) {
  const p = state.client && state.client.participants.get(id);
  return (p && p.name) || "Guest";
}

function createScreenTile(id) {
  const node = $("tile-template").content.firstElementChild.cloneNode(true);
  node.classList.add("screen");
  node.dataset.source = "screen";
  node.dataset.participant = id;
  node.querySelector(".mic-off").remove();
  const rec = { node, video: node.querySelector("video"), stream: new MediaStream(), local: false, track: null, shown: false, onMute: null };
  // Screen shares carry no sound of their own; the participant's microphone plays in their tile.
  rec.video.muted = true;
  setScreenName(rec, participantName(id));
  setTilePaused(rec, pausedVideos.has(`${id}/screen`));
  stage.append(node);
  screens.set(id, rec);
  observeTile(node);
  return rec;
}

function setScreenName(rec, name) {
  const label = `${name || "Guest"} (screen)`;
  rec.node.querySelector(".name").textContent = label;
  rec.node.querySelector(".avatar").textContent = [...(name || "Guest").trim()][0]?.toUpperCase() || "?";
  rec.node.setAttribute("aria-label", label);
}

function setScreenTrack(id, track) {
  const rec = screens.get(id) || createScreenTile(id);
  if (rec.track && rec.track !== track) {
    rec.track.removeEventListener("mute", rec.onMute);
    rec.track.removeEventListener("unmute", rec.onMute);
    rec.stream.removeTrack(rec.track);
  }
  if (rec.track !== track) {
    rec.track = track;
    rec.shown = false;
    rec.onMute = () => updateScreenTile(rec);
    track.addEventListener("mute", rec.onMute);
    track.addEventListener("unmute", rec.onMute);
    rec.stream.addTrack(track);
  }
  updateScreenTile(rec);
  playTile(rec);
}

/**
 * A screen tile shows from its track's arrival (so that it is in the `view` and Parley sends
 * it); once frames have flowed, a muted track hides it until it unmutes.
 */
function updateScreenTile(rec) {
  const t = rec.track;
  if (t && !t.muted) rec.shown = true;
  rec.node.hidden = !!(t && t.muted && rec.shown);
  rec.node.dataset.videoOff = String(!t || t.muted);
  updateStage();
  scheduleView();
}

function removeScreenTile(id) {
  const rec = screens.get(id);
  if (!rec) return;
  if (rec.track) {
    rec.track.removeEventListener("mute", rec.onMute);
    rec.track.removeEventListener("unmute", rec.onMute);
  }
  unobserveTile(rec.node);
  rec.video.srcObject = null;
  rec.node.remove();
  screens.delete(id);
  updateStage();
  scheduleView();
}

function updateStage() {
  const any = [...screens.values()].some((r) => !r.node.hidden);
  stage.hidden = !any;
  stage.dataset.count = String([...screens.values()].filter((r) => !r.node.hidden).length);
  $("call").dataset.screen = String(any);
}

// ---- view reports: which remote videos are shown, and how big (Parley picks layers from it) ----

const intersecting = new WeakMap(); // tile node → last IntersectionObserver verdict
const lastSize = new WeakMap(); // tile node → last measured {width, height} in device pixels
let viewTimer = 0;
let viewJson = "[]"; // the last view reported (nothing is reported while no tile is shown)
const resizeObserver = typeof ResizeObserver === "function" ? new ResizeObserver(() => scheduleView()) : null;
const intersectionObserver =
  typeof IntersectionObserver === "function"
    ? new IntersectionObserver((entries) => {
        for (const e of entries) intersecting.set(e.target, e.isIntersecting);
        scheduleView();
      })
    : null;
document.addEventListener("visibilitychange", () => scheduleView());

function observeTile(node) {
  resizeObserver?.observe(node);
  intersectionObserver?.observe(node);
}

function unobserveTile(node) {
  resizeObserver?.unobserve(node);
  intersectionObserver?.unobserve(node);
}

/**
 * Last-N: in a room of more remote participants than the server's `last_n`, the ids whose
 * camera is shown (the most recent speakers); null when every camera is shown.
 */
function lastNShown() {
  const n = state.client && state.client.lastN;
  const remote = [...tiles.keys()].filter((id) => !tiles.get(id).local);
  if (!n || remote.length <= n) return null;
  const order = state.speakers.filter((id) => tiles.has(id));
  for (const id of remote) if (!order.includes(id)) order.push(id);
  return new Set(order.slice(0, n));
}

/** Marks the tiles whose camera last-N leaves out, and reports the view if it changed. */
function applyLastN() {
  const shown = lastNShown();
  for (const [id, rec] of tiles) {
    if (rec.local) continue;
    rec.node.dataset.lastnHidden = String(!!shown && !shown.has(id));
  }
  scheduleView();
}

function speakerFirst(id) {
  if (!id || (state.client && id === state.client.participantId)) return;
  state.speakers = [id, ...state.speakers.filter((x) => x !== id)];
  applyLastN();
}

/** The remote videos on screen now: [{id, source, width, height}], sizes in device pixels. */
function currentView() {
  if (document.visibilityState === "hidden" || $("call").hidden) return [];
  const dpr = window.devicePixelRatio || 1;
  const view = [];
  const add = (id, source, rec) => {
    const node = rec.node;
    let size = null;
    if (node.isConnected && !node.hidden && node.clientWidth > 0 && node.clientHeight > 0) {
      if (intersecting.get(node) === false) return; // scrolled out of sight
      size = { width: Math.round(node.clientWidth * dpr), height: Math.round(node.clientHeight * dpr) };
      lastSize.set(node, size);
    } else if (source === "screen" && rec.track && rec.shown) {
      // Hidden only because its track is muted: keep asking for it at its last size.
      size = lastSize.get(node) || null;
    }
    if (size) view.push({ id, source, ...size });
  };
  const shown = lastNShown();
  for (const [id, rec] of tiles) {
    if (rec.local || rec.node.dataset.videoMuted === "true") continue;
    if (shown && !shown.has(id)) continue;
    add(id, "camera", rec);
  }
  for (const [id, rec] of screens) add(id, "screen", rec);
  view.sort((a, b) => (a.id === b.id ? a.source.localeCompare(b.source) : a.id < b.id ? -1 : 1));
  return view;
}

const viewKeys = (view) => view.map((t) => `${t.id}/${t.source}`).join(",");

/**
 * Reports the view to the SDK: at once when a video appears or goes, VIEW_DEBOUNCE_MS after
 * the last size change otherwise, and only when it changed.
 */
function scheduleView() {
  const client = state.client;
  if (!client || client.connectionState === "closed" || client.connectionState === "failed") return;
  if (viewKeys(currentView()) !== viewKeys(state.view)) {
    flushView();
    return;
  }
  clearTimeout(viewTimer);
  viewTimer = setTimeout(flushView, VIEW_DEBOUNCE_MS);
}

function flushView() {
  clearTimeout(viewTimer);
  viewTimer = 0;
  const client = state.client;
  if (!client || client.connectionState === "closed" || client.connectionState === "failed") return;
  const view = currentView();
  const json = JSON.stringify(view);
  state.view = view;
  if (json === viewJson) return;
  viewJson = json;
  client.setView(view);
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
  const token = new URLSearchParams(location.search).get("token");
  // ?relay=1: media through TURN only (networks that need it; tests).
  const relay = new URLSearchParams(location.search).get("relay") === "1";
  const client = new ParleyClient({
    room,
    name,
    token,
    localStream: state.localStream,
    iceTransportPolicy: relay ? "relay" : "all",
  });
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
    const screen = screens.get(p.id);
    if (screen) setScreenName(screen, p.name);
    if (p.speaking) speakerFirst(p.id);
    else applyLastN();
  });
  client.on("participantleft", ({ participantId }) => {
    removeScreenTile(participantId);
    removeTile(participantId);
    pausedVideos.delete(`${participantId}/camera`);
    pausedVideos.delete(`${participantId}/screen`);
    if (state.dominant === participantId) setDominant(null);
    state.speakers = state.speakers.filter((x) => x !== participantId);
    applyLastN();
  });
  client.on("track", ({ participantId, source, track }) => {
    if (!participantId) return;
    if (source === "screen") {
      if (track.kind === "video") setScreenTrack(participantId, track);
      return;
    }
    const rec = tileFor(participantId);
    for (const t of rec.stream.getTracks()) if (t.kind === track.kind && t !== track) rec.stream.removeTrack(t);
    if (!rec.stream.getTracks().includes(track)) rec.stream.addTrack(track);
    updateVideoOff(rec);
    playTile(rec);
  });
  client.on("trackremoved", ({ participantId, source, track }) => {
    if (source === "screen") {
      if (screens.get(participantId)?.track === track) removeScreenTile(participantId);
      return;
    }
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
    if (speaking) speakerFirst(participantId);
  });
  client.on("dominantspeaker", ({ participantId }) => {
    setDominant(participantId);
    speakerFirst(participantId);
  });
  client.on("videopaused", ({ participantId, source, paused }) => {
    const key = `${participantId}/${source}`;
    if (paused) pausedVideos.add(key);
    else pausedVideos.delete(key);
    const rec = source === "screen" ? screens.get(participantId) : tiles.get(participantId);
    if (rec && !rec.local) setTilePaused(rec, paused);
  });
  client.on("screensharechange", ({ active }) => {
    const btn = $("screen");
    btn.querySelector(".label").textContent = active ? "Stop sharing" : "Share screen";
    btn.classList.toggle("active", active);
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
  const screenBtn = $("screen");
  screenBtn.hidden = !(navigator.mediaDevices && navigator.mediaDevices.getDisplayMedia);
  screenBtn.onclick = async () => {
    if (client.screenTrack) {
      client.stopScreenShare().catch((err) => console.warn("stopScreenShare", err));
      return;
    }
    screenBtn.disabled = true;
    try {
      await client.startScreenShare();
      clearStatus("screen");
    } catch (err) {
      const denied = err && err.code === "screen_share_denied";
      setStatus("screen", (err && err.message) || ERROR_MESSAGES.screen_share_failed, denied ? "info" : "warn");
      setTimeout(() => clearStatus("screen"), 4000);
    } finally {
      screenBtn.disabled = false;
    }
  };

  // ?muted=1: join with the microphone muted.
  if (new URLSearchParams(location.search).get("muted") === "1") client.setMuted({ audio: true });
  client.join().then(
    () => clearStatus("server"),
    (err) => {
      setStatus("server", err.code === "room_full" ? "This room is full." : err.message, "error");
      for (const id of [...screens.keys()]) removeScreenTile(id);
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
  for (const id of [...screens.keys()]) removeScreenTile(id);
  for (const id of [...tiles.keys()]) removeTile(id);
  for (const key of ["conn", "media-conn", "negotiation", "screen"]) clearStatus(key);
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
  // Test hook: ?tile=small|large gives remote tiles a fixed size (160×90 or 1280×720 CSS px),
  // so that simulcast layer choice can be checked.
  const tileSize = params.get("tile");
  if (tileSize === "small" || tileSize === "large") document.body.classList.add(`tiles-${tileSize}`);
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
