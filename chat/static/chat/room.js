// The room page's live client: WebSocket protocol v1 (docs/protocol.md).
// This module wires the others together and handles the server's frames:
//
// - room/messages.js    the messages kept by seq: dedupe, order, holes, gaps
// - room/render.js      the message list in the DOM
// - room/controls.js    a message's buttons: reply, react, edit, delete, pin
// - room/reactions.js   the reaction chips and the emoji picker
// - room/pins.js        the pinned messages under the header
// - room/jump.js        going to a quoted or pinned message, loading it first if need be
// - room/composer.js    the textarea, the reply being written, the sends not acknowledged yet
// - room/uploads.js     the files for the next message: 📎, drop, paste, their upload chips
// - room/lightbox.js    an image in a message, full size over the page
// - room/autocomplete.js  the composer's "@name" suggestions
// - room/members.js     who is online, who is typing
// - room/reading.js     read marks and the unread count in the title
// - room/receipts.js    "Seen by N" under the reader's latest own message (others' read marks)
// - room/connection.js  the socket, the long-poll fallback, the connection pill
// - room/sidebar.js     the other rooms' unread and mention counts, kept live by "notify" frames
// - room/notifier.js    the reader's notification level here, and the browser's notifications
// - live.js             the transports; protocol.js the server's close codes and limits
import { LIMITS } from "./protocol.js";
import { Composer } from "./room/composer.js";
import { Connection } from "./room/connection.js";
import { MessageControls } from "./room/controls.js";
import { Jumper } from "./room/jump.js";
import { openImagesInLightbox } from "./room/lightbox.js";
import { forgetPresence, hideTyping, presenceUnknown, showPresence, showTyping } from "./room/members.js";
import { MessageLog } from "./room/messages.js";
import { BrowserNotifier, NotifyLevelControl } from "./room/notifier.js";
import { PinnedList } from "./room/pins.js";
import { Reactions } from "./room/reactions.js";
import { Reading } from "./room/reading.js";
import { Receipts } from "./room/receipts.js";
import {
  decorate, excerpt, followScrolling, holdPlace, insertBefore, markDeleted, markFirstUnread, mentionsReader, messageText,
  renderMessage, renderedMessages, scrollToBottom, setReactions, setReader, showHoles, updateMessage, updateQuotesOf,
} from "./room/render.js";
import { Sidebar } from "./room/sidebar.js";

const config = JSON.parse(document.getElementById("chat-config").textContent);
const loadOlder = document.getElementById("load-older");

