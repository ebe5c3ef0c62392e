// The reconnect schedule after losing a connection (docs/client.md, "What it does on
// trouble"), on a fake clock: a quick first retry at FIRST_RETRY + a random part of the
// node's spread hint, at once (spread) after a reconnect frame, then today's backoff.
//   node --test js/test/
import { test } from "node:test";
import assert from "node:assert/strict";
import { backoffDelay, DEFAULT_SPREAD, FIRST_RETRY, firstRetryDelay, OrbitedClient, spreadHint, STABLE,
         TRANSPORTS } from "../orbited.js";

// Transports the test drives by hand; each records the (fake) time it was started at.
function fakeFactories(log) {
  const make = (name) => (base, params, sink) => {
    const t = { name, params, sink, at: Date.now(), closed: false, close() { this.closed = true; } };
    log.push(t);
    return t;
  };
  return Object.fromEntries(TRANSPORTS.map((name) => [name, make(name)]));
}

// _open awaits the token: let those promise callbacks run (they are not timers).
const settle = async () => { for (let i = 0; i < 10; i++) await Promise.resolve(); };

/** A client on a fake clock, connected and open (hello with `hello` fields) for a while. */
async function openClient(t, options = {}, hello = {}) {
  t.mock.timers.reset();
  t.mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"], now: 1_000_000 });
  const log = [];
  const client = new OrbitedClient("http://n", { token: "t", factories: fakeFactories(log), random: () => 0.5,
                                                  ...options });
  client.connect();
  await settle();
  log[0].sink.frame({ type: "hello", stream: "e.1", reset: false, keepalive: 25, ...hello });
  t.mock.timers.tick(STABLE * 5); // a connection that worked for a while
  return { client, log };
}

// Node's mock clock jumps to the end of a tick before running the timers due in it, so
// a timer they set would start late: advance 1 ms at a time.
function advance(t, ms) {
  for (let i = 0; i < ms; i++) t.mock.timers.tick(1);
}

/** Advance the fake clock to just before and to `delay` ms after `from`: asserts that
 *  the next attempt starts exactly then (not earlier), and returns it. */
async function nextAttempt(t, log, delay, from = Date.now()) {
  const before = log.length;
  if (delay > 0) {
    advance(t, from + delay - 1 - Date.now());
    await settle();
    assert.equal(log.length, before, `no attempt before ${delay} ms`);
  }
  advance(t, from + delay - Date.now());
  t.mock.timers.tick(0); // a timer due now (delay 0)
  await settle();
  assert.equal(log.length, before + 1, `an attempt at ${delay} ms`);
  return log[log.length - 1];
}

test("spreadHint: seconds to ms, bounded by max, null when absent or not a number >= 0", () => {
  assert.equal(spreadHint(0.4), 400);
  assert.equal(spreadHint(0), 0);
  assert.equal(spreadHint(90, 30000), 30000);
  for (const bad of [undefined, null, "0.4", -1, NaN, Infinity]) assert.equal(spreadHint(bad), null, `${bad}`);
  assert.equal(firstRetryDelay(400, { random: () => 0 }), FIRST_RETRY);
  assert.equal(firstRetryDelay(400, { random: () => 1 }), FIRST_RETRY + 400);
});

test("after losing a connection that worked: 100 ms + random part of the hint, then today's backoff", async (t) => {
  const { client, log } = await openClient(t, {}, { spread: 0.4 });
  try {
    const lost = Date.now();
    log[0].sink.down("websocket closed 1006", null);
    assert.equal(client.state, "reconnecting");
    const first = await nextAttempt(t, log, 100 + 0.5 * 400, lost);
    assert.equal(first.name, "websocket");
    assert.equal(first.params.last, "e.1:0");
    // The route has not moved yet: that attempt fails, and the backoff goes on as before
    // (its first delay, then the second: the quick retry was not a backoff attempt).
    first.sink.down("websocket closed 1006", null);
    const second = await nextAttempt(t, log, backoffDelay(0, { random: () => 0.5 }));
    second.sink.down("websocket closed 1006", null);
    const third = await nextAttempt(t, log, backoffDelay(1, { random: () => 0.5 }));
    assert.deepEqual(log.map((a) => a.name), ["websocket", "websocket", "websocket", "websocket"]);
    // Landing on the new owner: open again, and the next loss is quick again.
    third.sink.frame({ type: "hello", stream: "f.1", reset: true, keepalive: 25, spread: 0.2 });
    assert.equal(client.state, "open");
    t.mock.timers.tick(STABLE * 5);
    const lostAgain = Date.now();
    third.sink.down("websocket closed 1006", null);
    await nextAttempt(t, log, 100 + 0.5 * 200, lostAgain);
  } finally {
    client.close();
  }
});

