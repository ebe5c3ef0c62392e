// Orbited browser client: connect with a token, pick the best transport and fall back,
// reconnect (quickly once after losing a connection that worked, spread by the node's
// hint, then with exponential backoff and jitter), resume from the last seen position so
// no event is lost or delivered twice. Payloads are parsed with JSON.parse, never
// evaluated. Protocol: docs/protocol.md; API: docs/client.md.
//
// This file is an ES module (served as /orbited/client.mjs); the node also serves it as a
// classic script (/orbited/client.js) that defines window.Orbited.

export const TRANSPORTS = ["websocket", "sse", "longpoll", "iframe"];

// Close codes after which reconnecting cannot help (docs/protocol.md, "Errors"): 4003
// "displaced" (the user's per-user connection limit closed this, its oldest connection)
// and 4429 "user_limit" (the limit refused this new one) end the client like 4001.
const FATAL_CLOSE = {
  4001: "replaced", 4003: "displaced", 4400: "bad_request", 4403: "forbidden", 4429: "user_limit",
};

/** Why a WebSocket close code ends the client ("token": fetch a new one), or null to
 *  reconnect with backoff and resume: 4000 reconnect, 4002 too slow a reader, network
 *  closes. 4503 is "overloaded": not an end, but no transport fallback either — the same
 *  transport is tried again after the backoff (every transport would be refused alike). */
export function closeFatal(code) {
  if (code === 4503) return "overloaded";
  return FATAL_CLOSE[code] || (code === 4401 ? "token" : null);
}

/** Seconds of an HTTP response's Retry-After (delta-seconds form), 0 if none or odd. */
export function retryAfter(response) {
  const value = Number.parseInt(response.headers.get("retry-after") || "", 10);
  return Number.isFinite(value) && value > 0 ? value : 0;
}

/** Delay before reconnect attempt `attempt` (0-based): exponential, capped, "equal jitter". */
export function backoffDelay(attempt, { base = 500, max = 30000, random = Math.random } = {}) {
  const ceiling = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return ceiling / 2 + random() * (ceiling / 2);
}

// Reconnecting after losing a connection that worked (docs/client.md, "What it does on
// trouble"): HaloD moves a dead node's routes once its probe finds the node's ports
// refusing (≈ 100 ms is the aim), so the first retry comes FIRST_RETRY ms + a random part
// of the node's spread hint (DEFAULT_SPREAD ms without one) to land on the new owner; a
// connection lost less than STABLE ms after its hello gets that only if the previous one
// lasted longer (a node that drops browsers at once gets them back at the backoff pace).
export const FIRST_RETRY = 100;
export const DEFAULT_SPREAD = 150;
export const STABLE = 1000;

/** The spread hint of a hello or ping frame (seconds) in ms, at most `max`; null if the
 *  frame has none or it is not a number ≥ 0. */
export function spreadHint(value, max = 30000) {
  return typeof value === "number" && Number.isFinite(value) && value >= 0 ? Math.min(value * 1000, max) : null;
}

/** Delay before the first reconnect after losing a connection that worked. */
export function firstRetryDelay(spread, { firstRetry = FIRST_RETRY, random = Math.random } = {}) {
  return firstRetry + random() * spread;
}

/** How many delivered event ids a client remembers to drop resends (docs/client.md). */
export const DEDUP_WINDOW = 1024;

/** Resume bookkeeping: which events are new, and the position to resume from. Also the
 *  ids of the last `window` events delivered, for the whole page's life (memory only):
 *  after a node crash the web app resends what was not acknowledged to the route's new
 *  owner, on a new stream, and an event seen before is dropped instead of delivered twice.
 *  And the seqs skipped without a `gap` frame: every seq between two events the page gets
 *  was either announced lost by a `gap`, or replaced by a later latest-value event
 *  (docs/protocol.md, "Mailboxes and resume"). */
export class Resume {
  constructor(position = null, { window = DEDUP_WINDOW } = {}) {
    this.stream = null;
    this.seq = 0;
    this.window = window;
    this.ids = new Set(); // insertion order: the oldest first
    this.gaps = []; // [from, to] of gap frames since the last event: not "replaced"
    this.hash = null; // the hash version of the last hello (1 when a node does not say)
    const match = typeof position === "string" && /^(.+):(\d+)$/.exec(position);
    if (match) {
      this.stream = match[1];
      this.seq = Number(match[2]);
    }
  }

