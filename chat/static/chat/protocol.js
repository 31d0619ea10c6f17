// What the server decides about the protocol (chat/protocol.py
// client_constants), read from the page's <script id="chat-protocol">:
// close codes by name, and limits. Never copy these numbers by hand.
const server = JSON.parse(document.getElementById("chat-protocol").textContent);

export const CLOSE = server.close; // {tryAgainLater, signedOut, removed, roomArchived, tooManySockets}
export const LIMITS = server.limits; // {messageMaxLength, historyMaxLimit}

// Closes after which reconnecting cannot help (docs/protocol.md).
const FINAL = new Map([
  [CLOSE.signedOut, "signedOut"],
  [CLOSE.removed, "removed"],
  [CLOSE.roomArchived, "roomArchived"],
  [CLOSE.tooManySockets, "tooManySockets"],
]);

// The name of a close that ends the page's connection for good, or null.
export function finalClose(code) {
  return FINAL.get(code) || null;
}
