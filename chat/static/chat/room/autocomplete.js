// "@" in the composer: the room's members whose names start with what follows
// it, in a list under the reader's control (the ARIA combobox pattern with a
// listbox: the textarea keeps focus, aria-activedescendant says which option
// is active). While the list is open the textarea is the combobox, as GitHub's
// does; closed, it is a plain multi-line text box again.
import { apiUrl, getJSON } from "../live.js";

const DEBOUNCE_MS = 150; // one request per pause in typing, not one per key
const ROOM = "room"; // @room: every member (chat/models.py ROOM_MENTION)
// An "@name" being typed: "@" at the start of a word (after a space, a line's
// start or punctuation, as the server's chat/markdown.py _MENTION), then the
// characters a name may have, up to the caret.
const TYPED_MENTION = /(?<![\p{L}\p{N}_@.+-])@([\p{L}\p{N}_.+-]*)$/u;

export class MentionAutocomplete {
  //   input            the composer's textarea
  //   room, username   from the page's config (the reader is never suggested)
  //   mayMentionRoom   whether @room from the reader mentions everyone: then it is suggested too
  constructor({ input, room, username, mayMentionRoom }) {
    this.input = input;
    this.room = room;
    this.username = username;
    this.mayMentionRoom = mayMentionRoom;
    this.cache = new Map(); // lower-cased prefix -> Promise of usernames
    this.typed = null; // {start, prefix}: the "@prefix" before the caret, while one is typed
    this.options = []; // the names listed
    this.active = -1; // the index of the active option
    this.timer = null;
    this.list = document.createElement("ul");
    this.list.id = "mention-suggestions";
    this.list.className = "mention-suggestions";
    this.list.setAttribute("role", "listbox");
    this.list.setAttribute("aria-label", "People to mention");
    this.list.hidden = true;
    // The textarea keeps focus (and its caret) when an option is pressed.
    this.list.addEventListener("mousedown", (event) => event.preventDefault());
    this.list.addEventListener("click", (event) => {
      const option = event.target.closest("[role=option]");
      if (option) this.pick(Number(option.dataset.index));
    });
    input.form.prepend(this.list);
    input.addEventListener("input", () => this.schedule());
    input.addEventListener("blur", () => this.close());
    // The caret moved out of the name (or into another): the list follows it.
    const follow = () => { if (this.open) this.schedule(); };
    input.addEventListener("click", follow);
    input.addEventListener("keyup", (event) => { if (["ArrowLeft", "ArrowRight", "Home", "End"].includes(event.key)) follow(); });
  }

  get open() {
    return !this.list.hidden;
  }

  // The composer's keydown, before its own: true when the list used the key.
  onKeydown(event) {
    if (!this.open || event.isComposing) return false;
    switch (event.key) {
      case "ArrowDown":
      case "ArrowUp":
        this.activate((this.active + (event.key === "ArrowDown" ? 1 : -1) + this.options.length) % this.options.length);
        break;
      case "Enter":
      case "Tab":
        if (event.shiftKey) return false; // Shift+Enter is a new line; Shift+Tab leaves the box
        this.pick(this.active);
        break;
      case "Escape":
        this.close();
        break;
      default:
        return false;
    }
    event.preventDefault();
    return true;
  }

  schedule() {
    clearTimeout(this.timer);
    const before = this.input.value.slice(0, this.input.selectionStart);
    const match = this.input.selectionStart === this.input.selectionEnd && TYPED_MENTION.exec(before);
    if (!match) {
      this.typed = null;
      this.close();
      return;
    }
    this.typed = { start: match.index, prefix: match[1] };
    this.timer = setTimeout(() => this.suggest(this.typed), DEBOUNCE_MS);
  }

  async suggest(typed) {
    const key = typed.prefix.toLowerCase();
    if (!this.cache.has(key)) this.cache.set(key, this.fetchNames(typed.prefix));
    const names = await this.cache.get(key);
    if (this.typed !== typed) return; // typed on meanwhile: a later answer shows
    const shown = names.filter((name) => name !== this.username);
    if (this.mayMentionRoom && ROOM.startsWith(key)) shown.push(ROOM);
    this.show(shown);
  }

  async fetchNames(prefix) {
    try {
      const { response, data } = await getJSON(apiUrl(this.room, `members?prefix=${encodeURIComponent(prefix)}`));
      if (response.ok && data) return data.members;
    } catch {
      // Offline: no suggestions; the name can still be typed.
    }
    this.cache.delete(prefix.toLowerCase()); // asked again next time
    return [];
  }

  show(names) {
    this.options = names;
    if (!names.length) {
      this.close();
      return;
    }
    this.list.replaceChildren(...names.map((name, index) => {
      const option = document.createElement("li");
      option.id = `mention-option-${index}`;
      option.className = "mention-option";
      option.setAttribute("role", "option");
      option.dataset.index = String(index);
      const label = document.createElement("span");
      label.className = "mention-option-name";
      label.textContent = `@${name}`;
      option.append(label);
      if (name === ROOM) {
        const note = document.createElement("span");
        note.className = "mention-option-note";
        note.textContent = " — everyone here";
        option.append(note);
      }
      return option;
    }));
    this.list.hidden = false;
    this.input.setAttribute("role", "combobox");
    this.input.setAttribute("aria-autocomplete", "list");
    this.input.setAttribute("aria-controls", this.list.id);
    this.input.setAttribute("aria-expanded", "true");
    this.activate(0);
  }

  activate(index) {
    this.active = index;
    for (const option of this.list.children) {
      const active = Number(option.dataset.index) === index;
      option.setAttribute("aria-selected", String(active));
      if (active) {
        this.input.setAttribute("aria-activedescendant", option.id);
        option.scrollIntoView({ block: "nearest" });
      }
    }
  }

  // The option replaces the "@prefix" before the caret with "@name ".
  pick(index) {
    const name = this.options[index];
    const typed = this.typed;
    this.close();
    if (name === undefined || !typed) return;
    const value = this.input.value;
    const caret = this.input.selectionStart;
    const mention = `@${name} `;
    this.input.value = value.slice(0, typed.start) + mention + value.slice(caret);
    this.input.selectionStart = this.input.selectionEnd = typed.start + mention.length;
    // The composer's counter and height follow the text.
    this.input.dispatchEvent(new Event("input", { bubbles: true }));
  }

  // Closed until the next keystroke in a name (an answer still on its way shows nothing).
  close() {
    clearTimeout(this.timer);
    this.typed = null;
    if (!this.open) return;
    this.list.hidden = true;
    this.list.replaceChildren();
    this.options = [];
    this.active = -1;
    for (const name of ["role", "aria-autocomplete", "aria-controls", "aria-expanded", "aria-activedescendant"]) {
      this.input.removeAttribute(name);
    }
  }
}
