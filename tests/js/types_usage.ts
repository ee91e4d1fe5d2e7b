// A usage sample the types must accept (and reject where marked); tests/js/types.test.mjs
// compiles it with tsc --strict when a tsc is on PATH or in $TSC.
import Roomcast = require("../../node/static/roomcast");
const client = new Roomcast.Client("/chat?room=lobby", { initialDelay: 250, refreshUrl: async () => "?token=x" });
client.on("message", (m) => { const d: string | Uint8Array = m.data; if (m.position) { const o: number = m.position.offset; } });
client.on("joined", (j) => { if (j.recovered === false) console.log(j.reason); });
client.on("reconnecting", (r) => console.log(r.attempt, r.delay));
client.on("closed", (c) => console.log(c.code, c.byClient));
const stop = client.on("open", (o) => console.log(o.node, o.connection));
stop();
client.connect().send("hi");
client.send(new Uint8Array([1]));
const p: Record<string, Roomcast.Position> = client.positions;
const v: string = Roomcast.VERSION;
// @ts-expect-error unknown event
client.on("mesage", () => {});
// @ts-expect-error not sendable
client.send({ a: 1 });
