// Unit tests for the client's pure logic, run with Node's built-in test runner:
//   node --test js/test/
import { test } from "node:test";
import assert from "node:assert/strict";
import { backoffDelay, closeFatal, OrbitedClient, Resume, retryAfter, transportUrl } from "../orbited.js";

test("backoff grows exponentially, is capped, and jitters within [ceiling/2, ceiling]", () => {
  const low = (a) => backoffDelay(a, { base: 100, max: 5000, random: () => 0 });
  const high = (a) => backoffDelay(a, { base: 100, max: 5000, random: () => 1 });
  assert.deepEqual([0, 1, 2, 3].map(high), [100, 200, 400, 800]);
  assert.deepEqual([0, 1, 2, 3].map(low), [50, 100, 200, 400]);
  assert.equal(high(20), 5000);
  assert.equal(high(1000), 5000);
  const seen = new Set(Array.from({ length: 50 }, () => backoffDelay(3, { base: 100 })));
  assert.ok(seen.size > 40, "random jitter spreads retries");
});

test("resume delivers each event once, in order, and tracks the position", () => {
  const r = new Resume();
  assert.equal(r.position(), null);
  assert.equal(r.handle({ type: "hello", stream: "ep.1", reset: false }).kind, "hello");
  assert.deepEqual(r.handle({ type: "event", seq: 1, data: "a" }), { kind: "message", data: "a", seq: 1 });
  assert.equal(r.handle({ type: "event", seq: 2, data: "b" }).kind, "message");
  assert.equal(r.position(), "ep.1:2");
  // A reconnect that replays already-seen events (e.g. unacknowledged) delivers them once.
  assert.equal(r.handle({ type: "hello", stream: "ep.1", reset: false }).reset, false);
  assert.equal(r.handle({ type: "event", seq: 2, data: "b" }).kind, "duplicate");
  assert.equal(r.handle({ type: "event", seq: 3, data: "c" }).kind, "message");
});

test("a new stream is a reset and restarts sequence numbers", () => {
  const r = new Resume();
  r.handle({ type: "hello", stream: "ep.1", reset: false });
  r.handle({ type: "event", seq: 5, data: 5 });
  const hello = r.handle({ type: "hello", stream: "other.1", reset: true });
  assert.equal(hello.reset, true);
  assert.equal(r.handle({ type: "event", seq: 1, data: "new" }).kind, "message");
  assert.equal(r.position(), "other.1:1");
});

test("gap, reconnect, ping and unknown frames", () => {
  const r = new Resume();
  assert.deepEqual(r.handle({ type: "gap", from: 3, to: 7 }), { kind: "gap", from: 3, to: 7 });
  assert.equal(r.handle({ type: "reconnect", reason: "x" }).kind, "reconnect");
  assert.equal(r.handle({ type: "ping" }).kind, "ping");
  assert.equal(r.handle({ type: "future-frame" }).kind, "ignore");
});

test("close codes: slow reader (4002) and reconnect (4000) retry; overload (4503) waits; others end", () => {
  for (const code of [1000, 1006, 4000, 4002]) assert.equal(closeFatal(code), null, `${code}`);
  assert.equal(closeFatal(4503), "overloaded");
  assert.equal(closeFatal(4001), "replaced");
  assert.equal(closeFatal(4400), "bad_request");
  assert.equal(closeFatal(4401), "token");
  // The per-user connection limit (docs/protocol.md, "Errors"): never reconnect.
  assert.equal(closeFatal(4003), "displaced");
  assert.equal(closeFatal(4429), "user_limit");
});

test("transport URLs carry token and position, skip empty params", () => {
  assert.equal(transportUrl("http://n:8000", "poll", { token: "a b", last: null }),
               "http://n:8000/orbited/poll?token=a+b");
  assert.equal(transportUrl("ws://n:8000/", "ws", { token: "t", last: "e.1:3" }),
               "ws://n:8000/orbited/ws?token=t&last=e.1%3A3");
});

// A fake transport the test drives by hand.
function fakeFactories(log) {
  const make = (name) => (base, params, sink) => {
    const t = { name, params, sink, closed: false, close() { this.closed = true; } };
    log.push(t);
    return t;
  };
  return { websocket: make("websocket"), sse: make("sse"), longpoll: make("longpoll"), iframe: make("iframe") };
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 5));