  /** The `last` parameter for the next connection, or null for a fresh one. */
  position() {
    return this.stream === null ? null : `${this.stream}:${this.seq}`;
  }

  /** The seqs after the position and before `seq` that no gap frame announced: replaced. */
  _skipped(seq) {
    const skipped = [];
    for (let s = this.seq + 1; s < seq; s++) {
      if (!this.gaps.some(([from, to]) => from <= s && s <= to)) skipped.push(s);
    }
    this.gaps = [];
    return skipped;
  }

  /** Digest one frame; returns {kind, data?} where kind is what the client should do. */
  handle(frame) {
    switch (frame.type) {
      case "hello": {
        const reset = frame.reset || (this.stream !== null && frame.stream !== this.stream);
        if (reset || frame.stream !== this.stream) {
          this.stream = frame.stream;
          this.seq = frame.seq || 0; // a fresh page starts after what was acknowledged
        }
        this.gaps = [];
        this.hash = Number.isInteger(frame.hash) ? frame.hash : 1;
        return { kind: "hello", reset, keepalive: frame.keepalive, spread: frame.spread, hash: this.hash };
      }
      case "event": {
        if (frame.seq <= this.seq) return { kind: "duplicate" };
        const skipped = this._skipped(frame.seq);
        this.seq = frame.seq; // a dropped resend advances the position too: it gets acked
        const result = { kind: "message", data: frame.data, seq: frame.seq };
        if (typeof frame.latest === "string") {
          result.latest = frame.latest;
          result.replaced = Number.isInteger(frame.replaced) ? frame.replaced : 0;
        }
        if (skipped.length) result.skipped = skipped;
        const id = frame.id;
        if (typeof id !== "string" || this.window <= 0) return result; // older node: no id
        result.id = id;
        if (this.ids.has(id)) {
          result.kind = "duplicate";
          delete result.data;
          return result;
        }
        this.ids.add(id);
        if (this.ids.size > this.window) this.ids.delete(this.ids.values().next().value);
        return result;
      }
      case "gap":
        this.gaps.push([frame.from, frame.to]);
        return { kind: "gap", from: frame.from, to: frame.to };
      case "reconnect": {
        const result = { kind: "reconnect", reason: frame.reason };
        if (Number.isInteger(frame.route)) result.route = frame.route;
        if (frame.spread !== undefined) result.spread = frame.spread;
        return result;
      }
      case "ping":
        return { kind: "ping", spread: frame.spread };
      case "replaced":
        return { kind: "replaced" };
      case "closed":
        return { kind: "closed", code: frame.code, reason: String(frame.reason ?? frame.code) };
      default:
        return { kind: "ignore" }; // unknown frame types are for newer clients
    }
  }
}

/** N, the cluster's route count unless HaloD says otherwise (orbited.core.routes'
 * DEFAULT_ROUTES; tests/integration/test_js_unit.py checks they agree). */
export const DEFAULT_ROUTES = 24;

/** The hash version clients use unless told otherwise (orbited.core.hashing's
 * DEFAULT_HASH_VERSION): 2, user affinity. */
export const HASH_VERSION = 2;

/** SHA-256 over each part as u32 big-endian UTF-8 length + UTF-8 bytes; the first 8 bytes
 * of the digest as an unsigned big-endian integer, mod routes, plus 1. */
async function hashRoute(parts, routes) {
  if (!Number.isInteger(routes) || routes < 1) throw new RangeError(`routes must be an integer >= 1, not ${routes}`);
  const encoded = parts.map((part) => new TextEncoder().encode(part));
  const bytes = new Uint8Array(encoded.reduce((n, p) => n + 4 + p.length, 0));
  const view = new DataView(bytes.buffer);
  let offset = 0;
  for (const part of encoded) {
    view.setUint32(offset, part.length);
    bytes.set(part, offset + 4);
    offset += 4 + part.length;
  }
  const digest = new DataView(await crypto.subtle.digest("SHA-256", bytes));
  return Number(digest.getBigUint64(0) % BigInt(routes)) + 1;
}

