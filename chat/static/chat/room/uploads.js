// Files for the next message: the 📎 button (a hidden file input), files
// dropped on the room, files pasted into the box. Each uploads at once
// (POST /api/rooms/<slug>/files/, docs/api.md) and shows as a chip above the
// box: its name and size, a progress bar, then its thumbnail or the server's
// reason it was refused, with Retry. The composer sends the finished uploads'
// ids with the message; their chips stay, "Sending…", until the server has it.
import { apiUrl, csrfToken } from "../live.js";
import { LIMITS } from "../protocol.js";
import { humanSize, isAtBottom, scrollToBottom } from "./render.js";

const MIB = 1024 * 1024;
// The server's limits (chat/protocol.py client_constants); its own defaults until the page says.
const MAX_BYTES = LIMITS.uploadMaxBytes ?? 10 * MIB;
const MAX_FILES = LIMITS.attachmentsMax ?? 10;

// What a refusal means when its body is not the API's JSON (a proxy's page, say).
const STATUS_TEXT = {
  401: "You are signed out: log in again.",
  403: "The server refused the upload: reload the page.",
  404: "This room is gone.",
  413: "The file is too large.",
  415: "Files of this type are not allowed.",
  429: "Too many uploads: wait a moment and retry.",
};

export class Uploads {
  //   room        the room's slug
  //   form, input the composer and its textarea
  //   dropZone    where files may be dropped: the room's messages and composer
  //   onChange()  a chip came, went, or its upload finished or failed
  //   say(text)   a line for the composer's hint
  constructor({ room, form, input, dropZone, onChange, say }) {
    this.room = room;
    this.input = input;
    this.onChange = onChange;
    this.say = say;
    this.chips = []; // {file, element, state: uploading|done|failed|sending, attachment, xhr, nonce}
    this.disabled = false;

    this.tray = document.createElement("ul");
    this.tray.className = "upload-tray";
    this.tray.setAttribute("aria-label", "Files to send");
    this.tray.setAttribute("aria-live", "polite"); // "uploaded", "failed: …" are read out
    this.tray.hidden = true;
    const replyBar = form.querySelector("#reply-bar");
    if (replyBar) replyBar.after(this.tray);
    else form.prepend(this.tray);

    this.picker = document.createElement("input");
    this.picker.type = "file";
    this.picker.multiple = true;
    this.picker.hidden = true; // the 📎 button opens it
    this.picker.addEventListener("change", () => {
      this.add([...this.picker.files]);
      this.picker.value = ""; // choosing the same file again is a change too
      this.input.focus();
    });
    this.button = document.createElement("button");
    this.button.type = "button";
    this.button.className = "attach-button";
    this.button.setAttribute("aria-label", "Attach files");
    this.button.title = "Attach files (or drop or paste them)";
    const clip = document.createElement("span");
    clip.setAttribute("aria-hidden", "true");
    clip.textContent = "📎";
    this.button.append(clip);
    this.button.addEventListener("click", () => this.picker.click());
    input.before(this.button, this.picker);

    input.addEventListener("paste", (event) => this.onPaste(event));
    this.watchDrops(dropZone);
  }

  // ---- what the composer asks ---------------------------------------------------

  // Chips for the next message (not those of a send on its way).
  unsent() {
    return this.chips.filter((chip) => chip.state !== "sending");
  }

  busy() {
    return this.chips.some((chip) => chip.state === "uploading");
  }

  failed() {
    return this.chips.some((chip) => chip.state === "failed");
  }

  // The finished uploads go with the send `nonce`: their attachments, for the frame and the placeholder.
  take(nonce) {
    const taken = this.chips.filter((chip) => chip.state === "done");
    for (const chip of taken) {
      chip.nonce = nonce;
      this.setState(chip, "sending", "Sending…");
    }
    return taken.map((chip) => chip.attachment);
  }

  // The send is in the room: its files are no longer the composer's.
  sent(nonce) {
    for (const chip of this.chips.filter((each) => each.nonce === nonce)) this.discard(chip);
  }

