// Test doubles for roomcast.js in Node: a fake WebSocket class and a fake clock.
// Node 20 has no global WebSocket, so the client takes these as constructor options.

import Roomcast from "../../node/static/roomcast.js";

export { Roomcast };

/** A WebSocket class whose instances the test drives from the server's side. */
export function fakeWebSocket() {
  const sockets = [];
  class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.protocol = "";
      this.binaryType = "blob";
      this.sent = [];
      this.closedWith = null;
      sockets.push(this);
    }

    send(data) {
      if (this.readyState !== 1) throw new Error("InvalidStateError: not open");
      this.sent.push(data);
    }

    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 2;
    }

    /** The server accepted the upgrade, answering `protocol` ("" for none). */
    serverOpen(protocol = "roomcast.v1") {
      this.readyState = 1;
      this.protocol = protocol;
      this.onopen({ type: "open" });
    }

    /** Upgrade plus the welcome frame. */
    welcome(node = "n1", connection = `n1.${sockets.indexOf(this) + 1}`) {
      this.serverOpen();
      this.text({ type: "welcome", protocol: "roomcast.v1", node, connection });
    }

    /** A text frame: an object as JSON, a string as is. */
    text(frame) {
      this.onmessage({ data: typeof frame === "string" ? frame : JSON.stringify(frame) });
    }

    /** A binary frame: the header object as JSON, 0x0A, then `bytes`. */
    binary(header, bytes) {
      const head = header === null ? new Uint8Array(0)
        : new TextEncoder().encode(JSON.stringify(header) + "\n");
      const frame = new Uint8Array(head.length + bytes.length);
      frame.set(head, 0);
      frame.set(bytes, head.length);
      this.onmessage({ data: frame.buffer });
    }

    /** The connection ended with `code` (1006: no close frame). */
    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose({ code, reason, wasClean: code !== 1006 });
    }

    /** The declared positions this socket's URL carries, or null. */
    get since() {
      const value = new URL(this.url).searchParams.get("roomcast.since");
      return value === null ? null : JSON.parse(value);
    }
  }
  return { FakeSocket, sockets };
}

/** setTimeout/clearTimeout/now on a clock that moves only when the test says. */
export function fakeClock() {
  let time = 0;
  let nextId = 1;
  const timers = new Map();
  return {
    now: () => time,
    setTimeout: (fn, ms) => {
      timers.set(nextId, { fn, at: time + ms, ms });
      return nextId++;
    },
    clearTimeout: (id) => { timers.delete(id); },
    /** The delays of the timers still pending. */
    pending: () => Array.from(timers.values(), (t) => t.ms),
    /** Move time on by `ms` and run the timers that are due. */
    advance(ms) {
      time += ms;
      for (const [id, timer] of Array.from(timers)) {
        if (timer.at <= time) {
          timers.delete(id);
          timer.fn();
        }
      }
    },
  };
}

/** A client on fakes, with every event it emits logged in order. */
export function setup(options = {}, url = "ws://hub.test/chat?room=lobby&name=ann") {
  const { FakeSocket, sockets } = fakeWebSocket();
  const clock = fakeClock();
  const events = [];
  const client = new Roomcast.Client(url, {
    WebSocket: FakeSocket,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random: () => 0.5,
    reportError: (error) => { throw error; },
    ...options,
  });
  for (const type of ["open", "message", "joined", "left", "lost", "error", "reconnecting",
                      "closed"]) {
    client.on(type, (event) => events.push(event));
  }
  const of = (type) => events.filter((e) => e.type === type);
  return { client, sockets, clock, events, of, last: () => sockets[sockets.length - 1] };
}
