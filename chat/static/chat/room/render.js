// The room page's message list in the DOM: one message's element (its reply
// quote, body, attachments, reactions and pin marker), the day separators and author
// groups, holes left by a jump, and the pane's scrolling. Text people wrote
// goes in with textContent; the one exception is a message's `html`, which the
// server rendered from Markdown and sanitized (chat/markdown.py). A `body` is
// never parsed as HTML: it is the source, kept for editing and quoting.
const list = document.getElementById("messages");
const pane = document.getElementById("messages-pane");
const jumpButton = document.getElementById("jump-new");
const jumpStatus = document.getElementById("jump-status");

const EXCERPT_LENGTH = 140; // as the server cuts reply_to.excerpt

let reader = ""; // who is reading: the reactions they made show as pressed, their own name is no link
let readerIsMember = false; // a member: @room mentions them
export function setReader(username, { isMember = false } = {}) {
  reader = username;
  readerIsMember = isMember;
}

// Whether a message asks for the reader: it names them, or says @room and they
// are a member; never their own, never a deleted one (as _message.html's "mentions-me").
export function mentionsReader(message) {
  if (message.deleted_at || message.author === reader) return false;
  return (message.mentions || []).includes(reader) || Boolean(message.mentions_room && readerIsMember);
}

// In a direct conversation the other person's name would link back to this very room.
const directRoom = list.dataset.direct !== undefined;

// Where a direct conversation with `name` opens (chat/urls.py "direct-room"; the
// server creates it the first time), as the template's links say it.
function directUrl(name) {
  return `/dm/${encodeURIComponent(name)}/`;
}

// A message's author: a link that opens a direct conversation with them, but
// for the reader's own messages, operators' system messages and in a direct room.
function authorElement(name, system) {
  const linked = !system && !directRoom && name !== reader;
  const author = document.createElement(linked ? "a" : "span");
  author.className = "author";
  author.textContent = name;
  if (linked) {
    author.href = directUrl(name);
    author.title = `Message ${name} directly`;
    author.setAttribute("aria-label", `Message ${name} directly`);
  }
  return author;
}

// The start of a body, as the server quotes it (reply_to.excerpt): its first
// characters, counted as Python counts them (code points, so no emoji is cut in two).
export function excerpt(body) {
  const characters = Array.from(body);
  return characters.length > EXCERPT_LENGTH ? characters.slice(0, EXCERPT_LENGTH).join("") : body;
}

// What a message says in a quote, a pin or a notification: its text, or, for
// one that is only files, their names (as the server's reply_to.excerpt).
export function messageText(message) {
  if (message.body) return message.body;
  return filesText((message.attachments || []).map((file) => file.name));
}

// The same, from a message's element.
export function itemText(item) {
  if (item.dataset.body) return item.dataset.body;
  return filesText([...item.querySelectorAll(".attachments > a")].map((link) =>
    link.dataset.name || (link.querySelector(".attachment-name") || link).textContent));
}

function filesText(names) {
  return names.length ? `📎 ${names.join(", ")}` : "";
}

// A body as a pinned message shows it: cut with "…" as the template's truncatechars:140 does.
export function truncate(text) {
  const characters = Array.from(text);
  return characters.length > EXCERPT_LENGTH ? `${characters.slice(0, EXCERPT_LENGTH - 1).join("")}…` : text;
}

// An excerpt as a quote shows it: one as long as an excerpt gets was most likely cut, so it says so.
export function quoteText(excerptText) {
  const characters = Array.from(excerptText);
  return characters.length >= EXCERPT_LENGTH ? `${characters.slice(0, EXCERPT_LENGTH - 1).join("")}…` : excerptText;
}

// The same structure as templates/chat/_message.html renders.
export function renderMessage(message) {
  const item = document.createElement("li");
  item.className = message.system ? "message system" : "message";
  item.dataset.seq = String(message.seq);
  item.dataset.id = String(message.id);
  item.dataset.author = message.author;
  item.dataset.body = message.body;
  const head = document.createElement("div");
  head.className = "message-head";
  const author = authorElement(message.author, message.system);
  const time = document.createElement("time");
  time.dateTime = message.created_at;
  localiseTime(time);
  head.append(author, " ", time);
  const body = document.createElement("div");
  body.className = "body";
  item.append(head, body);
  if (message.deleted_at) {
    markDeleted(item);
    return item;
  }
  setBody(body, message);
  item.classList.toggle("mentions-me", mentionsReader(message));
  setReplyQuote(item, message.reply_to);
  setAttachments(item, message.attachments || []);
  setReactions(item, message.reactions || []);
  setPinned(item, message.pinned_at);
  if (message.edited_at) markEdited(item);
  return item;
}

