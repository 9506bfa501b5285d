// The page's status area (role="status"): one line per key, replaced or removed by key.

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
