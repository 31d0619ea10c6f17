// The server's clock, as the patterns page reads it, and the page's one clock
// for timestamps. The delays the page shows are the time from the server
// storing a message to this browser showing it, so they need both.
import { apiUrl, getJSON } from "../live.js";

const CLOCK_WINDOW_MS = 120000; // samples older than this no longer count
const CLOCK_SYNC_EVERY_MS = 30000; // a cheap request of its own, so a quiet page keeps a good sample

// One clock for every timestamp the page takes: monotonic, in ms since the epoch.
export const now = () => performance.timeOrigin + performance.now();

export function formatMs(ms) {
  if (ms === null) return "–";
  return Math.abs(ms) >= 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
}

// NTP-style, from every API response the page gets: the server says when
// the request came in (X-Server-Received) and when the answer left
// (X-Server-Time); the browser's Resource Timing says when the request went
// out and the answer's first byte came back. The offset is then off by at
// most half the time on the wire, so the sample with the least wins.
export const clock = {
  root: document.getElementById("patterns"),
  label: document.getElementById("clock-offset"),
  samples: [],
  best: null, // {offset, rtt, at}: server time = local time + offset
  requests: 0, // the page's own clock readings (not any panel's)
  version: 0, // bumped when the offset changes, so delays are recomputed
  room: null, // the slug whose API the readings ask

  add(response, startedAt, endedAt) {
    const sent = Number(response.headers.get("X-Server-Time"));
    if (!(sent > 0)) return;
    const received = Number(response.headers.get("X-Server-Received")) || sent;
    // Resource Timing, when the browser has the entry: no queueing, no body in the round trip.
    const timing = performance.getEntriesByName(response.url, "resource").pop();
    performance.clearResourceTimings(); // its buffer is small; this page reads each entry once
    const wentOut = timing && timing.requestStart > 0 ? performance.timeOrigin + timing.requestStart : startedAt;
    const cameBack = timing && timing.responseStart > 0 ? performance.timeOrigin + timing.responseStart : endedAt;
    const sample = {
      at: endedAt,
      rtt: cameBack - wentOut - (sent - received),
      offset: (received - wentOut + (sent - cameBack)) / 2,
    };
    this.samples = this.samples.filter((old) => endedAt - old.at < CLOCK_WINDOW_MS);
    this.samples.push(sample);
    const best = this.samples.reduce((a, b) => (b.rtt < a.rtt ? b : a));
    if (!this.best || best.offset !== this.best.offset) this.version += 1;
    this.best = best;
    this.show();
  },

  offset() {
    return this.best ? this.best.offset : null;
  },

  show() {
    const { offset, rtt } = this.best;
    const error = rtt / 2;
    this.root.dataset.offsetMs = offset.toFixed(1);
    this.root.dataset.offsetErrorMs = error.toFixed(1);
    const ahead = offset >= 0 ? "ahead of" : "behind";
    this.label.textContent = `the server's clock is ${formatMs(Math.abs(offset))} ${ahead} this one, ±${formatMs(error)}`;
  },

  // Read the server's clock with a request that carries no messages.
  async read() {
    this.requests += 1;
    this.root.dataset.clockRequests = this.requests;
    const startedAt = now();
    try {
      const url = apiUrl(this.room, `messages?after=${Number.MAX_SAFE_INTEGER}&limit=1`);
      const { response } = await getJSON(url);
      this.add(response, startedAt, now());
    } catch (error) {
      // The panels show the server is away; the next reading will do.
    }
  },

  async start(room) {
    this.room = room;
    for (let reading = 0; reading < 3; reading += 1) await this.read();
    setInterval(() => this.read(), CLOCK_SYNC_EVERY_MS);
  },
};
