// How a page follows a room (docs/messaging-patterns.md), an ES module shared
// by the room page and the patterns page:
//
// - RoomSocket: publish/subscribe. The WebSocket (docs/protocol.md), resumed
//   from the page's cursor on every (re)connect, with capped, jittered backoff.
// - LongPoll: asynchronous messaging. GET …/poll in a loop, each answered as
//   soon as there is something after the page's last seq; with a pause
//   between requests and another URL, the same loop short-polls.
// - postMessage / getJSON: request/response through the JSON API (docs/api.md).
//
// All three carry the same messages with the same seqs, so a page can switch
// between them without losing or repeating one: it keeps messages by seq.
const SOCKET_BACKOFF_CAP_MS = 15000;
// After "unavailable" (the database restarting) the server is back within seconds.
const UNAVAILABLE_BACKOFF_CAP_MS = 3000;
const POLL_TIMEOUT_S = 25;

export function apiUrl(room, path) {
  return `/api/rooms/${encodeURIComponent(room)}/${path}`;
}

// The session's CSRF token, from the {% csrf_token %} the page renders.
export function csrfToken() {
  const field = document.querySelector("input[name=csrfmiddlewaretoken]");
  return field ? field.value : "";
}

// A send's nonce: the server stores each (author, nonce) once, so a retry cannot duplicate.
export function newNonce() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  // randomUUID exists only in secure contexts (https, or localhost).
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

// Exponential backoff with jitter, capped, so a restarted server is not stampeded.
export function backoff(attempt, capMs) {
  return Math.min(capMs, 500 * 2 ** Math.min(Math.max(attempt - 1, 0), 5)) * (0.75 + Math.random() / 2);
}

// GET a JSON API path; resolves to {response, data} (data null unless JSON).
export async function getJSON(url, options = {}) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store", ...options });
  const data = (response.headers.get("Content-Type") || "").startsWith("application/json") ? await response.json() : null;
  return { response, data };
}

// Post a message through the API; the nonce makes a retry return the original.
// replyTo: the id of the message it answers, or null; attachments: ids of the sender's uploads.
export async function postMessage(room, body, nonce, replyTo = null, attachments = []) {
  const payload = { body: body, nonce: nonce };
  if (replyTo != null) payload.reply_to = replyTo;
  if (attachments.length) payload.attachments = attachments;
  return getJSON(apiUrl(room, "messages"), {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
    body: JSON.stringify(payload),
  });
}

// One room's WebSocket, reconnected until stop() or until onClose says "stop".
//   cursor()            -> {after, changesAfter}: where the page's view ends
//   onFrame(frame)      every frame, parsed
//   onClose(event)      may return (or resolve to) "stop"
//   onRetry(due, event) a reconnect is scheduled for Date.now() === due
//   onConnecting(first) a connection attempt starts
export class RoomSocket {
  constructor(options) {
    this.options = options;
    this.socket = null;
    this.attempt = 0;
    this.live = false; // between "ready" and the close
    this.opened = false; // the latest connection got through the handshake
    this.frames = 0; // frames received, all connections together
    this.lastErrorCode = null;
    this.stopped = false;
    this.retryTimer = null;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    if (this.socket) this.socket.close();
  }

  connect() {
    clearTimeout(this.retryTimer);
    const { after, changesAfter } = this.options.cursor();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const room = encodeURIComponent(this.options.room);
    const url = `${scheme}://${location.host}/ws/rooms/${room}/?after=${after}&changes_after=${changesAfter}`;
    if (this.options.onConnecting) this.options.onConnecting(this.attempt === 0);
    this.live = false;
    this.opened = false;
    const socket = (this.socket = new WebSocket(url));
    socket.addEventListener("open", () => {
      if (socket === this.socket) this.opened = true;
    });
    socket.addEventListener("message", (event) => {
      if (socket !== this.socket) return;
      this.frames += 1;
      const frame = JSON.parse(event.data);
      if (frame.type === "ready") {
        this.live = true;
        this.attempt = 0;
        this.lastErrorCode = null;
      } else if (frame.type === "error") {
        this.lastErrorCode = frame.code;
      }
      this.options.onFrame(frame);
    });
    socket.addEventListener("close", (event) => this.closed(socket, event));
  }

