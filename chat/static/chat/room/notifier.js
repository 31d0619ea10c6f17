// Notifications: the reader's level in this room (the header's "Notify me of"
// select, saved as soon as it changes) and the browser's notifications while
// the page is hidden. The level decides which of this room's messages notify
// ("all", "mentions" of the reader, or "nothing"); a mention or direct message
// in another room arrives as a "notify" frame and notifies unless that room's
// level, in the sidebar, is "nothing". Permission is asked for only when the
// reader presses "Enable notifications", never on load.
import { apiUrl, csrfToken, getJSON } from "../live.js";
import { excerpt, messageText } from "./render.js";

const STATUS_MS = 4000; // "Saved: …" goes after this long; an error stays until the next change

// The select that sets the reader's level here: PATCH …/membership/ on change.
export class NotifyLevelControl {
  //   room                 the room's slug
  //   onSaved(level, data)  the level in force now, and the server's answer
  constructor({ room, onSaved }) {
    this.room = room;
    this.onSaved = onSaved;
    this.form = document.getElementById("notify-form");
    if (!this.form) return;
    this.select = document.getElementById("notify-level");
    this.saved = this.select.value; // what to go back to when a save fails
    this.form.querySelector(".notify-save").hidden = true; // a change saves itself
    this.status = document.createElement("span");
    this.status.className = "notify-status";
    this.status.setAttribute("role", "status"); // polite: said after what the reader is doing
    this.form.append(this.status);
    this.statusTimer = null;
    this.form.addEventListener("submit", (event) => { event.preventDefault(); this.save(); });
    this.select.addEventListener("change", () => this.save());
  }

  async save() {
    const chosen = this.select.value;
    this.say("Saving…");
    let result;
    try {
      result = await getJSON(apiUrl(this.room, "membership/"), {
        method: "PATCH",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
        body: JSON.stringify({ notify: chosen }),
      });
    } catch {
      return this.failed("Not saved: no connection. Try again.");
    }
    const { response, data } = result;
    if (!response.ok || !data) return this.failed(`Not saved: ${(data && data.error && data.error.detail) || "try again."}`);
    this.saved = chosen;
    const label = this.labelOf(data.notify);
    this.say(data.notify_is_default ? `Saved: default (${label})` : `Saved: ${label}`, { fades: true });
    this.onSaved(data.notify, data);
    return undefined;
  }

  // "mentions only" for "mentions": the option's own words.
  labelOf(level) {
    const option = [...this.select.options].find((choice) => choice.value === level);
    return (option ? option.textContent : level).toLowerCase();
  }

  failed(text) {
    this.select.value = this.saved;
    this.say(text, { error: true });
  }

  say(text, { error = false, fades = false } = {}) {
    clearTimeout(this.statusTimer);
    this.status.textContent = text;
    this.status.classList.toggle("error", error);
    if (fades) this.statusTimer = setTimeout(() => { this.status.textContent = ""; }, STATUS_MS);
  }
}

// The browser's notifications, while the page is hidden and the reader allowed them.
export class BrowserNotifier {
  //   config             the page's config: username, room, notify (the level in force here)
  //   sidebar            the Sidebar: other rooms' levels, and which rooms are direct
  //   mentionsReader(m)  whether message m asks for the reader (render.js)
  //   onJump(seq)        go to a message of this room
  constructor({ config, sidebar, mentionsReader, onJump }) {
    this.config = config;
    this.sidebar = sidebar;
    this.mentionsReader = mentionsReader;
    this.onJump = onJump;
    this.supported = "Notification" in window;
    this.button = document.getElementById("enable-notifications");
    if (this.button && this.supported && Notification.permission === "default") {
      this.button.hidden = false;
      this.button.addEventListener("click", () => this.ask());
    }
  }

  async ask() {
    let permission;
    try {
      permission = await Notification.requestPermission();
    } catch {
      permission = Notification.permission;
    }
    if (permission === "granted") {
      this.button.hidden = true;
    } else if (permission === "denied") {
      const note = document.createElement("span");
      note.className = "notifications-blocked";
      note.textContent = "Notifications are blocked in this browser's settings.";
      this.button.replaceWith(note);
    } // "default": the prompt was dismissed; the button stays for another try
  }

  allowed() {
    return this.supported && Notification.permission === "granted" && document.visibilityState === "hidden";
  }

  // A message of this room that arrived live (never one replayed on a reconnect).
  onMessage(message) {
    if (!this.allowed() || message.author === this.config.username || message.deleted_at) return;
    const level = this.config.notify;
    if (level !== "all" && !(level === "mentions" && this.mentionsReader(message))) return;
    const direct = document.getElementById("messages").dataset.direct !== undefined;
    this.show({
      title: direct ? `${message.author} (direct message)` : `${message.author} in ${this.roomName()}`,
      body: excerpt(messageText(message)),
      id: message.id,
      onClick: () => this.onJump(message.seq),
    });
  }

  // A "notify" frame: a mention of the reader, or a direct message, in another room.
  onNotify(frame) {
    if (frame.room === this.config.room || !this.allowed() || this.sidebar.levelOf(frame.room) === "nothing") return;
    const direct = frame.reason === "direct" || this.sidebar.isDirect(frame.room);
    this.show({
      title: direct ? `${frame.author} (direct message)` : `${frame.author} in ${frame.room_name}`,
      body: frame.excerpt,
      id: frame.id,
      onClick: () => { location.href = `/rooms/${encodeURIComponent(frame.room)}/#seq-${Number(frame.seq)}`; },
    });
  }

  roomName() {
    const current = document.querySelector("nav.sidebar a[aria-current=page] .sidebar-name");
    return current ? current.textContent.trim() : this.config.room;
  }

  show({ title, body, id, onClick }) {
    let notification;
    try {
      // The tag is the message's: two tabs notifying of one message show one notification.
      notification = new Notification(title, { body: body, tag: `chat-${id}` });
    } catch {
      return; // where only a service worker may notify (Chrome on Android)
    }
    notification.onclick = () => {
      window.focus();
      notification.close();
      onClick();
    };
  }
}