// A message object changed (an edit, a pin, reactions): show it as it is now.
export function updateMessage(item, message) {
  if (message.deleted_at) {
    markDeleted(item);
    return;
  }
  if (item.dataset.body !== message.body) {
    item.dataset.body = message.body;
    setBody(item.querySelector(".body"), message);
  }
  item.classList.toggle("mentions-me", mentionsReader(message)); // an edit may add or drop a mention
  setReplyQuote(item, message.reply_to);
  if (message.attachments) setAttachments(item, message.attachments); // a frame without the key says nothing of them
  setReactions(item, message.reactions || []);
  setPinned(item, message.pinned_at);
  if (message.edited_at) markEdited(item);
}

// The server's sanitized HTML; a message without any (a send not acknowledged
// yet) shows its source as text.
export function setBody(element, { body, html, author }) {
  if (html) {
    element.replaceChildren(safeFragment(html));
    element.classList.remove("plain");
    markOwnMentions(element, author);
  } else {
    element.textContent = body;
    element.classList.add("plain");
  }
}

// The reader's own name in a body (and @room, which names every member) stands out.
function markOwnMentions(body, author) {
  for (const mention of body.querySelectorAll("span.mention")) {
    const name = mention.dataset.mention;
    const me = name === reader || (name === "room" && readerIsMember && author !== reader);
    mention.classList.toggle("me", me);
  }
}

// The one place the page parses HTML: a message's `html`, from the server.
// Defence in depth: the server sends only these tags and attributes
// (chat/markdown.py ALLOWED_TAGS), so this removes nothing from what it sends;
// were anything else ever to slip through, it would become text, not markup.
// DOMParser's document is inert: nothing in it runs or loads while it is checked.
const ALLOWED = {
  P: [], BR: [], EM: [], STRONG: [], S: [], PRE: [], UL: [], LI: [], BLOCKQUOTE: [],
  CODE: ["class"], OL: ["start"], A: ["href", "title", "rel", "target"], SPAN: ["class", "data-mention"],
};
const MENTION_CLASS = "mention"; // a span's only class: the server's mention, not a class of the site's own
const SAFE_URL = /^(https?:|mailto:)/i;
function safeFragment(html) {
  const parsed = new DOMParser().parseFromString(html, "text/html").body;
  for (const element of parsed.querySelectorAll("*")) {
    const allowed = ALLOWED[element.tagName];
    if (!allowed) {
      element.replaceWith(element.textContent);
      continue;
    }
    for (const { name } of [...element.attributes]) if (!allowed.includes(name)) element.removeAttribute(name);
    if (element.tagName === "SPAN" && element.getAttribute("class") !== MENTION_CLASS) element.removeAttribute("class");
    if (element.tagName === "A") {
      if (!SAFE_URL.test(element.getAttribute("href") || "")) element.removeAttribute("href");
      element.rel = "nofollow noopener noreferrer ugc";
      element.target = "_blank";
    }
  }
  const fragment = document.createDocumentFragment();
  fragment.append(...parsed.childNodes); // adopted into the page only now, checked
  return fragment;
}

// The quote above a reply: who wrote the original and how it starts; a button
// that goes to it (room/jump.js).
export function setReplyQuote(item, replyTo) {
  let quote = item.querySelector(".reply-quote");
  if (!replyTo) {
    if (quote) quote.remove();
    return;
  }
  if (!quote) {
    quote = document.createElement("button");
    quote.type = "button";
    quote.className = "reply-quote";
    quote.title = "Go to the original message";
    const prefix = document.createElement("span");
    prefix.className = "visually-hidden";
    prefix.textContent = "In reply to ";
    const author = document.createElement("span");
    author.className = "reply-author";
    const text = document.createElement("span");
    text.className = "reply-excerpt";
    quote.append(prefix, author, " ", text);
    item.querySelector(".body").before(quote);
  }
  quote.dataset.replySeq = String(replyTo.seq);
  quote.dataset.replyId = String(replyTo.id);
  quote.querySelector(".reply-author").textContent = replyTo.author;
  setQuoteExcerpt(quote, replyTo.excerpt);
}

function setQuoteExcerpt(quote, text) {
  const shown = quote.querySelector(".reply-excerpt");
  shown.textContent = text ? quoteText(text) : "Message deleted"; // "" once the original is deleted
  shown.classList.toggle("gone", !text);
}

// The original of these quotes was edited ("" : deleted): quotes show it as it is now.
export function updateQuotesOf(seq, text) {
  for (const quote of list.querySelectorAll(`.reply-quote[data-reply-seq="${Number(seq)}"]`)) setQuoteExcerpt(quote, text);
}

