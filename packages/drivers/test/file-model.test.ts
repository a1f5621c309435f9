/**
 * Property test: random writes, zero writes (with and without may-unmap), discards and truncations on a
 * sparse file behave like a plain byte array, and block status never calls a range zero that is not.
 * Runs: BLK_FC_RUNS (default 25).
 */
import { writeFileSync } from "node:fs";
import { BlockGraph } from "@blk/core";
import { makeTempDir, pattern } from "@blk/testkit";
import fc from "fast-check";
import { afterAll, describe, expect, it } from "vitest";
import { fileDriver, makeFileDriver } from "../src/file/index.ts";

const RUNS = Number(process.env.BLK_FC_RUNS ?? 25);
const MAX = 256 * 1024;
const dir = makeTempDir("blk-fmodel");
afterAll(() => dir.dispose());
let n = 0;

type Op =
  | { k: "write"; off: number; len: number; seed: number }
  | { k: "zero"; off: number; len: number; unmap: boolean }
  | { k: "discard"; off: number; len: number }
  | { k: "truncate"; size: number };

const range = fc
  .tuple(fc.integer({ min: 0, max: MAX - 1 }), fc.integer({ min: 1, max: 70_000 }))
  .map(([off, len]) => ({ off, len }));
const op: fc.Arbitrary<Op> = fc.oneof(
  fc
    .record({ r: range, seed: fc.integer({ min: 1, max: 1000 }) })
    .map(({ r, seed }) => ({ k: "write" as const, ...r, seed })),
  fc.record({ r: range, unmap: fc.boolean() }).map(({ r, unmap }) => ({ k: "zero" as const, ...r, unmap })),
  range.map((r) => ({ k: "discard" as const, ...r })),
  fc.integer({ min: 0, max: MAX }).map((size) => ({ k: "truncate" as const, size })),
);

describe.each([
  ["with the FFI", fileDriver],
  ["without the FFI", makeFileDriver({ syscalls: null })],
])("file driver against a byte-array model (%s)", (_, driver) => {
  it("keeps content and block status consistent", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: MAX }),
        fc.array(op, { maxLength: 20 }),
        async (initial, ops) => {
          const p = dir.join(`m${n++}.img`);
          const init = pattern(n, 0, initial);
          writeFileSync(p, init);
          let model = new Uint8Array(MAX * 2);
          model.set(init);
          let size = initial;
          const graph = new BlockGraph();
          const node = await graph.open(driver, { filename: p }, { discard: "unmap" });
          try {
            for (const o of ops) {
              const len = node.length;
              if (o.k === "truncate") {
                await node.truncate(o.size);
                if (o.size < size) model.fill(0, o.size);
                size = o.size;
                continue;
              }
              if (o.off >= len) continue;
              const l = Math.min(o.len, len - o.off);
              if (o.k === "write") {
                const d = pattern(o.seed, o.off, l);
                await node.write(o.off, d);
                model.set(d, o.off);
              } else if (o.k === "zero") {
                await node.writeZeroes(o.off, l, { mayUnmap: o.unmap });
                model.fill(0, o.off, o.off + l);
              } else {
                await node.discard(o.off, l);
                model.fill(0, o.off, o.off + l);
              }
              size = Math.max(size, o.off + l);
            }
            expect(node.length).toBe(Math.ceil(size / 512) * 512);
            const got = await node.read(0, node.length);
            const want = model.subarray(0, node.length);
            expect(Buffer.from(got).equals(Buffer.from(want))).toBe(true);
            let pos = 0;
            for (const e of await node.blockStatus(0, node.length)) {
              expect(e.offset).toBe(pos);
              if (e.zero)
                expect(want.subarray(e.offset, e.offset + e.length).every((b) => b === 0)).toBe(true);
              pos += e.length;
            }
            expect(pos).toBe(node.length);
          } finally {
            await graph.delete(node);
            model = new Uint8Array(0);
          }
        },
      ),
      { numRuns: RUNS },
    );
  });
});
