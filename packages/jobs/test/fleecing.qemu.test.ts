/**
 * Fleecing against real NBD clients: while a guest keeps overwriting the source, `nbdinfo
 * --map=qemu:dirty-bitmap:b0` shows the bitmap as of job start, and `qemu-img convert` and `nbdcopy`
 * pull the point-in-time image from the export of the overlay, byte for byte.
 */
import { readFile } from "node:fs/promises";
import { NbdServer } from "@blk/drivers/nbd";
import { missingPeers, run } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { C, fleece, initialData, MiB } from "./fleecing-helpers.ts";
import { rng, sha } from "./mirror-helpers.ts";

const SIZE = 16 * MiB;
const missing = missingPeers(["nbdinfo", "nbdcopy", "qemu-img"]);
if (missing.length > 0) console.warn(`skipping fleecing interop tests: missing ${missing.join(", ")}`);

/** `nbdinfo --map` lines: offset, length, type, description. */
function parseMap(out: string): { offset: number; length: number; type: number; description: string }[] {
  return out
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l.length > 0)
    .map((l) => {
      const [offset, length, type, ...rest] = l.split(/\s+/);
      return {
        offset: Number(offset),
        length: Number(length),
        type: Number(type),
        description: rest.join(" "),
      };
    });
}

describe.skipIf(missing.length > 0)("fleecing export read by nbdinfo, qemu-img and nbdcopy", () => {
  it("a guest writes all along; every client sees the source and the bitmap as of job start", async () => {
    const data = initialData(SIZE, 42);
    const r = rng(43);
    const preDirty = new Set<number>();
    const f = await fleece(data, async (guest) => {
      for (let i = 0; i < 10; i++) {
        const c = Math.floor(r() * (SIZE / C));
        preDirty.add(c);
        await guest.write(c * C + 4096, new Uint8Array(8192).fill(0xdd));
      }
    });
    const server = new NbdServer();
    const ctl = { stop: false };
    let guestWrites = 0;
    let guestLoop: Promise<void> = Promise.resolve();
    try {
      const expected = await f.srcMem.snapshot();
      server.addExport({ name: "fleece", node: f.overlay, bitmaps: ["b0"] });
      const sock = f.dir.join("nbd.sock");
      await server.listen({ type: "unix", path: sock });
      const uri = `nbd+unix:///fleece?socket=${sock}`;
      // The guest overwrites random clusters until the clients are done (one write at a time).
      guestLoop = (async () => {
        while (!ctl.stop) {
          const c = Math.floor(r() * (SIZE / C));
          await f.guest.write(c * C, new Uint8Array(C).fill(1 + (guestWrites % 250)));
          guestWrites++;
          await new Promise((resolve) => setTimeout(resolve, 1));
        }
      })();

      const map = await run("nbdinfo", [`--map=qemu:dirty-bitmap:b0`, uri], { timeoutMs: 30_000 });
      expect(map.code, map.stderr).toBe(0);
      const dirty = new Set<number>();
      let end = 0;
      for (const e of parseMap(map.stdout)) {
        expect(e.offset).toBe(end);
        end = e.offset + e.length;
        expect(e.description).toBe(e.type === 1 ? "dirty" : "clean");
        if (e.type === 1) for (let c = e.offset / C; c < end / C; c++) dirty.add(c);
      }
      expect(end).toBe(SIZE);
      expect([...dirty].sort((a, b) => a - b)).toEqual([...preDirty].sort((a, b) => a - b));

      const viaQemu = f.dir.join("qemu-img.raw");
      const conv = await run("qemu-img", ["convert", "-f", "raw", "-O", "raw", uri, viaQemu], {
        timeoutMs: 60_000,
      });
      expect(conv.code, conv.stderr).toBe(0);
      const viaNbdcopy = f.dir.join("nbdcopy.raw");
      const copy = await run("nbdcopy", [uri, viaNbdcopy], { timeoutMs: 60_000 });
      expect(copy.code, copy.stderr).toBe(0);
      ctl.stop = true;
      await guestLoop;
      expect(guestWrites).toBeGreaterThan(0);
      expect(sha(await readFile(viaQemu))).toBe(sha(expected));
      expect(sha(await readFile(viaNbdcopy))).toBe(sha(expected));
      // and the source did move on
      expect(sha(await f.srcMem.snapshot())).not.toBe(sha(expected));
      await server.removeExport("fleece");
    } finally {
      ctl.stop = true;
      await guestLoop;
      await server.close();
      await f.dispose();
    }
    expect(f.graph.list().map((n) => n.nodeName)).toEqual(["src"]);
  });
});