// A message's files, after its body, as _message.html renders them: an image
// (it has a thumbnail) as its thumbnail, which links to the full image (room/lightbox.js
// opens it over the page); any other file as a download link with its name and size.
// Names are whatever the uploader's computer called the file: text and attributes only.
export function setAttachments(item, attachments) {
  let box = item.querySelector(".attachments");
  if (!attachments.length) {
    if (box) box.remove();
    return;
  }
  const urls = attachments.map((file) => file.url).join("\n");
  if (box && [...box.children].map((link) => link.getAttribute("href")).join("\n") === urls) return; // unchanged: no reload
  if (!box) {
    box = document.createElement("div");
    box.className = "attachments";
    item.querySelector(".body").after(box);
  }
  box.replaceChildren(...attachments.map(attachmentElement));
}

// The server's own file URLs (/files/…, or a bucket's https: one); anything else would be no link at all.
const FILE_URL = /^(\/(?!\/)|https?:)/i;
export function attachmentElement(file) {
  const link = document.createElement("a");
  if (FILE_URL.test(file.url || "")) link.href = file.url;
  if (file.thumbnail_url) {
    link.className = "attachment-image";
    link.dataset.name = file.name;
    const image = document.createElement("img");
    if (FILE_URL.test(file.thumbnail_url)) image.src = file.thumbnail_url;
    image.alt = file.name;
    image.loading = "lazy";
    link.append(image);
  } else {
    link.className = "attachment-file";
    link.download = ""; // the server names it (Content-Disposition)
    const name = document.createElement("span");
    name.className = "attachment-name";
    name.textContent = file.name;
    const size = document.createElement("span");
    size.className = "attachment-size";
    size.textContent = humanSize(file.size);
    link.append(name, " ", size);
  }
  return link;
}

// A size as people read it, exactly as the server's template writes it (Django's
// filesizeformat): "18 bytes", "12.1 KB", "3.4 MB", its space one that does not
// break, its tenths rounded as Python's round() does (half to even), in whole numbers.
const SIZE_UNITS = [[1024 ** 3, "GB"], [1024 ** 2, "MB"], [1024, "KB"]];
export function humanSize(bytes) {
  const unit = SIZE_UNITS.find(([size]) => bytes >= size);
  if (!unit) return `${bytes}\u00a0${bytes === 1 ? "byte" : "bytes"}`;
  const [size, name] = unit;
  let tenths = Math.floor((bytes * 10) / size);
  const rest = (bytes * 10) % size;
  if (rest * 2 > size || (rest * 2 === size && tenths % 2 === 1)) tenths += 1;
  return `${Math.floor(tenths / 10)}.${tenths % 10}\u00a0${name}`;
}

// The reaction chips: "👍 2", pressed when the reader is among those who reacted.
export function setReactions(item, reactions) {
  let row = item.querySelector(".reactions");
  if (!row) {
    row = document.createElement("div");
    row.className = "reactions";
    row.setAttribute("role", "group");
    row.setAttribute("aria-label", "Reactions");
    (item.querySelector(".attachments") || item.querySelector(".body")).after(row);
  }
  row.replaceChildren(...reactions.map(reactionChip));
  row.hidden = reactions.length === 0;
}

function reactionChip({ emoji, count, users }) {
  const chip = document.createElement("button");
  chip.type = "button";
  chip.className = "reaction";
  chip.dataset.emoji = emoji;
  chip.setAttribute("aria-pressed", String(users.includes(reader)));
  const who = users.join(", ");
  chip.title = `${who} reacted with ${emoji}`;
  chip.setAttribute("aria-label", `${emoji} ${count}: ${who}`);
  const symbol = document.createElement("span");
  symbol.className = "reaction-emoji";
  symbol.textContent = emoji;
  const number = document.createElement("span");
  number.className = "reaction-count";
  number.textContent = String(count);
  chip.append(symbol, " ", number);
  return chip;
}

// "📌 Pinned" in the message's head while a moderator has it pinned.
export function setPinned(item, pinnedAt) {
  item.classList.toggle("pinned", Boolean(pinnedAt));
  let marker = item.querySelector(".pin-marker");
  if (!pinnedAt) {
    delete item.dataset.pinnedAt;
    if (marker) marker.remove();
    return;
  }
  item.dataset.pinnedAt = pinnedAt;
  if (marker) return;
  marker = document.createElement("span");
  marker.className = "pin-marker";
  const pin = document.createElement("span");
  pin.setAttribute("aria-hidden", "true");
  pin.textContent = "📌";
  marker.append(pin, " Pinned");
  const head = item.querySelector(".message-head");
  head.insertBefore(marker, head.querySelector(".controls"));
}

