// A message's buttons: Reply and React for everyone; Edit and Delete for its
// author, Delete for moderators too; Pin for the room's owner, moderators and
// staff. React, edit, delete and pin go as frames on the live socket; a reply
// waits in the composer, which may send it later (queued offline).
import { LIMITS } from "../protocol.js";
import { excerpt, itemText } from "./render.js";

export class MessageControls {
  //   username, canModerate   who is reading, from the page's config
  //   live()                  whether the socket is past "ready"
  //   send(frame)             sends a frame on the socket
  //   onReply(original)       {id, seq, author, excerpt}: the reader answers this message
  //   onReact(item, button)   the reader wants to choose a reaction (room/reactions.js)
  constructor({ username, canModerate, live, send, onReply, onReact }) {
    this.username = username;
    this.canModerate = canModerate;
    this.live = live;
    this.send = send;
    this.onReply = onReply;
    this.onReact = onReact;
  }

  add(item) {
    if (!item.dataset.id || item.classList.contains("deleted") || item.querySelector(".controls")) return; // pending sends have no id
    const mine = item.dataset.author === this.username;
    const author = item.dataset.author;
    const controls = document.createElement("span");
    controls.className = "controls";
    controls.append(
      button("Reply", `Reply to ${author}`, () => this.onReply({
        id: Number(item.dataset.id), seq: Number(item.dataset.seq), author: author, excerpt: excerpt(itemText(item)),
      })),
    );
    const react = button("React", `React to ${author}'s message`, () => this.onReact(item, react));
    react.setAttribute("aria-expanded", "false");
    controls.append(react);
    if (mine) controls.append(button("Edit", "Edit this message", () => this.startEdit(item)));
    if (mine || this.canModerate) {
      const question = mine ? "Delete this message for everyone?" : `Delete ${author}'s message for everyone?`;
      controls.append(button("Delete", mine ? "Delete this message" : `Delete this message by ${author}`, () => {
        if (this.live() && confirm(question)) this.send({ type: "delete", id: Number(item.dataset.id) });
      }));
    }
    if (this.canModerate) {
      const pin = button("Pin", "", () => {
        if (this.live()) this.send({ type: "pin", id: Number(item.dataset.id), pinned: !item.classList.contains("pinned") });
      });
      pin.classList.add("pin-button");
      controls.append(pin);
    }
    item.querySelector(".message-head").append(controls);
    this.update(item);
  }

  // The message was pinned or unpinned: its Pin button says what it would do now.
  update(item) {
    const pin = item.querySelector(".pin-button");
    if (!pin) return;
    const pinned = item.classList.contains("pinned");
    pin.textContent = pinned ? "Unpin" : "Pin";
    pin.setAttribute("aria-label", `${pinned ? "Unpin" : "Pin"} ${item.dataset.author}'s message`);
  }

  startEdit(item) {
    if (!this.live() || item.querySelector(".edit-form")) return;
    const body = item.querySelector(".body");
    const source = item.dataset.body; // the Markdown, not the HTML it shows as
    const form = document.createElement("form");
    form.className = "edit-form";
    const box = document.createElement("textarea");
    box.value = source;
    box.maxLength = LIMITS.messageMaxLength;
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
    body.after(form);
    box.focus();
    const close = () => { form.remove(); body.hidden = false; };
    cancel.addEventListener("click", close);
    box.addEventListener("keydown", (event) => {
      if (event.key === "Escape") close();
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); form.requestSubmit(); }
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (box.value.trim() && box.value !== source) this.send({ type: "edit", id: Number(item.dataset.id), body: box.value });
      close();
    });
  }
}

function button(text, label, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = "link";
  element.textContent = text;
  if (label) element.setAttribute("aria-label", label);
  element.addEventListener("click", onClick);
  return element;
}