/**
 * The route (1..routes) of a connection key [user, session, location] (docs/hashing.md).
 * Version 2 (the default, user affinity): the hash of the user part alone, so every key
 * of a user has the same route, and so has a wildcard recipient ["alice", "*", "*"].
 * Version 1: the hash of all three parts (a wildcard has no route). Async (WebCrypto).
 */
export async function routeOf(key, routes = DEFAULT_ROUTES, version = HASH_VERSION) {
  if (version === 2) return hashRoute([key[0]], routes);
  if (version === 1) {
    if (key[1] === "*" || key[2] === "*") throw new RangeError("wildcards need hash_version 2");
    return hashRoute(key, routes);
  }
  throw new RangeError(`hash version must be 1 or 2, not ${version}`);
}

/** The route (1..routes) of every key of `user` under hash version 2. */
export async function routeOfUser(user, routes = DEFAULT_ROUTES) {
  return hashRoute([user], routes);
}

/** Build a transport URL on the node. */
export function transportUrl(base, path, params) {
  const url = new URL(`/orbited/${path}`, base);
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined) url.searchParams.set(k, v);
  return url.toString();
}

// -- transports: each calls sink.frame(obj), sink.up(), sink.down(reason, fatal) -------

function websocketTransport(base, params, sink) {
  const url = transportUrl(base.replace(/^http/, "ws"), "ws", params);
  const ws = new WebSocket(url);
  let acked = 0;
  let pending = 0;
  const ackTimer = setInterval(() => flushAck(), 1000);
  function flushAck() {
    if (pending > acked && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "ack", seq: pending }));
      acked = pending;
    }
  }
  ws.onmessage = (e) => {
    const frame = JSON.parse(e.data);
    sink.frame(frame);
    if (frame.type === "event") {
      pending = frame.seq;
      if (pending - acked >= 50) flushAck();
    }
  };
  ws.onclose = (e) => {
    clearInterval(ackTimer);
    const fatal = closeFatal(e.code);
    // 4003/4429: the detail is the node's reason ("user_limit: at most 3 connections per
    // user"), as the closed frame and HTTP 429 of the other transports give it.
    const user = e.code === 4003 || e.code === 4429;
    sink.down(user ? e.reason || fatal : `websocket closed ${e.code} ${e.reason}`, fatal);
  };
  return { close: () => { clearInterval(ackTimer); ws.onclose = null; ws.close(); } };
}

// EventSource and iframes cannot show an HTTP status: after a failure before any frame,
// ask the long-poll URL (timeout=0) whether the token is the problem, or the node is
// overloaded. Answers [fatal, retryAfter seconds, what the poll said (or "")].
async function probeFatal(base, params) {
  try {
    const response = await fetch(transportUrl(base, "poll", { ...params, timeout: 0 }), { cache: "no-store" });
    const status = response.status;
    let said = "";
    if (!response.ok) {
      let code = "";
      try { code = (await response.json()).error.code; } catch (_) { /* not JSON */ }
      said = `poll HTTP ${status} ${code}`.trim();
    }
    if (status === 401) return ["token", 0, said];
    if (status === 429) return ["user_limit", 0, said];
    if (status === 400 || status === 403) return [`http ${status}`, 0, said];
    if (status === 503) return ["overloaded", retryAfter(response), said];
  } catch (_) { /* unreachable: not fatal */ }
  return [null, 0, ""];
}

/** The `detail` of a failed SSE or iframe transport: what its probe poll said, if any. */
function probeDetail(what, fatal, said) {
  if (fatal === "user_limit") return fatal;
  return said ? `${what} (${said})` : what;
}

/** The `exp` claim of a JWT (seconds since the epoch), or null. */
function tokenExpiry(token) {
  try {
    const part = String(token).split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(b64.padEnd(Math.ceil(b64.length / 4) * 4, "="))).exp;
    return typeof exp === "number" ? exp : null;
  } catch (_) {
    return null;
  }
}