test("falls back to the next transport when one fails before hello", async () => {
  const log = [];
  const states = [];
  const client = new OrbitedClient("http://n", { token: "t", factories: fakeFactories(log), base: 1, max: 2,
                                                  onState: (s) => states.push(s) });
  client.connect();
  await tick();
  log[0].sink.down("blocked", null);
  await tick();
  assert.equal(log[1].name, "sse");
  log[1].sink.frame({ type: "hello", stream: "e.1", reset: false, keepalive: 25 });
  assert.equal(client.state, "open");
  assert.equal(client.transport, "sse");
  client.close();
  assert.deepEqual(states, ["connecting", "reconnecting", "open", "closed"]);
});

// firstRetry: 0 and max: 2 keep the quick first retry (reconnect.test.mjs) within a tick.
test("reconnects the working transport with its position after a drop, no duplicates", async () => {
  const log = [];
  const got = [];
  const client = new OrbitedClient("http://n", { token: "t", factories: fakeFactories(log), base: 1, max: 2,
                                                  firstRetry: 0, onMessage: (d) => got.push(d) });
  client.connect();
  await tick();
  const first = log[0];
  first.sink.frame({ type: "hello", stream: "e.1", reset: false, keepalive: 25 });
  first.sink.frame({ type: "event", seq: 1, data: "a" });
  first.sink.frame({ type: "event", seq: 2, data: "b" });
  first.sink.down("reset by peer", null);
  await tick();
  const second = log[1];
  assert.equal(second.name, "websocket");
  assert.equal(second.params.last, "e.1:2");
  second.sink.frame({ type: "hello", stream: "e.1", reset: false, keepalive: 25 });
  second.sink.frame({ type: "event", seq: 2, data: "b" });
  second.sink.frame({ type: "event", seq: 3, data: "c" });
  first.sink.frame({ type: "event", seq: 9, data: "stale" }); // from the dead transport
  assert.deepEqual(got, ["a", "b", "c"]);
  client.close();
});

test("a reconnect frame reconnects; a 'replaced' close does not", async () => {
  const log = [];
  const client = new OrbitedClient("http://n", { token: "t", factories: fakeFactories(log), base: 1, max: 2 });
  client.connect();
  await tick();
  log[0].sink.frame({ type: "hello", stream: "e.1", reset: false });
  log[0].sink.frame({ type: "reconnect", reason: "route moved" });
  assert.ok(log[0].closed);
  await tick();
  assert.equal(log.length, 2);
  log[1].sink.frame({ type: "hello", stream: "e.1", reset: false });
  log[1].sink.down("websocket closed 4001", "replaced");
  await tick();
  assert.equal(client.state, "closed");
  assert.equal(log.length, 2);
});

test("a token error fetches a new token once", async () => {
  const log = [];
  let issued = 0;
  const client = new OrbitedClient("http://n", { token: async () => `tok${++issued}`, factories: fakeFactories(log), base: 1, max: 2 });
  client.connect();
  await tick();
  assert.equal(log[0].params.token, "tok1");
  log[0].sink.down("expired", "token");
  await tick();
  assert.equal(log[1].params.token, "tok2");
  log[1].sink.down("expired", "token");
  await tick();
  assert.equal(client.state, "closed");
});

test("a replaced frame ends the client without reconnecting", async () => {
  const log = [];
  const client = new OrbitedClient("http://n", { token: "t", factories: fakeFactories(log), base: 1, max: 2 });
  client.connect();
  await tick();
  log[0].sink.frame({ type: "hello", stream: "e.1", reset: false });
  log[0].sink.frame({ type: "replaced" });
  await tick();
  assert.equal(client.state, "closed");
  assert.equal(log.length, 1);
});

test("a reset hello on the same stream restarts sequence numbers; a given position resumes", () => {
  const r = new Resume("e.1:7");
  assert.equal(r.position(), "e.1:7");
  r.handle({ type: "hello", stream: "e.1", reset: true });
  assert.equal(r.handle({ type: "event", seq: 1, data: "x" }).kind, "message");
});

test("close() during a token fetch does not bring the client back", async () => {
  const log = [];
  let reject;
  const client = new OrbitedClient("http://n", {
    token: () => new Promise((_, r) => { reject = r; }), factories: fakeFactories(log), base: 1, max: 2,
  });
  client.connect();
  client.close();
  reject(new Error("no token"));
  await tick();
  assert.equal(client.state, "closed");
  assert.equal(log.length, 0);
});

test("token refresh works again after each successful hello", async () => {
  const log = [];
  let issued = 0;
  const client = new OrbitedClient("http://n", { token: async () => `tok${++issued}`, factories: fakeFactories(log), base: 1, max: 2 });
  client.connect();
  for (let round = 0; round < 3; round++) {
    await tick();
    const t = log[log.length - 1];
    t.sink.frame({ type: "hello", stream: "e.1", reset: false });
    t.sink.down("expired", "token");
  }
  await tick();
  assert.equal(client.state, "reconnecting");
  assert.deepEqual(log.map((t) => t.params.token), ["tok1", "tok2", "tok3", "tok4"]);
  client.close();
});

