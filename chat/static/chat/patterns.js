// The patterns page (templates/chat/patterns.html): one room followed three
// ways at once, each in a panel of its own, with what each way costs and how
// late each message arrives:
//
// - short: GET …/messages?after=<seq> on a timer (the interval is on the page);
// - long:  ChatLive.LongPoll, GET …/poll answered when something is posted;
// - socket: ChatLive.RoomSocket, the WebSocket the room page uses.
//
// The figures are also in the DOM, for tests and benchmarks: each panel
// (data-pattern="short|long|socket") carries data-state, data-requests,
// data-messages, data-median-ms and data-p95-ms (the socket's also
// data-frames); #patterns carries the clock offset. Message text goes into
// the page with textContent only.
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("patterns-config").textContent);
  const { RoomSocket, LongPoll, postMessage, getJSON, apiUrl, backoff, newNonce } = window.ChatLive;

  const SHOWN_PER_PANEL = 200; // list items kept; the figures count every message
  const CLOCK_WINDOW_MS = 120000; // samples older than this no longer count
  const CLOCK_SYNC_EVERY_MS = 30000; // a cheap request of its own, so a quiet page keeps a good sample
  const RENDER_EVERY_MS = 500; // the counters move without events (LongPoll.requests, RoomSocket.frames)
  const TAGS = { short: "[via API · short poll]", long: "[via API · long poll]", socket: "[via WebSocket]" };
  // Closes after which reconnecting cannot help (docs/protocol.md).
  const SOCKET_STOPS = {
    4401: "Signed out: log in again",
    4403: "Removed from the room",
    4410: "The room was archived",
    4429: "Too many chat windows open",
  };

  // One clock for every timestamp the page takes: monotonic, in ms since the epoch.
  const now = () => performance.timeOrigin + performance.now();

  // A message's created_at (ISO 8601, maybe with microseconds) in ms since the epoch.
  function serverMs(iso) {
    const parts = /^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(.*)$/.exec(iso || "");
    if (!parts) return Date.parse(iso);
    return Date.parse(parts[1] + parts[3]) + (parts[2] ? Number(`0.${parts[2]}`) * 1000 : 0);
  }

  function formatMs(ms) {
    if (ms === null) return "–";
    return Math.abs(ms) >= 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
  }

  // ---- the server's clock --------------------------------------------------

  // NTP-style, from every API response the page gets: the server says when
  // the request came in (X-Server-Received) and when the answer left
  // (X-Server-Time); the browser's Resource Timing says when the request went
  // out and the answer's first byte came back. The offset is then off by at
  // most half the time on the wire, so the sample with the least wins.
  const clock = {
    root: document.getElementById("patterns"),
    label: document.getElementById("clock-offset"),
    samples: [],
    best: null, // {offset, rtt, at}: server time = local time + offset
    requests: 0, // the page's own clock readings (not any panel's)
    version: 0, // bumped when the offset changes, so delays are recomputed

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
        const url = apiUrl(config.room, `messages?after=${Number.MAX_SAFE_INTEGER}&limit=1`);
        const { response } = await getJSON(url);
        this.add(response, startedAt, now());
      } catch (error) {
        // The panels show the server is away; the next reading will do.
      }
    },

    async start() {
      for (let reading = 0; reading < 3; reading += 1) await this.read();
      setInterval(() => this.read(), CLOCK_SYNC_EVERY_MS);
    },
  };

  // ---- a panel: one pattern's messages and figures -------------------------

  class Panel {
    constructor(element) {
      this.element = element;
      this.pattern = element.dataset.pattern;
      this.after = config.lastSeq; // the last seq held with nothing missing below it
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
        if (this.received.has(message.seq) || message.seq <= config.lastSeq) continue;
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

  // ---- short polling -------------------------------------------------------

  // Asks for what is new every `interval` seconds, counted from the start of
  // the previous request; a slow answer is never overlapped by the next ask.
  class ShortPoll {
    constructor(panel, interval) {
      this.panel = panel;
      this.interval = interval;
      this.requests = 0;
      this.failures = 0;
      this.timer = null;
      this.lastStart = 0;
      this.stopped = false;
      panel.requests = () => this.requests;
    }

    start() {
      this.panel.setState("polling", `Polling every ${this.interval} s`);
      this.poll();
    }

    setInterval(seconds) {
      this.interval = seconds;
      if (this.failures === 0 && !this.stopped) this.panel.setState("polling", `Polling every ${seconds} s`);
      if (this.timer !== null && this.failures === 0) this.schedule(this.lastStart + seconds * 1000 - now());
    }

    schedule(delay) {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.poll(), Math.max(0, delay));
    }

    async poll() {
      this.timer = null;
      const panel = this.panel;
      const startedAt = (this.lastStart = now());
      this.requests += 1;
      panel.update();
      let trouble = null;
      let again = false;
      try {
        const { response, data } = await getJSON(apiUrl(config.room, `messages?after=${panel.after}&limit=200`));
        clock.add(response, startedAt, now());
        if (response.ok && data) {
          if (this.failures) panel.setState("polling", `Polling every ${this.interval} s`);
          this.failures = 0;
          panel.receive(data.messages);
          again = data.has_more; // more than a page came: fetch the rest now
        } else if ([401, 403, 404].includes(response.status)) {
          this.stopped = true;
          panel.stop(response.status === 404 ? "The room is gone" : "Signed out: log in again");
          return;
        } else {
          trouble = response;
        }
      } catch (error) {
        trouble = error;
      }
      if (trouble) {
        this.failures += 1;
        const retryAfter = trouble instanceof Response ? Number(trouble.headers.get("Retry-After")) * 1000 || 0 : 0;
        const delay = Math.max(retryAfter, backoff(this.failures, 10000), this.interval * 1000);
        panel.setRetry("retrying", "Retrying", Date.now() + delay);
        this.schedule(delay);
      } else {
        this.schedule(again ? 0 : this.lastStart + this.interval * 1000 - now());
      }
    }
  }

  function startShortPoll(panel) {
    const input = panel.element.querySelector(".pattern-interval-input");
    const [low, high] = config.intervalRange;
    const poller = new ShortPoll(panel, config.interval);
    input.addEventListener("change", () => {
      const seconds = Number(input.value);
      if (!Number.isFinite(seconds) || seconds <= 0) {
        input.value = poller.interval;
        return;
      }
      const clamped = Math.min(Math.max(seconds, low), high);
      input.value = clamped;
      poller.setInterval(clamped);
    });
    poller.start();
    return { send: (body, nonce) => sendByApi(panel, body, nonce) };
  }

  // ---- long-polling --------------------------------------------------------

  function startLongPoll(panel) {
    let startedAt = 0;
    const poller = new LongPoll({
      room: config.room,
      // Called as each request is made: its start, for the clock.
      after: () => {
        startedAt = now();
        return panel.after;
      },
      onResponse: (response) => clock.add(response, startedAt, now()),
      onMessages: (messages) => {
        if (panel.element.dataset.state !== "polling") panel.setState("polling", "Waiting for news");
        panel.receive(messages);
      },
      onTrouble: () => panel.setState("retrying", "Retrying…"),
      onStop: (response) => panel.stop(response.status === 404 ? "The room is gone" : "Signed out: log in again"),
    });
    panel.requests = () => poller.requests;
    panel.setState("polling", "Waiting for news");
    poller.start();
    return { send: (body, nonce) => sendByApi(panel, body, nonce) };
  }

  // ---- WebSocket -----------------------------------------------------------

  function startSocket(panel) {
    let lastChange = config.lastChange;
    let connections = 0;
    let wasLive = false;
    const pending = new Set(); // nonces sent and not yet acknowledged
    const socket = new RoomSocket({
      room: config.room,
      cursor: () => ({ after: panel.after, changesAfter: lastChange }),
      onConnecting: () => {
        connections += 1;
        panel.setState(wasLive ? "reconnecting" : "connecting", wasLive ? "Reconnecting…" : "Connecting…");
      },
      onFrame: (frame) => {
        switch (frame.type) {
          case "message":
            panel.receive([frame.message]);
            if (pending.delete(frame.message.nonce)) panel.sending(`Sent as #${frame.message.seq}.`);
            break;
          case "ready":
            wasLive = true;
            lastChange = Math.max(lastChange, frame.last_change);
            panel.setState("live", "Live");
            break;
          case "gap": // more were missed than the server replays: they are not this page's to show
            panel.after = Math.max(panel.after, frame.next_seq - 1);
            break;
          case "error":
            if (pending.delete(frame.nonce)) panel.sendFailed(frame.detail);
            break;
          default:
            if (typeof frame.change === "number") lastChange = Math.max(lastChange, frame.change);
        }
        panel.scheduleUpdate();
      },
      onClose: (event) => {
        pending.clear();
        if (SOCKET_STOPS[event.code]) {
          panel.stop(SOCKET_STOPS[event.code]);
          return "stop";
        }
        return undefined;
      },
      onRetry: (due) => panel.setRetry("reconnecting", "Reconnecting", due),
    });
    panel.requests = () => connections; // each connection is one HTTP upgrade request
    panel.frames = () => socket.frames;
    socket.start();
    return {
      send: (body, nonce) => {
        if (!socket.send({ type: "send", body: body, nonce: nonce })) {
          panel.sendFailed("Not connected: send again when the panel says Live.");
          return;
        }
        pending.add(nonce);
        panel.sending("Sending…");
      },
    };
  }

  // ---- sending -------------------------------------------------------------

  async function sendByApi(panel, body, nonce) {
    panel.sending("Sending…");
    const startedAt = now();
    let answer;
    try {
      answer = await postMessage(config.room, body, nonce);
    } catch (error) {
      panel.sendFailed("The server did not answer: send again.");
      return;
    }
    const { response, data } = answer;
    clock.add(response, startedAt, now());
    if (response.ok && data) {
      panel.sending(`Sent as #${data.seq}.`);
    } else {
      panel.sendFailed(data && data.error ? data.error.detail : `The server answered ${response.status}.`);
    }
  }

  // ---- the page ------------------------------------------------------------

  const starters = { short: startShortPoll, long: startLongPoll, socket: startSocket };
  const input = document.getElementById("pattern-body");
  const panels = [];
  for (const element of document.querySelectorAll(".pattern-panel[data-pattern]")) {
    const panel = new Panel(element);
    const path = starters[panel.pattern](panel);
    panel.sendButton.addEventListener("click", () => {
      const text = input.value.trim() || input.placeholder;
      path.send(`${TAGS[panel.pattern]} ${text}`, newNonce());
    });
    panels.push(panel);
  }
  // The box is only the text; each panel's button sends it.
  document.getElementById("pattern-composer").addEventListener("submit", (event) => event.preventDefault());
  clock.start();
  setInterval(() => panels.forEach((panel) => panel.update()), RENDER_EVERY_MS);
})();