// SSE and iframe streams have no way back: acknowledge by POST /orbited/ack, every
// second or every 50 events, so the node frees memory and acknowledged-mode sends finish.
// The stream outlives its token: `ackToken()` gives the token to ack with (a fresh one
// from the page's token function once the stream's is about to expire).
function httpAcker(base, params, ackToken = () => params.token) {
  let acked = 0;
  let pending = 0;
  let stream = null;
  const flush = () => {
    if (pending <= acked) return;
    const seq = pending;
    acked = seq;
    const last = `${stream}:${seq}`;
    // the stream too: an ack that arrives after a reconnect must not confirm a new stream
    // no-cors: a simple POST whose answer is never read, so it needs no CORS set-up
    Promise.resolve(ackToken())
      .then((token) => fetch(transportUrl(base, "ack", { token, last }),
                             { method: "POST", mode: "no-cors", cache: "no-store", keepalive: true }))
      .catch(() => { /* the next resume acknowledges too */ });
  };
  const timer = setInterval(flush, 1000);
  return {
    frame(frame) {
      if (frame.type === "hello") {
        if (frame.stream !== stream) { stream = frame.stream; acked = pending = 0; }
      } else if (frame.type === "event") {
        pending = frame.seq;
        if (pending - acked >= 50) flush();
      }
    },
    stop() { clearInterval(timer); },
  };
}

function sseTransport(base, params, sink) {
  const source = new EventSource(transportUrl(base, "sse", params));
  const acker = httpAcker(base, params, sink.ackToken);
  let framed = false;
  source.onmessage = (e) => {
    framed = true;
    const frame = JSON.parse(e.data);
    sink.frame(frame);
    acker.frame(frame);
  };
  // EventSource would reconnect on its own; we do it ourselves for backoff and fallback.
  source.onerror = async () => {
    source.close();
    acker.stop();
    const [fatal, wait, said] = framed ? [null, 0, ""] : await probeFatal(base, params);
    sink.down(probeDetail("sse error", fatal, said), fatal, wait);
  };
  return { close: () => { acker.stop(); source.close(); } };
}

function longpollTransport(base, params, sink) {
  let stopped = false;
  let controller = null;
  let last = params.last;
  let first = true;
  // Seconds the node may hold a poll: 25, or its keepalive if shorter. A held poll gets no
  // ping, and the client's watchdog ends a link silent for 2x keepalive.
  let hold = 25;
  (async () => {
    while (!stopped) {
      controller = new AbortController();
      let response;
      try {
        response = await fetch(transportUrl(base, "poll", { ...params, last, timeout: first ? 0 : hold }),
                               { signal: controller.signal, cache: "no-store" });
      } catch (err) {
        if (!stopped) sink.down(`poll failed: ${err}`, null);
        return;
      }
      if (!response.ok) {
        let code = "";
        try { code = (await response.json()).error.code; } catch (_) { /* not JSON */ }
        const status = response.status;
        if (status === 429) { // the user's connection limit (docs/protocol.md, "Errors")
          if (!stopped) sink.down("user_limit", "user_limit");
          return;
        }
        const fatal = status === 401 ? "token" : status === 503 ? "overloaded" : status >= 500 ? null : code || "http";
        if (!stopped) sink.down(`poll HTTP ${status} ${code}`, fatal, retryAfter(response));
        return;
      }
      let frames;
      try { frames = await response.json(); } catch (err) { if (!stopped) sink.down("poll body", null); return; }
      if (stopped) return;
      first = false;
      for (const frame of frames) {
        if (stopped) return;
        if (frame.type === "hello" && frame.keepalive > 0) hold = Math.min(25, frame.keepalive);
        sink.frame(frame);
      }
      last = sink.position();
    }
  })();
  return { close: () => { stopped = true; if (controller) controller.abort(); } };
}

// How long the page waits, after an iframe document that posted frames has loaded, for its
// end message (a document of an older node has none).
const IFRAME_END_WAIT = 500;

