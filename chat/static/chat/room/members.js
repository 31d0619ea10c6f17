// Who is in the room with the reader: the "N online" line (presence frames)
// and the "… is typing" line (typing frames).
const online = document.getElementById("online");
const typingLine = document.getElementById("typing");

const TYPING_SHOWN_MS = 4000; // the server relays a typist at most every 2 s
const typists = new Map(); // username -> timer that hides them

export function showPresence(users) {
  const shown = users.slice(0, 5).join(", ");
  online.textContent = `${users.length} online: ${shown}${users.length > 5 ? ` and ${users.length - 5} more` : ""}`;
  online.title = users.join(", ");
}

// The page's connection ended: who is online is no longer known.
export function forgetPresence() {
  online.textContent = "";
}

// The server cannot tell who is online for now (its Redis is away); typing pauses too.
export function presenceUnknown() {
  online.textContent = "Who is online is unknown for now";
  online.title = "";
  for (const user of [...typists.keys()]) hideTyping(user);
}

export function showTyping(user) {
  clearTimeout(typists.get(user));
  typists.set(user, setTimeout(() => hideTyping(user), TYPING_SHOWN_MS));
  renderTyping();
}

export function hideTyping(user) {
  if (!typists.has(user)) return;
  clearTimeout(typists.get(user));
  typists.delete(user);
  renderTyping();
}

function renderTyping() {
  const names = [...typists.keys()];
  typingLine.textContent =
    names.length === 0 ? "" :
    names.length === 1 ? `${names[0]} is typing…` :
    names.length === 2 ? `${names[0]} and ${names[1]} are typing…` :
    "Several people are typing…";
}
