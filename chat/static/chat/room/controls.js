// Editing and deleting messages: authors edit and delete their own,
// moderators also delete others'. Both go as frames on the live socket.
import { LIMITS } from "../protocol.js";

export class MessageControls {
  //   username, canModerate   who is reading, from the page's config
  //   live()                  whether the socket is past "ready"
  //   send(frame)             sends a frame on the socket
  constructor({ username, canModerate, live, send }) {
    this.username = username;
    this.canModerate = canModerate;
    this.live = live;
    this.send = send;
  }

  add(item) {
    if (!item.dataset.id || item.classList.contains("deleted") || item.querySelector(".controls")) return; // pending sends have no id
    const mine = item.dataset.author === this.username;
    if (!mine && !this.canModerate) return;
    const controls = document.createElement("span");
    controls.className = "controls";
    if (mine) {
      const editButton = document.createElement("button");
      editButton.type = "button";
      editButton.className = "link";
      editButton.textContent = "Edit";
      editButton.setAttribute("aria-label", "Edit this message");
      editButton.addEventListener("click", () => this.startEdit(item));
      controls.append(editButton);
    }
    const deleteButton = document.createElement("button");
    deleteButton.type = "button";
    deleteButton.className = "link";
    deleteButton.textContent = "Delete";
    deleteButton.setAttribute("aria-label", mine ? "Delete this message" : `Delete this message by ${item.dataset.author}`);
    const question = mine ? "Delete this message for everyone?" : `Delete ${item.dataset.author}'s message for everyone?`;
    deleteButton.addEventListener("click", () => {
      if (this.live() && confirm(question)) this.send({ type: "delete", id: Number(item.dataset.id) });
    });
    controls.append(deleteButton);
    item.querySelector(".message-head").append(controls);
  }

  startEdit(item) {
    if (!this.live() || item.querySelector(".edit-form")) return;
    const body = item.querySelector(".body");
    const form = document.createElement("form");
    form.className = "edit-form";
    const box = document.createElement("textarea");
    box.value = body.textContent;
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
      if (box.value.trim() && box.value !== body.textContent) this.send({ type: "edit", id: Number(item.dataset.id), body: box.value });
      close();
    });
  }
}
