// Drives roomcast.js over a real WebSocket for tests/node/test_client.py: run with
// `node --experimental-websocket live_driver.mjs URL`. Prints every event as one JSON
// line (binary data as a list of byte values); reads commands, one JSON object a line,
// from stdin: {"send": "text"}, {"sendBytes": [1, 2]}, {"close": true}. Exits after
// the "closed" event. Not a test file itself (node --test runs *.test.mjs only).

import { createInterface } from "node:readline";

import Roomcast from "../../node/static/roomcast.js";

const client = new Roomcast.Client(process.argv[2], {
  initialDelay: 20, maxDelay: 100, goingAwayDelay: 20,
  reportError: (error) => { console.error(error); process.exit(3); },
});
for (const type of ["open", "message", "joined", "left", "lost", "error", "reconnecting", "closed"]) {
  client.on(type, (event) => {
    const line = { ...event };
    if (event.data instanceof Uint8Array) line.data = Array.from(event.data);
    if (type === "closed") line.duplicates = client.duplicates;
    process.stdout.write(JSON.stringify(line) + "\n");
    if (type === "closed") process.exit(0);
  });
}
createInterface({ input: process.stdin }).on("line", (text) => {
  const command = JSON.parse(text);
  if ("send" in command) client.send(command.send);
  if ("sendBytes" in command) client.send(new Uint8Array(command.sendBytes));
  if (command.close) client.close();
});
client.connect();
