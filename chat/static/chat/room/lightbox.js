// An image in a message opens full size over the page: a modal <dialog> with
// the image, its name, a link to the file and a Close button. Esc and a click
// outside the image close it; focus goes back to the thumbnail that opened it.
// The thumbnails are links to the full image (room/render.js, _message.html),
// so a modified click (new tab) and a page without this module still work.

let dialog = null;
let opener = null; // the link that opened the dialog: focus goes back there

function build() {
  dialog = document.createElement("dialog");
  dialog.className = "lightbox";
  dialog.setAttribute("aria-labelledby", "lightbox-name");
  const close = document.createElement("button");
  close.type = "button";
  close.className = "lightbox-close";
  close.setAttribute("aria-label", "Close");
  close.title = "Close (Esc)";
  close.textContent = "×";
  close.addEventListener("click", () => dialog.close());
  const figure = document.createElement("figure");
  const image = document.createElement("img");
  image.className = "lightbox-image";
  const caption = document.createElement("figcaption");
  const name = document.createElement("span");
  name.id = "lightbox-name";
  name.className = "lightbox-name";
  const original = document.createElement("a");
  original.className = "lightbox-original";
  original.textContent = "Open original";
  original.target = "_blank";
  original.rel = "noopener";
  caption.append(name, " ", original);
  figure.append(image, caption);
  dialog.append(close, figure);
  // A click on the backdrop lands on the dialog element itself, not on its contents.
  dialog.addEventListener("click", (event) => { if (event.target === dialog) dialog.close(); });
  dialog.addEventListener("close", () => {
    dialog.querySelector(".lightbox-image").removeAttribute("src"); // a large image is not kept decoded
    if (opener && opener.isConnected) opener.focus();
    opener = null;
  });
  document.body.append(dialog);
}

export function openLightbox(link) {
  if (!dialog) build();
  opener = link;
  const name = link.dataset.name || link.querySelector("img")?.alt || "";
  const image = dialog.querySelector(".lightbox-image");
  image.alt = name;
  image.src = link.href;
  dialog.querySelector(".lightbox-name").textContent = name;
  dialog.querySelector(".lightbox-original").href = link.href;
  dialog.showModal();
  dialog.querySelector(".lightbox-close").focus();
}

// Thumbnails anywhere in `list`, the server-rendered ones and those added later.
export function openImagesInLightbox(list) {
  list.addEventListener("click", (event) => {
    const link = event.target.closest("a.attachment-image");
    if (!link || !link.href || event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    openLightbox(link);
  });
}
