// roomcast.js's Client on a fake WebSocket and a fake clock: connecting, events,
// positions and de-duplication, reconnecting, final closes, refresh, send and close.

import { test } from "node:test";
import assert from "node:assert/strict";

import { Roomcast, fakeWebSocket, setup } from "./harness.mjs";

const FINAL = [1000, 1002, 1003, 1007, 1008, 1009, 1010, 4000, 4003, 4499];
const RETRY = [1005, 1006, 1011, 1012, 1013, 1014, 4500, 4999];

test("connect offers roomcast.v1 on the app's URL and asks for ArrayBuffers", () => {
  const { client, sockets } = setup();
  assert.equal(client.state, "idle");
  assert.equal(sockets.length, 0, "nothing happens before connect()");
  assert.equal(client.connect(), client);
  assert.equal(sockets.length, 1);
  assert.equal(sockets[0].url, "ws://hub.test/chat?room=lobby&name=ann");
  assert.deepEqual(sockets[0].protocols, ["roomcast.v1"]);
  assert.equal(sockets[0].binaryType, "arraybuffer");
  assert.equal(client.state, "connecting");
  assert.throws(() => client.connect(), /make a new Client/);
});

test("a relative or http(s) URL becomes ws(s) against the page; a fragment is dropped", () => {
  const { FakeSocket, sockets } = fakeWebSocket();
  new Roomcast.Client("/chat?room=a#x", { WebSocket: FakeSocket, base: "https://hub.test/page" })
    .connect();
  new Roomcast.Client("http://hub.test:8080/chat", { WebSocket: FakeSocket }).connect();
  assert.deepEqual(sockets.map((s) => s.url),
    ["wss://hub.test/chat?room=a", "ws://hub.test:8080/chat"]);
  assert.throws(() => new Roomcast.Client("ftp://x/", { WebSocket: FakeSocket }), /ws:, wss:/);
  assert.throws(() => new Roomcast.Client("chat", { WebSocket: FakeSocket }), /bad URL/);
});

test("without a WebSocket class (Node 20) the constructor says to inject one", () => {
  assert.throws(() => new Roomcast.Client("ws://x/"), /options\.WebSocket/);
});

test("the welcome is the open event; text, binary and room-less messages follow", () => {
  const { client, last, of } = setup();
  client.connect();
  last().welcome("n1", "n1.7");
  assert.deepEqual(of("open"), [{ type: "open", node: "n1", connection: "n1.7", reconnect: false }]);
  assert.equal(client.node, "n1");
  assert.equal(client.connection, "n1.7");
  assert.equal(client.state, "open");
  last().text({ type: "message", room: "lobby", epoch: "e", offset: 1, data: "hello" });
  last().binary({ type: "message", room: "lobby", epoch: "e", offset: 2 }, new Uint8Array([0, 10, 1]));
  last().text({ type: "message", data: "just for you" });
  const messages = of("message");
  assert.equal(messages[0].data, "hello");
  assert.ok(messages[1].data instanceof Uint8Array);
  assert.deepEqual(Array.from(messages[1].data), [0, 10, 1]);
  assert.deepEqual(messages[1].position, { epoch: "e", offset: 2 });
  assert.deepEqual(messages[2], { type: "message", room: null, data: "just for you", position: null });
  assert.deepEqual(client.positions, { lobby: { epoch: "e", offset: 2 } });
});

test("duplicates are dropped by position, also inside a batch; a new epoch is not one", () => {
  const { client, last, of } = setup();
  client.connect();
  last().welcome();
  const msg = (offset, epoch = "e") => ({ type: "message", room: "r", epoch, offset, data: `${epoch}${offset}` });
  last().text(msg(1));
  last().text({ type: "batch", messages: [msg(2), msg(2), msg(3), msg(1)] });
  last().text(msg(3));
  last().text(msg(1, "f"));
  assert.deepEqual(of("message").map((m) => m.data), ["e1", "e2", "e3", "f1"]);
  assert.equal(client.duplicates, 3);
});

