/**
 * The pieces a mirror job is made of, put together: a filter above the source taking over its parents,
 * an enabled dirty bitmap catching guest writes, the copy engine looping until the bitmap is clean, then
 * removing the filter and replacing the source by the target under all its parents.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  BlockGraph,
  backendParent,
  CopyEngine,
  filterDriver,
  jobParent,
  memoryDriver,
  PERM,
  PERM_ALL,
} from "../src/index.ts";

const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 15);
const CL = 65536;
const tick = () => new Promise((r) => setImmediate(r));

describe("mirror in miniature", () => {
  it("converges under guest writes and switches the export to the target (property)", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.record({
            offset: fc.integer({ min: 0, max: 16 * CL - 1 }),
            bytes: fc.integer({ min: 1, max: CL }),
            value: fc.integer({ min: 1, max: 255 }),
          }),
          { maxLength: 12 },
        ),
        async (writes) => {
          const g = new BlockGraph();
          const src = await g.open(memoryDriver, { size: 16 * CL }, { nodeName: "src" });
          for (let i = 0; i < 16; i += 3) await src.write(i * CL, new Uint8Array(CL).fill(i + 1));
          const dst = await g.open(memoryDriver, { size: 16 * CL }, { nodeName: "dst", discard: "unmap" });
          const exp = g.attach(backendParent(), src, {
            name: "root",
            perm: PERM.CONSISTENT_READ | PERM.WRITE,
            shared: PERM_ALL & ~PERM.RESIZE,
          });
          const top = await g.openFilterAbove(filterDriver("mirror_top"), {}, src, { childName: "backing" });
          expect(exp.child).toBe(top);
          const job = jobParent("mirror", "m0");
          const target = g.attach(job, dst, {
            name: "target",
            perm: PERM.WRITE,
            shared: PERM.WRITE_UNCHANGED,
          });
          const bitmap = src.createBitmapSync({ granularity: CL });
          bitmap.setDirty(0, src.length);
          const engine = new CopyEngine({ source: src, target, bitmap, chunkSize: 2 * CL, maxWorkers: 4 });
          const guest = (async () => {
            for (const w of writes) {
              await tick();
              const n = Math.min(w.bytes, src.length - w.offset);
              await exp.write(w.offset, new Uint8Array(n).fill(w.value));
            }
          })();
          const st = { guestDone: false };
          void guest.then(() => {
            st.guestDone = true;
          });
          // The copy loop: passes until the guest is quiet and the bitmap is clean.
          while (!st.guestDone || bitmap.count() > 0) {
            await engine.run();
            await tick();
          }
          await guest;
          expect(bitmap.count()).toBe(0);
          await g.removeFilter(top);
          target.detach();
          bitmap.release();
          g.replaceNode(src, dst);
          expect(exp.child).toBe(dst);
          const a = await src.read(0, src.length);
          const b = await exp.read(0, src.length);
          expect(Buffer.compare(a, b)).toBe(0);
        },
      ),
      { numRuns: RUNS },
    );
  });
});
