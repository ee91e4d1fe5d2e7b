// The browser example in README.md runs as written in a page: roomcast.js and the
// example's inline script in one context with a document, a location and a WebSocket.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import vm from "node:vm";

import { fakeWebSocket } from "./harness.mjs";

const docs = readFileSync(new URL("../../README.md", import.meta.url), "utf8");
const library = readFileSync(new URL("../../node/static/roomcast.js", import.meta.url), "utf8");

function browserExample() {
  const block = /```html\n<!-- example: browser -->\n([\s\S]*?)```/.exec(docs);
  assert.ok(block, "no '<!-- example: browser -->' html block in README.md");
  assert.match(block[1], /<script src="\/roomcast\.js"><\/script>/);
  const scripts = Array.from(block[1].matchAll(/<script>([\s\S]*?)<\/script>/g), (m) => m[1]);
  assert.equal(scripts.length, 1);
  return scripts[0];
}

test("the browser example connects, shows what happens as text, and sends", () => {
  const { FakeSocket, sockets } = fakeWebSocket();
  const items = [];
  const page = {
    document: {
      getElementById: (id) => (id === "log" ? { append: (item) => items.push(item) } : null),
      createElement: (tag) => ({ tag, textContent: "" }),
    },
    location: { href: "http://hub.test:8080/" },
    WebSocket: FakeSocket,
    TextDecoder, URL, URLSearchParams, setTimeout, clearTimeout,
  };
  const context = vm.createContext(page);
  vm.runInContext(library, context, { filename: "roomcast.js" });
  vm.runInContext(browserExample(), context, { filename: "README.md" });
  assert.equal(sockets.length, 1);
  assert.equal(sockets[0].url, "ws://hub.test:8080/chat?room=lobby&name=ann");
  sockets[0].welcome("n1", "n1.1");
  assert.deepEqual(sockets[0].sent.map((s) => JSON.parse(s)),
    [{ type: "message", name: "ann", text: "hello" }]);
  sockets[0].text({ type: "message", room: "lobby", epoch: "e", offset: 1, data: "<b>hi</b>" });
  sockets[0].binary({ type: "message", room: "lobby" }, new Uint8Array([1, 2, 3]));
  sockets[0].text({ type: "joined", room: "lobby", epoch: "k", offset: 9, recovered: false, reason: "epoch" });
  sockets[0].serverClose(1006);
  const shown = items.map((item) => item.textContent);
  assert.ok(items.every((item) => item.tag === "li"));
  assert.deepEqual(shown.slice(0, 4), ["on node n1", "<b>hi</b>", "3 bytes",
                                       "missed messages in lobby are gone"]);
  assert.match(shown[4], /^reconnecting in \d+ ms \(attempt 1\)$/);
  vm.runInContext("client.close()", context);
  assert.equal(items[5].textContent, "closed for good: 1000 ");
});