test("joined, lost and left keep the position book; a room without history is forgotten", () => {
  const { client, last, of } = setup();
  client.connect();
  last().welcome();
  last().text({ type: "joined", room: "a", epoch: "e1", offset: 40, replayed: 1 });
  last().text({ type: "joined", room: "b", epoch: "k8", offset: 5, recovered: false, reason: "epoch" });
  last().text({ type: "lost", room: "a", epoch: "e2", offset: 57, reason: "window" });
  assert.deepEqual(client.positions, { b: { epoch: "k8", offset: 5 }, a: { epoch: "e2", offset: 57 } });
  last().text({ type: "left", room: "b" });
  last().text({ type: "joined", room: "a" }); // a's history is gone: nothing to declare
  assert.deepEqual(client.positions, {});
  assert.deepEqual(of("joined")[1], { type: "joined", room: "b", recovered: false, reason: "epoch",
                                      replayed: 0, position: { epoch: "k8", offset: 5 } });
  assert.deepEqual(of("lost"), [{ type: "lost", room: "a", position: { epoch: "e2", offset: 57 },
                                  reason: "window" }]);
  assert.deepEqual(of("left"), [{ type: "left", room: "b" }]);
});

test("after an unexpected close it reconnects declaring its positions, and resumes once", () => {
  const { client, sockets, last, clock, of } = setup({ initialDelay: 500 });
  client.connect();
  last().welcome();
  for (let n = 1; n <= 3; n++) last().text({ type: "message", room: "lobby", epoch: "e", offset: n, data: `m${n}` });
  last().serverClose(1006);
  assert.equal(client.state, "reconnecting");
  assert.deepEqual(of("reconnecting"), [{ type: "reconnecting", attempt: 1, delay: 250, code: 1006, reason: "" }]);
  assert.deepEqual(clock.pending(), [250]);
  clock.advance(249);
  assert.equal(sockets.length, 1);
  clock.advance(1);
  assert.equal(sockets.length, 2);
  assert.deepEqual(last().since, { lobby: ["e", 3] });
  assert.equal(new URL(sockets[0].url).searchParams.get("roomcast.previous"), null);
  assert.equal(new URL(last().url).searchParams.get("roomcast.previous"), "n1.1",
               "the connection the positions come from");
  assert.equal(new URL(last().url).searchParams.get("name"), "ann", "the app's query is kept");
  last().welcome();
  assert.equal(of("open")[1].reconnect, true);
  for (const n of [2, 3, 4, 5]) last().text({ type: "message", room: "lobby", epoch: "e", offset: n, data: `m${n}` });
  last().text({ type: "joined", room: "lobby", epoch: "e", offset: 5, recovered: true, replayed: 4 });
  assert.deepEqual(of("message").map((m) => m.data), ["m1", "m2", "m3", "m4", "m5"]);
  assert.equal(client.duplicates, 2);
  assert.equal(of("joined")[0].recovered, true);
});

test("1001 (a draining node) reconnects after random() * goingAwayDelay", () => {
  const { client, last, clock, of } = setup({ goingAwayDelay: 1000, initialDelay: 5000,
                                              stableAfter: 0, random: () => 0.3 });
  client.connect();
  last().welcome();
  last().serverClose(1001, "node draining");
  assert.deepEqual(of("reconnecting"), [{ type: "reconnecting", attempt: 1, delay: 300, code: 1001,
                                          reason: "node draining" }]);
  assert.deepEqual(clock.pending(), [300]);
});

test("failing reconnects back off exponentially up to maxDelay (the timers prove it)", () => {
  const { client, last, clock, of } = setup({ initialDelay: 100, maxDelay: 1000, random: () => 1 });
  client.connect();
  last().welcome();
  last().serverClose(1006);
  const delays = [];
  for (let i = 0; i < 7; i++) {
    const [delay] = clock.pending();
    delays.push(delay);
    clock.advance(delay);
    last().serverClose(1006); // the upgrade failed: browsers report 1006
  }
  assert.deepEqual(delays, [100, 200, 400, 800, 1000, 1000, 1000]);
  assert.deepEqual(of("reconnecting").map((e) => e.attempt), [1, 2, 3, 4, 5, 6, 7, 8]);
});

