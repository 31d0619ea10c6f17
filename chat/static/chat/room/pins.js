// The room's pinned messages, listed under its header (<details id="pinned">),
// newest pin first. The server renders the list with the page; it is kept live
// from message_updated frames, which carry pins and unpins (pinned_at set or
// null), and from deletions. Each entry goes to its message (room/jump.js).
import { messageText, truncate } from "./render.js";

export class PinnedList {
  //   onJump(seq)   the reader chose a pinned message
  constructor({ onJump }) {
    this.details = document.getElementById("pinned");
    this.list = document.getElementById("pinned-list");
    this.count = document.getElementById("pinned-count");
    this.list.addEventListener("click", (event) => {
      const button = event.target.closest(".pinned-jump");
      if (button) onJump(Number(button.closest("li").dataset.seq));
    });
    this.refresh();
  }

  entry(id) {
    return this.list.querySelector(`li[data-id="${Number(id)}"]`);
  }

  // A message as it is now: listed while it is pinned, with its text as it is now.
  update(message) {
    if (!message.pinned_at || message.deleted_at) {
      this.remove(message.id);
      return;
    }
    let entry = this.entry(message.id);
    if (!entry) {
      entry = document.createElement("li");
      entry.dataset.id = String(message.id);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "pinned-jump";
      const author = document.createElement("span");
      author.className = "pinned-author";
      const text = document.createElement("span");
      text.className = "pinned-excerpt";
      button.append(author, " ", text);
      entry.append(button);
    }
    entry.dataset.seq = String(message.seq);
    entry.dataset.pinnedAt = message.pinned_at;
    entry.querySelector(".pinned-author").textContent = message.author;
    entry.querySelector(".pinned-excerpt").textContent = truncate(messageText(message));
    this.place(entry);
    this.refresh();
  }

  // Newest pin first, as the server lists them.
  place(entry) {
    const pinnedAt = Date.parse(entry.dataset.pinnedAt);
    const after = [...this.list.children].find((other) => other !== entry && Date.parse(other.dataset.pinnedAt) < pinnedAt);
    this.list.insertBefore(entry, after || null);
  }

  remove(id) {
    const entry = this.entry(id);
    if (!entry) return;
    entry.remove();
    this.refresh();
  }

  // Staff cleared the history up to `seq`.
  removeUpTo(seq) {
    for (const entry of [...this.list.children]) if (Number(entry.dataset.seq) <= seq) entry.remove();
    this.refresh();
  }

  refresh() {
    const count = this.list.children.length;
    this.count.textContent = String(count);
    this.details.hidden = count === 0;
  }
}
