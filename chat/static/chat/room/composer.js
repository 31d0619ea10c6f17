// The composer: the textarea, its hint line, the message being replied to,
// and the sends not acknowledged yet. Each send carries a nonce; the server
// stores each (author, nonce) once, so a send queued offline, sent again after
// a reconnect or through the API, or retried after the server could not save
// it, never makes a second message. A reply keeps its reply_to, and a message
// its files (room/uploads.js), through all of that.
import { newNonce, postMessage } from "../live.js";
import { LIMITS } from "../protocol.js";
import { MentionAutocomplete } from "./autocomplete.js";
import { appendPending, isAtBottom, quoteText, renderMessage, scrollToBottom } from "./render.js";
import { Uploads } from "./uploads.js";

const TYPING_SEND_MS = 1500; // one "typing" frame at most this often
// A send the server could not save (its database is away: docs/protocol.md) goes
// again, same nonce, after RETRY_FIRST_MS, then twice as long each time up to RETRY_MAX_MS.
const RETRYABLE = new Set(["not_saved", "database_unavailable"]);
const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 5000;
// Only where there is a physical keyboard; touch keyboards have their own Enter.
const KEYBOARD_HINT = window.matchMedia && matchMedia("(hover: hover) and (pointer: fine)").matches
  ? "Enter to send · Shift+Enter for a new line" : "";