test("a connection that stayed up stableAfter resets the backoff; a short one does not", () => {
  const { client, last, clock, of } = setup({ initialDelay: 100, stableAfter: 5000, random: () => 1 });
  client.connect();
  last().welcome();
  last().serverClose(1006);
  clock.advance(100);
  last().welcome();
  clock.advance(4999);
  last().serverClose(1006);
  clock.advance(200);
  last().welcome();
  clock.advance(5000);
  last().serverClose(1011);
  assert.deepEqual(of("reconnecting").map((e) => [e.attempt, e.delay]), [[1, 100], [2, 200], [1, 100]]);
});

for (const code of FINAL) {
  test(`close code ${code} is final: closed event, no timer, no new socket`, () => {
    const { client, sockets, clock, of } = setup();
    client.connect();
    sockets[0].welcome();
    sockets[0].serverClose(code, "bye");
    assert.deepEqual(of("closed"), [{ type: "closed", code, reason: "bye", byClient: false }]);
    assert.deepEqual(of("reconnecting"), []);
    assert.deepEqual(clock.pending(), []);
    assert.equal(client.state, "closed");
    clock.advance(60000);
    assert.equal(sockets.length, 1);
  });
}

for (const code of RETRY) {
  test(`close code ${code} reconnects with backoff`, () => {
    const { client, sockets, clock, of } = setup();
    client.connect();
    sockets[0].welcome();
    sockets[0].serverClose(code);
    assert.equal(of("reconnecting").length, 1);
    clock.advance(60000);
    assert.equal(sockets.length, 2);
  });
}

test("a server without roomcast.v1 on the first connect: error, then closed for good", () => {
  const { client, sockets, clock, of } = setup();
  client.connect();
  sockets[0].serverOpen("");
  assert.equal(of("error")[0].code, "subprotocol");
  assert.match(of("error")[0].message, /server does not speak roomcast\.v1/);
  assert.deepEqual(sockets[0].closedWith, { code: 1000, reason: "roomcast.v1 required" });
  assert.equal(of("closed")[0].code, 1002);
  assert.equal(client.state, "closed");
  assert.deepEqual(clock.pending(), []);
});

test("a server without roomcast.v1 after a welcome (an older node mid-deploy): retry", () => {
  const { client, sockets, clock, of } = setup();
  client.connect();
  sockets[0].welcome();
  sockets[0].serverClose(1001);
  clock.advance(60000);
  sockets[1].serverOpen("");
  assert.equal(of("error")[0].code, "subprotocol");
  assert.deepEqual(of("closed"), []);
  clock.advance(60000);
  assert.equal(sockets.length, 3);
});

test("4001 awaits refreshUrl and reconnects with the URL it gives", async () => {
  let calls = 0;
  const { client, sockets, clock, of } = setup({
    refreshUrl: async () => { calls += 1; return "?room=lobby&token=fresh"; } },
    "ws://hub.test/chat?room=lobby&token=old");
  client.connect();
  sockets[0].welcome();
  sockets[0].serverClose(4001, "token expired");
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(calls, 1);
  assert.equal(of("reconnecting")[0].code, 4001);
  clock.advance(60000);
  assert.equal(new URL(sockets[1].url).searchParams.get("token"), "fresh");
  assert.equal(client.url, "ws://hub.test/chat?room=lobby&token=fresh");
});

test("4001 without refreshUrl, or when it returns null, closes for good", async () => {
  for (const options of [{}, { refreshUrl: async () => null }]) {
    const { client, sockets, of } = setup(options);
    client.connect();
    sockets[0].welcome();
    sockets[0].serverClose(4001, "token expired");
    await new Promise((resolve) => setImmediate(resolve));
    assert.deepEqual(of("closed"), [{ type: "closed", code: 4001, reason: "token expired", byClient: false }]);
  }
});

