// One panel of the patterns page: one way of following the room, its
// messages (kept by seq, each once) and its figures, also written to the
// panel's data-* attributes for tests and benchmarks. Message text goes into
// the page with textContent only.
import { clock, formatMs, now } from "./clock.js";

const SHOWN_PER_PANEL = 200; // list items kept; the figures count every message

// A message's created_at (ISO 8601, maybe with microseconds) in ms since the epoch.
function serverMs(iso) {
  const parts = /^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(.*)$/.exec(iso || "");
  if (!parts) return Date.parse(iso);
  return Date.parse(parts[1] + parts[3]) + (parts[2] ? Number(`0.${parts[2]}`) * 1000 : 0);
}

export class Panel {
  // lastSeq: where the room was when the page was rendered; only what comes after is shown.
  constructor(element, lastSeq) {
    this.element = element;
    this.pattern = element.dataset.pattern;
    this.lastSeq = lastSeq;
    this.after = lastSeq; // the last seq held with nothing missing below it
    this.received = new Map(); // seq -> {createdAt (server ms), arrivedAt (local ms), delay}
    this.list = element.querySelector(".pattern-messages");
    this.log = element.querySelector(".pattern-log");
    this.empty = element.querySelector(".pattern-empty");
    this.stateLabel = element.querySelector(".connection");
    this.sendButton = element.querySelector(".pattern-send-button");
    this.sendStatus = element.querySelector(".pattern-send-status");
    this.stats = Object.fromEntries([...element.querySelectorAll("[data-stat]")].map((dd) => [dd.dataset.stat, dd]));
    this.requests = () => 0; // HTTP requests used so far (the socket: connections opened)
    this.frames = null; // the socket's frames received so far
    this.figures = { size: -1, version: -1, median: null, p95: null };
    this.countdown = null;
    this.updateTimer = null;
  }

  setState(state, text) {
    clearInterval(this.countdown);
    this.countdown = null;
    this.element.dataset.state = state;
    this.stateLabel.dataset.state = state;
    this.stateLabel.textContent = text;
  }

  // "Retrying in 3 s…", counting down to Date.now() === due.
  setRetry(state, why, due) {
    const show = () => {
      const seconds = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      this.stateLabel.textContent = `${why} in ${seconds} s…`;
    };
    this.setState(state, "");
    show();
    this.countdown = setInterval(show, 1000);
  }

  stop(text) {
    this.setState("stopped", text);
    this.sendButton.disabled = true;
  }

  // Messages as they came, in seq order; one already here (re-delivered) is skipped.
  receive(messages) {
    const arrivedAt = now();
    for (const message of messages) {
      if (this.received.has(message.seq) || message.seq <= this.lastSeq) continue;
      this.received.set(message.seq, { createdAt: serverMs(message.created_at), arrivedAt, delay: undefined });
      this.place(message.seq, this.render(message));
    }
    while (this.received.has(this.after + 1)) this.after += 1;
    this.scheduleUpdate();
  }

  // A burst of messages (a benchmark's) costs one update, not one each.
  scheduleUpdate() {
    if (this.updateTimer) return;
    this.updateTimer = setTimeout(() => {
      this.updateTimer = null;
      this.update();
    }, 100);
  }

  render(message) {
    const item = document.createElement("li");
    item.className = "message";
    item.dataset.seq = message.seq;
    const head = document.createElement("div");
    head.className = "message-head";
    const seq = document.createElement("span");
    seq.className = "pattern-seq";
    seq.textContent = `#${message.seq}`;
    const author = document.createElement("span");
    author.className = "author";
    author.textContent = message.author;
    const delay = document.createElement("span");
    delay.className = "pattern-delay";
    head.append(seq, " ", author, " ", delay);
    const body = document.createElement("div");
    body.className = "body";
    if (message.deleted_at) {
      body.classList.add("muted");
      body.textContent = "(deleted)";
    } else {
      body.textContent = message.body;
    }
    item.append(head, body);
    return item;
  }

  // Insert in seq order (the end, nearly always), keep the log at its newest
  // if it was there, and drop the oldest items past SHOWN_PER_PANEL.
  place(seq, item) {
    const atBottom = this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < 40;
    let next = null;
    for (let other = this.list.lastElementChild; other; other = other.previousElementSibling) {
      if (Number(other.dataset.seq) < seq) break;
      next = other;
    }
    this.list.insertBefore(item, next);
    while (this.list.childElementCount > SHOWN_PER_PANEL) this.list.firstElementChild.remove();
    this.empty.hidden = true;
    if (atBottom) this.log.scrollTop = this.log.scrollHeight;
  }

  // The delays and their median and p95, with the page's current clock offset.
  computeFigures() {
    const offset = clock.offset();
    if (this.figures.size === this.received.size && this.figures.version === clock.version) return false;
    this.figures = { size: this.received.size, version: clock.version, median: null, p95: null };
    if (offset === null || this.received.size === 0) return true;
    const delays = [];
    for (const entry of this.received.values()) {
      entry.delay = entry.arrivedAt + offset - entry.createdAt;
      delays.push(entry.delay);
    }
    delays.sort((a, b) => a - b);
    const middle = delays.length >> 1;
    this.figures.median = delays.length % 2 ? delays[middle] : (delays[middle - 1] + delays[middle]) / 2;
    this.figures.p95 = delays[Math.ceil(delays.length * 0.95) - 1]; // nearest rank
    return true;
  }

  update() {
    const requests = this.requests();
    this.element.dataset.requests = requests;
    if (this.stats.requests) this.stats.requests.textContent = requests;
    if (this.frames !== null) {
      const frames = this.frames();
      this.element.dataset.frames = frames;
      this.stats.frames.textContent = frames;
    }
    this.element.dataset.messages = this.received.size;
    this.stats.messages.textContent = this.received.size;
    if (!this.computeFigures()) return;
    const { median, p95 } = this.figures;
    this.element.dataset.medianMs = median === null ? "" : median.toFixed(1);
    this.element.dataset.p95Ms = p95 === null ? "" : p95.toFixed(1);
    this.stats.median.textContent = formatMs(median);
    this.stats.p95.textContent = formatMs(p95);
    for (const item of this.list.children) {
      const { delay } = this.received.get(Number(item.dataset.seq));
      item.querySelector(".pattern-delay").textContent = delay === undefined ? "" : `after ${formatMs(delay)}`;
    }
  }

  sending(text) {
    this.sendStatus.classList.remove("failed");
    this.sendStatus.textContent = text;
  }

  sendFailed(text) {
    this.sendStatus.classList.add("failed");
    this.sendStatus.textContent = text;
  }
}
