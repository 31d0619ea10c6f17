// The room list's "Message someone" form: opens the direct conversation with
// the name typed. Its address is /dm/<name>/ (chat/urls.py "direct-room";
// the server creates the conversation the first time, and answers a name it
// does not know by going back to the list with an error), which a plain GET
// form cannot build: the form stays hidden until this module handles it.
const section = document.getElementById("direct-start");
const form = document.getElementById("direct-form");
const input = document.getElementById("direct-username");

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const name = input.value.trim();
  if (name) location.assign(`/dm/${encodeURIComponent(name)}/`);
});
section.hidden = false;
