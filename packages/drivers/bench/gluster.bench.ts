/**
 * Parses the gluster conformance vectors (spec §3 and §5, plus the extra observed rows). Before timing, every
 * vector is checked against its expected result, so the benchmark never measures a wrong parser.
 * Measures the parse stage only (no connect-time checks, no I/O).
 */
import { deepStrictEqual, strictEqual } from "node:assert/strict";
import { bench, describe } from "vitest";
import {
  formatGlusterUri,
  GlusterError,
  parseGlusterOptions,
  parseGlusterUri,
  validateGlusterOptions,
} from "../src/gluster/index.ts";
import {
  JSON_EXTRA_VECTORS,
  JSON_VECTORS,
  URI_EXTRA_VECTORS,
  URI_VECTORS,
  type Vector,
} from "../test/gluster-vectors.ts";

const uris = [...URI_VECTORS, ...URI_EXTRA_VECTORS];
const jsons = [...JSON_VECTORS, ...JSON_EXTRA_VECTORS].map((v) => ({ ...v, input: `json:${v.input}` }));
const objects = [...JSON_VECTORS, ...JSON_EXTRA_VECTORS]
  .filter((v) => /^\{"driver":"gluster","volume"/.test(v.input) && !/"filename"|"debug"/.test(v.input))
  .map((v) => ({ ...v, value: JSON.parse(v.input) as unknown }));
const valid = uris.filter((v) => "ok" in v.expected).map((v) => parseGlusterUri(v.input));
const formattable = valid.filter((o) => !(o.server[0]?.type === "inet" && o.server[0].host === ""));

function check(v: Vector, run: () => unknown): void {
  try {
    const got = run();
    if (!("ok" in v.expected)) throw new Error(`${v.id}: expected ${v.expected.error}`);
    deepStrictEqual(got, v.expected.ok, v.id);
  } catch (e) {
    if (!(e instanceof GlusterError) || !("error" in v.expected)) throw e;
    strictEqual(e.message, v.expected.error, v.id);
    strictEqual(e.hint, v.expected.hint, v.id);
  }
}

for (const v of uris) check(v, () => parseGlusterUri(v.input));
for (const v of jsons) check(v, () => parseGlusterOptions(v.input));
for (const v of objects) check(v, () => validateGlusterOptions(v.value));
for (const o of formattable) deepStrictEqual(parseGlusterUri(formatGlusterUri(o)), o);

const swallow = (f: () => unknown): void => {
  try {
    f();
  } catch {
    // rejections are part of the vector set
  }
};

describe(`gluster vectors (${uris.length} URI, ${jsons.length} JSON)`, () => {
  bench("parseGlusterUri, all URI vectors", () => {
    for (const v of uris) swallow(() => parseGlusterUri(v.input));
  });
  bench("parseGlusterOptions, all json: vectors", () => {
    for (const v of jsons) swallow(() => parseGlusterOptions(v.input));
  });
  bench("validateGlusterOptions, JSON objects", () => {
    for (const v of objects) swallow(() => validateGlusterOptions(v.value));
  });
  bench("formatGlusterUri, all valid URI vectors", () => {
    for (const o of formattable) formatGlusterUri(o);
  });
});