function iframeTransport(base, params, sink) {
  const nodeOrigin = new URL(base).origin;
  const frame = document.createElement("iframe");
  frame.style.display = "none";
  frame.src = transportUrl(base, "iframe", { ...params, origin: window.location.origin });
  let up = false;
  let endTimer = null;
  const onMessage = (e) => {
    if (e.source !== frame.contentWindow || e.origin !== nodeOrigin || typeof e.data !== "string") return;
    if (e.data === "") { ended(); return; } // the document's end, after its last frame
    up = true;
    const parsed = JSON.parse(e.data);
    sink.frame(parsed);
    acker.frame(parsed);
  };
  // The document ended (byte cap, node shutdown, cut, error page): reconnect, unless a
  // frame said otherwise (closed, replaced).
  const ended = async () => {
    cleanup();
    const [fatal, wait, said] = up ? [null, 0, ""] : await probeFatal(base, params);
    sink.down(probeDetail("iframe document ended", fatal, said), fatal, wait);
  };
  // The element's load event may come before the messages the document posted last (a
  // `closed` frame just before the end): the node's document posts "" once it has
  // loaded, after those, so wait for that.
  const onLoad = () => {
    if (!up) ended(); // an error page, or nothing came: no frames to wait for
    else if (endTimer === null) endTimer = setTimeout(ended, IFRAME_END_WAIT);
  };
  const acker = httpAcker(base, params, sink.ackToken);
  function cleanup() {
    clearTimeout(endTimer);
    acker.stop();
    window.removeEventListener("message", onMessage);
    frame.removeEventListener("load", onLoad);
    frame.remove();
  }
  window.addEventListener("message", onMessage);
  frame.addEventListener("load", onLoad);
  (document.body || document.documentElement).appendChild(frame);
  return { close: cleanup };
}

const FACTORIES = { websocket: websocketTransport, sse: sseTransport, longpoll: longpollTransport, iframe: iframeTransport };

/**
 * new OrbitedClient("https://push.example.com", { token, transports, onMessage, onState })
 * base: the node's URL, or a function returning it (or a Promise of it), called at the
 * first connect and again after a `rehash` reconnect frame. token: a string, or a
 * function returning a string or a Promise of one (called again after a token error).
 * States: "connecting", "open", "reconnecting", "closed".
 */
export class OrbitedClient {
  constructor(base, options = {}) {
    this._baseFn = typeof base === "function" ? base : null;
    this.base = this._baseFn ? null : base;
    this._relocate = null; // {route, reason} of a reconnect frame that asks for a new base
    this.hashVersion = null; // the node's hash version, from its hello
    this.options = options;
    this.transports = options.transports || TRANSPORTS;
    this.factories = options.factories || FACTORIES;
    this.resume = new Resume(options.position, { window: options.dedupWindow ?? DEDUP_WINDOW });
    this.state = "closed";
    this.transport = null;
    this.attempt = 0;
    this.index = 0;
    this.listeners = { message: [], state: [], gap: [], reset: [], skip: [] };
    if (options.onMessage) this.on("message", options.onMessage);
    if (options.onState) this.on("state", options.onState);
    this._current = null;
    this._timer = null;
    this._watchdog = null;
    this._keepalive = 25;
    this._token = null;
    this._ackRefresh = null; // a token refresh for acks under way
    this._spread = null; // the node's spread hint in ms (hello, ping), null: none
    this._helloAt = null; // when the current connection got its first hello
    this._shortQuick = false; // the last quick reconnect followed a connection < STABLE
  }

  on(name, fn) { this.listeners[name].push(fn); return this; }

  _emit(name, ...args) {
    for (const fn of this.listeners[name]) {
      try { fn(...args); } catch (err) { console.error("orbited: listener failed", err); }
    }
  }

