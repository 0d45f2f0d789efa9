// Calls to the balancer's management and inference APIs (other origins; both send CORS headers).

let configPromise = null;

/** The panel's config: API base URLs and the inference parameter catalogue. */
export function getConfig() {
  if (configPromise === null) {
    configPromise = fetch("/config.json", { cache: "no-store" }).then((r) => {
      if (!r.ok) throw new Error(`config.json: HTTP ${r.status}`);
      return r.json();
    });
  }
  return configPromise;
}

// Credentials the operator typed into the sign-in form; kept for this tab only.
const STORE = { management: "paddler.managementToken", inference: "paddler.apiKey" };

/** The stored management token ("management") or API key ("inference"), or "". */
export function credential(kind) {
  try {
    return window.sessionStorage.getItem(STORE[kind]) || "";
  } catch {
    return "";
  }
}

export function saveCredential(kind, value) {
  if (value) window.sessionStorage.setItem(STORE[kind], value);
  else window.sessionStorage.removeItem(STORE[kind]);
}

/** ``url`` with ``param=value`` added: browsers cannot put headers on EventSource or WebSocket. */
export function withQuery(url, param, value) {
  if (!value) return url;
  const parsed = new URL(url);
  parsed.searchParams.set(param, value);
  return parsed.toString();
}

/** Resolves true when ``url`` accepts ``secret`` (false on 401); other failures reject. */
export async function accepts(url, secret) {
  const headers = secret ? { Authorization: `Bearer ${secret}` } : {};
  const response = await fetch(url, { headers, cache: "no-store" });
  return response.status !== 401;
}

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

/** JSON request to the management API; resolves to the parsed body (null for 204), rejects with ApiError. */
export async function api(base, path, { method = "GET", body } = {}) {
  const init = { method, headers: { Accept: "application/json" } };
  const token = credential("management");
  if (token) init.headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(base + path, init);
  } catch (err) {
    throw new ApiError(0, `Cannot reach the balancer at ${base} (${err.message}).`, null);
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = (data && data.error && data.error.message) || text || response.statusText;
    throw new ApiError(response.status, message, data);
  }
  return data;
}

/**
 * Server-sent events from the management API. Calls onData(parsed) for each event
 * and onState("live" | "down") when the connection opens or drops (EventSource retries).
 * Returns a function that closes the stream.
 */
export function subscribe(url, onData, onState = () => {}) {
  const source = new EventSource(withQuery(url, "management_token", credential("management")));
  source.onopen = () => onState("live");
  source.onerror = () => onState("down"); // EventSource keeps retrying on its own
  source.onmessage = (event) => {
    onState("live");
    try {
      onData(JSON.parse(event.data));
    } catch (err) {
      console.error("bad event", err);
    }
  };
  return () => source.close();
}

/** Update the connection indicator in the top bar. */
export function setConnection(state, text) {
  const el = document.getElementById("connection");
  if (!el) return;
  el.dataset.state = state;
  document.body.dataset.connection = state;
  el.querySelector(".connection-text").textContent = text;
}