test("a transport that worked is kept through a few failed reconnects", async () => {
  const log = [];
  const client = new OrbitedClient("http://n", { token: "t", factories: fakeFactories(log), base: 1, max: 2,
                                                  firstRetry: 0 });
  client.connect();
  await tick();
  log[0].sink.frame({ type: "hello", stream: "e.1", reset: false });
  try {
    for (let i = 0; i < 5; i++) {  // one drop after hello, then four failed attempts
      log[log.length - 1].sink.down("node down", null);
      await tick();
    }
    assert.deepEqual(log.map((t) => t.name), [...Array(5).fill("websocket"), "sse"]);
  } finally {
    client.close();
  }
});

test("an overloaded node is retried on the same transport after max(backoff, Retry-After)", async () => {
  const log = [];
  const states = [];
  const client = new OrbitedClient("http://n", { token: "t", factories: fakeFactories(log), base: 1, max: 2,
                                                  random: () => 0, onState: (s, d) => states.push([s, d.detail]) });
  client.connect();
  await tick();
  // Before any hello: no fallback to the next transport (it would be refused too).
  log[0].sink.down("websocket closed 4503 overloaded", "overloaded");
  await tick();
  assert.deepEqual(log.map((t) => t.name), ["websocket", "websocket"]);
  assert.equal(client.state, "reconnecting");
  // A long-poll's 503 with Retry-After: 1 waits a whole second, above the 1-2 ms backoff.
  log[1].sink.down("poll HTTP 503 overloaded", "overloaded", 1);
  await tick();
  assert.equal(log.length, 2, "waits for Retry-After");
  await new Promise((resolve) => setTimeout(resolve, 1100));
  assert.equal(log.length, 3);
  assert.equal(log[2].name, "websocket");
  log[2].sink.frame({ type: "hello", stream: "e.1", reset: false });
  assert.equal(client.state, "open");
  client.close();
});

test("retryAfter reads delta-seconds and ignores the rest", () => {
  const response = (value) => ({ headers: { get: () => value } });
  assert.equal(retryAfter(response("5")), 5);
  assert.equal(retryAfter(response(null)), 0);
  assert.equal(retryAfter(response("Wed, 21 Oct 2015 07:28:00 GMT")), 0);
  assert.equal(retryAfter(response("-3")), 0);
});

test("an event id already delivered is dropped after a reset, still advancing the position", () => {
  const r = new Resume(null, { window: 1024 });
  r.handle({ type: "hello", stream: "dead.1", reset: false });
  assert.deepEqual(r.handle({ type: "event", seq: 1, id: "e1", data: 1 }),
                   { kind: "message", data: 1, seq: 1, id: "e1" });
  r.handle({ type: "event", seq: 2, id: "e2", data: 2 });
  // The node died before the ack; the web app resent e1, e2 to the new owner.
  assert.equal(r.handle({ type: "hello", stream: "new.1", reset: true }).reset, true);
  assert.deepEqual(r.handle({ type: "event", seq: 1, id: "e1", data: 1 }), { kind: "duplicate", seq: 1, id: "e1" });
  assert.equal(r.handle({ type: "event", seq: 2, id: "e2", data: 2 }).kind, "duplicate");
  assert.equal(r.position(), "new.1:2"); // so the next resume (and ack) covers them
  assert.equal(r.handle({ type: "event", seq: 3, id: "e3", data: 3 }).kind, "message");
  // An event without an id (a node of the previous version) is always delivered.
  assert.equal(r.handle({ type: "event", seq: 4, data: 4 }).kind, "message");
});

test("the window of remembered ids is bounded", () => {
  const r = new Resume(null, { window: 3 });
  r.handle({ type: "hello", stream: "a.1", reset: false });
  for (let i = 1; i <= 4; i++) r.handle({ type: "event", seq: i, id: `e${i}`, data: i });
  assert.equal(r.ids.size, 3);
  r.handle({ type: "hello", stream: "b.1", reset: true });
  assert.equal(r.handle({ type: "event", seq: 1, id: "e1", data: 1 }).kind, "message"); // forgotten
  assert.equal(r.handle({ type: "event", seq: 2, id: "e4", data: 4 }).kind, "duplicate");
  assert.equal(new Resume().window, 1024); // the default
});

