// Read receipts: "Seen by N" under the reader's latest own message, N being
// the other people whose read mark is at or past it, with their names on
// hover or focus. No receipt is stored per message (docs/protocol.md,
// read_by): a read mark is a member's last_read_seq, so one map of marks
// answers for any message. The page starts from the marks it was rendered
// with (the furthest readers) and read_by frames move them while it is open.
import { apiUrl, getJSON } from "../live.js";
import { isAtBottom, scrollToBottom } from "./render.js";

const NAMES_SHOWN = 10; // the tooltip names this many, then "and N more"

export class Receipts {
  //   marks, max     readMarks ({username: seq}) and readMarksMax from the page's config
  //   username       who is reading: their own mark never counts
  //   log            the MessageLog
  constructor({ marks, max, username, log }) {
    this.marks = new Map(Object.entries(marks)); // a Map: usernames are people's text, not property names
    this.username = username;
    this.log = log;
    // The server sends only the `max` furthest readers. When it sent that many,
    // everyone it left out read no further than the nearest of them: a message
    // at or before that mark may have readers the page does not know of, so its
    // count is a lower bound ("199+"). Past it the count is exact, read_by
    // frames telling of anyone who moves past it later.
    this.floor = this.marks.size >= max ? Math.min(...this.marks.values()) : 0; // 0: no seq is at or before it
    this.shownFor = null; // the message the line is under
    this.line = this.build();
  }

  build() {
    const line = document.createElement("div");
    line.className = "seen-by";
    // A button, so the keyboard reaches the names, and a tap shows them where nothing hovers.
    const count = document.createElement("button");
    count.type = "button";
    count.className = "seen-by-count";
    count.setAttribute("aria-describedby", "seen-by-names");
    count.addEventListener("click", () => count.focus()); // Safari does not focus a clicked button
    const names = document.createElement("span");
    names.className = "seen-by-names";
    names.id = "seen-by-names";
    names.setAttribute("role", "tooltip");
    // Escape hides the names without moving focus (WCAG 1.4.13), until the pointer or focus leaves.
    count.addEventListener("keydown", (event) => {
      if (event.key === "Escape") line.classList.add("dismissed");
    });
    const undismiss = () => line.classList.remove("dismissed");
    count.addEventListener("blur", undismiss);
    line.addEventListener("mouseleave", undismiss);
    line.append(count, names);
    return line;
  }

  // After a reconnect: read_by frames sent while the page was away are not
  // replayed, so ask where everyone is now (GET /api/rooms/<slug>/reads).
  async catchUp(room) {
    try {
      const { response, data } = await getJSON(apiUrl(room, "reads"));
      if (!response.ok || !data) return;
      for (const [user, seq] of Object.entries(data.marks)) this.note(user, seq);
    } catch {
      // Offline again: the next reconnect asks again.
    }
  }

  // A read_by frame: marks only move forward (a late or repeated frame changes nothing).
  note(user, seq) {
    if (seq <= (this.marks.get(user) || 0)) return;
    this.marks.set(user, seq);
    if (this.shownFor !== null && seq >= this.shownFor) this.update(); // someone reached the message shown
  }

  // The newest acknowledged, not deleted message by the reader, or undefined.
  latestOwn() {
    let latest;
    for (const [seq, item] of this.log.entries()) {
      if (item.dataset.author !== this.username || item.classList.contains("deleted")) continue;
      if (!latest || seq > latest[0]) latest = [seq, item];
    }
    return latest;
  }

  // Put the line under the latest own message, counted afresh; call whenever
  // that may have changed (a message came, one was deleted, the view restarted).
  update() {
    const latest = this.latestOwn();
    const readers = latest ? this.readersOf(latest[0]) : [];
    this.shownFor = latest ? latest[0] : null; // watched even while unread: the first reader shows the line
    const place = readers.length ? latest[1] : null;
    if (place) this.show(readers, latest[0] <= this.floor);
    if (this.line.parentElement === place) return; // where it was (or still nowhere): no height changed
    // The line changes a message's height: keep the newest in view if it was. Only
    // then: a count changing in place must not pull the pane from a message the reader went to.
    const stick = isAtBottom();
    if (place) place.append(this.line);
    else this.line.remove();
    if (stick) scrollToBottom();
  }

  // Who other than the reader has read up to `seq`, by name.
  readersOf(seq) {
    const readers = [];
    for (const [user, mark] of this.marks) if (user !== this.username && mark >= seq) readers.push(user);
    return readers.sort((a, b) => a.localeCompare(b));
  }

  show(readers, lowerBound) {
    // "N+": every one of the furthest readers the server sent counts, and others
    // it left out may have read this far too. N is the ones known, not the
    // server's cut (readMarksMax): the reader is usually one of those it sent.
    const more = lowerBound ? "+" : "";
    const text = `Seen by ${readers.length}${more}`;
    const count = this.line.querySelector(".seen-by-count");
    if (count.textContent !== text) count.textContent = text;
    const rest = readers.length - NAMES_SHOWN;
    const names = readers.slice(0, NAMES_SHOWN).join(", ") +
      (rest > 0 ? ` and ${rest}${more} more` : lowerBound ? " and perhaps more" : "");
    this.line.querySelector(".seen-by-names").textContent = names;
  }
}
