// What this person has read. A message counts as read once it has been on
// screen while the window had the person's attention; the server keeps the
// highest seq read per member. The tab's title carries the unread count
// while the person is elsewhere.
const READ_DELAY_MS = 500; // batch the read marks of a fast scroll into one frame

function hasAttention() {
  return document.visibilityState === "visible" && document.hasFocus();
}

export class Reading {
  //   lastRead, username   from the page's config
  //   log                  the MessageLog
  //   send(frame)          sends a frame on the socket; false if it could not
  constructor({ lastRead, username, log, send }) {
    this.lastRead = lastRead; // as the page was rendered
    this.lastReadSent = lastRead;
    this.username = username;
    this.log = log;
    this.send = send;
    this.baseTitle = document.title;
    this.onScreen = new Set(); // seqs of messages visible in the pane now
    this.readTimer = null;
    this.visibility = new IntersectionObserver((entries) => {
      for (const entry of entries) {
        const seq = Number(entry.target.dataset.seq);
        if (entry.isIntersecting) this.onScreen.add(seq); else this.onScreen.delete(seq);
      }
      this.scheduleRead();
    }, { root: document.getElementById("messages-pane") });
    for (const event of ["focus", "blur"]) window.addEventListener(event, () => this.markRead());
    document.addEventListener("visibilitychange", () => this.markRead());
  }

  observe(item) {
    this.visibility.observe(item);
  }

  scheduleRead() {
    if (this.readTimer === null) this.readTimer = setTimeout(() => { this.readTimer = null; this.markRead(); }, READ_DELAY_MS);
  }

  markRead() {
    const newestSeen = this.onScreen.size ? Math.max(...this.onScreen) : 0;
    if (hasAttention() && newestSeen > this.lastReadSent && this.send({ type: "read", seq: newestSeen })) {
      this.lastReadSent = newestSeen;
    }
    this.updateTitle();
  }

  unreadCount() {
    let count = 0;
    for (const [seq, item] of this.log.entries()) {
      if (seq > this.lastReadSent && item.dataset.author !== this.username && !item.classList.contains("deleted")) count += 1;
    }
    return count;
  }

  updateTitle() {
    const count = hasAttention() ? 0 : this.unreadCount();
    document.title = count ? `(${count}) ${this.baseTitle}` : this.baseTitle;
  }

  // The first message someone else sent since this person last read the room, or undefined.
  firstUnread() {
    const first = [...this.log.entries()].find(([seq, item]) => seq > this.lastRead && item.dataset.author !== this.username);
    return first && first[1];
  }
}
