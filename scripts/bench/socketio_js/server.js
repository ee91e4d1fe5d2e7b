// The socket.io 4 peer for benchmarks: Node.js, @socket.io/redis-adapter, node-redis.
//
// The same room fan-out as roomcast_node.py and socketio_node.py: every client joins the
// room named in the query (?room=R, default "fanout") when it connects; a "msg" event
// is emitted to that room on every node through Redis. WebSocket transport only, no
// compression (unless --compression), written as socket.io's documentation shows.
//
// --sink: a "sink" event whose handler only counts; GET /stats gives that count
// (sink_messages), when it last moved (sink_last, CLOCK_MONOTONIC seconds like Python's
// time.perf_counter) and the worst event-loop lag since the last read (sink_lag), as
// scripts/bench/_sink.py does for the Python nodes.
"use strict";

const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

function parseArgs(argv) {
  const args = { port: 0, redis: "", pingInterval: 25, sink: false, compression: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--port") args.port = Number(argv[++i]);
    else if (a === "--redis") args.redis = argv[++i];
    else if (a === "--ping-interval") args.pingInterval = Number(argv[++i]);
    else if (a === "--sink") args.sink = true;
    else if (a === "--compression") args.compression = true;
    else throw new Error(`unknown argument ${a}`);
  }
  if (!args.port || !args.redis) throw new Error("--port and --redis are required");
  return args;
}

const now = () => Number(process.hrtime.bigint()) / 1e9;

const sink = { messages: 0, last: 0, lag: 0, seen: 0, still: 0, armed: false, due: 0 };

function armSink() {
  sink.still = 0;
  if (sink.armed) return;
  sink.armed = true;
  sink.due = now() + 0.005;
  setTimeout(tick, 5);
}

function tick() {
  const t = now();
  sink.lag = Math.max(sink.lag, t - sink.due);
  sink.due = t + 0.005;
  if (sink.messages !== sink.seen) {
    sink.seen = sink.messages;
    sink.last = t;
    sink.still = 0;
  } else {
    sink.still += 1;
  }
  if (sink.still < 400) setTimeout(tick, 5);
  else sink.armed = false;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const pub = createClient({ url: args.redis });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const rooms = new Map();
  const httpServer = http.createServer((req, res) => {
    if (req.url === "/stats") {
      const lag = sink.lag;
      sink.lag = 0;
      if (args.sink) armSink();
      res.writeHead(200, { "Content-Type": "application/json" });
      res.end(JSON.stringify({ broadcast_seconds: [], connections: rooms.size,
        sink_messages: sink.messages, sink_last: sink.last, sink_lag: lag }));
      return;
    }
    res.writeHead(404);
    res.end();
  });
  const pingMs = args.pingInterval * 1000;
  const io = new Server(httpServer, {
    transports: ["websocket"],
    perMessageDeflate: args.compression,
    httpCompression: false,
    pingInterval: pingMs,
    pingTimeout: Math.max(pingMs, 20000),
    adapter: createAdapter(pub, sub, { key: "bench-socketio" }),
  });
  io.on("connection", (socket) => {
    const room = socket.handshake.query.room || "fanout";
    rooms.set(socket.id, room);
    socket.join(room);
    socket.on("msg", (data) => {
      io.to(room).emit("msg", data);
    });
    if (args.sink) {
      socket.on("sink", () => {
        sink.messages += 1;
      });
    }
    socket.on("disconnect", () => rooms.delete(socket.id));
  });
  httpServer.listen({ port: args.port, host: "127.0.0.1", backlog: 4096 });
  const stop = () => {
    io.close();
    Promise.allSettled([pub.quit(), sub.quit()]).finally(() => process.exit(0));
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
