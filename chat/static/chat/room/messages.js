// The room's messages kept by seq (docs/protocol.md): whatever order frames
// arrive in, each message is held once, and the page knows the last seq it
// holds without a hole (where a resume starts) and asks for any hole above it.
// A jump to an old message (a reply's quote, a pinned message) may add an
// island of messages below that: the holes between are shown with a button
// that loads them ("fill"), never asked for by themselves.
import { LIMITS } from "../protocol.js";

const GAP_GRACE_MS = 1000; // frames from two publishers may cross; wait before asking
const OLDER_PAGE = 50; // messages per "Load older"
const AROUND_PAGE = 50; // messages around one the reader goes to

export class MessageLog {
  //   lastSeq, lastChange   what the server rendered with the page
  //   live()                whether a "history" request can be sent now
  //   send(frame)           sends a frame on the socket; false if it could not
  constructor({ lastSeq, lastChange, live, send }) {
    this.bySeq = new Map(); // seq -> the message's element
    // Every seq in (first shown, lastContiguous] is held, but for the holes a jump left (holes()).
    this.lastContiguous = lastSeq;
    this.lastChange = lastChange; // edits and deletions up to here are applied
    // "older" | "gap" | "fill" | "around": history requests, answered in order. An
    // "around" answer echoes its seq; the others look alike, so this is how they are told apart.
    this.requests = [];
    this.gapTimer = null;
    this.live = live;
    this.send = send;
  }

  has(seq) {
    return this.bySeq.has(seq);
  }

  get(seq) {
    return this.bySeq.get(seq);
  }

  entries() {
    return this.bySeq.entries();
  }

  items() {
    return this.bySeq.values();
  }

  // Hold a message; one above a hole gets the hole asked for after the grace.
  add(seq, item) {
    this.bySeq.set(seq, item);
    while (this.bySeq.has(this.lastContiguous + 1)) this.lastContiguous += 1;
    if (seq > this.lastContiguous) this.scheduleGapCheck();
  }

  // The element a message with this seq goes before, or null (the end).
  nextAfter(seq) {
    let next = null;
    let nextSeq = Infinity;
    const newest = this.bySeq.size ? Math.max(this.lastContiguous, ...this.bySeq.keys()) : 0;
    if (seq > newest) return null; // nearly always: a new message
    for (const [otherSeq, other] of this.bySeq) {
      if (otherSeq > seq && otherSeq < nextSeq) [next, nextSeq] = [other, otherSeq];
    }
    return next;
  }

  noteChange(change) {
    this.lastChange = Math.max(this.lastChange, change);
  }

  // The server skipped the oldest missed messages ("gap"): start afresh from
  // nextSeq. Returns the elements no longer held.
  restartFrom(nextSeq) {
    const dropped = [...this.bySeq.values()];
    this.bySeq.clear();
    this.lastContiguous = nextSeq - 1;
    return dropped;
  }

  // A new connection: answers to the old one's requests will never come.
  forgetRequests() {
    this.requests.length = 0;
  }

  // Which request a "history" frame answers.
  answered() {
    return this.requests.shift();
  }

  // The seq of the oldest message held (or the next one, when none is).
  firstSeq() {
    return Math.min(...this.bySeq.keys(), this.lastContiguous + 1);
  }

  requestOlder() {
    return this.ask("older", this.firstSeq(), OLDER_PAGE);
  }

  // The messages on both sides of `seq`, to go to it. False if the socket could not send.
  requestAround(seq) {
    if (!this.send({ type: "history", around: seq, limit: AROUND_PAGE })) return false;
    this.requests.push("around");
    return true;
  }

  // The newest `limit` messages of the hole below `before`.
  requestFill(before, limit) {
    return this.ask("fill", before, limit);
  }

  // The holes below lastContiguous, oldest first: [{before, count, next}], where
  // `before` is the seq just above the hole and `next` its element.
  holes() {
    const seqs = [...this.bySeq.keys()].filter((seq) => seq <= this.lastContiguous).sort((a, b) => a - b);
    const holes = [];
    for (let index = 1; index < seqs.length; index += 1) {
      const count = seqs[index] - seqs[index - 1] - 1;
      if (count > 0) holes.push({ before: seqs[index], count: count, next: this.bySeq.get(seqs[index]) });
    }
    return holes;
  }

  scheduleGapCheck() {
    if (this.gapTimer === null) this.gapTimer = setTimeout(() => { this.gapTimer = null; this.checkGap(); }, GAP_GRACE_MS);
  }

  checkGap() {
    const above = [...this.bySeq.keys()].filter((seq) => seq > this.lastContiguous);
    if (above.length === 0 || !this.live()) return;
    const before = Math.min(...above);
    this.ask("gap", before, Math.min(LIMITS.historyMaxLimit, before - this.lastContiguous - 1));
    this.scheduleGapCheck(); // checks again once the answer has had time to arrive
  }

  // Returns whether the request went; only one that went is waited for.
  ask(kind, before, limit) {
    if (!this.send({ type: "history", before: before, limit: limit })) return false;
    this.requests.push(kind);
    return true;
  }
}