export class Composer {
  //   room, username           from the page's config
  //   connection               .live, .fallbackLive, .send(frame)
  //   onPosted(message)        a message the API stored (the answer to a fallback send)
  //   mayMentionRoom           @room from this person mentions everyone (the @-list offers it)
  constructor({ room, username, connection, onPosted, mayMentionRoom = false }) {
    this.room = room;
    this.username = username;
    this.connection = connection;
    this.onPosted = onPosted;
    this.pending = new Map(); // nonce -> {body, replyTo, attachments, element, retries, retryTimer}
    this.waitingForUploads = false; // Enter was pressed while files were still uploading
    this.replyTo = null; // {id, seq, author, excerpt}: what the next send answers
    this.lastTypingSent = 0;
    this.form = document.getElementById("composer");
    this.input = document.getElementById("message-input");
    this.hint = document.getElementById("composer-hint");
    this.sendButton = document.getElementById("send-button");
    this.replyBar = document.getElementById("reply-bar");
    this.replyText = document.getElementById("reply-bar-text");
    this.mentions = new MentionAutocomplete({ input: this.input, room, username, mayMentionRoom });
    this.uploads = new Uploads({
      room, form: this.form, input: this.input, dropZone: this.form.closest(".chat") || this.form,
      onChange: () => this.uploadsChanged(),
      say: (text) => { this.hint.textContent = text; },
    });
    document.getElementById("reply-cancel").addEventListener("click", () => {
      this.cancelReply();
      this.input.focus();
    });
    this.form.addEventListener("submit", (event) => { event.preventDefault(); this.submit(); });
    this.input.addEventListener("keydown", (event) => {
      if (this.mentions.onKeydown(event)) return; // the @-list open: Enter picks a name, Escape closes it
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.submit();
      } else if (event.key === "Escape" && this.replyTo) {
        event.preventDefault();
        this.cancelReply();
      }
    });
    this.input.addEventListener("input", () => { this.update(); this.signalTyping(); });
  }

  submit() {
    // A message with files may have no text.
    const body = this.input.value.trim() ? this.input.value : "";
    if (!body && !this.uploads.unsent().length) return;
    if (body.length > LIMITS.messageMaxLength) {
      this.hint.textContent = `Messages can be at most ${LIMITS.messageMaxLength} characters.`;
      return;
    }
    if (this.uploads.failed()) {
      this.waitingForUploads = false;
      this.hint.textContent = "A file could not be uploaded: retry it or remove it, then send.";
      return;
    }
    if (this.uploads.busy()) {
      this.waitingForUploads = true; // sent by uploadsChanged once they are done
      this.update();
      return;
    }
    this.waitingForUploads = false;
    const nonce = newNonce();
    const replyTo = this.replyTo;
    const attachments = this.uploads.take(nonce);
    const element = renderMessage({
      seq: 0, id: "", author: this.username, body: body, created_at: new Date().toISOString(), reply_to: replyTo,
      attachments: attachments,
    });
    element.classList.add("pending");
    delete element.dataset.seq;
    const status = document.createElement("span");
    status.className = "status";
    element.querySelector(".message-head").append(" ", status);
    appendPending(element);
    const item = {
      body: body, replyTo: replyTo ? replyTo.id : null, attachments: attachments.map((file) => file.id),
      element: element, retries: 0, retryTimer: null,
    };
    this.pending.set(nonce, item);
    if (this.connection.fallbackLive) this.sendByApi(nonce, item);
    else this.mark(item, this.connection.send(sendFrame(nonce, item)) ? "Sending…" : "Waiting for connection…");
    this.cancelReply();
    this.mentions.close();
    this.input.value = "";
    this.input.focus();
    this.update();
  }

  // The next send answers this message: the bar above the box says which.
  startReply(original) {
    const stick = isAtBottom(); // the bar makes the composer taller; keep the newest message in view
    this.replyTo = original;
    const author = document.createElement("strong");
    author.textContent = original.author;
    const text = document.createElement("span");
    text.className = "reply-bar-excerpt";
    text.textContent = original.excerpt ? quoteText(original.excerpt) : "Message deleted";
    this.replyText.replaceChildren("Replying to ", author, ": ", text);
    this.replyBar.hidden = false;
    if (stick) scrollToBottom();
    this.input.focus();
  }

  // No reply after all; with `id`, only if the reply was to that message (it was deleted).
  cancelReply(id = null) {
    if (!this.replyTo || (id !== null && this.replyTo.id !== id)) return;
    const stick = isAtBottom();
    this.replyTo = null;
    this.replyBar.hidden = true;
    this.replyText.replaceChildren();
    if (stick) scrollToBottom();
  }

  mark(item, text) {
    item.element.querySelector(".status").textContent = text;
  }

  // The socket is live again: sends never acknowledged go again, same nonces.
  resendAll() {
    for (const [nonce, item] of this.pending) {
      clearTimeout(item.retryTimer);
      this.connection.send(sendFrame(nonce, item));
      this.mark(item, "Sending…");
    }
  }

  // The long-poll fallback is live: the queued sends go through the API.
  sendAllByApi() {
    for (const [nonce, item] of this.pending) this.sendByApi(nonce, item);
  }

  async sendByApi(nonce, item) {
    this.mark(item, "Sending…");
    let result;
    try {
      result = await postMessage(this.room, item.body, nonce, item.replyTo, item.attachments);
    } catch (error) {
      this.mark(item, "Waiting for connection…"); // sent again, same nonce, when a transport is back
      return;
    }
    const { response, data } = result;
    if (response.ok && data) this.onPosted(data);
    else if (data && data.error && (response.status < 500 || RETRYABLE.has(data.error.code))) {
      this.onError({ nonce: nonce, ...data.error });
    } else this.mark(item, "Waiting for connection…");
  }

  // A message arrived: if it is one of this page's sends, its placeholder goes.
  acknowledge(message) {
    const item = message.nonce != null && this.pending.get(message.nonce);
    if (item && message.author === this.username) {
      clearTimeout(item.retryTimer);
      item.element.remove();
      this.pending.delete(message.nonce);
      this.uploads.sent(message.nonce);
    }
  }

  // An upload finished, failed or went: a send that waited for the uploads goes now.
  uploadsChanged() {
    if (this.waitingForUploads && !this.uploads.busy()) {
      this.waitingForUploads = false;
      this.submit(); // or says why it cannot (a failed upload)
      return;
    }
    this.update();
  }

  // An "error" frame (or API error): a send it names was not saved (tried again) or
  // refused (failed); any other is shown in the hint.
  onError(frame) {
    const item = frame.nonce != null ? this.pending.get(frame.nonce) : null;
    if (item && RETRYABLE.has(frame.code)) {
      this.retryLater(frame.nonce, item);
    } else if (item) {
      this.pending.delete(frame.nonce);
      this.uploads.returned(frame.nonce); // its files can go with the next send
      item.element.classList.add("failed");
      this.mark(item, `Not sent: ${frame.detail}`);
      item.element.addEventListener("click", () => item.element.remove(), { once: true });
    } else {
      this.hint.textContent = frame.detail;
    }
  }

  retryLater(nonce, item) {
    this.mark(item, "Not saved yet — retrying…");
    const delay = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** item.retries) * (0.75 + Math.random() / 2);
    item.retries += 1;
    clearTimeout(item.retryTimer);
    item.retryTimer = setTimeout(() => {
      if (this.pending.get(nonce) !== item) return; // acknowledged meanwhile
      if (this.connection.fallbackLive) this.sendByApi(nonce, item);
      else this.connection.send(sendFrame(nonce, item)); // offline: resendAll sends it
    }, delay);
  }

  update() {
    const { live, fallbackLive } = this.connection;
    const stick = isAtBottom(); // the composer may change height; keep the newest message in view
    const remaining = LIMITS.messageMaxLength - this.input.value.length;
    // Offline the button is off; Enter still queues the message, sent (once) when the page is live again.
    this.sendButton.disabled = !live && !fallbackLive;
    if (fallbackLive) {
      this.hint.textContent = "Connected by long-poll: messages still arrive and send; editing waits for the live connection.";
    } else if (!live) {
      this.hint.textContent = "Offline: press Enter to queue a message; it is sent when the connection is back.";
    } else if (this.waitingForUploads) {
      this.hint.textContent = "Waiting for uploads…";
    } else if (remaining < 200) {
      this.hint.textContent = `${remaining} characters left`;
    } else {
      this.hint.textContent = KEYBOARD_HINT;
    }
    this.fitInput();
    if (stick) scrollToBottom();
  }

  // The composer grows with its text (up to the CSS max-height), then scrolls.
  fitInput() {
    this.input.style.height = "auto";
    const border = this.input.offsetHeight - this.input.clientHeight;
    this.input.style.height = `${this.input.scrollHeight + border}px`;
  }

  signalTyping() {
    const now = Date.now();
    if (!this.connection.live || !this.input.value.trim() || now - this.lastTypingSent < TYPING_SEND_MS) return;
    this.lastTypingSent = now;
    this.connection.send({ type: "typing" });
  }

  // The page's connection ended for good: say why, and where to go.
  close(message, link, label) {
    this.hint.textContent = `${message} `;
    const anchor = document.createElement("a");
    anchor.href = link;
    anchor.textContent = label || (link === "/" ? "Back to rooms" : "Log in");
    this.hint.append(anchor);
    this.cancelReply();
    this.mentions.close();
    this.input.disabled = true;
    this.form.querySelector("button[type=submit]").disabled = true;
    this.waitingForUploads = false;
    this.uploads.disable();
  }
}

// A "send" frame; reply_to only when it answers a message, attachments only when it carries files.
function sendFrame(nonce, item) {
  const frame = { type: "send", body: item.body, nonce: nonce };
  if (item.replyTo != null) frame.reply_to = item.replyTo;
  if (item.attachments.length) frame.attachments = item.attachments;
  return frame;
}