  async closed(socket, event) {
    if (socket !== this.socket) return;
    this.socket = null;
    this.live = false;
    this.attempt += 1;
    if (this.stopped) return;
    if (this.options.onClose && (await this.options.onClose(event)) === "stop") {
      this.stopped = true;
      return;
    }
    if (this.stopped) return;
    const cap = this.lastErrorCode === "unavailable" ? UNAVAILABLE_BACKOFF_CAP_MS : SOCKET_BACKOFF_CAP_MS;
    const delay = backoff(this.attempt, cap);
    if (this.options.onRetry) this.options.onRetry(Date.now() + delay, event);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  send(frame) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }
}

// A room followed by polling, until stop(): by default long-poll, each
// request held by the server until there is news; with `path` and `pause`,
// short polling on a timer.
//   after()                  the last seq the page holds without a hole
//   path(after, quick)       the API path to GET (default poll?after=…&timeout=…);
//                            quick: the first poll, or the first after trouble
//   pause()                  ms from one request's start to the next (default 0)
//   onMessages(messages, data)  each answer's messages (maybe none), in seq order
//   onResponse(response)     every HTTP response, before its body is read
//   onTrouble(response|error, due)  a failed poll; retried at Date.now() === due
//   onStop(response)         401/403/404: polling cannot go on
export class LongPoll {
  constructor(options) {
    this.options = options;
    this.requests = 0;
    this.failures = 0; // failed polls in a row
    this.running = false;
    this.controller = null;
    this.lastStart = 0; // Date.now() when the latest request went out
    this.pausing = false; // waiting out the pause between good polls (not a retry)
    this.timer = null;
    this.wake = null;
  }

  start() {
    if (this.running) return;
    this.running = true;
    this.loop();
  }

  stop() {
    this.running = false;
    if (this.controller) this.controller.abort();
    clearTimeout(this.timer);
    if (this.wake) this.wake();
  }

  // The pause changed: a wait between good polls ends at the new time.
  retime() {
    if (!this.pausing) return;
    clearTimeout(this.timer);
    this.timer = setTimeout(this.wake, Math.max(0, this.lastStart + this.pause() - Date.now()));
  }

  pause() {
    return this.options.pause ? this.options.pause() : 0;
  }

  path(after, quick) {
    if (this.options.path) return this.options.path(after, quick);
    // A quick poll is answered within a second even when the room is quiet:
    // the page learns at once that polling works.
    return `poll?after=${after}&timeout=${quick ? 1 : POLL_TIMEOUT_S}`;
  }

  sleep(due, pausing) {
    this.pausing = pausing;
    return new Promise((resolve) => {
      this.wake = resolve;
      this.timer = setTimeout(resolve, Math.max(0, due - Date.now()));
    }).then(() => {
      this.pausing = false;
      this.wake = null;
    });
  }

  async loop() {
    this.failures = 0;
    while (this.running) {
      const url = apiUrl(this.options.room, this.path(this.options.after(), this.failures > 0 || this.requests === 0));
      this.controller = new AbortController();
      this.lastStart = Date.now();
      let trouble = null;
      try {
        this.requests += 1;
        const { response, data } = await getJSON(url, { signal: this.controller.signal });
        if (this.options.onResponse) this.options.onResponse(response);
        if (!this.running) return;
        if (response.ok && data) {
          this.failures = 0;
          this.options.onMessages(data.messages, data);
          // More than a page came: fetch the rest at once.
          if (!data.has_more && this.pause() > 0) await this.sleep(this.lastStart + this.pause(), true);
          continue;
        }
        if ([401, 403, 404].includes(response.status)) {
          this.running = false;
          if (this.options.onStop) this.options.onStop(response);
          return;
        }
        trouble = response;
      } catch (error) {
        if (!this.running) return; // aborted by stop()
        trouble = error;
      }
      this.failures += 1;
      const retryAfter = trouble instanceof Response ? Number(trouble.headers.get("Retry-After")) * 1000 || 0 : 0;
      const due = Date.now() + Math.max(retryAfter, backoff(this.failures, 10000), this.pause());
      if (this.options.onTrouble) this.options.onTrouble(trouble, due);
      await this.sleep(due, false);
    }
  }
}