  // The server refused the send: its files can go with another.
  returned(nonce) {
    for (const chip of this.chips.filter((each) => each.nonce === nonce)) {
      chip.nonce = null;
      this.setState(chip, "done", "Not sent");
    }
    this.onChange();
  }

  disable() {
    this.disabled = true;
    this.button.disabled = true;
    for (const chip of this.chips) if (chip.xhr) chip.xhr.abort();
  }

  // ---- adding files -----------------------------------------------------------------

  add(files) {
    if (this.disabled || !files.length) return;
    const stick = isAtBottom(); // the tray makes the composer taller; keep the newest message in view
    let tooMany = false;
    for (const file of files) {
      if (this.unsent().length >= MAX_FILES) {
        tooMany = true;
        break;
      }
      const chip = this.chip(file);
      if (file.size > MAX_BYTES) {
        // Refused here: the server would only read it all to say the same.
        this.fail(chip, `Too large: files can be at most ${maxSize()}.`, { retry: false });
      } else {
        this.upload(chip);
      }
    }
    this.tray.hidden = this.chips.length === 0;
    if (stick) scrollToBottom();
    this.onChange();
    if (tooMany) this.say(`A message can carry at most ${MAX_FILES} files.`); // after onChange, which rewrites the hint
  }

  // Files pasted into the box upload; but text copied from an office program
  // comes with a picture of itself, and then the text is what was meant.
  onPaste(event) {
    const data = event.clipboardData;
    const files = data ? [...data.files] : [];
    if (!files.length) return;
    const rich = data.types.includes("text/html") || data.types.includes("text/rtf");
    if (rich && data.getData("text/plain").trim()) return;
    event.preventDefault();
    this.add(files);
  }

  // Dragging files over the room shows where they may be dropped. Enter and
  // leave fire for every element crossed: the count says when the drag is out.
  watchDrops(zone) {
    const target = document.createElement("div");
    target.className = "drop-target";
    target.hidden = true;
    const label = document.createElement("p");
    label.textContent = "Drop files to attach them";
    target.append(label);
    zone.append(target);
    let depth = 0;
    const carriesFiles = (event) => !this.disabled && event.dataTransfer && [...event.dataTransfer.types].includes("Files");
    const hide = () => { depth = 0; target.hidden = true; };
    zone.addEventListener("dragenter", (event) => {
      if (!carriesFiles(event)) return;
      event.preventDefault();
      depth += 1;
      target.hidden = false;
    });
    zone.addEventListener("dragover", (event) => {
      if (!carriesFiles(event)) return;
      event.preventDefault(); // allows the drop
      event.dataTransfer.dropEffect = "copy";
    });
    zone.addEventListener("dragleave", (event) => {
      if (!carriesFiles(event)) return;
      depth = Math.max(0, depth - 1);
      if (!depth) hide();
    });
    zone.addEventListener("drop", (event) => {
      hide();
      if (!carriesFiles(event)) return;
      event.preventDefault();
      this.add([...event.dataTransfer.files]);
      this.input.focus();
    });
    window.addEventListener("dragend", hide);
    // Dropped anywhere else (or while the composer is closed), a file would
    // replace the page: the browser opens it. Nothing is dropped there at all.
    window.addEventListener("dragover", (event) => {
      if (!event.defaultPrevented && event.dataTransfer && [...event.dataTransfer.types].includes("Files")) {
        event.preventDefault();
        event.dataTransfer.dropEffect = "none";
      }
    });
    window.addEventListener("drop", (event) => {
      if (event.dataTransfer && [...event.dataTransfer.types].includes("Files")) event.preventDefault();
    });
  }

  // ---- one chip ----------------------------------------------------------------------

