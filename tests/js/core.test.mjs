// roomcast.js without a socket: loading, parsing, the position book, the backoff, the
// close-code rules.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import vm from "node:vm";

import { Roomcast } from "./harness.mjs";

const source = fileURLToPath(new URL("../../node/static/roomcast.js", import.meta.url));
const pyproject = fileURLToPath(new URL("../../pyproject.toml", import.meta.url));

test("as a classic script it defines the global Roomcast, and CommonJS gets the same API", () => {
  const context = vm.createContext({ TextDecoder, URL, URLSearchParams });
  vm.runInContext(readFileSync(source, "utf8"), context, { filename: "roomcast.js" });
  assert.equal(typeof context.Roomcast.Client, "function");
  assert.equal(context.Roomcast.VERSION, Roomcast.VERSION);
  assert.deepEqual(Object.keys(context.Roomcast).sort(), Object.keys(Roomcast).sort());
});

test("VERSION is the package's version and PROTOCOL is roomcast.v1", () => {
  const version = /^version = "([^"]+)"/m.exec(readFileSync(pyproject, "utf8"))[1];
  assert.equal(Roomcast.VERSION, version);
  assert.equal(Roomcast.PROTOCOL, "roomcast.v1");
});

// ------------------------------------------------------------------------- parsing

test("parseText reads every frame type of the protocol", () => {
  const p = Roomcast.parseText;
  assert.deepEqual(p('{"type":"welcome","protocol":"roomcast.v1","node":"n1","connection":"n1.4"}'),
    [{ type: "open", node: "n1", connection: "n1.4", reconnect: false }]);
  assert.deepEqual(p('{"type":"message","room":"lobby","epoch":"f3k9q2","offset":42,"data":"hello"}'),
    [{ type: "message", room: "lobby", data: "hello", position: { epoch: "f3k9q2", offset: 42 } }]);
  assert.deepEqual(p('{"type":"message","data":"just for you"}'),
    [{ type: "message", room: null, data: "just for you", position: null }]);
  assert.deepEqual(p('{"type":"joined","room":"lobby","epoch":"k81zz0","offset":5,"recovered":false,"reason":"epoch","replayed":0}'),
    [{ type: "joined", room: "lobby", recovered: false, reason: "epoch", replayed: 0,
       position: { epoch: "k81zz0", offset: 5 } }]);
  assert.deepEqual(p('{"type":"joined","room":"plain"}'),
    [{ type: "joined", room: "plain", recovered: null, reason: null, replayed: 0, position: null }]);
  assert.deepEqual(p('{"type":"left","room":"lobby"}'), [{ type: "left", room: "lobby" }]);
  assert.deepEqual(p('{"type":"lost","room":"r","epoch":"e","offset":57,"reason":"window"}'),
    [{ type: "lost", room: "r", position: { epoch: "e", offset: 57 }, reason: "window" }]);
  assert.deepEqual(p('{"type":"error","code":"forbidden","message":"no","room":"admin"}'),
    [{ type: "error", code: "forbidden", message: "no", room: "admin", source: "server" }]);
});

test("parseText ignores unknown types and fields (later v1 versions may add them)", () => {
  assert.deepEqual(Roomcast.parseText('{"type":"presence","who":["ann"]}'), []);
  assert.deepEqual(Roomcast.parseText('{"type":"left","room":"r","extra":1}'),
    [{ type: "left", room: "r" }]);
});

test("a batch is unpacked in order; a broken entry becomes an error in its place", () => {
  const events = Roomcast.parseText(JSON.stringify({ type: "batch", messages: [
    { type: "message", room: "r", epoch: "e", offset: 44, data: "a" }, 7,
    { type: "joined", room: "r" },
    { type: "message", room: "r", epoch: "e", offset: 45, data: "b" }] }));
  assert.deepEqual(events.map((e) => e.type), ["message", "error", "error", "message"]);
  assert.deepEqual(events.filter((e) => e.type === "message").map((e) => e.data), ["a", "b"]);
});