test("a dropped duplicate is still acknowledged over the WebSocket", async () => {
  const sockets = [];
  class FakeWebSocket {
    static OPEN = 1;
    constructor(url) { this.url = url; this.readyState = 1; this.sent = []; sockets.push(this); }
    send(text) { this.sent.push(JSON.parse(text)); }
    close() { this.readyState = 3; }
    feed(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
  }
  const saved = globalThis.WebSocket;
  globalThis.WebSocket = FakeWebSocket;
  const got = [];
  const client = new OrbitedClient("http://n", { token: "t", transports: ["websocket"], firstRetry: 0, base: 1, max: 2,
                                                  dedupWindow: 100, onMessage: (d) => got.push(d) });
  try {
    client.connect();
    await tick();
    const first = sockets[0];
    first.feed({ type: "hello", stream: "dead.1", reset: false, keepalive: 25 });
    first.feed({ type: "event", seq: 1, id: "e1", data: 1 });
    first.onclose({ code: 1006, reason: "" }); // killed before the ack went out
    await new Promise((resolve) => setTimeout(resolve, 50));
    const second = sockets[1];
    second.feed({ type: "hello", stream: "new.1", reset: true, keepalive: 25 });
    for (let seq = 1; seq <= 50; seq++) second.feed({ type: "event", seq, id: `e${seq}`, data: seq });
    assert.deepEqual(got, Array.from({ length: 50 }, (_, i) => i + 1)); // 1 once, from the first
    assert.deepEqual(second.sent, [{ type: "ack", seq: 50 }]); // the resent e1 is acknowledged too
    assert.equal(client.position, "new.1:50");
  } finally {
    client.close();
    globalThis.WebSocket = saved;
  }
});

// -- issue 21: user limits (closed frame, 4003/4429, HTTP 429), latest-value events (skip),
// -- hash version and relocation after a rehash ------------------------------------------

test("hello carries the node's hash version (1 when it does not say)", () => {
  const r = new Resume();
  assert.equal(r.handle({ type: "hello", stream: "e.1", reset: false, hash: 2 }).hash, 2);
  assert.equal(r.handle({ type: "hello", stream: "e.1", reset: false }).hash, 1);
});

test("a tagged event carries latest and replaced; seqs skipped without a gap are replaced", () => {
  const r = new Resume();
  r.handle({ type: "hello", stream: "e.1", reset: false, seq: 0 });
  assert.deepEqual(r.handle({ type: "event", seq: 1, id: "a", data: 1 }), { kind: "message", data: 1, seq: 1, id: "a" });
  // 2..4 replaced by 5 (same tag): no gap frame, so they are skipped as replaced.
  assert.deepEqual(r.handle({ type: "event", seq: 5, id: "b", latest: "price:AAPL", replaced: 3, data: 5 }),
                   { kind: "message", data: 5, seq: 5, id: "b", latest: "price:AAPL", replaced: 3, skipped: [2, 3, 4] });
  // A gap frame announces 6..7 lost; 8 was replaced: only 8 is skipped.
  assert.deepEqual(r.handle({ type: "gap", from: 6, to: 7 }), { kind: "gap", from: 6, to: 7 });
  const next = r.handle({ type: "event", seq: 9, id: "c", latest: "t", data: 9 });
  assert.deepEqual(next.skipped, [8]);
  assert.equal(next.replaced, 0); // absent on the wire: 0
  // Everything covered by the gap: nothing skipped.
  r.handle({ type: "gap", from: 10, to: 12 });
  assert.equal(r.handle({ type: "event", seq: 13, data: 13 }).skipped, undefined);
  // A gap frame only covers the hole before the next event, not later ones.
  assert.deepEqual(r.handle({ type: "event", seq: 15, data: 15 }).skipped, [14]);
});

test("a fresh hello's seq is where skipping counts from; a reset starts over", () => {
  const r = new Resume();
  r.handle({ type: "hello", stream: "e.1", reset: false, seq: 4 });
  assert.deepEqual(r.handle({ type: "event", seq: 6, data: 6 }).skipped, [5]);
  r.handle({ type: "hello", stream: "n.1", reset: true, seq: 0 });
  assert.equal(r.handle({ type: "event", seq: 1, data: 1 }).skipped, undefined);
});

test("onMessage gets {seq, id, latest, replaced, transport}; skip gets (seqs, 'replaced') first", async () => {
  const log = [];
  const seen = [];
  const client = new OrbitedClient("http://n", { token: "t", factories: fakeFactories(log), base: 1, max: 2,
                                                  onMessage: (data, info) => seen.push(["message", data, info]) });
  client.on("skip", (seqs, why) => seen.push(["skip", seqs, why]));
  client.connect();
  await tick();
  const sink = log[0].sink;
  sink.frame({ type: "hello", stream: "e.1", reset: false, seq: 0, hash: 2 });
  assert.equal(client.hashVersion, 2);
  sink.frame({ type: "event", seq: 1, id: "x1", data: "a" });
  sink.frame({ type: "event", seq: 4, id: "x4", latest: "room:1", replaced: 2, data: "d" });
  assert.deepEqual(seen, [
    ["message", "a", { seq: 1, id: "x1", latest: undefined, replaced: 0, transport: "websocket" }],
    ["skip", [2, 3], "replaced"],
    ["message", "d", { seq: 4, id: "x4", latest: "room:1", replaced: 2, transport: "websocket" }],
  ]);
  client.close();
});

test("a skipped seq before a dropped resend is still reported", async () => {
  const log = [];
  const skips = [];
  const client = new OrbitedClient("http://n", { token: "t", factories: fakeFactories(log), base: 1, max: 2 });
  client.on("skip", (seqs) => skips.push(seqs));
  client.connect();
  await tick();
  const sink = log[0].sink;
  sink.frame({ type: "hello", stream: "e.1", reset: false });
  sink.frame({ type: "event", seq: 1, id: "same", data: 1 });
  sink.frame({ type: "event", seq: 3, id: "same", data: 1 }); // a resend of "same", dropped
  assert.deepEqual(skips, [[2]]);
  client.close();
});

for (const [code, reason] of [[4429, "user_limit"], [4003, "displaced"]]) {
  test(`a closed frame (${code} ${reason}) ends the client without reconnecting, detail = reason`, async () => {
    const log = [];
    const states = [];
    const client = new OrbitedClient("http://n", { token: "t", factories: fakeFactories(log), base: 1, max: 2,
                                                    onState: (s, info) => states.push([s, info.detail]) });
    client.connect();
    await tick();
    log[0].sink.frame({ type: "hello", stream: "e.1", reset: false });
    log[0].sink.frame({ type: "closed", code, reason });
    await tick();
    assert.equal(client.state, "closed");
    assert.ok(log[0].closed);
    assert.equal(log.length, 1);
    assert.deepEqual(states.at(-1), ["closed", reason]);
  });
}

test("a closed frame before hello ends the client too (no fallback to another transport)", async () => {
  const log = [];
  const client = new OrbitedClient("http://n", { token: "t", factories: fakeFactories(log), base: 1, max: 2 });
  client.connect();
  await tick();
  log[0].sink.frame({ type: "closed", code: 4429, reason: "user_limit" });
  await tick();
  assert.equal(client.state, "closed");
  assert.equal(log.length, 1);
});

/** Run `body` with globalThis.WebSocket / fetch replaced by fakes. */
async function withGlobals(fakes, body) {
  const saved = Object.fromEntries(Object.keys(fakes).map((k) => [k, globalThis[k]]));
  Object.assign(globalThis, fakes);
  try { await body(); } finally { Object.assign(globalThis, saved); }
}

class FakeSocket {
  static OPEN = 1;
  static made = [];
  constructor(url) { this.url = url; this.readyState = 1; FakeSocket.made.push(this); }
  send() {}
  close() { this.readyState = 3; }
}

for (const [code, word] of [[4429, "user_limit"], [4003, "displaced"]]) {
  test(`a WebSocket close ${code} ends the client; detail is the node's reason`, async () => {
    const states = [];
    FakeSocket.made = [];
    await withGlobals({ WebSocket: FakeSocket }, async () => {
      const client = new OrbitedClient("http://n", { token: "t", base: 1, max: 2,
                                                      onState: (s, info) => states.push([s, info.detail]) });
      client.connect();
      await tick();
      const ws = FakeSocket.made[0];
      ws.onmessage({ data: JSON.stringify({ type: "hello", stream: "e.1", reset: false }) });
      ws.onclose({ code, reason: `${word}: at most 3 connections per user` });
      await tick();
      assert.equal(client.state, "closed");
      assert.equal(FakeSocket.made.length, 1, "no reconnect");
      assert.deepEqual(states.at(-1), ["closed", `${word}: at most 3 connections per user`]);
    });
  });
}

test("a long-poll answered HTTP 429 user_limit ends the client with detail user_limit", async () => {
  const urls = [];
  const fetch = async (url) => {
    urls.push(url);
    return new Response(JSON.stringify({ error: { code: "user_limit", message: "at most 3 connections per user" } }),
                        { status: 429, headers: { "content-type": "application/json" } });
  };
  const states = [];
  await withGlobals({ fetch }, async () => {
    const client = new OrbitedClient("http://n", { token: "t", transports: ["longpoll", "sse"], base: 1, max: 2,
                                                    onState: (s, info) => states.push([s, info.detail]) });
    client.connect();
    await tick();
    assert.equal(client.state, "closed");
    assert.equal(urls.length, 1, "no retry, no fallback");
    assert.deepEqual(states, [["connecting", undefined], ["closed", "user_limit"]]);
  });
});

test("a long-poll is held at most the node's keepalive, inside the watchdog's 2x", async () => {
  // With keepalive 10 a poll held 25 s tripped the watchdog (20 s) on every idle poll.
  const urls = [];
  const fetch = async (url) => {
    urls.push(url);
    if (urls.length > 3) return new Promise(() => {}); // held
    return new Response(JSON.stringify([{ type: "hello", stream: "e.1", reset: false, seq: 0, keepalive: 10 }]),
                        { status: 200 });
  };
  await withGlobals({ fetch }, async () => {
    const client = new OrbitedClient("http://n", { token: "t", transports: ["longpoll"], base: 1, max: 2 });
    try {
      client.connect();
      for (let i = 0; i < 6; i++) await tick();
      assert.match(urls[0], /timeout=0/);
      assert.match(urls[1], /timeout=10(&|$)/);
      assert.match(urls[2], /timeout=10(&|$)/);
    } finally {
      client.close();
    }
  });
});

test("a long-poll answered with a closed frame stops polling", async () => {
  let polls = 0;
  const fetch = async () => {
    polls += 1;
    return new Response(JSON.stringify([{ type: "hello", stream: "e.1", reset: false },
                                        { type: "closed", code: 4003, reason: "displaced" }]), { status: 200 });
  };
  await withGlobals({ fetch }, async () => {
    const client = new OrbitedClient("http://n", { token: "t", transports: ["longpoll"], base: 1, max: 2 });
    client.connect();
    await tick();
    await tick();
    assert.equal(client.state, "closed");
    assert.equal(polls, 1);
  });
});

test("SSE refused before any frame asks the poll URL; 429 there ends the client (user_limit)", async () => {
  class FakeEventSource {
    static made = [];
    constructor(url) { this.url = url; FakeEventSource.made.push(this); }
    close() {}
  }
  const probes = [];
  const fetch = async (url) => { probes.push(url); return new Response("{}", { status: 429 }); };
  const states = [];
  await withGlobals({ EventSource: FakeEventSource, fetch }, async () => {
    const client = new OrbitedClient("http://n", { token: "t", transports: ["sse", "longpoll"], base: 1, max: 2,
                                                    onState: (s, info) => states.push([s, info.detail]) });
    client.connect();
    await tick();
    await FakeEventSource.made[0].onerror();
    await tick();
    assert.equal(client.state, "closed");
    assert.equal(probes.length, 1);
    assert.match(probes[0], /\/orbited\/poll\?.*timeout=0/);
    assert.deepEqual(states.at(-1), ["closed", "user_limit"]);
  });
});

function jwtWithExp(exp, tag) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: tag, exp })}.sig`;
}

class FakeEventSource {
  static made = [];
  constructor(url) { this.url = url; FakeEventSource.made.push(this); }
  close() {}
}

/** An SSE client with `token` that gets hello and 50 events (an ack at once): the URL it
 *  opened the stream with and the ack URLs it sent. */
async function sseAcks(token) {
  FakeEventSource.made = [];
  const acks = [];
  const fetch = async (url) => { acks.push(url); return new Response("", { status: 204 }); };
  let opened = null;
  await withGlobals({ EventSource: FakeEventSource, fetch }, async () => {
    const client = new OrbitedClient("http://n", { token, transports: ["sse"], base: 1, max: 2 });
    try {
      client.connect();
      await tick();
      const source = FakeEventSource.made[0];
      opened = source.url;
      source.onmessage({ data: JSON.stringify({ type: "hello", stream: "e.1", reset: false, seq: 0 }) });
      for (let seq = 1; seq <= 50; seq++) {
        source.onmessage({ data: JSON.stringify({ type: "event", seq, id: `m${seq}`, data: seq }) });
      }
      for (let i = 0; i < 5; i++) await tick();
    } finally {
      client.close();
    }
  });
  return { opened, acks };
}

test("SSE acks with a fresh token once the stream's own is about to expire", async () => {
  // The stream outlives its token; an ack with the expired one got 401, unseen (no-cors),
  // and acknowledged-mode sends came back unacked for ever.
  const now = Date.now() / 1000;
  const tokens = [jwtWithExp(now + 30, "old"), jwtWithExp(now + 3600, "new")];
  let calls = 0;
  const { opened, acks } = await sseAcks(async () => tokens[calls++]);
  assert.match(opened, new RegExp(`token=${tokens[0]}`));
  assert.equal(calls, 2, "the token function was asked again");
  assert.equal(acks.length, 1);
  assert.match(acks[0], new RegExp(`/orbited/ack\\?token=${tokens[1]}&last=e.1%3A50`));
});

test("a token far from expiry, or a string token, acks as it is", async () => {
  const fresh = jwtWithExp(Date.now() / 1000 + 3600, "a");
  for (const token of [async () => fresh, fresh]) {
    const { acks } = await sseAcks(token);
    assert.equal(acks.length, 1);
    assert.match(acks[0], new RegExp(`token=${fresh}&`));
  }
});

test("SSE refused for its token ends with the poll's words in its detail", async () => {
  // The detail was only "sse error": a page could not tell "log in again" from the rest.
  FakeEventSource.made = [];
  const fetch = async () => new Response(JSON.stringify({ error: { code: "token_expired", message: "m" } }),
                                         { status: 401, headers: { "content-type": "application/json" } });
  const states = [];
  await withGlobals({ EventSource: FakeEventSource, fetch }, async () => {
    const client = new OrbitedClient("http://n", { token: "t", transports: ["sse"], base: 1, max: 2,
                                                    onState: (s, info) => states.push([s, info.detail]) });
    client.connect();
    await tick();
    await FakeEventSource.made[0].onerror();
    await tick();
    assert.equal(client.state, "closed");
    assert.deepEqual(states.at(-1), ["closed", "sse error (poll HTTP 401 token_expired)"]);
  });
});

test("a reconnect frame with a route asks options.locate for the next base", async () => {
  const log = [];
  const asked = [];
  const client = new OrbitedClient("http://old", {
    token: "t", factories: fakeFactories(log), base: 1, max: 2, firstRetry: 0, spread: 0,
    locate: async (route, info) => { asked.push([route, info]); return `http://route-${route}`; },
  });
  client.connect();
  await tick();
  assert.equal(client.base, "http://old");
  log[0].sink.frame({ type: "hello", stream: "e.1", reset: false, hash: 2 });
  log[0].sink.frame({ type: "reconnect", reason: "rehash", route: 7 });
  await tick();
  assert.deepEqual(asked, [[7, { reason: "rehash", base: "http://old" }]]);
  assert.equal(log.length, 2);
  assert.equal(client.base, "http://route-7");
  // A reconnect without a route keeps the base.
  log[1].sink.frame({ type: "hello", stream: "e.1", reset: false, hash: 2 });
  log[1].sink.frame({ type: "reconnect", reason: "node stopping" });
  await tick();
  assert.equal(asked.length, 1);
  assert.equal(client.base, "http://route-7");
  client.close();
});

