// Types for roomcast.js 0.1.0, the roomcast.v1 browser client (docs/protocol.md).
// The script is UMD: a global `Roomcast` in a page, `module.exports` for bundlers.

export = Roomcast;
export as namespace Roomcast;

declare namespace Roomcast {
  /** The client's version, the roomcast package's. */
  const VERSION: string;
  /** "roomcast.v1", the subprotocol offered and required. */
  const PROTOCOL: "roomcast.v1";
  /** "roomcast.since", the query parameter that declares positions. */
  const SINCE_PARAM: "roomcast.since";
  /** "roomcast.previous", the query parameter that names the connection reconnected from. */
  const PREVIOUS_PARAM: "roomcast.previous";
  /** 100: the protocol's limit on rooms in one roomcast.since. */
  const MAX_DECLARED_ROOMS: number;

  /** Where a client is in a room with history; compare offsets within one epoch only. */
  interface Position {
    epoch: string;
    offset: number;
  }

  /** The welcome: the connection is open (`reconnect`: not the first one). */
  interface OpenEvent {
    type: "open";
    node: string;
    connection: string;
    reconnect: boolean;
  }

  /** An application message: a string from a text frame, bytes from a binary one. */
  interface MessageEvent {
    type: "message";
    /** null for a send to this connection or a broadcast to everyone. */
    room: string | null;
    data: string | Uint8Array;
    /** null outside rooms with history. */
    position: Position | null;
  }

  /** The connection is in `room`; missed (or recent) messages came before this. */
  interface JoinedEvent {
    type: "joined";
    room: string;
    /** null when no position was declared; false: reload the room's state. */
    recovered: boolean | null;
    /** "epoch", "window", "limit", "unavailable" when recovered is false. */
    reason: string | null;
    replayed: number;
    /** null for a room without history. */
    position: Position | null;
  }

  interface LeftEvent {
    type: "left";
    room: string;
  }

  /** Messages of `room` were lost mid-session: reload its state, go on from here. */
  interface LostEvent {
    type: "lost";
    room: string;
    position: Position;
    reason: string | null;
  }

  /**
   * A refusal from the server (source "server"), or a problem the client saw
   * (source "client": bad_frame, subprotocol, refresh, connect).
   */
  interface ErrorEvent {
    type: "error";
    code: string;
    message: string;
    room: string | null;
    source: "server" | "client";
  }

  /** The connection ended (code/reason); reconnect number `attempt` in `delay` ms. */
  interface ReconnectingEvent {
    type: "reconnecting";
    attempt: number;
    delay: number;
    code: number | null;
    reason: string;
  }

  /** Closed for good: the last event. `byClient` when close() did it. */
  interface ClosedEvent {
    type: "closed";
    code: number | null;
    reason: string;
    byClient: boolean;
  }

  interface EventMap {
    open: OpenEvent;
    message: MessageEvent;
    joined: JoinedEvent;
    left: LeftEvent;
    lost: LostEvent;
    error: ErrorEvent;
    reconnecting: ReconnectingEvent;
    closed: ClosedEvent;
  }

  type State = "idle" | "connecting" | "open" | "reconnecting" | "closed";

  /** Positions an app may hand in, e.g. saved across a page load. */
  type InitialPositions = Record<string, [string, number] | Position>;

  interface BackoffOptions {
    /** First reconnect's largest delay, ms (500). */
    initialDelay?: number;
    /** Cap of the delay, ms (30000). */
    maxDelay?: number;
    /** Growth per attempt (2). */
    factor?: number;
    /** After 1001 from a stable connection: reconnect within 0..this ms (1000). */
    goingAwayDelay?: number;
    /** [0, 1) source for the jitter (Math.random). */
    random?: () => number;
  }

  interface ClientOptions extends BackoffOptions {
    /** The WebSocket class; the global one by default (Node 20 has none). */
    WebSocket?: new (url: string, protocols: string[]) => WebSocket;
    /** Base for a relative URL; location.href in a page. */
    base?: string;
    /** A connection up this long after its welcome resets the backoff, ms (5000). */
    stableAfter?: number;
    /** Rooms whose positions are kept and declared, 1..100 (100). */
    maxRooms?: number;
    /** Longest encoded roomcast.since value, characters (4096). */
    maxSinceLength?: number;
    positions?: InitialPositions;
    /**
     * Called after a 4001 close (token expired): the URL to reconnect to, absolute or
     * relative to the current one ("?token=new" replaces the query); null gives up.
     */
    refreshUrl?: () => Promise<string | null> | string | null;
    setTimeout?: (fn: () => void, ms: number) => unknown;
    clearTimeout?: (id: unknown) => void;
    /** Milliseconds clock (Date.now). */
    now?: () => number;
    /** Where a listener's exception goes (reportError, or a thrown timer). */
    reportError?: (error: unknown) => void;
  }

  /** A roomcast.v1 connection that reconnects and resumes until closed. */
  class Client {
    constructor(url: string | URL, options?: ClientOptions);
    readonly state: State;
    /** The app's URL (a connection adds roomcast.since and, on a reconnect, roomcast.previous). */
    readonly url: string;
    /** A copy of the last position per room: what a reconnect declares. */
    readonly positions: Record<string, Position>;
    /** True while a socket is open: send() works. */
    readonly connected: boolean;
    /** The node of the current (or last) connection. */
    node: string | null;
    /** The current (or last) connection's id. */
    connection: string | null;
    /** Messages dropped as duplicates. */
    duplicates: number;
    /** Listen; returns a function that stops listening. */
    on<K extends keyof EventMap>(type: K, listener: (event: EventMap[K]) => void): () => void;
    off<K extends keyof EventMap>(type: K, listener: (event: EventMap[K]) => void): void;
    /** Open the first connection (once per client). */
    connect(): this;
    /** Text for a string, binary for bytes; throws while not connected. */
    send(data: string | ArrayBuffer | ArrayBufferView | Blob): void;
    /** Close for good with 1000 or 3000-4999. */
    close(code?: number, reason?: string): void;
    /** Stop declaring a position for `room`. */
    forget(room: string): void;
  }

  /** The last position per room, bounded, least recently updated out. */
  class PositionBook {
    constructor(maxRooms?: number, initial?: InitialPositions);
    readonly size: number;
    get(room: string): Position | null;
    snapshot(): Record<string, Position>;
    set(room: string, position: Position): void;
    /** False for a duplicate, else the position is held. */
    accept(room: string, position: Position): boolean;
    forget(room: string): void;
    since(maxLength: number): string | null;
  }

  /** Capped exponential backoff with full jitter, ms. */
  class Backoff {
    constructor(options?: BackoffOptions);
    initialDelay: number;
    maxDelay: number;
    factor: number;
    goingAwayDelay: number;
    attempt: number;
    ceiling(attempt: number): number;
    next(code: number | null): [number, number];
    stable(): void;
  }

  type AnyEvent = EventMap[keyof EventMap];

  function closeAction(code: number | null, canRefresh: boolean): "final" | "refresh" | "retry";
  function parseText(text: string): AnyEvent[];
  function parseBinary(frame: ArrayBuffer | ArrayBufferView): AnyEvent[];
}