for (const [frame, says] of [
  ["not json", "not JSON"],
  ["[1,2]", "JSON object"],
  ["null", "JSON object"],
  ['{"type":3}', "string 'type'"],
  ['{"type":"message","room":"r","data":7}', "'data' must be a string"],
  ['{"type":"message","room":"r","epoch":"bad epoch","offset":1,"data":"x"}', "bad epoch"],
  ['{"type":"message","room":"r","epoch":"e","offset":-1,"data":"x"}', "bad offset"],
  ['{"type":"message","room":"r","epoch":"e","offset":9007199254740992,"data":"x"}', "bad offset"],
  ['{"type":"message","room":"r","epoch":"e","data":"x"}', "bad offset"],
  ['{"type":"message","epoch":"e","offset":1,"data":"x"}', "without a room"],
  ['{"type":"joined","room":"r","recovered":"yes"}', "'recovered'"],
  ['{"type":"welcome","node":"n"}', "'connection'"],
  ['{"type":"lost","room":"r"}', "bad epoch"],
  ['{"type":"batch","messages":{}}', "must be a list"],
]) {
  test(`a broken text frame is a bad_frame error: ${frame}`, () => {
    const [event, ...rest] = Roomcast.parseText(frame);
    assert.deepEqual(rest, []);
    assert.equal(event.type, "error");
    assert.equal(event.code, "bad_frame");
    assert.equal(event.source, "client");
    assert.ok(event.message.includes(says), event.message);
  });
}

test("parseBinary splits the JSON header line from the bytes, which may hold 0x0A", () => {
  const header = new TextEncoder().encode('{"type":"message","room":"lobby","epoch":"f3k9q2","offset":43}\n');
  const frame = new Uint8Array([...header, 0, 10, 255]);
  const [event] = Roomcast.parseBinary(frame.buffer);
  assert.equal(event.type, "message");
  assert.equal(event.room, "lobby");
  assert.deepEqual(event.position, { epoch: "f3k9q2", offset: 43 });
  assert.ok(event.data instanceof Uint8Array);
  assert.deepEqual(Array.from(event.data), [0, 10, 255]);
  assert.deepEqual(Roomcast.parseBinary(new TextEncoder().encode('{"type":"future"}\nxyz')), []);
});

for (const [bytes, says] of [
  [new TextEncoder().encode('{"type":"message"}'), "no 0x0A"],
  [new Uint8Array([0xff, 0xfe, 10]), "header"],
  [new TextEncoder().encode('{"type":"joined","room":"r"}\n'), "only messages"],
  [new TextEncoder().encode("[1]\nabc"), "JSON object"],
]) {
  test(`a broken binary frame is a bad_frame error: ${says}`, () => {
    const [event] = Roomcast.parseBinary(bytes);
    assert.equal(event.code, "bad_frame");
    assert.ok(event.message.includes(says), event.message);
  });
}

// ------------------------------------------------------------------------- positions

test("the position book drops duplicates within an epoch and accepts a new epoch", () => {
  const book = new Roomcast.PositionBook();
  assert.equal(book.accept("r", { epoch: "e1", offset: 5 }), true);
  assert.equal(book.accept("r", { epoch: "e1", offset: 5 }), false);
  assert.equal(book.accept("r", { epoch: "e1", offset: 3 }), false);
  assert.equal(book.accept("r", { epoch: "e1", offset: 7 }), true); // a jump: exclusions
  assert.equal(book.accept("r", { epoch: "e2", offset: 1 }), true);
  assert.deepEqual(book.get("r"), { epoch: "e2", offset: 1 });
});

test("the position book is bounded and evicts the least recently updated room", () => {
  const book = new Roomcast.PositionBook(3);
  for (let i = 0; i < 1000; i++) book.accept(`room${i % 10}`, { epoch: "e", offset: i });
  assert.equal(book.size, 3);
  assert.deepEqual(Object.keys(book.snapshot()), ["room7", "room8", "room9"]);
  book.accept("room7", { epoch: "e", offset: 5000 });
  assert.deepEqual(Object.keys(book.snapshot()), ["room8", "room9", "room7"]);
  book.forget("room8");
  assert.deepEqual(Object.keys(book.snapshot()), ["room9", "room7"]);
});

test("rooms the protocol would refuse in roomcast.since are not held", () => {
  const book = new Roomcast.PositionBook();
  assert.equal(book.accept("x".repeat(201), { epoch: "e", offset: 1 }), true);
  assert.equal(book.accept("😀".repeat(200), { epoch: "e", offset: 1 }), true); // 200 characters
  assert.deepEqual(Object.keys(book.snapshot()), ["😀".repeat(200)]);
});

