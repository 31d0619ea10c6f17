// The room page's live client: WebSocket protocol v1 (docs/protocol.md).
//
// It holds messages keyed by seq, so whatever order frames arrive in, the
// page shows each message once and in seq order. It resumes from the last
// seq it holds without a hole, and asks for any hole it notices.
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("chat-config").textContent);
  const list = document.getElementById("messages");
  const pane = document.getElementById("messages-pane");
  const stateLabel = document.getElementById("connection-state");
  const form = document.getElementById("composer");
  const input = document.getElementById("message-input");
  const hint = document.getElementById("composer-hint");
  const loadOlder = document.getElementById("load-older");
  const typingLine = document.getElementById("typing");
  const online = document.getElementById("online");
  const jumpButton = document.getElementById("jump-new");
  const sendButton = document.getElementById("send-button");

  const GAP_GRACE_MS = 1000; // frames from two publishers may cross; wait before asking
  const HISTORY_LIMIT = 100;

  const bySeq = new Map(); // seq -> <li>
  const pending = new Map(); // nonce -> {body, element}
  let lastContiguous = config.lastSeq; // every seq in (first shown, lastContiguous] is held
  let lastChange = config.lastChange; // edits and deletions up to here are applied
  let live = false; // the socket is past "ready"
  let gapTimer = null;
  let retryTimer = null; // ticks the "reconnecting in N s" countdown
  const FALLBACK_AFTER = 2; // failed handshakes in a row before following the room by long-poll
  let failedHandshakes = 0;
  let fallback = null; // the LongPoll while the socket cannot connect
  let fallbackLive = false; // the long-poll answers: messages arrive, sends go through the API
  // Only where there is a physical keyboard; touch keyboards have their own Enter.
  const KEYBOARD_HINT = window.matchMedia && matchMedia("(hover: hover) and (pointer: fine)").matches
    ? "Enter to send · Shift+Enter for a new line" : "";
  const historyRequests = []; // "older" | "gap", answered in order

  // ---- what this person has read ------------------------------------------
  // A message counts as read once it has been on screen while the window had
  // the person's attention; the server keeps the highest seq read per member.

  const baseTitle = document.title;
  const READ_DELAY_MS = 500; // batch the read marks of a fast scroll into one frame
  const onScreen = new Set(); // seqs of messages visible in the pane now
  let lastReadSent = config.lastRead;
  let readTimer = null;
  const visibility = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      const seq = Number(entry.target.dataset.seq);
      if (entry.isIntersecting) onScreen.add(seq); else onScreen.delete(seq);
    }
    scheduleRead();
  }, { root: pane });

  function hasAttention() {
    return document.visibilityState === "visible" && document.hasFocus();
  }

  function scheduleRead() {
    if (readTimer === null) readTimer = setTimeout(() => { readTimer = null; markRead(); }, READ_DELAY_MS);
  }

  function markRead() {
    const newestSeen = onScreen.size ? Math.max(...onScreen) : 0;
    if (hasAttention() && newestSeen > lastReadSent && send({ type: "read", seq: newestSeen })) {
      lastReadSent = newestSeen;
    }
    updateTitle();
  }

  function unreadCount() {
    let count = 0;
    for (const [seq, item] of bySeq) {
      if (seq > lastReadSent && item.dataset.author !== config.username && !item.classList.contains("deleted")) count += 1;
    }
    return count;
  }

  // The tab's title carries the unread count while the person is elsewhere.
  function updateTitle() {
    const count = hasAttention() ? 0 : unreadCount();
    document.title = count ? `(${count}) ${baseTitle}` : baseTitle;
  }

  for (const event of ["focus", "blur"]) window.addEventListener(event, markRead);
  document.addEventListener("visibilitychange", markRead);

  for (const item of list.querySelectorAll("li.message")) {
    bySeq.set(Number(item.dataset.seq), item);
    localiseTime(item.querySelector("time"));
    visibility.observe(item);
  }
  // (addControls is a function declaration below, so hoisted.)
  for (const item of bySeq.values()) addControls(item);
  markFirstUnread();

  // A line above the first message that arrived since this person last read the room.
  function markFirstUnread() {
    const first = [...bySeq].find(([seq, item]) => seq > config.lastRead && item.dataset.author !== config.username);
    if (!first) return;
    const divider = document.createElement("li");
    divider.className = "new-divider";
    divider.textContent = "New messages";
    list.insertBefore(divider, first[1]);
  }

  // ---- connection ----------------------------------------------------------

  function setState(state, text) {
    stateLabel.dataset.state = state;
    stateLabel.textContent = text;
    document.body.dataset.connection = state;
  }

  const socket = new ChatLive.RoomSocket({
    room: config.room,
    cursor: () => ({ after: lastContiguous, changesAfter: lastChange }),
    onConnecting: (first) => {
      clearInterval(retryTimer);
      retryTimer = null;
      historyRequests.length = 0;
      if (!fallbackLive) setState(first ? "connecting" : "reconnecting", first ? "Connecting…" : "Reconnecting…");
    },
    onFrame: handleFrame,
    onClose: onClose,
    onRetry: onRetry,
  });

  async function onClose(event) {
    live = false;
    if (event.code === 4403) return stop("Removed", "You were removed from this room.", "/");
    if (event.code === 4401) return stop("Signed out", "You signed out. Log in again to keep chatting.", config.loginUrl);
    if (event.code === 4429) {
      return stop("Too many windows", "You have too many chat windows open; close some, then", location.pathname, "reload");
    }
    if (event.code === 4410) return stop("Archived", "This room was archived; it is read-only now.", "/");
    // A handshake refused again and again may mean the person was signed out
    // or the room closed; the page itself says which, so ask it before retrying.
    if (socket.attempt >= 2 && !event.wasClean && (await explainRefusal())) return "stop";
    // Handshakes that keep failing while the site answers (a proxy that strips
    // the Upgrade header, say): follow the room by long-poll meanwhile.
    failedHandshakes = socket.opened ? 0 : failedHandshakes + 1;
    if (failedHandshakes >= FALLBACK_AFTER) startFallback();
    updateComposer();
  }

  function onRetry(due, event) {
    if (fallbackLive) return; // the state says "long-poll"; the socket retries quietly
    // Short enough for the pill on a phone; the composer hint says what offline means.
    const why = event.code === 1013 ? "Catching up — reconnecting" : "Reconnecting";
    const showCountdown = () => {
      const seconds = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      setState("reconnecting", `${why} in ${seconds} s…`);
    };
    showCountdown();
    clearInterval(retryTimer);
    retryTimer = setInterval(showCountdown, 1000);
  }

  // ---- fallback: long-poll to receive, the API to send ------------------------
  // Both resume from the same seq as the socket, and messages are kept by seq,
  // so switching either way neither loses nor repeats one.

  function startFallback() {
    if (fallback) return;
    fallback = new ChatLive.LongPoll({
      room: config.room,
      after: () => lastContiguous,
      onMessages: (messages) => {
        if (!fallbackLive && !live) {
          fallbackLive = true;
          clearInterval(retryTimer);
          setState("fallback", "Live (long-poll)");
          for (const [nonce, item] of pending) sendByApi(nonce, item);
          updateComposer();
        }
        for (const message of messages) addMessage(message);
      },
      onTrouble: () => {
        if (!fallbackLive) return;
        fallbackLive = false;
        setState("reconnecting", "Reconnecting…");
        updateComposer();
      },
      onStop: () => {
        stopFallback();
        explainRefusal();
      },
    });
    fallback.start();
  }

  function stopFallback() {
    if (fallback) fallback.stop();
    fallback = null;
    fallbackLive = false;
  }

  async function sendByApi(nonce, item) {
    markPending(item, "Sending…");
    let result;
    try {
      result = await ChatLive.postMessage(config.room, item.body, nonce);
    } catch (error) {
      markPending(item, "Waiting for connection…"); // sent again, same nonce, when a transport is back
      return;
    }
    const { response, data } = result;
    if (response.ok && data) addMessage(data);
    else if (response.status < 500 && data && data.error) onError({ nonce: nonce, ...data.error });
    else markPending(item, "Waiting for connection…");
  }

  async function explainRefusal() {
    let response;
    try {
      response = await fetch(location.href, { redirect: "manual", cache: "no-store" });
    } catch (error) {
      return false; // the server is down: keep retrying
    }
    if (response.type === "opaqueredirect") {
      stop("Signed out", "You were signed out. Log in again to keep chatting.", config.loginUrl);
      return true;
    }
    if (response.status === 404) {
      stop("Closed", "This room is no longer available.", "/");
      return true;
    }
    return false;
  }

  // The end of this page's connection: say why, and where to go.
  function stop(state, message, link, label) {
    socket.stop();
    stopFallback();
    setState("stopped", state);
    hint.textContent = `${message} `;
    const anchor = document.createElement("a");
    anchor.href = link;
    anchor.textContent = label || (link === "/" ? "Back to rooms" : "Log in");
    hint.append(anchor);
    input.disabled = true;
    form.querySelector("button[type=submit]").disabled = true;
    online.textContent = ""; // no longer known
    return "stop";
  }

  function send(frame) {
    return socket.send(frame);
  }

  // ---- frames from the server ----------------------------------------------

  function handleFrame(frame) {
    switch (frame.type) {
      case "message":
        addMessage(frame.message);
        break;
      case "history":
        onHistory(frame);
        break;
      case "gap":
        onGap(frame);
        break;
      case "ready":
        onReady(frame);
        break;
      case "error":
        onError(frame);
        break;
      case "typing":
        showTyping(frame.user);
        break;
      case "presence":
        showPresence(frame.users);
        break;
      case "message_updated":
        onUpdated(frame);
        break;
      case "message_deleted":
        onDeleted(frame);
        break;
      case "history_cleared":
        onCleared(frame);
        break;
    }
  }

  function onReady(frame) {
    lastChange = Math.max(lastChange, frame.last_change);
    if (frame.last_seq < lastContiguous) {
      // The room is behind what this page holds (it was recreated): start over.
      location.reload();
      return;
    }
    live = true;
    failedHandshakes = 0;
    stopFallback();
    setState("live", "Live");
    // Sends that were never acknowledged go again with the same nonce; the
    // server stores each nonce once, so a retry cannot duplicate a message.
    for (const [nonce, item] of pending) {
      send({ type: "send", body: item.body, nonce: nonce });
      markPending(item, "Sending…");
    }
    updateComposer();
    checkGap();
    markRead();
  }

  function onGap(frame) {
    // The server skipped the oldest missed messages; start the view afresh
    // from next_seq and let "Load older" fetch the rest on demand.
    for (const item of bySeq.values()) item.remove();
    bySeq.clear();
    lastContiguous = frame.next_seq - 1;
    loadOlder.hidden = false;
  }

  function onHistory(frame) {
    const kind = historyRequests.shift();
    // Keep the reader's place when messages land above what they are reading.
    const fromBottom = pane.scrollHeight - pane.scrollTop;
    for (const message of frame.messages) addMessage(message);
    if (kind === "older") {
      loadOlder.disabled = false;
      loadOlder.hidden = !frame.has_more;
      pane.scrollTop = pane.scrollHeight - fromBottom;
    }
  }

  function onError(frame) {
    const item = frame.nonce != null ? pending.get(frame.nonce) : null;
    if (item) {
      pending.delete(frame.nonce);
      item.element.classList.add("failed");
      markPending(item, `Not sent: ${frame.detail}`);
      item.element.addEventListener("click", () => item.element.remove(), { once: true });
    } else {
      hint.textContent = frame.detail;
    }
  }

  // ---- the message list ----------------------------------------------------

  // ---- who is here -------------------------------------------------------------

  function showPresence(users) {
    const shown = users.slice(0, 5).join(", ");
    online.textContent = `${users.length} online: ${shown}${users.length > 5 ? ` and ${users.length - 5} more` : ""}`;
    online.title = users.join(", ");
  }

  // ---- who is typing ----------------------------------------------------------

  const TYPING_SHOWN_MS = 4000; // the server relays a typist at most every 2 s
  const TYPING_SEND_MS = 1500;
  const typists = new Map(); // username -> timer that hides them
  let lastTypingSent = 0;

  function showTyping(user) {
    clearTimeout(typists.get(user));
    typists.set(user, setTimeout(() => hideTyping(user), TYPING_SHOWN_MS));
    renderTyping();
  }

  function hideTyping(user) {
    if (!typists.has(user)) return;
    clearTimeout(typists.get(user));
    typists.delete(user);
    renderTyping();
  }

  function renderTyping() {
    const names = [...typists.keys()];
    typingLine.textContent =
      names.length === 0 ? "" :
      names.length === 1 ? `${names[0]} is typing…` :
      names.length === 2 ? `${names[0]} and ${names[1]} are typing…` :
      "Several people are typing…";
  }

  function signalTyping() {
    const now = Date.now();
    if (!live || !input.value.trim() || now - lastTypingSent < TYPING_SEND_MS) return;
    lastTypingSent = now;
    send({ type: "typing" });
  }

  function addMessage(message) {
    hideTyping(message.author);
    const acknowledged = message.nonce != null && pending.get(message.nonce);
    if (acknowledged && message.author === config.username) {
      acknowledged.element.remove();
      pending.delete(message.nonce);
    }
    if (bySeq.has(message.seq)) return; // a resend or a replay overlap: already shown
    const item = renderMessage(message);
    insertInOrder(item, message.seq);
    bySeq.set(message.seq, item);
    visibility.observe(item);
    updateTitle();
    const empty = document.getElementById("no-messages");
    if (empty) empty.remove();
    while (bySeq.has(lastContiguous + 1)) lastContiguous += 1;
    if (message.seq > lastContiguous) scheduleGapCheck();
  }

  function renderMessage(message) {
    // Built with textContent only: a message body is never parsed as HTML.
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
    addControls(item);
    return item;
  }

  // ---- editing and deleting one's own messages ---------------------------------

  function onUpdated(frame) {
    lastChange = Math.max(lastChange, frame.change);
    const item = bySeq.get(frame.message.seq);
    if (!item || item.classList.contains("deleted")) return;
    setBody(item.querySelector(".body"), frame.message.body);
    markEdited(item);
  }

  function onDeleted(frame) {
    lastChange = Math.max(lastChange, frame.change);
    const item = bySeq.get(frame.seq);
    if (item) markDeleted(item);
    updateTitle();
  }

  function onCleared(frame) {
    lastChange = Math.max(lastChange, frame.change);
    for (const [seq, item] of bySeq) if (seq <= frame.seq) markDeleted(item);
    updateTitle();
  }

  function markEdited(item) {
    if (item.querySelector(".edited")) return;
    const note = document.createElement("span");
    note.className = "edited";
    note.textContent = "(edited)";
    item.querySelector(".message-head").append(" ", note);
  }

  function markDeleted(item) {
    item.classList.add("deleted");
    item.querySelector(".body").textContent = "Message deleted";
    for (const extra of item.querySelectorAll(".edited, .controls, .edit-form")) extra.remove();
    item.querySelector(".body").hidden = false;
  }

  // Authors edit and delete their own messages; moderators also delete others'.
  function addControls(item) {
    if (!item.dataset.id || item.classList.contains("deleted") || item.querySelector(".controls")) return; // pending sends have no id
    const mine = item.dataset.author === config.username;
    if (!mine && !config.canModerate) return;
    const controls = document.createElement("span");
    controls.className = "controls";
    if (mine) {
      const editButton = document.createElement("button");
      editButton.type = "button";
      editButton.className = "link";
      editButton.textContent = "Edit";
      editButton.setAttribute("aria-label", "Edit this message");
      editButton.addEventListener("click", () => startEdit(item));
      controls.append(editButton);
    }
    const deleteButton = document.createElement("button");
    deleteButton.type = "button";
    deleteButton.className = "link";
    deleteButton.textContent = "Delete";
    deleteButton.setAttribute("aria-label", mine ? "Delete this message" : `Delete this message by ${item.dataset.author}`);
    const question = mine ? "Delete this message for everyone?" : `Delete ${item.dataset.author}'s message for everyone?`;
    deleteButton.addEventListener("click", () => {
      if (live && confirm(question)) send({ type: "delete", id: Number(item.dataset.id) });
    });
    controls.append(deleteButton);
    item.querySelector(".message-head").append(controls);
  }

  function startEdit(item) {
    if (!live || item.querySelector(".edit-form")) return;
    const body = item.querySelector(".body");
    const form = document.createElement("form");
    form.className = "edit-form";
    const box = document.createElement("textarea");
    box.value = body.textContent;
    box.maxLength = config.maxLength;
    box.setAttribute("aria-label", "Edit message");
    const save = document.createElement("button");
    save.type = "submit";
    save.textContent = "Save";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "link";
    cancel.textContent = "Cancel";
    form.append(box, save, cancel);
    body.hidden = true;
    item.append(form);
    box.focus();
    const close = () => { form.remove(); body.hidden = false; };
    cancel.addEventListener("click", close);
    box.addEventListener("keydown", (event) => {
      if (event.key === "Escape") close();
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); form.requestSubmit(); }
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (box.value.trim() && box.value !== body.textContent) send({ type: "edit", id: Number(item.dataset.id), body: box.value });
      close();
    });
  }

  function insertInOrder(item, seq) {
    const stick = isAtBottom();
    let next = null;
    const newest = bySeq.size ? Math.max(lastContiguous, ...bySeq.keys()) : 0;
    for (const [otherSeq, other] of seq > newest ? [] : bySeq) {
      if (otherSeq > seq && (next === null || otherSeq < Number(next.dataset.seq))) next = other;
    }
    const firstPending = list.querySelector("li.pending");
    list.insertBefore(item, next || firstPending);
    scheduleDecorate();
    if (stick) scrollToBottom();
    else if (!next && !firstPending) jumpButton.hidden = false; // a new message below what is being read
  }

  function scheduleGapCheck() {
    if (gapTimer === null) gapTimer = setTimeout(() => { gapTimer = null; checkGap(); }, GAP_GRACE_MS);
  }

  function checkGap() {
    const above = [...bySeq.keys()].filter((seq) => seq > lastContiguous);
    if (above.length === 0 || !live) return;
    const before = Math.min(...above);
    historyRequests.push("gap");
    send({ type: "history", before: before, limit: Math.min(HISTORY_LIMIT, before - lastContiguous - 1) });
    scheduleGapCheck(); // checks again once the answer has had time to arrive
  }

  function requestOlder() {
    const first = Math.min(...bySeq.keys(), lastContiguous + 1);
    if (first <= 1 || !live || loadOlder.disabled || loadOlder.hidden) return;
    loadOlder.disabled = true;
    historyRequests.push("older");
    send({ type: "history", before: first, limit: 50 });
  }

  loadOlder.addEventListener("click", requestOlder);
  jumpButton.addEventListener("click", () => { scrollToBottom(); jumpButton.hidden = true; });
  pane.addEventListener("scroll", () => {
    if (pane.scrollTop < 80) requestOlder(); // reaching the top loads the page of history above it
    if (isAtBottom()) jumpButton.hidden = true;
  }, { passive: true });

  // ---- composing ------------------------------------------------------------

  function markPending(item, text) {
    item.element.querySelector(".status").textContent = text;
  }

  function submit() {
    const body = input.value;
    if (!body.trim()) return;
    if (body.length > config.maxLength) {
      hint.textContent = `Messages can be at most ${config.maxLength} characters.`;
      return;
    }
    const nonce = ChatLive.newNonce();
    const element = renderMessage({ seq: 0, id: "", author: config.username, body: body, created_at: new Date().toISOString() });
    element.classList.add("pending");
    delete element.dataset.seq;
    const status = document.createElement("span");
    status.className = "status";
    element.querySelector(".message-head").append(" ", status);
    list.append(element);
    scrollToBottom();
    const item = { body: body, element: element };
    pending.set(nonce, item);
    if (fallbackLive) sendByApi(nonce, item);
    else markPending(item, send({ type: "send", body: body, nonce: nonce }) ? "Sending…" : "Waiting for connection…");
    input.value = "";
    input.focus();
    updateComposer();
  }

  function updateComposer() {
    const stick = isAtBottom(); // the composer may change height; keep the newest message in view
    const remaining = config.maxLength - input.value.length;
    // Offline the button is off; Enter still queues the message, sent (once) when the page is live again.
    sendButton.disabled = !live && !fallbackLive;
    if (fallbackLive) {
      hint.textContent = "Connected by long-poll: messages still arrive and send; editing waits for the live connection.";
    } else if (!live) {
      hint.textContent = "Offline: press Enter to queue a message; it is sent when the connection is back.";
    } else if (remaining < 200) {
      hint.textContent = `${remaining} characters left`;
    } else {
      hint.textContent = KEYBOARD_HINT;
    }
    fitInput();
    if (stick) scrollToBottom();
  }

  // The composer grows with its text (up to the CSS max-height), then scrolls.
  function fitInput() {
    input.style.height = "auto";
    const border = input.offsetHeight - input.clientHeight;
    input.style.height = `${input.scrollHeight + border}px`;
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); submit(); });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
  input.addEventListener("input", () => { updateComposer(); signalTyping(); });

  // ---- helpers ----------------------------------------------------------------

  // Text, with http(s) links made clickable; never HTML (chat/templatetags/chat_text.py does the same).
  const URL_PATTERN = /https?:\/\/[^\s<>"']+/g;
  function setBody(element, text) {
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

  // Day separators, and consecutive messages by one author within five minutes shown as one group.
  const GROUP_MS = 5 * 60 * 1000;
  let decorateQueued = false;
  function scheduleDecorate() {
    if (decorateQueued) return;
    decorateQueued = true;
    queueMicrotask(() => { decorateQueued = false; decorate(); });
  }

  function decorate() {
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

  function localiseTime(time) {
    if (!time) return;
    const moment = new Date(time.dateTime);
    time.textContent = moment.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    time.title = moment.toLocaleString();
  }

  function isAtBottom() {
    return pane.scrollHeight - pane.scrollTop - pane.clientHeight < 40;
  }

  function scrollToBottom() {
    pane.scrollTop = pane.scrollHeight;
  }

  decorate();
  scrollToBottom();
  if (config.archived) stop("Archived", "This room is archived; it is read-only.", "/");
  else socket.start();
})();
