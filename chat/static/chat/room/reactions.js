// Reactions: a chip ("👍 2") toggles the reader's own reaction with that
// emoji, and a message's React button opens a row of common emoji to add one.
// Both send a "react" frame (docs/protocol.md); the chips change when the
// server's "reactions" frame comes back, for everyone at once.
export const COMMON_EMOJI = ["👍", "❤️", "😂", "🎉", "😮", "😢", "👀", "✅", "🙏", "🔥"];

export class Reactions {
  //   live()        whether the socket is past "ready"
  //   send(frame)   sends a frame on the socket
  constructor({ live, send }) {
    this.live = live;
    this.send = send;
    this.open = null; // {picker, opener} while a picker is shown
    // One listener for every chip, server-rendered or not.
    document.getElementById("messages").addEventListener("click", (event) => {
      const chip = event.target.closest(".reaction");
      if (chip) this.toggle(chip.closest("li.message"), chip.dataset.emoji);
    });
    document.addEventListener("click", (event) => {
      if (this.open && !this.open.picker.contains(event.target) && event.target !== this.open.opener) this.close();
    });
  }

  toggle(item, emoji) {
    if (!item || !item.dataset.id || item.classList.contains("deleted") || !this.live()) return;
    this.send({ type: "react", id: Number(item.dataset.id), emoji: emoji });
  }

  // The picker under the message's reactions; `opener` is the React button.
  togglePicker(item, opener) {
    const wasOpen = this.open && this.open.opener === opener;
    this.close();
    if (wasOpen) return;
    const picker = document.createElement("div");
    picker.className = "emoji-picker";
    picker.id = `emoji-picker-${item.dataset.id}`;
    picker.setAttribute("role", "group");
    picker.setAttribute("aria-label", "Choose a reaction");
    const mine = new Set([...item.querySelectorAll(".reaction[aria-pressed='true']")].map((chip) => chip.dataset.emoji));
    for (const emoji of COMMON_EMOJI) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = emoji;
      // Choosing one the reader already reacted with takes it back, as its chip does.
      button.setAttribute("aria-label", mine.has(emoji) ? `Remove your ${emoji} reaction` : `React with ${emoji}`);
      button.setAttribute("aria-pressed", String(mine.has(emoji)));
      button.addEventListener("click", () => {
        this.toggle(item, emoji);
        this.close(true);
      });
      picker.append(button);
    }
    picker.addEventListener("keydown", (event) => this.onKey(event));
    (item.querySelector(".reactions") || item.querySelector(".body")).after(picker);
    opener.setAttribute("aria-expanded", "true");
    opener.setAttribute("aria-controls", picker.id);
    this.open = { picker: picker, opener: opener };
    picker.querySelector("button").focus();
  }

  // Arrow keys move along the row, Home and End to its ends, Escape closes it.
  onKey(event) {
    const buttons = [...this.open.picker.querySelectorAll("button")];
    const index = buttons.indexOf(document.activeElement);
    const moves = { ArrowRight: index + 1, ArrowDown: index + 1, ArrowLeft: index - 1, ArrowUp: index - 1, Home: 0, End: buttons.length - 1 };
    if (event.key === "Escape") {
      event.preventDefault();
      this.close(true);
    } else if (event.key in moves) {
      event.preventDefault();
      buttons[(moves[event.key] + buttons.length) % buttons.length].focus();
    }
  }

  // `refocus`: give the focus back to the React button (a choice or Escape, not a click elsewhere).
  close(refocus = false) {
    if (!this.open) return;
    const { picker, opener } = this.open;
    this.open = null;
    picker.remove();
    opener.setAttribute("aria-expanded", "false");
    if (refocus && opener.isConnected) opener.focus();
  }
}