test("the quick first retry comes before the old backoff's first attempt, for any random draw", () => {
  for (const r of [0, 0.3, 0.7, 1]) {
    const quick = firstRetryDelay(DEFAULT_SPREAD, { random: () => r });
    assert.ok(quick >= 100 && quick <= 250, `${quick}`);
    assert.ok(quick <= backoffDelay(0, { random: () => 0 }), "old first attempt: 250-500 ms");
  }
});

test("without a hint the window is 150 ms (or options.spread); a ping refreshes the hint", async (t) => {
  const { client, log } = await openClient(t, { random: () => 1 });
  try {
    let lost = Date.now();
    log[0].sink.down("reset", null);
    const second = await nextAttempt(t, log, FIRST_RETRY + DEFAULT_SPREAD, lost);
    second.sink.frame({ type: "hello", stream: "e.1", reset: false, keepalive: 25, spread: 0.05 });
    second.sink.frame({ type: "ping", spread: 2 }); // the node has grown since hello
    second.sink.frame({ type: "ping" }); // an older node's ping keeps the hint
    t.mock.timers.tick(STABLE * 5);
    lost = Date.now();
    second.sink.down("reset", null);
    const third = await nextAttempt(t, log, 100 + 2000, lost);
    // A hello without a hint (an older node) goes back to the default.
    third.sink.frame({ type: "hello", stream: "e.1", reset: false, keepalive: 25 });
    t.mock.timers.tick(STABLE * 5);
    lost = Date.now();
    third.sink.down("reset", null);
    await nextAttempt(t, log, 100 + 150, lost);
  } finally {
    client.close();
  }
  const custom = await openClient(t, { random: () => 1, spread: 400, firstRetry: 50 });
  try {
    const lost = Date.now();
    custom.log[0].sink.down("reset", null);
    await nextAttempt(t, custom.log, 50 + 400, lost);
  } finally {
    custom.client.close();
  }
});

test("a hint is bounded by options.max; a bad one counts as none", async (t) => {
  const { client, log } = await openClient(t, { random: () => 1, max: 5000 }, { spread: 1e9 });
  try {
    let lost = Date.now();
    log[0].sink.down("reset", null);
    const second = await nextAttempt(t, log, 100 + 5000, lost);
    second.sink.frame({ type: "hello", stream: "e.1", reset: false, keepalive: 25, spread: "lots" });
    t.mock.timers.tick(STABLE * 5);
    lost = Date.now();
    second.sink.down("reset", null);
    await nextAttempt(t, log, 100 + 150, lost);
  } finally {
    client.close();
  }
});

test("a silent link (watchdog) that worked also gets the quick retry", async (t) => {
  const { client, log } = await openClient(t, { random: () => 0 }, { keepalive: 10, spread: 0.3 });
  try {
    // openClient ran 5 s of the 20 s watchdog (2 x keepalive); no frame since hello.
    await nextAttempt(t, log, 20000 - 5000 + FIRST_RETRY);
    assert.equal(log[1].name, "websocket");
  } finally {
    client.close();
  }
});

test("a planned move's reconnect frame brings its own spread, counted over the movers", async (t) => {
  // The node's hello said 0.4 s (all its browsers); only 60 of them move: 0.06 s.
  const { client, log } = await openClient(t, {}, { spread: 0.4 });
  try {
    const told = Date.now();
    log[0].sink.frame({ type: "reconnect", reason: "route_moved", spread: 0.06 });
    const next = await nextAttempt(t, log, 0.5 * 60, told);
    assert.equal(next.name, "websocket");
  } finally {
    client.close();
  }
});