test("since() is JSON, most recent rooms first, and leaves out what exceeds the budget", () => {
  const book = new Roomcast.PositionBook(100, {
    a: ["e1", 1], "b+c &d/é": { epoch: "e2", offset: 2 }, ["z".repeat(150)]: ["e3", 3] });
  assert.deepEqual(JSON.parse(book.since(4096)), {
    a: ["e1", 1], "b+c &d/é": ["e2", 2], ["z".repeat(150)]: ["e3", 3] });
  assert.deepEqual(JSON.parse(book.since(120)), { a: ["e1", 1], "b+c &d/é": ["e2", 2] });
  assert.equal(new Roomcast.PositionBook().since(4096), null);
});

test("positions given by the app and maxRooms are validated like the protocol does", () => {
  for (const bad of [{ "": ["e", 1] }, { r: ["bad epoch", 1] }, { r: ["e", -1] },
                     { r: ["e", 2 ** 53] }]) {
    assert.throws(() => new Roomcast.PositionBook(100, bad), RangeError);
  }
  assert.throws(() => new Roomcast.PositionBook(101), /1\.\.100/);
});

// ------------------------------------------------------------------------- backoff

test("backoff ceilings grow by factor and are capped; no overflow however long", () => {
  const backoff = new Roomcast.Backoff({ initialDelay: 500, maxDelay: 30000, random: () => 1 });
  const delays = Array.from({ length: 10 }, () => backoff.next(1006)[1]);
  assert.deepEqual(delays, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]);
  backoff.attempt = 1e9;
  assert.equal(backoff.next(1006)[1], 30000);
});

test("full jitter keeps every delay in [0, ceiling] and spreads over it", () => {
  const backoff = new Roomcast.Backoff({ initialDelay: 500, maxDelay: 4000 });
  for (let attempt = 1; attempt <= 7; attempt++) {
    const ceiling = backoff.ceiling(attempt);
    const samples = Array.from({ length: 300 }, () => {
      backoff.attempt = attempt - 1;
      return backoff.next(1011)[1];
    });
    assert.ok(samples.every((d) => d >= 0 && d <= ceiling));
    assert.ok(Math.min(...samples) < ceiling * 0.1 && Math.max(...samples) > ceiling * 0.9);
  }
});

test("1001 after a stable connection waits 0..goingAwayDelay; repeats back off", () => {
  const backoff = new Roomcast.Backoff({ initialDelay: 500, goingAwayDelay: 1000,
                                         random: () => 0.5 });
  assert.deepEqual(backoff.next(1001), [1, 500]);
  assert.deepEqual(backoff.next(1001), [2, 500]);
  assert.deepEqual(backoff.next(1006), [3, 1000]);
  backoff.stable();
  assert.deepEqual(backoff.next(1006), [1, 250]);
});

test("nonsense backoff options are refused with their name", () => {
  assert.throws(() => new Roomcast.Backoff({ initialDelay: 0 }), /initialDelay/);
  assert.throws(() => new Roomcast.Backoff({ maxDelay: 10 }), /maxDelay/);
  assert.throws(() => new Roomcast.Backoff({ factor: 0.5 }), /factor/);
  assert.throws(() => new Roomcast.Backoff({ goingAwayDelay: -1 }), /goingAwayDelay/);
  assert.throws(() => new Roomcast.Backoff({ initialDelay: "1" }), /initialDelay/);
});

test("close codes: the protocol's final ones stop, the others reconnect", () => {
  const final = [1000, 1002, 1003, 1007, 1008, 1009, 1010, 4000, 4001, 4003, 4499];
  const retry = [1001, 1005, 1006, 1011, 1012, 1013, 1014, 1015, 4500, 4999, null];
  for (const code of final) assert.equal(Roomcast.closeAction(code, false), "final", String(code));
  for (const code of retry) assert.equal(Roomcast.closeAction(code, false), "retry", String(code));
  assert.equal(Roomcast.closeAction(4001, true), "refresh");
  assert.equal(Roomcast.closeAction(4003, true), "final");
});
