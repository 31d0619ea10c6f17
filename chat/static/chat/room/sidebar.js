// The sidebar's counts for the other rooms: "@N" unread mentions and N unread,
// as the server renders them with the page. A "notify" frame (a mention of the
// reader, or a direct message, in another room) adds one live; after every
// (re)connect the counts are read again (GET /api/rooms/), since notify frames
// are not replayed and any sent while the page was away are lost.
import { getJSON } from "../live.js";

const ROOMS_URL = "/api/rooms/";

export class Sidebar {
  //   room   the slug of the room this page shows: it has no counts
  constructor({ room }) {
    this.room = room;
    this.nav = document.querySelector("nav.sidebar");
    this.refreshing = null; // notify frames counted while a refresh is on its way, to count again after it
    // What the counts include already, so that no message counts twice: each room's last seq as of
    // the last refresh (the page's render at first), and the messages counted from frames since.
    this.countedThrough = new Map();
    this.countedSeqs = new Set();
  }

  link(slug) {
    return this.nav ? [...this.nav.querySelectorAll("a[data-room]")].find((link) => link.dataset.room === slug) : undefined;
  }

  // The level in force in a room ("all", "mentions", "nothing"), or "" when it is not listed.
  levelOf(slug) {
    const link = this.link(slug);
    return link ? link.dataset.notify : "";
  }

  setLevel(slug, level) {
    const link = this.link(slug);
    if (link) link.dataset.notify = level;
  }

  // A direct conversation: listed under "Direct messages".
  isDirect(slug) {
    const link = this.link(slug);
    return Boolean(link && link.closest("ul[aria-labelledby='sidebar-direct']"));
  }

  // A "notify" frame for another room: one more unread, and one more mention when it is one.
  notified(frame) {
    if (frame.room === this.room) return;
    if (this.refreshing) this.refreshing.push(frame);
    this.add(frame);
  }

  add(frame) {
    const link = this.link(frame.room);
    if (!link) return; // not listed yet (a conversation just started): the next page load lists it
    // A refresh that answered after the message was saved counted it already (its frame may come later).
    const key = `${frame.room}:${frame.seq}`;
    if (frame.seq <= (this.countedThrough.get(frame.room) || 0) || this.countedSeqs.has(key)) return;
    this.countedSeqs.add(key);
    setBadges(link, {
      unread: count(link, ".unread-badge") + 1,
      mentions: count(link, ".mention-badge") + (frame.reason === "mention" ? 1 : 0),
    });
  }

  // Every room's counts as the server has them now.
  async refresh() {
    if (!this.nav || this.refreshing) return;
    this.refreshing = [];
    try {
      const { response, data } = await getJSON(ROOMS_URL);
      if (!response.ok || !data) return;
      const lastSeqs = new Map();
      this.countedSeqs.clear();
      for (const room of data.rooms) {
        lastSeqs.set(room.slug, room.last_seq);
        this.countedThrough.set(room.slug, room.last_seq);
        const link = this.link(room.slug);
        if (!link) continue;
        link.dataset.notify = room.notify;
        if (room.slug !== this.room) setBadges(link, { unread: room.unread, mentions: room.unread_mentions });
      }
      // A frame that came while the answer was on its way, for a message the answer did not count yet.
      for (const frame of this.refreshing) if (frame.seq > (lastSeqs.get(frame.room) || 0)) this.add(frame);
    } catch {
      // Offline again: the next reconnect asks again.
    } finally {
      this.refreshing = null;
    }
  }
}

function count(link, selector) {
  const badge = link.querySelector(selector);
  return badge ? parseInt(badge.firstChild.textContent.replace("@", ""), 10) || 0 : 0;
}

// The badges as templates/chat/room_detail.html renders them (none for 0): "@N", then N.
function setBadges(link, { unread, mentions }) {
  setBadge(link, "mention-badge", mentions, `@${mentions}`, ` unread mention${mentions === 1 ? "" : "s"}`, {
    title: "Unread messages that mention you",
    before: link.querySelector(".unread-badge"),
  });
  setBadge(link, "unread-badge", unread, String(unread), " unread", { title: "", before: null });
}

function setBadge(link, className, number, shown, spoken, { title, before }) {
  let badge = link.querySelector(`.${className}`);
  if (!number) {
    if (badge) badge.remove();
    return;
  }
  if (!badge) {
    badge = document.createElement("span");
    badge.className = className;
    if (title) badge.title = title;
    link.insertBefore(badge, before);
  }
  const hidden = document.createElement("span");
  hidden.className = "visually-hidden";
  hidden.textContent = spoken;
  badge.replaceChildren(shown, hidden);
}
