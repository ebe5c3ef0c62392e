// The JS client computes the same routes as the published test vectors (docs/hashing.md).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { routeOf } from "../orbited.js";

const vectors = JSON.parse(readFileSync(new URL("../../docs/hashing-vectors.json", import.meta.url))).vectors;

test("at least 20 published vectors", () => assert.ok(vectors.length >= 20));

for (const vector of vectors) {
  test(`route of ${JSON.stringify(vector.key).slice(0, 40)}`, async () => {
    for (const [routes, expected] of Object.entries(vector.routes)) {
      assert.equal(await routeOf(vector.key, Number(routes)), expected, `N=${routes}`);
    }
  });
}
