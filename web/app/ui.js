// Shared by the call pages: the status area (role="status", one line per key, replaced or
// removed by key) and the local camera and microphone.
import { ERROR_MESSAGES, ParleyError, getLocalMedia } from "/sdk/parley.js";

const area = () => document.getElementById("status");

export function setStatus(key, text, kind = "info") {
  let el = area().querySelector(`[data-key="${key}"]`);
  if (!el) {
    el = document.createElement("p");
    el.dataset.key = key;
    area().append(el);
  }
  el.dataset.kind = kind;
  el.textContent = text;
}

export function clearStatus(key) {
  area().querySelector(`[data-key="${key}"]`)?.remove();
}

let mediaPromise = null;

/**
 * Starts the camera and microphone once per page; later calls get the same promise. The stream
 * (or the error) lands in `state.localStream` / `state.mediaError`, and the status area says
 * what is missing. `noCameraText` is shown when only the microphone could be opened.
 */
export function startLocalMedia(state, noCameraText) {
  if (!mediaPromise) {
    mediaPromise = getLocalMedia({ audio: true, video: true }).then(
      (stream) => {
        state.localStream = stream;
        clearStatus("media");
        if (!stream.getAudioTracks().length) setStatus("media", "No microphone found; others will not hear you.", "warn");
        else if (!stream.getVideoTracks().length) setStatus("media", noCameraText, "warn");
        return stream;
      },
      (err) => {
        state.mediaError = err;
        setStatus("media", err instanceof ParleyError ? err.message : ERROR_MESSAGES.media_error, "error");
        return null;
      },
    );
  }
  return mediaPromise;
}