test("a refreshUrl that throws is an error event and the client backs off", async () => {
  const { client, sockets, clock, of } = setup({
    refreshUrl: async () => { throw new Error("auth service down"); } });
  client.connect();
  sockets[0].welcome();
  sockets[0].serverClose(4001);
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(of("error")[0].code, "refresh");
  assert.match(of("error")[0].message, /auth service down/);
  clock.advance(60000);
  assert.equal(sockets.length, 2);
});

test("send() passes text and binary on while open, throws while not", () => {
  const { client, sockets, last } = setup();
  assert.throws(() => client.send("x"), /not connected \(idle\)/);
  client.connect();
  assert.throws(() => client.send("x"), /not connected \(connecting\)/);
  last().welcome();
  client.send("hi");
  const bytes = new Uint8Array([1, 2]);
  client.send(bytes);
  client.send(bytes.buffer);
  assert.deepEqual(sockets[0].sent, ["hi", bytes, bytes.buffer]);
  assert.throws(() => client.send({ a: 1 }), TypeError);
  last().serverClose(1006);
  assert.throws(() => client.send("x"), /not connected \(reconnecting\); wait for the "open" event/);
});

test("close() is for good: closed event, socket closed, the pending reconnect cancelled", () => {
  const { client, sockets, clock, of } = setup();
  client.connect();
  sockets[0].welcome();
  client.close();
  assert.deepEqual(sockets[0].closedWith, { code: 1000, reason: "" });
  assert.deepEqual(of("closed"), [{ type: "closed", code: 1000, reason: "", byClient: true }]);
  sockets[0].serverClose(1000); // the close handshake ends later: nothing more happens
  assert.equal(of("closed").length, 1);

  const second = setup();
  second.client.connect();
  second.sockets[0].welcome();
  second.sockets[0].serverClose(1006);
  assert.equal(second.clock.pending().length, 1);
  second.client.close(4000, "user left");
  assert.deepEqual(second.clock.pending(), []);
  assert.deepEqual(second.of("closed")[0], { type: "closed", code: 4000, reason: "user left", byClient: true });
  second.client.close(); // idempotent
  assert.equal(second.of("closed").length, 1);
  assert.throws(() => second.client.close(1001), RangeError);
  assert.equal(clock.pending().length, 0);
});

test("garbage from the server is an error event; the client goes on", () => {
  const { client, last, of } = setup();
  client.connect();
  last().welcome();
  last().text("{not json");
  last().binary(null, new TextEncoder().encode("no header line"));
  last().text({ type: "message", data: "still here" });
  assert.deepEqual(of("error").map((e) => e.code), ["bad_frame", "bad_frame"]);
  assert.deepEqual(of("message").map((m) => m.data), ["still here"]);
  assert.equal(client.connected, true);
});

test("a server error frame is an error event with source server", () => {
  const { client, last, of } = setup();
  client.connect();
  last().welcome();
  last().text({ type: "error", code: "forbidden", message: "no", room: "admin" });
  assert.deepEqual(of("error"), [{ type: "error", code: "forbidden", message: "no", room: "admin", source: "server" }]);
});

test("a throwing listener is reported and does not stop the rest of a batch", () => {
  const reported = [];
  const { client, last, of } = setup({ reportError: (e) => reported.push(e.message) });
  client.on("message", (m) => { if (m.data === "a") throw new Error("app bug"); });
  client.connect();
  last().welcome();
  last().text({ type: "batch", messages: [{ type: "message", data: "a" }, { type: "message", data: "b" }] });
  assert.deepEqual(of("message").map((m) => m.data), ["a", "b"]);
  assert.deepEqual(reported, ["app bug"]);
});

test("a listener that closes the client stops the rest of the frame and any reconnect", () => {
  const { client, last, clock, of } = setup();
  client.on("message", () => client.close());
  client.connect();
  last().welcome();
  last().text({ type: "batch", messages: [{ type: "message", data: "a" }, { type: "message", data: "b" }] });
  assert.deepEqual(of("message").map((m) => m.data), ["a"]);
  assert.deepEqual(clock.pending(), []);
});

