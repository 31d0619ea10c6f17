// How the room page follows its room: the WebSocket (live.js RoomSocket),
// falling back to long-poll to receive and the API to send while handshakes
// keep failing. Both resume from the same seq as the socket and messages are
// kept by seq, so switching either way neither loses nor repeats one.
// The connection pill (#connection-state) says which is in use.
import { LongPoll, RoomSocket } from "../live.js";
import { CLOSE, finalClose } from "../protocol.js";

const FALLBACK_AFTER = 2; // failed handshakes in a row before following the room by long-poll
const stateLabel = document.getElementById("connection-state");

function setState(state, text) {
  stateLabel.dataset.state = state;
  stateLabel.textContent = text;
  document.body.dataset.connection = state;
}

export class Connection {
  //   room, loginUrl          from the page's config
  //   cursor()                -> {after, changesAfter}, where the page's view ends
  //   onConnecting()          a socket connection attempt starts
  //   onFrame(frame)          every socket frame
  //   onMessages(messages)    messages the long-poll fallback brought
  //   onFallbackLive()        the fallback answers: sends go through the API now
  //   onChange()              live or fallbackLive changed
  //   onStop(message, link, label)  the connection ended for good: say why, and where to go
  constructor(options) {
    this.options = options;
    this.live = false; // the socket is past "ready"
    this.fallbackLive = false; // the long-poll answers: messages arrive, sends go through the API
    this.fallback = null; // the LongPoll while the socket cannot connect
    this.failedHandshakes = 0;
    this.retryTimer = null; // ticks the "reconnecting in N s" countdown
    this.socket = new RoomSocket({
      room: options.room,
      cursor: options.cursor,
      onConnecting: (first) => {
        clearInterval(this.retryTimer);
        this.retryTimer = null;
        options.onConnecting();
        if (!this.fallbackLive) setState(first ? "connecting" : "reconnecting", first ? "Connecting…" : "Reconnecting…");
      },
      onFrame: options.onFrame,
      onClose: (event) => this.closed(event),
      onRetry: (due, event) => this.retrying(due, event),
    });
    // What the page says after a close that reconnecting cannot help (protocol.js finalClose).
    this.finalStops = {
      removed: ["Removed", "You were removed from this room.", "/"],
      signedOut: ["Signed out", "You signed out. Log in again to keep chatting.", options.loginUrl],
      tooManySockets: ["Too many windows", "You have too many chat windows open; close some, then", location.pathname, "reload"],
      roomArchived: ["Archived", "This room was archived; it is read-only now.", "/"],
    };
  }

  start() {
    this.socket.start();
  }

  send(frame) {
    return this.socket.send(frame);
  }

  // The socket said "ready": it carries the room from now on.
  ready() {
    this.live = true;
    this.failedHandshakes = 0;
    this.stopFallback();
    setState("live", "Live");
  }

  // The server says how messages reach this socket: "live", or "delayed" (read
  // from the database about a second late while its Redis is away).
  delivery(mode) {
    if (!this.live) return;
    if (mode === "delayed") {
      setState("delayed", "Live (delayed)");
      stateLabel.title = "The server is catching up: messages arrive about a second late, and who is online is unknown.";
    } else {
      setState("live", "Live");
      stateLabel.title = "";
    }
  }

  async closed(event) {
    this.live = false;
    const final = finalClose(event.code);
    if (final) return this.stop(...this.finalStops[final]);
    // A handshake refused again and again may mean the person was signed out
    // or the room closed; the page itself says which, so ask it before retrying.
    if (this.socket.attempt >= 2 && !event.wasClean && (await this.explainRefusal())) return "stop";
    // Handshakes that keep failing while the site answers (a proxy that strips
    // the Upgrade header, say): follow the room by long-poll meanwhile.
    this.failedHandshakes = this.socket.opened ? 0 : this.failedHandshakes + 1;
    if (this.failedHandshakes >= FALLBACK_AFTER) this.startFallback();
    this.options.onChange();
    return undefined;
  }

  retrying(due, event) {
    if (this.fallbackLive) return; // the state says "long-poll"; the socket retries quietly
    // Short enough for the pill on a phone; the composer hint says what offline means.
    const why = event.code === CLOSE.tryAgainLater ? "Catching up — reconnecting" : "Reconnecting";
    const showCountdown = () => {
      const seconds = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      setState("reconnecting", `${why} in ${seconds} s…`);
    };
    showCountdown();
    clearInterval(this.retryTimer);
    this.retryTimer = setInterval(showCountdown, 1000);
  }

  startFallback() {
    if (this.fallback) return;
    this.fallback = new LongPoll({
      room: this.options.room,
      after: () => this.options.cursor().after,
      onMessages: (messages) => {
        if (!this.fallbackLive && !this.live) {
          this.fallbackLive = true;
          clearInterval(this.retryTimer);
          setState("fallback", "Live (long-poll)");
          this.options.onFallbackLive();
          this.options.onChange();
        }
        this.options.onMessages(messages);
      },
      onTrouble: () => {
        if (!this.fallbackLive) return;
        this.fallbackLive = false;
        setState("reconnecting", "Reconnecting…");
        this.options.onChange();
      },
      onStop: () => {
        this.stopFallback();
        this.explainRefusal();
      },
    });
    this.fallback.start();
  }

  stopFallback() {
    if (this.fallback) this.fallback.stop();
    this.fallback = null;
    this.fallbackLive = false;
  }

  // Ask the page itself why the room cannot be followed; true if it said (and the page stopped).
  async explainRefusal() {
    let response;
    try {
      response = await fetch(location.href, { redirect: "manual", cache: "no-store" });
    } catch (error) {
      return false; // the server is down: keep retrying
    }
    if (response.type === "opaqueredirect") {
      this.stop("Signed out", "You were signed out. Log in again to keep chatting.", this.options.loginUrl);
      return true;
    }
    if (response.status === 404) {
      this.stop("Closed", "This room is no longer available.", "/");
      return true;
    }
    return false;
  }

  // The end of this page's connection.
  stop(state, message, link, label) {
    this.socket.stop();
    this.stopFallback();
    setState("stopped", state);
    this.options.onStop(message, link, label);
    return "stop";
  }
}