test("a reconnect frame after hello (planned move): at once, spread by the hint", async (t) => {
  const { client, log } = await openClient(t, {}, { spread: 0.4 });
  try {
    const told = Date.now();
    log[0].sink.frame({ type: "reconnect", reason: "route_moved" });
    assert.ok(log[0].closed);
    const next = await nextAttempt(t, log, 0.5 * 400, told);
    assert.equal(next.name, "websocket");
    // The data plane still leads to the old node, which refuses with a reconnect frame
    // before hello: that attempt failed; back off (no fallback: the transport works).
    next.sink.frame({ type: "reconnect", reason: "route_moved" });
    const after = await nextAttempt(t, log, backoffDelay(0, { random: () => 0.5 }));
    after.sink.frame({ type: "reconnect", reason: "route_moved" });
    await nextAttempt(t, log, backoffDelay(1, { random: () => 0.5 }));
    assert.deepEqual(log.map((a) => a.name), Array(4).fill("websocket"));
  } finally {
    client.close();
  }
});

test("a connection that drops at once gets the quick retry only if the one before lasted", async (t) => {
  const { client, log } = await openClient(t, { random: () => 0 }, { spread: 0 });
  try {
    // Long-lived connection lost: quick. The next one lasts 10 ms: quick once more (a
    // join followed at once by a drain moves a browser twice).
    log[0].sink.down("reset", null);
    const a = await nextAttempt(t, log, FIRST_RETRY);
    a.sink.frame({ type: "hello", stream: "e.1", reset: false, keepalive: 25, spread: 0 });
    t.mock.timers.tick(10);
    a.sink.frame({ type: "reconnect", reason: "route_moved" });
    const b = await nextAttempt(t, log, 0);
    // Again at once: a node that accepts and drops browsers gets the backoff pace.
    b.sink.frame({ type: "hello", stream: "e.1", reset: false, keepalive: 25, spread: 0 });
    t.mock.timers.tick(10);
    b.sink.down("reset", null);
    const c = await nextAttempt(t, log, backoffDelay(0, { random: () => 0 }));
    c.sink.frame({ type: "hello", stream: "e.1", reset: false, keepalive: 25, spread: 0 });
    t.mock.timers.tick(10);
    c.sink.frame({ type: "reconnect", reason: "route_moved" });
    const d = await nextAttempt(t, log, backoffDelay(0, { random: () => 0 })); // attempt reset by hello
    // One that lasts again restores the quick retry.
    d.sink.frame({ type: "hello", stream: "e.1", reset: false, keepalive: 25, spread: 0 });
    t.mock.timers.tick(STABLE);
    d.sink.down("reset", null);
    await nextAttempt(t, log, FIRST_RETRY);
  } finally {
    client.close();
  }
});

test("every transport follows the same rule", async (t) => {
  for (const name of TRANSPORTS) {
    const { client, log } = await openClient(t, { transports: [name] }, { spread: 0.2 });
    try {
      const lost = Date.now();
      log[0].sink.down(`${name} failed`, null);
      const next = await nextAttempt(t, log, 100 + 0.5 * 200, lost);
      assert.equal(next.name, name);
    } finally {
      client.close();
      t.mock.timers.reset();
    }
  }
});

test("a 503 on the quick retry still waits max(backoff, Retry-After) on the same transport", async (t) => {
  const { client, log } = await openClient(t, { transports: ["longpoll", "websocket"] }, { spread: 0.2 });
  try {
    log[0].sink.down("poll failed", null);
    const quick = await nextAttempt(t, log, 100 + 100);
    quick.sink.down("poll HTTP 503 overloaded", "overloaded", 3);
    const after = await nextAttempt(t, log, 3000);
    assert.deepEqual(log.map((a) => a.name), ["longpoll", "longpoll", "longpoll"]);
    after.sink.frame({ type: "hello", stream: "e.1", reset: false, keepalive: 25 });
    assert.equal(client.state, "open");
  } finally {
    client.close();
  }
});