export function markEdited(item) {
  if (item.querySelector(".edited")) return;
  const note = document.createElement("span");
  note.className = "edited";
  note.textContent = "(edited)";
  const head = item.querySelector(".message-head");
  const before = head.querySelector(".pin-marker, .controls");
  head.insertBefore(document.createTextNode(" "), before);
  head.insertBefore(note, before);
}

// A deleted message keeps its place and says so; everything else about it goes.
export function markDeleted(item) {
  item.classList.add("deleted");
  item.classList.remove("pinned", "mentions-me");
  delete item.dataset.body;
  delete item.dataset.pinnedAt;
  for (const extra of item.querySelectorAll(".edited, .controls, .edit-form, .reply-quote, .attachments, .reactions, .emoji-picker, .pin-marker")) {
    extra.remove();
  }
  const body = item.querySelector(".body");
  body.classList.remove("plain");
  body.textContent = "Message deleted";
  body.hidden = false;
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
    markOwnMentions(item.querySelector(".body"), item.dataset.author);
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
    if (item.classList.contains("history-hole")) { previous = null; continue; } // no group spans messages not shown
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

// Holes below the newest messages, left by a jump to an old message (a
// "history" around it): each gets a line with a button that loads it, the
// newest `limit` of it at a time. holes: [{before, count, next}] (MessageLog.holes).
export function showHoles(holes, limit, onLoad) {
  for (const marker of list.querySelectorAll("li.history-hole")) marker.remove();
  for (const { before, count, next } of holes) {
    const marker = document.createElement("li");
    marker.className = "history-hole";
    const button = document.createElement("button");
    button.type = "button";
    button.className = "link";
    const loads = Math.min(count, limit);
    button.textContent = loads === count
      ? `Load ${count} more message${count === 1 ? "" : "s"}`
      : `Load ${loads} of ${count.toLocaleString()} more messages`;
    button.addEventListener("click", () => {
      if (!onLoad(before, loads)) return; // not connected: the button stays
      button.disabled = true;
      button.textContent = "Loading…";
    });
    marker.append(button);
    list.insertBefore(marker, next);
  }
  scheduleDecorate();
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

// A thumbnail makes its message taller only once it has loaded, which scrolls
// nothing: a reader who was at the newest message (as of their last scroll)
// stays there. Growing content fires no scroll event, so `atBottom` still says
// where they were before it grew.
let atBottom = true;
pane.addEventListener("scroll", () => { atBottom = isAtBottom(); }, { passive: true });
list.addEventListener("load", (event) => {
  if (event.target.tagName === "IMG" && atBottom) scrollToBottom();
}, true); // load does not bubble

export function scrollToBottom() {
  if (revealing()) return;
  pane.scrollTop = pane.scrollHeight;
}

// Call before adding messages above what is being read; the returned function
// scrolls back to the reader's place.
export function holdPlace() {
  const fromBottom = pane.scrollHeight - pane.scrollTop;
  return () => { if (!revealing()) pane.scrollTop = pane.scrollHeight - fromBottom; };
}

// While the pane scrolls (smoothly) to a message the reader asked for, nothing else moves it:
// setting scrollTop would stop that scroll short, with the message still out of view.
const REVEAL_MS = 1000;
let revealUntil = 0;
function revealing() {
  return performance.now() < revealUntil;
}

// Show a message the reader asked to go to: in the middle of the pane,
// highlighted for a moment, and focused (so the keyboard carries on from it).
const HIGHLIGHT_MS = 2500;
const highlights = new WeakMap(); // item -> the timer that ends its highlight
const reducedMotion = window.matchMedia && matchMedia("(prefers-reduced-motion: reduce)").matches;
export function revealMessage(item) {
  revealUntil = performance.now() + REVEAL_MS;
  item.scrollIntoView({ block: "center", behavior: reducedMotion ? "auto" : "smooth" });
  item.classList.remove("highlight");
  void item.offsetWidth; // restarts the highlight's fade when it is asked for again
  item.classList.add("highlight");
  clearTimeout(highlights.get(item));
  highlights.set(item, setTimeout(() => item.classList.remove("highlight"), HIGHLIGHT_MS));
  item.tabIndex = -1;
  item.focus({ preventScroll: true });
}

// The line at the top of the pane while a message is being fetched to go to
// ("" hides it); an `error` goes by itself after a few seconds.
const STATUS_ERROR_MS = 4000;
let statusTimer = null;
export function showJumpStatus(text, { error = false } = {}) {
  clearTimeout(statusTimer);
  jumpStatus.textContent = text;
  jumpStatus.hidden = !text;
  jumpStatus.classList.toggle("error", error);
  if (error) statusTimer = setTimeout(() => showJumpStatus(""), STATUS_ERROR_MS);
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
