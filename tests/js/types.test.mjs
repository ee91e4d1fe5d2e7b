// roomcast.d.ts says what roomcast.js has: the same exported names and members, the
// same events. With a tsc available, the usage sample compiles under --strict.

import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

import { Roomcast, fakeWebSocket } from "./harness.mjs";

const dts = readFileSync(new URL("../../node/static/roomcast.d.ts", import.meta.url), "utf8");

/** The body of `class NAME {...}` (or the namespace) in the .d.ts, at two-space indent. */
function block(header) {
  const start = dts.indexOf(header);
  assert.ok(start >= 0, `no "${header}" in roomcast.d.ts`);
  const indent = /^( *)/m.exec(dts.slice(dts.lastIndexOf("\n", start) + 1))[1];
  const end = dts.indexOf(`\n${indent}}`, start);
  return dts.slice(start, end);
}

function members(header) {
  const body = block(header);
  const names = new Set();
  for (const match of body.matchAll(/^ {4}(?:readonly )?([A-Za-z]\w*)\s*[<(:?]/gm)) {
    if (match[1] !== "constructor") names.add(match[1]);
  }
  return names;
}

function runtimeMembers(instance) {
  const names = new Set(Object.keys(instance).filter((n) => !n.startsWith("_")));
  for (let proto = Object.getPrototypeOf(instance); proto !== Object.prototype;
    proto = Object.getPrototypeOf(proto)) {
    for (const name of Object.getOwnPropertyNames(proto)) {
      if (name !== "constructor" && !name.startsWith("_")) names.add(name);
    }
  }
  return names;
}

test("the .d.ts declares exactly the names roomcast.js exports", () => {
  const body = block("declare namespace Roomcast");
  const declared = new Set(Array.from(body.matchAll(/^ {2}(?:const|class|function) (\w+)/gm), (m) => m[1]));
  assert.deepEqual([...declared].sort(), Object.keys(Roomcast).sort());
});

test("Client, PositionBook and Backoff have the members the .d.ts declares, no more", () => {
  const { FakeSocket } = fakeWebSocket();
  const instances = {
    Client: new Roomcast.Client("ws://x/", { WebSocket: FakeSocket }),
    PositionBook: new Roomcast.PositionBook(),
    Backoff: new Roomcast.Backoff(),
  };
  for (const [name, instance] of Object.entries(instances)) {
    assert.deepEqual([...members(`class ${name} {`)].sort(), [...runtimeMembers(instance)].sort(), name);
  }
});

test("every event in the .d.ts EventMap is one the client accepts, and only those", () => {
  const { FakeSocket } = fakeWebSocket();
  const client = new Roomcast.Client("ws://x/", { WebSocket: FakeSocket });
  const declared = Array.from(block("interface EventMap {").matchAll(/^ {4}(\w+): /gm), (m) => m[1]);
  assert.equal(declared.length, 8);
  for (const type of declared) client.on(type, () => {});
  assert.throws(() => client.on("connect", () => {}), /unknown event/);
});

const tsc = process.env.TSC || (() => {
  try { execFileSync("tsc", ["--version"], { stdio: "ignore" }); return "tsc"; } catch { return null; }
})();

test("tsc --strict accepts the usage sample", { skip: tsc ? false : "no tsc on PATH or in $TSC" }, () => {
  const sample = fileURLToPath(new URL("./types_usage.ts", import.meta.url));
  execFileSync(tsc, ["--strict", "--noEmit", "--lib", "dom,es2020", "--module", "commonjs", sample],
    { stdio: "pipe" });
});
