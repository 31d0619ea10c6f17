// The patterns page (templates/chat/patterns.html): one room followed three
// ways at once, each in a panel of its own, with what each way costs and how
// late each message arrives:
//
// - short: LongPoll with a pause, GET …/messages?after=<seq> on a timer (the interval is on the page);
// - long:  LongPoll, GET …/poll answered when something is posted;
// - socket: RoomSocket, the WebSocket the room page uses.
//
// The figures are also in the DOM, for tests and benchmarks: each panel
// (data-pattern="short|long|socket") carries data-state, data-requests,
// data-messages, data-median-ms and data-p95-ms (the socket's also
// data-frames); #patterns carries the clock offset (patterns/clock.js).
import { LongPoll, RoomSocket, newNonce, postMessage } from "./live.js";
import { clock, now } from "./patterns/clock.js";
import { Panel } from "./patterns/panel.js";
import { finalClose } from "./protocol.js";

const config = JSON.parse(document.getElementById("patterns-config").textContent);

const RENDER_EVERY_MS = 500; // the counters move without events (LongPoll.requests, RoomSocket.frames)
const TAGS = { short: "[via API · short poll]", long: "[via API · long poll]", socket: "[via WebSocket]" };
// What a panel says after a close that reconnecting cannot help (protocol.js finalClose).
const SOCKET_STOPS = {
  signedOut: "Signed out: log in again",
  removed: "Removed from the room",
  roomArchived: "The room was archived",
  tooManySockets: "Too many chat windows open",
};

// ---- polling: short and long -------------------------------------------------

// Follow the room with a LongPoll whose `options` say how (path, pause); `polling` is the panel's state text.
function startPolling(panel, polling, options) {
  let startedAt = 0;
  const poller = new LongPoll({
    room: config.room,
    ...options,
    // Called as each request is made: its start, for the clock.
    after: () => {
      startedAt = now();
      panel.scheduleUpdate();
      return panel.after;
    },
    onResponse: (response) => clock.add(response, startedAt, now()),
    onMessages: (messages) => {
      if (panel.element.dataset.state !== "polling") panel.setState("polling", polling());
      panel.receive(messages);
    },
    onStop: (response) => panel.stop(response.status === 404 ? "The room is gone" : "Signed out: log in again"),
  });
  panel.requests = () => poller.requests;
  panel.setState("polling", polling());
  poller.start();
  return poller;
}

// Asks for what is new every `interval` seconds, counted from the start of
// the previous request; a slow answer is never overlapped by the next ask.
function startShortPoll(panel) {
  let interval = config.interval;
  const polling = () => `Polling every ${interval} s`;
  const poller = startPolling(panel, polling, {
    path: (after) => `messages?after=${after}&limit=200`,
    pause: () => interval * 1000,
    onTrouble: (trouble, due) => panel.setRetry("retrying", "Retrying", due),
  });
  const input = panel.element.querySelector(".pattern-interval-input");
  const [low, high] = config.intervalRange;
  input.addEventListener("change", () => {
    const seconds = Number(input.value);
    if (!Number.isFinite(seconds) || seconds <= 0) {
      input.value = interval;
      return;
    }
    interval = Math.min(Math.max(seconds, low), high);
    input.value = interval;
    if (poller.failures === 0 && poller.running) {
      panel.setState("polling", polling());
      poller.retime();
    }
  });
  return { send: (body, nonce) => sendByApi(panel, body, nonce) };
}

function startLongPoll(panel) {
  startPolling(panel, () => "Waiting for news", { onTrouble: () => panel.setState("retrying", "Retrying…") });
  return { send: (body, nonce) => sendByApi(panel, body, nonce) };
}

// ---- WebSocket -----------------------------------------------------------------

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
      const final = finalClose(event.code);
      if (!final) return undefined;
      panel.stop(SOCKET_STOPS[final]);
      return "stop";
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

// ---- sending -------------------------------------------------------------------

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

// ---- the page ------------------------------------------------------------------

const starters = { short: startShortPoll, long: startLongPoll, socket: startSocket };
const input = document.getElementById("pattern-body");
const panels = [];
for (const element of document.querySelectorAll(".pattern-panel[data-pattern]")) {
  const panel = new Panel(element, config.lastSeq);
  const path = starters[panel.pattern](panel);
  panel.sendButton.addEventListener("click", () => {
    const text = input.value.trim() || input.placeholder;
    path.send(`${TAGS[panel.pattern]} ${text}`, newNonce());
  });
  panels.push(panel);
}
// The box is only the text; each panel's button sends it.
document.getElementById("pattern-composer").addEventListener("submit", (event) => event.preventDefault());
clock.start(config.room);
setInterval(() => panels.forEach((panel) => panel.update()), RENDER_EVERY_MS);