test("a base function is asked at the first connect and again after a rehash", async () => {
  const bases = [];
  const seenBy = [];
  const factories = Object.fromEntries(["websocket", "sse", "longpoll", "iframe"].map((name) => [name,
    (base, params, sink) => { const t = { base, sink, close() {} }; seenBy.push(t); return t; }]));
  let n = 0;
  const client = new OrbitedClient(async () => { bases.push(++n); return `http://b${n}`; },
                                   { token: "t", factories, base: 1, max: 2, firstRetry: 0, spread: 0 });
  client.connect();
  await tick();
  assert.equal(seenBy[0].base, "http://b1");
  seenBy[0].sink.frame({ type: "hello", stream: "e.1", reset: false });
  seenBy[0].sink.frame({ type: "reconnect", reason: "route_moved", route: 3 }); // no locate: base kept
  await tick();
  assert.equal(seenBy[1].base, "http://b1");
  seenBy[1].sink.frame({ type: "hello", stream: "e.1", reset: false });
  seenBy[1].sink.frame({ type: "reconnect", reason: "rehash" });
  await tick();
  assert.equal(seenBy[2].base, "http://b2");
  assert.deepEqual(bases, [1, 2]);
  client.close();
});

test("a failing locate is asked again after the backoff", async () => {
  const log = [];
  let calls = 0;
  const client = new OrbitedClient("http://old", {
    token: "t", factories: fakeFactories(log), base: 1, max: 2, firstRetry: 0, spread: 0,
    locate: async (route) => { calls += 1; if (calls === 1) throw new Error("down"); return `http://r${route}`; },
  });
  client.connect();
  await tick();
  log[0].sink.frame({ type: "hello", stream: "e.1", reset: false });
  log[0].sink.frame({ type: "reconnect", reason: "rehash", route: 2 });
  await tick();
  await tick();
  assert.equal(calls, 2);
  assert.equal(client.base, "http://r2");
  assert.equal(log.length, 2);
  client.close();
});

