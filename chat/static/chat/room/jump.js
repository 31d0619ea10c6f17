// Going to a message: a reply's quote or a pinned message. One the page holds
// is scrolled to and highlighted; one it does not hold (older than the page
// loaded) is asked for first with a "history" frame around its seq
// (docs/protocol.md), while a line at the top of the pane says it is loading.
import { revealMessage, showJumpStatus } from "./render.js";

const JUMP_TIMEOUT_MS = 10000; // no answer by then: say so, and let the reader try again

export class Jumper {
  //   log      the MessageLog
  //   live()   whether the socket is past "ready"
  constructor({ log, live }) {
    this.log = log;
    this.live = live;
    this.target = null; // the seq asked for, while its answer is awaited
    this.timer = null;
  }

  to(seq) {
    if (this.log.has(seq)) {
      this.settle("");
      revealMessage(this.log.get(seq));
      return;
    }
    if (this.target === seq) return; // asked already
    if (!this.live() || !this.log.requestAround(seq)) {
      showJumpStatus("Not connected: that message can be loaded once the page is live again.", { error: true });
      return;
    }
    this.target = seq;
    showJumpStatus("Loading the message…");
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.settle("That message did not load. Try again.", true), JUMP_TIMEOUT_MS);
  }

  // An "around" answer is in the list. True when it brought the message asked for into view.
  arrived(around) {
    if (this.target === null || around !== this.target) return false; // an earlier jump's answer
    const seq = this.target;
    if (!this.log.has(seq)) {
      this.settle("That message is no longer in this room.", true);
      return false;
    }
    this.settle("");
    revealMessage(this.log.get(seq));
    return true;
  }

  // A new connection: the answer to the old one's request will never come.
  cancel() {
    if (this.target !== null) this.settle("The connection dropped before that message loaded. Try again.", true);
  }

  settle(text, error = false) {
    clearTimeout(this.timer);
    this.target = null;
    showJumpStatus(text, { error: error });
  }
}
