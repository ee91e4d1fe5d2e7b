/*
 * roomcast.js: the roomcast.v1 browser client (docs/protocol.md). No dependencies.
 *
 * Connects with the subprotocol roomcast.v1, reconnects after an unexpected close with
 * capped exponential backoff and full jitter (promptly after 1001), remembers the last
 * position per room and declares it on reconnect, drops duplicates, and surfaces the
 * events an app needs. Types: roomcast.d.ts beside this file.
 *
 * One file, two ways in. It is a UMD-style script, not an ES module, on purpose: a
 * file containing `export` is a syntax error as a classic <script>, while a script
 * that assigns `module.exports` is taken by every bundler (webpack, Rollup with its
 * commonjs plugin, esbuild, Vite's dependency pre-bundling) and by Node:
 *
 *   <script src="/roomcast.js"></script>                 global `Roomcast`
 *   <script type="module">import "/roomcast.js"; ...     global `Roomcast` too
 *   import Roomcast from "./roomcast.js"                 bundlers, Node (CommonJS)
 */
(function (root, factory) {
  "use strict";
  var api = factory();
  if (typeof module === "object" && module !== null && typeof module.exports === "object") {
    module.exports = api;
  } else {
    root.Roomcast = api;
  }
})(typeof globalThis !== "undefined" ? globalThis : typeof self !== "undefined" ? self : this,
function () {
  "use strict";

  const VERSION = "0.1.0";
  const PROTOCOL = "roomcast.v1";
  const SINCE_PARAM = "roomcast.since";
  const PREVIOUS_PARAM = "roomcast.previous";
  const MAX_DECLARED_ROOMS = 100; // the protocol's limit on rooms in one roomcast.since
  const MAX_ROOM_LENGTH = 200;
  const EPOCH = /^[0-9A-Za-z_-]{1,32}$/;
  const MAX_EXPONENT = 64; // factor ** 64 exceeds any sensible maxDelay
  // Close codes after which the protocol says not to reconnect (plus 4000-4499).
  const FINAL_CODES = new Set([1000, 1002, 1003, 1007, 1008, 1009, 1010]);
  const GOING_AWAY = 1001;
  const TOKEN_EXPIRED = 4001;
  const EVENTS = ["open", "message", "joined", "left", "lost", "error", "reconnecting",
                  "closed"];
  const KNOWN_TYPES = new Set(["welcome", "message", "joined", "left", "lost", "error",
                               "batch"]);
  const utf8 = new TextDecoder("utf-8", { fatal: true });

  // ------------------------------------------------------------------------- parsing

  class FrameError extends Error {}

  function show(value) {
    try { return JSON.stringify(value); } catch (e) { return String(value); }
  }

  function str(obj, name, required) {
    const value = obj[name];
    if ((value === undefined || value === null) && !required) return null;
    if (typeof value !== "string") {
      throw new FrameError(`'${obj.type}' frame: '${name}' must be a string, got ${show(value)}`);
    }
    return value;
  }

  function position(obj, required) {
    const epoch = obj.epoch, offset = obj.offset;
    if ((epoch === undefined || epoch === null) && (offset === undefined || offset === null)
        && !required) {
      return null;
    }
    if (typeof epoch !== "string" || !EPOCH.test(epoch)) {
      throw new FrameError(`'${obj.type}' frame: bad epoch ${show(epoch)}`);
    }
    if (!Number.isSafeInteger(offset) || offset < 0) {
      throw new FrameError(`'${obj.type}' frame: bad offset ${show(offset)}`);
    }
    return { epoch, offset };
  }

  // One frame object -> its event (an object with `type`), or null for a type this
  // version does not know. `binary` is the message's bytes for a binary frame.
  function frameEvent(obj, binary, inBatch) {
    if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
      throw new FrameError(`a frame must be a JSON object, got ${show(obj)}`);
    }
    const kind = obj.type;
    if (typeof kind !== "string") {
      throw new FrameError(`a frame needs a string 'type', got ${show(kind)}`);
    }
    if (binary !== undefined && kind !== "message") {
      if (KNOWN_TYPES.has(kind)) {
        throw new FrameError(`a binary frame carries only messages, not '${kind}'`);
      }
      return null;
    }
    if (kind === "message") {
      const room = str(obj, "room", false);
      const pos = position(obj, false);
      if (pos !== null && room === null) {
        throw new FrameError("'message' frame: a position without a room");
      }
      let data = binary;
      if (data === undefined) {
        data = obj.data;
        if (typeof data !== "string") {
          throw new FrameError(`'message' frame: 'data' must be a string, got ${show(data)}`);
        }
      }
      return { type: "message", room, data, position: pos };
    }
    if (inBatch) throw new FrameError(`a batch carries only messages, not '${kind}'`);
    switch (kind) {
      case "welcome":
        return { type: "open", node: str(obj, "node", true),
                 connection: str(obj, "connection", true), reconnect: false };
      case "joined": {
        const room = str(obj, "room", true);
        const recovered = obj.recovered === undefined ? null : obj.recovered;
        if (recovered !== null && typeof recovered !== "boolean") {
          throw new FrameError(`'joined' frame: 'recovered' must be a boolean, got ${show(recovered)}`);
        }
        const replayed = obj.replayed === undefined ? 0 : obj.replayed;
        if (!Number.isSafeInteger(replayed) || replayed < 0) {
          throw new FrameError(`'joined' frame: bad 'replayed' ${show(replayed)}`);
        }
        return { type: "joined", room, recovered, reason: str(obj, "reason", false), replayed,
                 position: position(obj, false) };
      }
      case "left":
        return { type: "left", room: str(obj, "room", true) };
      case "lost":
        return { type: "lost", room: str(obj, "room", true), position: position(obj, true),
                 reason: str(obj, "reason", false) };
      case "error":
        return { type: "error", code: str(obj, "code", true),
                 message: str(obj, "message", false) || "", room: str(obj, "room", false),
                 source: "server" };
      default:
        return null;
    }
  }

  // Realm-independent (an ArrayBuffer from an iframe or another context is one too).
  function isArrayBuffer(value) {
    return Object.prototype.toString.call(value) === "[object ArrayBuffer]";
  }

  function badFrame(message) {
    return { type: "error", code: "bad_frame", message, room: null, source: "client" };
  }

  /** The events of one text frame, in order; a broken frame becomes an error event. */
  function parseText(text) {
    let obj;
    try {
      obj = JSON.parse(text);
    } catch (e) {
      return [badFrame(`a text frame that is not JSON: ${e.message}`)];
    }
    try {
      if (obj !== null && typeof obj === "object" && obj.type === "batch") {
        if (!Array.isArray(obj.messages)) {
          throw new FrameError("'batch' frame: 'messages' must be a list");
        }
        const events = [];
        for (const entry of obj.messages) {
          try {
            const event = frameEvent(entry, undefined, true);
            if (event !== null) events.push(event);
          } catch (e) {
            if (!(e instanceof FrameError)) throw e;
            events.push(badFrame(`batch entry: ${e.message}`));
          }
        }
        return events;
      }
      const event = frameEvent(obj, undefined, false);
      return event === null ? [] : [event];
    } catch (e) {
      if (!(e instanceof FrameError)) throw e;
      return [badFrame(e.message)];
    }
  }

  /** The message of one binary frame: a JSON header line, 0x0A, then the bytes. */
  function parseBinary(frame) {
    const bytes = frame instanceof Uint8Array ? frame
      : ArrayBuffer.isView(frame) ? new Uint8Array(frame.buffer, frame.byteOffset, frame.byteLength)
      : new Uint8Array(frame);
    const newline = bytes.indexOf(0x0a);
    if (newline < 0) return [badFrame("a binary frame without a header line (no 0x0A)")];
    let header;
    try {
      header = JSON.parse(utf8.decode(bytes.subarray(0, newline)));
    } catch (e) {
      return [badFrame(`binary frame header: ${e.message}`)];
    }
    try {
      const event = frameEvent(header, bytes.subarray(newline + 1), false);
      return event === null ? [] : [event];
    } catch (e) {
      if (!(e instanceof FrameError)) throw e;
      return [badFrame(`binary frame header: ${e.message}`)];
    }
  }

  // ------------------------------------------------------------------------- positions

  function declarable(room) {
    if (typeof room !== "string" || room.length === 0) return false;
    // The protocol counts characters; count code points, not UTF-16 units.
    return room.length <= MAX_ROOM_LENGTH || Array.from(room).length <= MAX_ROOM_LENGTH;
  }

  function formLength(text) {
    // What a value costs in a query, encoded as URLSearchParams encodes it.
    return new URLSearchParams({ v: text }).toString().length - 2;
  }

  /**
   * The last position per room, bounded: at most maxRooms, least recently updated out.
   * Only rooms the protocol lets a client declare are kept. Nothing grows per message.
   */
  class PositionBook {
    constructor(maxRooms, initial) {
      if (maxRooms === undefined) maxRooms = MAX_DECLARED_ROOMS;
      if (!Number.isInteger(maxRooms) || maxRooms < 1 || maxRooms > MAX_DECLARED_ROOMS) {
        throw new RangeError(`roomcast: maxRooms must be an integer in 1..${MAX_DECLARED_ROOMS}, got ${show(maxRooms)}`);
      }
      this._max = maxRooms;
      this._rooms = new Map();
      for (const room of Object.keys(initial || {})) {
        if (!declarable(room)) {
          throw new RangeError(`roomcast: positions: bad room name ${show(room)} (1-200 characters)`);
        }
        const value = initial[room];
        const pair = Array.isArray(value) ? { epoch: value[0], offset: value[1] } : value || {};
        let pos;
        try {
          pos = position({ type: "positions", epoch: pair.epoch, offset: pair.offset }, true);
        } catch (e) {
          throw new RangeError(`roomcast: positions[${show(room)}]: ${e.message}`);
        }
        this.set(room, pos);
      }
    }

    get size() { return this._rooms.size; }

    get(room) { return this._rooms.get(room) || null; }

    /** A copy: room -> {epoch, offset}, least recently updated first. */
    snapshot() {
      const out = {};
      for (const [room, pos] of this._rooms) out[room] = { epoch: pos.epoch, offset: pos.offset };
      return out;
    }

    /** Hold `pos` for `room` (the server said so: joined, lost). */
    set(room, pos) {
      if (!declarable(room)) return;
      this._rooms.delete(room);
      this._rooms.set(room, { epoch: pos.epoch, offset: pos.offset });
      while (this._rooms.size > this._max) {
        this._rooms.delete(this._rooms.keys().next().value);
      }
    }

    /** False for a duplicate (same epoch, offset not after the held one), else hold it. */
    accept(room, pos) {
      const held = this._rooms.get(room);
      if (held !== undefined && held.epoch === pos.epoch && pos.offset <= held.offset) {
        return false;
      }
      this.set(room, pos);
      return true;
    }

    forget(room) { this._rooms.delete(room); }

    /** The JSON to declare, most recent rooms first, within maxLength encoded characters;
     *  null when nothing is held. */
    since(maxLength) {
      let budget = maxLength - formLength("{}");
      const parts = [];
      const rooms = Array.from(this._rooms).reverse();
      for (const [room, pos] of rooms) {
        const part = `${JSON.stringify(room)}:[${JSON.stringify(pos.epoch)},${pos.offset}]`;
        const cost = formLength(part) + (parts.length ? formLength(",") : 0);
        if (cost > budget) continue;
        budget -= cost;
        parts.push(part);
      }
      if (!parts.length) return null;
      return "{" + parts.reverse().join(",") + "}";
    }
  }

  // ------------------------------------------------------------------------- reconnecting

  /** "final" (do not reconnect), "refresh" (4001 with a hook), or "retry". */
  function closeAction(code, canRefresh) {
    if (code === TOKEN_EXPIRED && canRefresh) return "refresh";
    if (typeof code === "number" && (FINAL_CODES.has(code) || (code >= 4000 && code <= 4499))) {
      return "final";
    }
    return "retry";
  }

  function number(options, name, fallback, min) {
    const value = options[name] === undefined ? fallback : options[name];
    if (typeof value !== "number" || !Number.isFinite(value) || value < min) {
      throw new RangeError(`roomcast: option ${name} must be a number >= ${min}, got ${show(value)}`);
    }
    return value;
  }

  /**
   * Capped exponential backoff with full jitter, in milliseconds. 1001 after a stable
   * connection waits 0..goingAwayDelay, so that a drained node's clients spread out.
   * `attempt` counts reconnects since the last stable connection.
   */
  class Backoff {
    constructor(options) {
      options = options || {};
      this.initialDelay = number(options, "initialDelay", 500, Number.MIN_VALUE);
      this.maxDelay = number(options, "maxDelay", 30000, this.initialDelay);
      this.factor = number(options, "factor", 2, 1);
      this.goingAwayDelay = number(options, "goingAwayDelay", 1000, 0);
      this._random = options.random || Math.random;
      this.attempt = 0;
    }

    /** The largest delay of reconnect number `attempt` (1-based), capped. */
    ceiling(attempt) {
      const exponent = Math.min(attempt - 1, MAX_EXPONENT);
      return Math.min(this.maxDelay, this.initialDelay * Math.pow(this.factor, exponent));
    }

    /** Count one more reconnect; its [attempt, delay] after a close with `code`. */
    next(code) {
      this.attempt += 1;
      const ceiling = code === GOING_AWAY && this.attempt === 1
        ? this.goingAwayDelay : this.ceiling(this.attempt);
      return [this.attempt, this._random() * ceiling];
    }

    /** A connection stayed up: the next reconnect starts from the initial delay. */
    stable() { this.attempt = 0; }
  }

  // ------------------------------------------------------------------------- the client

  function resolveUrl(url, base) {
    let resolved;
    try {
      resolved = base ? new URL(String(url), base) : new URL(String(url));
    } catch (e) {
      throw new TypeError(`roomcast: bad URL ${show(String(url))}: ${e.message}`);
    }
    if (resolved.protocol === "http:") resolved.protocol = "ws:";
    else if (resolved.protocol === "https:") resolved.protocol = "wss:";
    if (resolved.protocol !== "ws:" && resolved.protocol !== "wss:") {
      throw new TypeError(`roomcast: URL must be ws:, wss:, http: or https:, got ${resolved.href}`);
    }
    resolved.hash = ""; // a WebSocket URL may not carry a fragment
    return resolved;
  }

  function defaultReportError(error) {
    if (typeof reportError === "function") reportError(error); // eslint-disable-line no-undef
    else setTimeout(() => { throw error; }, 0);
  }

  /**
   * A roomcast.v1 connection that reconnects and resumes until closed.
   * `new Roomcast.Client(url, options).on("message", fn).connect()`.
   */
  class Client {
    constructor(url, options) {
      options = options || {};
      const WS = options.WebSocket
        || (typeof WebSocket !== "undefined" ? WebSocket : undefined); // eslint-disable-line no-undef
      if (typeof WS !== "function") {
        throw new TypeError("roomcast: no WebSocket here; pass options.WebSocket (Node 20 has none)");
      }
      const base = options.base
        || (typeof location !== "undefined" ? location.href : undefined); // eslint-disable-line no-undef
      this._WebSocket = WS;
      this._url = resolveUrl(url, base);
      this._backoff = new Backoff(options);
      this._book = new PositionBook(options.maxRooms, options.positions);
      this._stableAfter = number(options, "stableAfter", 5000, 0);
      this._maxSinceLength = number(options, "maxSinceLength", 4096, 1);
      if (options.refreshUrl !== undefined && typeof options.refreshUrl !== "function") {
        throw new TypeError("roomcast: option refreshUrl must be a function returning a URL");
      }
      this._refreshUrl = options.refreshUrl || null;
      this._setTimeout = options.setTimeout || ((fn, ms) => setTimeout(fn, ms));
      this._clearTimeout = options.clearTimeout || ((id) => clearTimeout(id));
      this._now = options.now || (() => Date.now());
      this._reportError = options.reportError || defaultReportError;
      this._listeners = Object.create(null);
      for (const type of EVENTS) this._listeners[type] = [];
      this._state = "idle";
      this._ws = null;
      this._timer = null;
      this._welcomedAt = null;
      this._opens = 0;
      /** The node the current (or last) connection is on, from its welcome. */
      this.node = null;
      /** The current (or last) connection's id (what the server's send_to takes). */
      this.connection = null;
      /** Messages dropped as duplicates (position not after the one held). */
      this.duplicates = 0;
    }

    /** "idle", "connecting", "open", "reconnecting" or "closed" (for good). */
    get state() { return this._state; }

    /** The app's URL (the next connection adds roomcast.since and roomcast.previous). */
    get url() { return this._url.href; }

    /** A copy of the last position per room: what a reconnect declares. */
    get positions() { return this._book.snapshot(); }

    /** True while a socket is open: send() works. */
    get connected() {
      return this._state === "open" && this._ws !== null && this._ws.readyState === 1;
    }

    /** Listen to an event; returns a function that stops listening. */
    on(type, listener) {
      if (!(type in this._listeners)) {
        throw new TypeError(`roomcast: unknown event ${show(type)}; one of ${EVENTS.join(", ")}`);
      }
      if (typeof listener !== "function") throw new TypeError("roomcast: listener must be a function");
      this._listeners[type].push(listener);
      return () => this.off(type, listener);
    }

    off(type, listener) {
      const list = this._listeners[type];
      if (!list) return;
      const index = list.indexOf(listener);
      if (index >= 0) list.splice(index, 1);
    }

    /** Open the first connection. A client connects once; make a new one after close. */
    connect() {
      if (this._state !== "idle") {
        throw new Error(`roomcast: connect() on a client that is ${this._state}; make a new Client`);
      }
      this._state = "connecting";
      this._open(true);
      return this;
    }

    /**
     * Send one application message: a string as text, bytes (ArrayBuffer, a typed
     * array, Blob) as binary. Throws while not connected: nothing is queued to go out
     * late; wait for "open".
     */
    send(data) {
      const ok = typeof data === "string" || isArrayBuffer(data) || ArrayBuffer.isView(data)
        || (typeof Blob !== "undefined" && data instanceof Blob); // eslint-disable-line no-undef
      if (!ok) throw new TypeError("roomcast: send() takes a string, an ArrayBuffer, a typed array or a Blob");
      if (!this.connected) {
        throw new Error(`roomcast: not connected (${this._state}); wait for the "open" event`);
      }
      this._ws.send(data);
    }

    /** Close for good (1000 or 3000-4999); emits "closed" with byClient true. */
    close(code, reason) {
      if (code === undefined) code = 1000;
      if (reason === undefined) reason = "";
      if (!(code === 1000 || (Number.isInteger(code) && code >= 3000 && code <= 4999))) {
        throw new RangeError(`roomcast: a client may close with 1000 or 3000-4999, not ${show(code)}`);
      }
      if (this._state === "closed") return;
      this._state = "closed";
      this._cancelTimer();
      const ws = this._ws;
      this._ws = null;
      if (ws !== null) {
        try { ws.close(code, reason); } catch (e) { /* already closing */ }
      }
      this._emit("closed", { type: "closed", code, reason, byClient: true });
    }

    /** Stop declaring a position for `room` (the app left it). */
    forget(room) { this._book.forget(room); }

    // -- internals

    _emit(type, event) {
      for (const listener of this._listeners[type].slice()) {
        try {
          listener(event);
        } catch (error) {
          this._reportError(error); // an app's bug must not stop the client
        }
      }
    }

    _cancelTimer() {
      if (this._timer !== null) {
        this._clearTimeout(this._timer);
        this._timer = null;
      }
    }

    /**
     * The URL of the next upgrade: the app's URL with the positions to declare
     * (roomcast.since) and, on a reconnect, the id of the connection those positions
     * come from (roomcast.previous), so that what the server sent "to the room except
     * that connection" is not replayed to it. Stale values in the app's URL go.
     */
    _connectUrl() {
      const since = this._book.since(this._maxSinceLength);
      const previous = this.connection;
      const params = this._url.searchParams;
      if (since === null && previous === null && !params.has(SINCE_PARAM)
          && !params.has(PREVIOUS_PARAM)) {
        return this._url.href;
      }
      const url = new URL(this._url.href);
      if (since === null) url.searchParams.delete(SINCE_PARAM);
      else url.searchParams.set(SINCE_PARAM, since);
      if (previous === null) url.searchParams.delete(PREVIOUS_PARAM);
      else url.searchParams.set(PREVIOUS_PARAM, previous);
      return url.href;
    }

    _open(first) {
      let ws;
      try {
        ws = new this._WebSocket(this._connectUrl(), [PROTOCOL]);
      } catch (error) {
        if (first) {
          this._state = "closed";
          throw error;
        }
        this._emit("error", { type: "error", code: "connect", message: String(error),
                              room: null, source: "client" });
        this._ended(null, `cannot connect: ${error}`);
        return;
      }
      ws.binaryType = "arraybuffer";
      this._ws = ws;
      ws.onopen = () => {
        if (ws !== this._ws) return;
        if (ws.protocol !== PROTOCOL) this._mismatch(ws);
        else this._state = "open";
      };
      ws.onmessage = (event) => {
        if (ws !== this._ws) return;
        const data = event.data;
        const events = typeof data === "string" ? parseText(data)
          : isArrayBuffer(data) || ArrayBuffer.isView(data) ? parseBinary(data)
          : [badFrame("a binary message that is not an ArrayBuffer (binaryType changed?)")];
        for (const item of events) {
          if (ws !== this._ws) break; // a listener closed the client
          this._handle(item);
        }
      };
      ws.onerror = () => {}; // a close event always follows, with the code
      ws.onclose = (event) => {
        if (ws !== this._ws) return;
        this._ws = null;
        this._ended(event.code, event.reason || "");
      };
    }

    _mismatch(ws) {
      const message = `server does not speak ${PROTOCOL}: ${this._url.href} answered without `
        + "the subprotocol (a route that is not a roomcast.v1 endpoint, or an older node)";
      this._ws = null;
      try { ws.close(1000, `${PROTOCOL} required`); } catch (e) { /* closing anyway */ }
      this._emit("error", { type: "error", code: "subprotocol", message, room: null,
                            source: "client" });
      if (this._state === "closed") return;
      if (this._opens === 0) {
        this._giveUp(1002, message); // never spoke v1 here: a wrong URL, not an outage
      } else {
        this._state = "reconnecting";
        this._schedule(null, message); // e.g. an older node during a rolling deploy
      }
    }

    _handle(event) {
      const book = this._book;
      switch (event.type) {
        case "message":
          if (event.position !== null && declarable(event.room)
              && !book.accept(event.room, event.position)) {
            this.duplicates += 1;
            return;
          }
          break;
        case "open":
          this.node = event.node;
          this.connection = event.connection;
          this._welcomedAt = this._now();
          this._opens += 1;
          event.reconnect = this._opens > 1;
          break;
        case "joined":
          if (event.position === null) book.forget(event.room);
          else book.set(event.room, event.position);
          break;
        case "left":
          book.forget(event.room);
          break;
        case "lost":
          book.set(event.room, event.position);
          break;
        default:
          break;
      }
      this._emit(event.type, event);
    }

    _ended(code, reason) {
      if (this._state === "closed") return;
      if (this._welcomedAt !== null && this._now() - this._welcomedAt >= this._stableAfter) {
        this._backoff.stable();
      }
      this._welcomedAt = null;
      this._state = "reconnecting";
      const action = closeAction(code, this._refreshUrl !== null);
      if (action === "final") {
        this._giveUp(code, reason);
      } else if (action === "refresh") {
        this._refresh().then((ok) => {
          if (this._state === "closed") return;
          if (ok) this._schedule(code, reason);
          else this._giveUp(code, reason);
        });
      } else {
        this._schedule(code, reason);
      }
    }

    async _refresh() {
      let next;
      try {
        next = await this._refreshUrl();
      } catch (error) {
        this._emit("error", { type: "error", code: "refresh",
                              message: `refreshUrl failed: ${error}`, room: null,
                              source: "client" });
        return true; // keep the old URL and back off; the next 4001 asks again
      }
      if (next === null || next === undefined) return false;
      try {
        this._url = resolveUrl(next, this._url.href);
      } catch (error) {
        this._emit("error", { type: "error", code: "refresh", message: error.message,
                              room: null, source: "client" });
      }
      return true;
    }

    _schedule(code, reason) {
      const [attempt, delay] = this._backoff.next(code);
      this._emit("reconnecting", { type: "reconnecting", attempt, delay, code, reason });
      if (this._state === "closed") return; // a listener closed the client
      this._timer = this._setTimeout(() => {
        this._timer = null;
        if (this._state !== "closed") this._open(false);
      }, delay);
    }

    _giveUp(code, reason) {
      this._state = "closed";
      this._cancelTimer();
      this._emit("closed", { type: "closed", code, reason, byClient: false });
    }
  }

  return {
    VERSION,
    PROTOCOL,
    SINCE_PARAM,
    PREVIOUS_PARAM,
    MAX_DECLARED_ROOMS,
    Client,
    PositionBook,
    Backoff,
    closeAction,
    parseText,
    parseBinary,
  };
});