test("iframe: a closed frame posted just before the document's load event still ends the client", async () => {
  // Chromium may fire the iframe element's load event before the messages the document
  // posted last; the node's document posts "" once loaded, after its frames.
  const listeners = {};
  const made = [];
  const fakeWindow = {
    location: { origin: "http://page" },
    addEventListener: (name, fn) => { listeners[name] = fn; },
    removeEventListener: (name) => { delete listeners[name]; },
  };
  const fakeDocument = {
    body: { appendChild: () => {} },
    createElement: () => {
      const el = { style: {}, contentWindow: {}, on: {}, removed: false,
                   addEventListener(name, fn) { this.on[name] = fn; },
                   removeEventListener(name) { delete this.on[name]; },
                   remove() { this.removed = true; } };
      made.push(el);
      return el;
    },
  };
  const probes = [];
  const fetch = async (url) => { probes.push(url); return new Response("", { status: 204 }); };
  await withGlobals({ window: fakeWindow, document: fakeDocument, fetch }, async () => {
    const states = [];
    const client = new OrbitedClient("http://node", { token: "t", transports: ["iframe"], base: 1, max: 2,
                                                      onState: (s, info) => states.push([s, info.detail]) });
    client.connect();
    await tick();
    const el = made[0];
    const post = (frame) => listeners.message({ source: el.contentWindow, origin: "http://node",
                                                data: typeof frame === "string" ? frame : JSON.stringify(frame) });
    post({ type: "hello", stream: "e.1", reset: false });
    assert.equal(client.state, "open");
    el.on.load(); // the load event first ...
    await tick();
    assert.equal(client.state, "open", "waits for the document's end message");
    post({ type: "closed", code: 4003, reason: "displaced" }); // ... then the last frame
    await tick();
    assert.equal(listeners.message, undefined, "the transport is closed: its \"\" is not awaited");
    assert.deepEqual(states.at(-1), ["closed", "displaced"]);
    assert.equal(made.length, 1, "no reconnect");
    assert.ok(el.removed);
    assert.deepEqual(probes.filter((u) => !u.includes("/orbited/ack")), []);
  });
});