test("on() refuses unknown events; its return value and off() stop listening", () => {
  const { client, last } = setup();
  assert.throws(() => client.on("mesage", () => {}), /unknown event "mesage"/);
  const seen = [];
  const stop = client.on("message", (m) => seen.push(m.data));
  const other = (m) => seen.push(`other ${m.data}`);
  client.on("message", other);
  client.connect();
  last().welcome();
  last().text({ type: "message", data: "1" });
  stop();
  client.off("message", other);
  last().text({ type: "message", data: "2" });
  assert.deepEqual(seen, ["1", "other 1"]);
});

test("state stays bounded over a long session across many rooms", () => {
  const { client, last } = setup();
  const events = [];
  client.on("message", () => events.push(1));
  client.connect();
  last().welcome();
  const keys = Object.keys(client).sort();
  for (let n = 1; n <= 20000; n++) {
    last().text({ type: "message", room: `room${n % 500}`, epoch: "e", offset: n, data: "x" });
  }
  assert.equal(events.length, 20000);
  assert.equal(Object.keys(client.positions).length, 100, "capped at the protocol's 100 rooms");
  assert.deepEqual(Object.keys(client).sort(), keys, "no new per-client structures");
  last().serverClose(1006);
  assert.ok(last().url.length < 4096 + 100, "the declared positions fit the length budget");
});

test("positions given at construction are declared on the first connect", () => {
  const { client, last } = setup({ positions: { lobby: ["e9", 4] } });
  client.connect();
  assert.deepEqual(last().since, { lobby: ["e9", 4] });
});

test("a stale roomcast.since in the app's URL is replaced by the client's own", () => {
  const { client, last, clock } = setup({}, "ws://hub.test/chat?roomcast.since=%7B%7D&room=a");
  client.connect();
  assert.equal(new URL(last().url).searchParams.get("roomcast.since"), null);
  last().welcome();
  last().text({ type: "joined", room: "a", epoch: "e", offset: 3 });
  last().serverClose(1006);
  clock.advance(60000);
  assert.deepEqual(last().since, { a: ["e", 3] });
  assert.equal(new URL(last().url).searchParams.getAll("roomcast.since").length, 1);
});

test("a binary frame whose ArrayBuffer comes from another realm (an iframe) is read", async () => {
  const vm = await import("node:vm");
  const { client, last, of } = setup();
  client.connect();
  last().welcome();
  const header = new TextEncoder().encode('{"type":"message","room":"r"}\n');
  const foreign = vm.runInNewContext(`new Uint8Array([${[...header, 7]}]).buffer`);
  assert.equal(foreign instanceof ArrayBuffer, false);
  last().onmessage({ data: foreign });
  assert.deepEqual(Array.from(of("message")[0].data), [7]);
  client.send(foreign);
  assert.equal(last().sent[0], foreign);
});

test("each reconnect names the connection of the last welcome in roomcast.previous", () => {
  const { client, sockets, last, clock } = setup({},
    "ws://hub.test/chat?room=a&roomcast.previous=old.1");
  client.connect();
  assert.equal(new URL(last().url).searchParams.get("roomcast.previous"), null,
               "a stale one in the app's URL is not sent");
  last().welcome("n1", "n1.7");
  last().serverClose(1006);
  clock.advance(60000);
  assert.equal(new URL(last().url).searchParams.get("roomcast.previous"), "n1.7");
  last().serverClose(1006); // never welcomed: the last welcome is still n1.7's
  clock.advance(60000);
  assert.equal(new URL(last().url).searchParams.get("roomcast.previous"), "n1.7");
  last().welcome("n2", "n2.3");
  last().serverClose(1001);
  clock.advance(60000);
  const url = new URL(last().url);
  assert.equal(url.searchParams.get("roomcast.previous"), "n2.3");
  assert.equal(url.searchParams.getAll("roomcast.previous").length, 1);
  assert.equal(url.searchParams.get("room"), "a");
  assert.equal(sockets.length, 4);
  assert.equal(client.url, "ws://hub.test/chat?room=a&roomcast.previous=old.1", "the app's URL");
});
