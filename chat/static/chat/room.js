// The room page's live client: WebSocket protocol v1 (docs/protocol.md).
// This module wires the others together and handles the server's frames:
//
// - room/messages.js    the messages kept by seq: dedupe, order, holes, gaps
// - room/render.js      the message list in the DOM
// - room/controls.js    edit and delete buttons
// - room/composer.js    the textarea and the sends not acknowledged yet
// - room/members.js     who is online, who is typing
// - room/reading.js     read marks and the unread count in the title
// - room/connection.js  the socket, the long-poll fallback, the connection pill
// - live.js             the transports; protocol.js the server's close codes and limits
import { Composer } from "./room/composer.js";
import { Connection } from "./room/connection.js";
import { MessageControls } from "./room/controls.js";
import { forgetPresence, hideTyping, presenceUnknown, showPresence, showTyping } from "./room/members.js";
import { MessageLog } from "./room/messages.js";
import { Reading } from "./room/reading.js";
import {
  decorate, followScrolling, holdPlace, insertBefore, markDeleted, markEdited, markFirstUnread,
  renderMessage, renderedMessages, scrollToBottom, setBody,
} from "./room/render.js";

const config = JSON.parse(document.getElementById("chat-config").textContent);
const loadOlder = document.getElementById("load-older");

const connection = new Connection({
  room: config.room,
  loginUrl: config.loginUrl,
  cursor: () => ({ after: log.lastContiguous, changesAfter: log.lastChange }),
  onConnecting: () => log.forgetRequests(),
  onFrame: handleFrame,
  onMessages: (messages) => messages.forEach(addMessage),
  onFallbackLive: () => composer.sendAllByApi(),
  onChange: () => composer.update(),
  onStop: (message, link, label) => {
    composer.close(message, link, label);
    forgetPresence();
  },
});
const live = () => connection.live;
const send = (frame) => connection.send(frame);
const log = new MessageLog({ lastSeq: config.lastSeq, lastChange: config.lastChange, live, send });
const controls = new MessageControls({ username: config.username, canModerate: config.canModerate, live, send });
const composer = new Composer({ room: config.room, username: config.username, connection, onPosted: addMessage });
const reading = new Reading({ lastRead: config.lastRead, username: config.username, log, send });

for (const [seq, item] of renderedMessages()) {
  log.add(seq, item);
  reading.observe(item);
}
for (const item of log.items()) controls.add(item);
const firstUnread = reading.firstUnread();
if (firstUnread) markFirstUnread(firstUnread);

// ---- frames from the server ---------------------------------------------------

function handleFrame(frame) {
  switch (frame.type) {
    case "message":
      addMessage(frame.message);
      break;
    case "history":
      onHistory(frame);
      break;
    case "gap":
      // The server skipped the oldest missed messages; start the view afresh
      // from next_seq and let "Load older" fetch the rest on demand.
      for (const item of log.restartFrom(frame.next_seq)) item.remove();
      loadOlder.hidden = false;
      break;
    case "ready":
      onReady(frame);
      break;
    case "error":
      composer.onError(frame);
      break;
    case "typing":
      showTyping(frame.user);
      break;
    case "presence":
      showPresence(frame.users);
      break;
    case "delivery":
      connection.delivery(frame.mode);
      if (frame.mode === "delayed") presenceUnknown();
      break;
    case "message_updated":
      onUpdated(frame);
      break;
    case "message_deleted":
      log.noteChange(frame.change);
      if (log.has(frame.seq)) markDeleted(log.get(frame.seq));
      reading.updateTitle();
      break;
    case "history_cleared":
      log.noteChange(frame.change);
      for (const [seq, item] of log.entries()) if (seq <= frame.seq) markDeleted(item);
      reading.updateTitle();
      break;
  }
}

function onReady(frame) {
  log.noteChange(frame.last_change);
  if (frame.last_seq < log.lastContiguous) {
    // The room is behind what this page holds (it was recreated): start over.
    location.reload();
    return;
  }
  connection.ready();
  // Sends that were never acknowledged go again with the same nonce; the
  // server stores each nonce once, so a retry cannot duplicate a message.
  composer.resendAll();
  composer.update();
  log.checkGap();
  reading.markRead();
}

function onHistory(frame) {
  const kind = log.answered();
  const restorePlace = holdPlace(); // the reader's place, when messages land above it
  for (const message of frame.messages) addMessage(message);
  if (kind === "older") {
    loadOlder.disabled = false;
    loadOlder.hidden = !frame.has_more;
    restorePlace();
  }
}

function onUpdated(frame) {
  log.noteChange(frame.change);
  const item = log.get(frame.message.seq);
  if (!item || item.classList.contains("deleted")) return;
  setBody(item.querySelector(".body"), frame.message.body);
  markEdited(item);
}

function addMessage(message) {
  hideTyping(message.author);
  composer.acknowledge(message);
  if (log.has(message.seq)) return; // a resend or a replay overlap: already shown
  const item = renderMessage(message);
  controls.add(item);
  insertBefore(item, log.nextAfter(message.seq));
  log.add(message.seq, item);
  reading.observe(item);
  reading.updateTitle();
  const empty = document.getElementById("no-messages");
  if (empty) empty.remove();
}

// ---- history above --------------------------------------------------------------

function requestOlder() {
  if (log.firstSeq() <= 1 || !connection.live || loadOlder.disabled || loadOlder.hidden) return;
  loadOlder.disabled = true;
  log.requestOlder();
}

loadOlder.addEventListener("click", requestOlder);
followScrolling(requestOlder);

decorate();
scrollToBottom();
if (config.archived) connection.stop("Archived", "This room is archived; it is read-only.", "/");
else connection.start();