test("iframe: a document that ends without frames is probed at once; one without the end message after a wait", async () => {
  const listeners = {};
  const made = [];
  const fakeWindow = {
    location: { origin: "http://page" },
    addEventListener: (name, fn) => { listeners[name] = fn; },
    removeEventListener: (name) => { delete listeners[name]; },
  };
  const fakeDocument = {
    body: { appendChild: () => {} },
    createElement: () => {
      const el = { style: {}, contentWindow: {}, on: {}, addEventListener(name, fn) { this.on[name] = fn; },
                   removeEventListener(name) { delete this.on[name]; }, remove() {} };
      made.push(el);
      return el;
    },
  };
  const fetch = async () => new Response("{}", { status: 429 });
  await withGlobals({ window: fakeWindow, document: fakeDocument, fetch }, async () => {
    const states = [];
    const client = new OrbitedClient("http://node", { token: "t", transports: ["iframe"], base: 1, max: 2,
                                                      firstRetry: 0, spread: 0,
                                                      onState: (s, info) => states.push([s, info.detail]) });
    client.connect();
    await tick();
    made[0].on.load(); // an error page (429): no frames
    await tick();
    assert.deepEqual(states.at(-1), ["closed", "user_limit"]);
  });
  await withGlobals({ window: fakeWindow, document: fakeDocument, fetch }, async () => {
    made.length = 0;
    const client = new OrbitedClient("http://node", { token: "t", transports: ["iframe"], base: 1, max: 2,
                                                      firstRetry: 0, spread: 0 });
    client.connect();
    await tick();
    const el = made[0];
    listeners.message({ source: el.contentWindow, origin: "http://node",
                        data: JSON.stringify({ type: "hello", stream: "e.1", reset: false }) });
    el.on.load(); // an older node's document: no end message
    await tick();
    assert.equal(made.length, 1);
    await new Promise((resolve) => setTimeout(resolve, 600));
    assert.equal(made.length, 2, "reconnected after the wait");
    client.close();
  });
});