const connection = new Connection({
  room: config.room,
  loginUrl: config.loginUrl,
  cursor: () => ({ after: log.lastContiguous, changesAfter: log.lastChange }),
  onConnecting: () => {
    log.forgetRequests();
    loadOlder.disabled = false; // an "older" request in flight will not be answered now
    jumper.cancel();
    showHoles(log.holes(), LIMITS.historyMaxLimit, fillHole); // so are "fill" requests: their buttons come back
  },
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
const composer = new Composer({
  room: config.room, username: config.username, mayMentionRoom: config.mayMentionRoom, connection, onPosted: addMessage,
});
const reactions = new Reactions({ live, send });
const controls = new MessageControls({
  username: config.username, canModerate: config.canModerate, live, send,
  onReply: (original) => composer.startReply(original),
  onReact: (item, button) => reactions.togglePicker(item, button),
});
const jumper = new Jumper({ log, live });
const pins = new PinnedList({ onJump: (seq) => jumper.to(seq) });
setReader(config.username, { isMember: config.isMember });
const sidebar = new Sidebar({ room: config.room });
const notifier = new BrowserNotifier({ config, sidebar, mentionsReader, onJump: (seq) => jumper.to(seq) });
new NotifyLevelControl({
  room: config.room,
  onSaved: (level) => {
    config.notify = level;
    config.isMember = true; // saving a level joins a public room: @room mentions the reader from now on
    setReader(config.username, { isMember: true });
    sidebar.setLevel(config.room, level);
  },
});
// A read mark joins a public room (the server's read_mark): from then on @room mentions the reader.
const sendRead = (frame) => {
  const sent = send(frame);
  if (sent && !config.isMember) {
    config.isMember = true;
    setReader(config.username, { isMember: true });
  }
  return sent;
};
const reading = new Reading({ lastRead: config.lastRead, username: config.username, log, send: sendRead });
const receipts = new Receipts({ marks: config.readMarks, max: config.readMarksMax, username: config.username, log });

for (const [seq, item] of renderedMessages()) {
  log.add(seq, item);
  reading.observe(item);
}
for (const item of log.items()) controls.add(item);
receipts.update();
const firstUnread = reading.firstUnread();
if (firstUnread) markFirstUnread(firstUnread);
// A reply's quote goes to the original, on server-rendered and live messages alike; so does a thumbnail to its image.
openImagesInLightbox(document.getElementById("messages"));
document.getElementById("messages").addEventListener("click", (event) => {
  const quote = event.target.closest(".reply-quote");
  if (quote && quote.dataset.replySeq) jumper.to(Number(quote.dataset.replySeq));
});

// ---- frames from the server ---------------------------------------------------

function handleFrame(frame) {
  switch (frame.type) {
    case "message":
      // Only a message that arrives live notifies: not one replayed on a reconnect (before "ready").
      if (addMessage(frame.message) && connection.live) notifier.onMessage(frame.message);
      break;
    case "notify": // a mention of the reader or a direct message; this room's own is its "message" frame
      if (frame.room === config.room) break;
      sidebar.notified(frame);
      notifier.onNotify(frame);
      break;
    case "history":
      onHistory(frame);
      break;
    case "gap":
      // The server skipped the oldest missed messages; start the view afresh
      // from next_seq and let "Load older" fetch the rest on demand.
      for (const item of log.restartFrom(frame.next_seq)) item.remove();
      showHoles([], 0, fillHole);
      loadOlder.hidden = false;
      receipts.update();
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
    case "read_by":
      receipts.note(frame.user, frame.seq);
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
      pins.remove(frame.id);
      updateQuotesOf(frame.seq, "");
      composer.cancelReply(frame.id);
      reading.updateTitle();
      receipts.update();
      break;
    case "reactions":
      log.noteChange(frame.change);
      if (log.has(frame.seq) && !log.get(frame.seq).classList.contains("deleted")) setReactions(log.get(frame.seq), frame.reactions);
      break;
    case "history_cleared":
      log.noteChange(frame.change);
      for (const [seq, item] of log.entries()) {
        if (seq > frame.seq) continue;
        if (item.dataset.id) composer.cancelReply(Number(item.dataset.id));
        markDeleted(item);
        updateQuotesOf(seq, "");
      }
      pins.removeUpTo(frame.seq);
      reading.updateTitle();
      receipts.update();
      break;
  }
}

let readyBefore = false; // a ready after the first is a reconnect
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
  sidebar.refresh(); // the notify frames sent while the page was away are not replayed
  if (readyBefore) receipts.catchUp(config.room);
  else jumpToLinked(); // a link to a message: a search result, the Mentions page, an email
  readyBefore = true;
}

// /rooms/<slug>/?at=<seq> (the server checked it: config.jumpTo): go to that message, loading
// the history around it if it is older than the page, and highlight it.
function jumpToLinked() {
  if (config.jumpTo == null) return;
  jumper.to(config.jumpTo);
  const url = new URL(location.href);
  url.searchParams.delete("at");
  history.replaceState(null, "", url.pathname + url.search + url.hash); // a reload opens at the newest messages
}

function onHistory(frame) {
  // Answers come in the order asked; an "around" one also says so itself.
  const asked = log.answered();
  const kind = frame.around != null ? "around" : asked;
  const restorePlace = holdPlace(); // the reader's place, when messages land above it
  for (const message of frame.messages) addMessage(message);
  if (kind === "older") {
    loadOlder.disabled = false;
    loadOlder.hidden = !frame.has_more;
  } else if (kind === "around" && frame.messages.length && frame.messages[0].seq === log.firstSeq()) {
    // The messages around the one asked for are now the top of the list: "Load older" continues above them.
    loadOlder.disabled = false;
    loadOlder.hidden = !frame.has_more;
  }
  showHoles(log.holes(), LIMITS.historyMaxLimit, fillHole);
  if (kind === "around" && jumper.arrived(frame.around)) return;
  if (kind !== "gap") restorePlace();
}

function fillHole(before, limit) {
  return connection.live && log.requestFill(before, limit);
}

// The message as it is now: an edit, a pin or unpin, or reactions (after a resume).
function onUpdated(frame) {
  log.noteChange(frame.change);
  const message = frame.message;
  pins.update(message);
  updateQuotesOf(message.seq, message.deleted_at ? "" : excerpt(messageText(message)));
  const item = log.get(message.seq);
  if (!item || item.classList.contains("deleted")) return;
  updateMessage(item, message);
  controls.update(item);
}

// Show a message; true when it is new to the page.
function addMessage(message) {
  hideTyping(message.author);
  composer.acknowledge(message);
  if (log.has(message.seq)) return false; // a resend or a replay overlap: already shown
  const item = renderMessage(message);
  controls.add(item);
  insertBefore(item, log.nextAfter(message.seq));
  log.add(message.seq, item);
  reading.observe(item);
  reading.updateTitle();
  if (message.author === config.username) receipts.update(); // the line moves to the newest own message
  const empty = document.getElementById("no-messages");
  if (empty) empty.remove();
  return true;
}

// ---- history above --------------------------------------------------------------

function requestOlder() {
  if (log.firstSeq() <= 1 || !connection.live || loadOlder.disabled || loadOlder.hidden) return;
  loadOlder.disabled = log.requestOlder();
}

loadOlder.addEventListener("click", requestOlder);
followScrolling(requestOlder);

decorate();
scrollToBottom();
if (config.archived) connection.stop("Archived", "This room is archived; it is read-only.", "/");
else connection.start();