  chip(file) {
    const element = document.createElement("li");
    element.className = "upload-chip";
    const preview = document.createElement("span");
    preview.className = "upload-preview";
    preview.setAttribute("aria-hidden", "true");
    const text = document.createElement("span");
    text.className = "upload-text";
    const name = document.createElement("span");
    name.className = "upload-name";
    name.textContent = file.name || "Pasted file";
    name.title = file.name;
    const line = document.createElement("span");
    line.className = "upload-line";
    const size = document.createElement("span");
    size.className = "upload-size";
    size.textContent = humanSize(file.size);
    const status = document.createElement("span");
    status.className = "upload-status";
    line.append(size, " ", status);
    const progress = document.createElement("progress");
    progress.className = "upload-progress";
    progress.max = 1;
    progress.setAttribute("aria-label", `Uploading ${file.name}`);
    text.append(name, line, progress);
    const retry = document.createElement("button");
    retry.type = "button";
    retry.className = "upload-retry link";
    retry.textContent = "Retry";
    retry.setAttribute("aria-label", `Retry uploading ${file.name}`);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "upload-remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${file.name}`);
    remove.title = "Remove";
    element.append(preview, text, retry, remove);
    this.tray.append(element);
    const chip = { file, element, state: "", attachment: null, xhr: null, nonce: null };
    retry.addEventListener("click", () => {
      this.upload(chip);
      this.onChange();
      remove.focus(); // the Retry button goes while it uploads
    });
    remove.addEventListener("click", () => {
      this.discard(chip);
      this.onChange();
      this.input.focus();
    });
    this.chips.push(chip);
    return chip;
  }

  // The chip's state shows in its data-state (the CSS), its status words and which buttons it has.
  setState(chip, state, words = "") {
    chip.state = state;
    const element = chip.element;
    element.dataset.state = state;
    element.querySelector(".upload-status").textContent = words;
    element.querySelector(".upload-progress").hidden = state !== "uploading";
    element.querySelector(".upload-remove").hidden = state === "sending";
  }

  upload(chip) {
    const xhr = new XMLHttpRequest(); // fetch cannot report an upload's progress
    chip.xhr = xhr;
    const progress = chip.element.querySelector(".upload-progress");
    progress.value = 0;
    chip.element.querySelector(".upload-retry").hidden = true;
    this.setState(chip, "uploading", "Uploading…");
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) progress.value = event.loaded / event.total;
    });
    xhr.addEventListener("load", () => {
      if (chip.xhr !== xhr) return;
      chip.xhr = null;
      const data = xhr.response;
      if (xhr.status === 201 && data && data.id != null) this.done(chip, data);
      else this.fail(chip, refusal(xhr.status, data), { retry: true });
      this.onChange();
    });
    xhr.addEventListener("error", () => {
      if (chip.xhr !== xhr) return;
      chip.xhr = null;
      this.fail(chip, "No connection to the server.", { retry: true });
      this.onChange();
    });
    xhr.open("POST", apiUrl(this.room, "files/"));
    xhr.setRequestHeader("X-CSRFToken", csrfToken());
    xhr.responseType = "json";
    const form = new FormData();
    form.append("file", chip.file, chip.file.name || "pasted");
    xhr.send(form);
  }

  done(chip, attachment) {
    chip.attachment = attachment;
    const preview = chip.element.querySelector(".upload-preview");
    if (attachment.thumbnail_url) {
      const stick = isAtBottom();
      const image = document.createElement("img");
      image.alt = "";
      image.src = attachment.thumbnail_url;
      if (stick) image.addEventListener("load", scrollToBottom, { once: true });
      preview.replaceChildren(image);
      preview.classList.add("image");
    }
    this.setState(chip, "done", "Uploaded");
  }

  fail(chip, reason, { retry }) {
    this.setState(chip, "failed", reason);
    chip.element.querySelector(".upload-retry").hidden = !retry;
  }

  discard(chip) {
    if (chip.xhr) {
      const xhr = chip.xhr;
      chip.xhr = null;
      xhr.abort();
    }
    // A finished upload that is never sent stays the uploader's until the server clears it away.
    const stick = isAtBottom();
    chip.element.remove();
    this.chips = this.chips.filter((each) => each !== chip);
    this.tray.hidden = this.chips.length === 0;
    if (stick) scrollToBottom();
  }
}

function maxSize() {
  return MAX_BYTES % MIB === 0 ? `${MAX_BYTES / MIB} MB` : humanSize(MAX_BYTES);
}

// The server's reason for refusing an upload, or one for its status.
function refusal(status, data) {
  if (data && data.error && data.error.detail) return data.error.detail;
  return STATUS_TEXT[status] || `The upload failed (HTTP ${status}).`;
}
