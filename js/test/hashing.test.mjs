// The JS client computes the same routes as the published test vectors (docs/hashing.md):
// version 1 (all three parts of the key) and version 2 (the user part only, the default).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { HASH_VERSION, routeOf, routeOfUser } from "../orbited.js";

const published = JSON.parse(readFileSync(new URL("../../docs/hashing-vectors.json", import.meta.url)));
const v1 = published.vectors;
const v2 = published.v2?.vectors ?? [];

test("at least 20 published vectors of each version", () => {
  assert.ok(v1.length >= 20);
  assert.ok(v2.length >= 20, "docs/hashing-vectors.json has a v2 section");
});

test("version 2 is the default", () => assert.equal(HASH_VERSION, 2));

for (const vector of v1) {
  test(`v1 route of ${JSON.stringify(vector.key).slice(0, 40)}`, async () => {
    for (const [routes, expected] of Object.entries(vector.routes)) {
      assert.equal(await routeOf(vector.key, Number(routes), 1), expected, `N=${routes}`);
    }
  });
}

for (const vector of v2) {
  test(`v2 route of user ${JSON.stringify(vector.user).slice(0, 40)}`, async () => {
    assert.ok(vector.keys.length >= 2, "each vector lists keys of the user");
    for (const [routes, expected] of Object.entries(vector.routes)) {
      const n = Number(routes);
      assert.equal(await routeOfUser(vector.user, n), expected, `N=${routes}`);
      for (const key of vector.keys) {
        assert.equal(key[0], vector.user);
        assert.equal(await routeOf(key, n, 2), expected, `${JSON.stringify(key)} N=${routes}`);
        assert.equal(await routeOf(key, n), expected, `${JSON.stringify(key)} N=${routes} (default)`);
      }
    }
  });
}

test("the worked example of docs/hashing.md: alice is route 11 of 24, 219 of 1024", async () => {
  assert.equal(await routeOfUser("alice", 24), 11);
  assert.equal(await routeOf(["alice", "s1", "/chat"], 1024), 219);
  assert.equal(await routeOf(["alice", "s1", "/chat"], 24, 1), 17); // version 1
});

test("a bad version or route count is an error, not a route", async () => {
  await assert.rejects(routeOf(["a", "b", "c"], 24, 3), RangeError);
  await assert.rejects(routeOfUser("a", 0), RangeError);
});

test("a wildcard recipient has its user's route under v2 and none under v1", async () => {
  assert.equal(await routeOf(["alice", "*", "*"], 24), 11);
  assert.equal(await routeOf(["alice", "s1", "*"], 1024), 219);
  await assert.rejects(routeOf(["alice", "*", "*"], 24, 1), /wildcards need hash_version 2/);
  await assert.rejects(routeOf(["alice", "s1", "*"], 24, 1), /wildcards need hash_version 2/);
});
