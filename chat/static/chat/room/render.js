// The room page's message list in the DOM: one message's element, the day
// separators and author groups, and the pane's scrolling. Message text goes
// in with textContent only: a body is never parsed as HTML.
const list = document.getElementById("messages");
const pane = document.getElementById("messages-pane");
const jumpButton = document.getElementById("jump-new");

export function renderMessage(message) {
  const item = document.createElement("li");
  item.className = message.system ? "message system" : "message";
  item.dataset.seq = String(message.seq);
  item.dataset.id = String(message.id);
  item.dataset.author = message.author;
  const head = document.createElement("div");
  head.className = "message-head";
  const author = document.createElement("span");
  author.className = "author";
  author.textContent = message.author;
  const time = document.createElement("time");
  time.dateTime = message.created_at;
  localiseTime(time);
  head.append(author, " ", time);
  const body = document.createElement("div");
  body.className = "body";
  setBody(body, message.body);
  item.append(head, body);
  if (message.deleted_at) markDeleted(item);
  else if (message.edited_at) markEdited(item);
  return item;
}

// Text, with http(s) links made clickable; never HTML (chat/templatetags/chat_text.py does the same).
const URL_PATTERN = /https?:\/\/[^\s<>"']+/g;
export function setBody(element, text) {
  element.replaceChildren();
  let position = 0;
  for (const match of text.matchAll(URL_PATTERN)) {
    const url = match[0].replace(/[.,;:!?)\]}'"]+$/, "");
    element.append(text.slice(position, match.index));
    const link = document.createElement("a");
    link.href = url;
    link.rel = "noopener noreferrer";
    link.target = "_blank";
    link.textContent = url;
    element.append(link);
    position = match.index + url.length;
  }
  element.append(text.slice(position));
}

export function markEdited(item) {
  if (item.querySelector(".edited")) return;
  const note = document.createElement("span");
  note.className = "edited";
  note.textContent = "(edited)";
  item.querySelector(".message-head").append(" ", note);
}

export function markDeleted(item) {
  item.classList.add("deleted");
  item.querySelector(".body").textContent = "Message deleted";
  for (const extra of item.querySelectorAll(".edited, .controls, .edit-form")) extra.remove();
  item.querySelector(".body").hidden = false;
}

export function localiseTime(time) {
  if (!time) return;
  const moment = new Date(time.dateTime);
  time.textContent = moment.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  time.title = moment.toLocaleString();
}

// ---- the list ---------------------------------------------------------------

// The messages the server rendered with the page, by seq.
export function renderedMessages() {
  return [...list.querySelectorAll("li.message")].map((item) => {
    localiseTime(item.querySelector("time"));
    return [Number(item.dataset.seq), item];
  });
}

// Put a message before `next` (null: after the others, above any pending send).
export function insertBefore(item, next) {
  const stick = isAtBottom();
  const firstPending = list.querySelector("li.pending");
  list.insertBefore(item, next || firstPending);
  scheduleDecorate();
  if (stick) scrollToBottom();
  else if (!next && !firstPending) jumpButton.hidden = false; // a new message below what is being read
}

// A send not acknowledged yet goes at the very end.
export function appendPending(item) {
  list.append(item);
  scrollToBottom();
}

// A line above the first message that arrived since this person last read the room.
export function markFirstUnread(item) {
  const divider = document.createElement("li");
  divider.className = "new-divider";
  divider.textContent = "New messages";
  list.insertBefore(divider, item);
}

// Day separators, and consecutive messages by one author within five minutes shown as one group.
const GROUP_MS = 5 * 60 * 1000;
let decorateQueued = false;
function scheduleDecorate() {
  if (decorateQueued) return;
  decorateQueued = true;
  queueMicrotask(() => { decorateQueued = false; decorate(); });
}

export function decorate() {
  let previous = null;
  for (const item of [...list.children]) {
    if (item.classList.contains("day-separator")) { item.remove(); continue; }
    if (!item.classList.contains("message") || item.classList.contains("pending")) continue;
    const moment = new Date(item.querySelector("time").dateTime);
    const day = moment.toDateString();
    if (!previous || previous.day !== day) {
      const separator = document.createElement("li");
      separator.className = "day-separator";
      separator.textContent = dayLabel(moment);
      list.insertBefore(separator, item);
    }
    const continued = previous && previous.day === day && previous.author === item.dataset.author &&
      moment - previous.moment < GROUP_MS && !item.classList.contains("system");
    item.classList.toggle("continued", Boolean(continued));
    previous = { day: day, author: item.dataset.author, moment: moment };
  }
}

function dayLabel(moment) {
  const today = new Date();
  const yesterday = new Date(today);
  yesterday.setDate(today.getDate() - 1);
  if (moment.toDateString() === today.toDateString()) return "Today";
  if (moment.toDateString() === yesterday.toDateString()) return "Yesterday";
  return moment.toLocaleDateString([], { weekday: "long", year: "numeric", month: "long", day: "numeric" });
}

// ---- the pane ---------------------------------------------------------------

export function isAtBottom() {
  return pane.scrollHeight - pane.scrollTop - pane.clientHeight < 40;
}

export function scrollToBottom() {
  pane.scrollTop = pane.scrollHeight;
}

// Call before adding messages above what is being read; the returned function
// scrolls back to the reader's place.
export function holdPlace() {
  const fromBottom = pane.scrollHeight - pane.scrollTop;
  return () => { pane.scrollTop = pane.scrollHeight - fromBottom; };
}

// Reaching the top calls `onTop` (load the page of history above); the
// "New messages ↓" button scrolls down.
export function followScrolling(onTop) {
  jumpButton.addEventListener("click", () => { scrollToBottom(); jumpButton.hidden = true; });
  pane.addEventListener("scroll", () => {
    if (pane.scrollTop < 80) onTop();
    if (isAtBottom()) jumpButton.hidden = true;
  }, { passive: true });
}