  _setState(state, detail) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", state, { transport: this.transport, detail });
  }

  /** The position to resume from ("<stream>:<seq>"), e.g. to keep in sessionStorage. */
  get position() { return this.resume.position(); }

  connect() {
    if (this.state !== "closed") return this;
    this._setState("connecting");
    this._open();
    return this;
  }

  close() {
    this._generation = null;
    this._opening = null;
    clearTimeout(this._timer);
    clearTimeout(this._watchdog);
    if (this._current) this._current.close();
    this._current = null;
    this._setState("closed");
  }

  /** The token to acknowledge with over HTTP (SSE, iframe): the stream's own, or, with a
   *  token function, a fresh one once it expires within a minute (the node refuses an
   *  expired token, also for an ack, and a no-cors POST cannot see the refusal). */
  async _ackToken(token) {
    if (typeof this.options.token !== "function") return token;
    const current = this._token ?? token;
    const exp = tokenExpiry(current);
    if (exp === null || exp - Date.now() / 1000 > 60) return current;
    if (!this._ackRefresh) {
      this._ackRefresh = Promise.resolve(this.options.token())
        .then((fresh) => { this._token = fresh; return fresh; }, () => current)
        .finally(() => { this._ackRefresh = null; });
    }
    return this._ackRefresh;
  }

  async _getToken(refresh) {
    const token = this.options.token;
    if (typeof token === "function") {
      if (refresh || this._token === null) this._token = await token();
      return this._token;
    }
    return token;
  }

  /** The base URL for the next connection: after a reconnect frame with a `route`, what
   *  options.locate(route, info) answers; at the first connect and after a `rehash`, what
   *  the base function answers (a plain base stays). */
  async _getBase() {
    const where = this._relocate;
    if (where && where.route !== undefined && typeof this.options.locate === "function") {
      this.base = await this.options.locate(where.route, { reason: where.reason, base: this.base });
    } else if (this._baseFn && (this.base === null || (where && where.reason === "rehash"))) {
      this.base = await this._baseFn();
    }
    this._relocate = null;
    return this.base;
  }

  async _open(refreshToken = false) {
    const name = this.transports[this.index % this.transports.length];
    this.transport = name;
    this._helloAt = null;
    const opening = {};
    this._opening = opening;
    let token;
    if (this.base === null || this._relocate) {
      try {
        await this._getBase();
      } catch (err) {
        if (this._opening !== opening || this.state === "closed") return;
        // The web app could not say where to connect: ask again later (same transport).
        this._setState("reconnecting", `base: ${err}`);
        this._timer = setTimeout(() => this._open(refreshToken), backoffDelay(this.attempt++, this.options));
        return;
      }
      if (this._opening !== opening || this.state === "closed") return;
    }
    try {
      token = await this._getToken(refreshToken);
    } catch (err) {
      if (this._opening !== opening || this.state === "closed") return;
      // The web app could not give a token: try again later, on the same transport.
      this._setState("reconnecting", `token: ${err}`);
      this._timer = setTimeout(() => this._open(true), backoffDelay(this.attempt++, this.options));
      return;
    }
    if (this._opening !== opening || this.state === "closed") return; // closed or superseded
    let gotHello = false;
    const client = this;
    const generation = {};
    this._generation = generation;
    const sink = {
      up() {},
      position: () => client.resume.position(),
      frame(frame) {
        if (client._generation !== generation) return;
        client._feed();
        const r = client.resume.handle(frame);
        switch (r.kind) {
          case "hello":
            gotHello = true;
            if (client._helloAt === null) client._helloAt = Date.now();
            client._spread = spreadHint(r.spread, client._max());
            client.attempt = 0;
            client._failures = 0;
            client._tokenRetried = false;
            client._established = true;
            client._keepalive = r.keepalive || 25;
            client.hashVersion = r.hash;
            client._feed();
            if (r.reset) client._emit("reset");
            client._setState("open");
            break;
          case "message":
          case "duplicate":
            // Seqs skipped without a gap frame were replaced by a later latest-value event.
            if (r.skipped) client._emit("skip", r.skipped, "replaced");
            if (r.kind === "message") {
              client._emit("message", r.data, { seq: r.seq, id: r.id, latest: r.latest, replaced: r.replaced ?? 0,
                                                transport: client.transport });
            }
            break;
          case "gap":
            client._emit("gap", r.from, r.to);
            break;
          case "reconnect":
            // After hello a planned move (route moved, node stopping): come back at once,
            // spread by the hint. Before hello (a node that does not own the key's route
            // any more, or is stopping): this attempt failed, back off on this transport.
            if (r.route !== undefined || r.reason === "rehash") client._relocate = { route: r.route, reason: r.reason };
            {
              // A planned move's own hint, counted over the browsers that move.
              const spread = spreadHint(r.spread, client._max());
              if (spread !== null) client._spread = spread;
            }
            client._drop(`reconnect: ${r.reason}`, null, true, 0, gotHello);
            break;
          case "ping": {
            const spread = spreadHint(r.spread, client._max());
            if (spread !== null) client._spread = spread;
            break;
          }
          case "replaced":
            client._drop("replaced: a newer connection took this key", "replaced", true);
            break;
          case "closed":
            // The node ended this connection for good (4003 displaced, 4429 user_limit).
            client._drop(r.reason, "closed", true);
            break;
          default:
        }
      },
      down(reason, fatal, retryAfterSeconds = 0) {
        if (client._generation !== generation) return;
        client._drop(reason, fatal, gotHello, retryAfterSeconds);
      },
      ackToken: () => client._ackToken(token),
    };
    const params = { token, last: this.resume.position() };
    try {
      this._current = this.factories[name](this.base, params, sink);
    } catch (err) {
      sink.down(`cannot start ${name}: ${err}`, null);
      return;
    }
    this._feed(10000); // time to get the hello frame
  }

  // The watchdog: no frame for 2x keepalive (or no hello in time) means the link is dead.
  _feed(ms) {
    clearTimeout(this._watchdog);
    if (this.state === "closed") return;
    this._watchdog = setTimeout(() => this._drop("timeout", null, this.state === "open"),
                                ms || this._keepalive * 2000);
  }

  _max() { return this.options.max ?? 30000; }

  _drop(reason, fatal, worked, retryAfterSeconds = 0, planned = false) {
    this._generation = null;
    clearTimeout(this._watchdog);
    if (this._current) { const c = this._current; this._current = null; c.close(); }
    if (this.state === "closed") return;
    if (fatal === "overloaded") {
      // The node refuses new connections for now (503 / 4503): another transport would
      // be refused too, so keep this one and wait the backoff, at least Retry-After
      // (capped at 5 minutes), so that a crowd of clients does not hammer it.
      const wait = Math.min(retryAfterSeconds, 300) * 1000;
      this._setState("reconnecting", reason);
      this._timer = setTimeout(() => this._open(), Math.max(backoffDelay(this.attempt++, this.options), wait));
      return;
    }
    if (fatal === "token" && typeof this.options.token === "function" && !this._tokenRetried) {
      this._tokenRetried = true;
      this._setState("reconnecting", reason);
      this._timer = setTimeout(() => this._open(true), backoffDelay(0, this.options));
      return;
    }
    if (fatal) {
      this._setState("closed", reason);
      return;
    }
    this._retry(reason, worked, planned);
  }

  /** May the reconnect after losing the current connection be quick (first retry,
   *  planned move)? Only if it got hello, and lasted STABLE ms or followed one that did. */
  _quick() {
    if (this._helloAt === null) return false;
    if (Date.now() - this._helloAt >= STABLE) {
      this._shortQuick = false;
      return true;
    }
    if (this._shortQuick) return false;
    this._shortQuick = true;
    return true;
  }

  _retry(reason, worked, planned = false) {
    const quick = worked && this._quick();
    this._helloAt = null;
    // A transport that never got as far as hello is skipped: the next one is tried at once.
    // Once one has worked, it is kept through a few failed attempts (the node may just be
    // restarting) before falling back again.
    this._failures = worked ? 0 : (this._failures || 0) + 1;
    if (!worked && !(this._established && this._failures <= 3)) {
      this.index += 1;
      if (this.index % this.transports.length !== 0) {
        this._setState("reconnecting", reason);
        this._timer = setTimeout(() => this._open(), 0);
        return;
      }
    }
    // Quick: the first retry after a loss (or at once after a planned move) does not
    // count as a backoff attempt; if it fails, the backoff starts from its first delay.
    const spread = this._spread ?? Math.min(this.options.spread ?? DEFAULT_SPREAD, this._max());
    const random = this.options.random || Math.random;
    let delay;
    if (quick && planned) delay = random() * spread;
    else if (quick) delay = firstRetryDelay(spread, { firstRetry: this.options.firstRetry ?? FIRST_RETRY, random });
    else delay = backoffDelay(this.attempt++, this.options);
    this._setState("reconnecting", reason);
    this._timer = setTimeout(() => this._open(), delay);
  }
}
