/**
 * Fleecing (pull-mode backup): `sync=none` backup into a temporary qcow2 overlay backed by the source
 * itself, the overlay exported over NBD with the dirty bitmap as `qemu:dirty-bitmap:NAME`. While a guest
 * overwrites half of the image, an NBD client reads the export: it sees the source as of job start, byte
 * for byte. Then the job is cancelled and the overlay dropped. Also the serialising rule on its own: an
 * overlay read in flight holds back the copy of the same cluster, and so the guest write that caused it.
 */
import { backendParent, PERM } from "@blk/core";
import { NbdClient, NbdServer } from "@blk/drivers/nbd";
import { describe, expect, it } from "vitest";
import { C, fleece, initialData, MiB, readAll, waitFor } from "./fleecing-helpers.ts";
import { settle } from "./helpers.ts";
import { rng, sha } from "./mirror-helpers.ts";

/** Image size in MiB (the 1 GiB proof: BLK_FLEECE_MIB=1024). */
const SIZE = Number(process.env.BLK_FLEECE_MIB ?? 8) * MiB;
const ROUNDS = Number(process.env.BLK_FLEECE_ROUNDS ?? 2);

describe("fleecing: sync=none into an overlay backed by the source, read over NBD", () => {
  for (let round = 0; round < ROUNDS; round++) {
    it(`round ${round}: a guest overwrites half the image; the export shows the source at job start`, async () => {
      const data = initialData(SIZE, 100 + round);
      const r = rng(200 + round);
      const preDirty = new Set<number>();
      const f = await fleece(data, async (guest) => {
        for (let i = 0; i < 8; i++) {
          const c = Math.floor(r() * (SIZE / C));
          preDirty.add(c);
          await guest.write(c * C + 100, new Uint8Array(300).fill(0xee));
        }
      });
      const server = new NbdServer();
      try {
        expect(f.job.cbw.fleecing).toBe(true);
        expect(f.job.cbw.bufferSize).toBe(0);
        // the overlay's backing edge stayed on the source (moving it above would make a cycle)
        expect(f.overlay.backing).toBe(f.src);
        expect(f.guest.child).toBe(f.job.filter);
        const expected = await f.srcMem.snapshot();
        const model = expected.slice();
        server.addExport({ name: "fleece", node: f.overlay, bitmaps: ["b0"] });
        const sock = f.dir.join("nbd.sock");
        await server.listen({ type: "unix", path: sock });
        const client = await NbdClient.connect({
          server: { type: "unix", path: sock },
          export: "fleece",
          metaContexts: ["base:allocation", "qemu:dirty-bitmap:b0"],
        });
        try {
          // The guest overwrites half of the clusters (random patterns, some zero-writes, some partial)
          // in rounds, while the client reads the whole export in chunks.
          const clusters = SIZE / C;
          const order = [...Array(clusters).keys()].sort(() => r() - 0.5).slice(0, clusters / 2);
          const guestDone = (async () => {
            for (let i = 0; i < order.length; i += 8) {
              await Promise.all(
                order.slice(i, i + 8).map((c) => {
                  // inside cluster c: writes of one batch never overlap
                  const head = r() < 0.3 ? Math.floor(r() * C) : 0;
                  const off = c * C + head;
                  const len = 1 + Math.floor(r() * (C - head));
                  if (r() < 0.15) {
                    model.fill(0, off, off + len);
                    return f.guest.writeZeroes(off, len);
                  }
                  const d = new Uint8Array(len);
                  for (let k = 0; k < len; k += 512) d.fill(Math.floor(r() * 256), k, k + 512);
                  model.set(d, off);
                  return f.guest.write(off, d);
                }),
              );
            }
          })();
          const during = await readAll(client, SIZE, 256 * 1024);
          await guestDone;
          const after = await readAll(client, SIZE, 4 * MiB);
          expect(sha(during)).toBe(sha(expected));
          expect(sha(after)).toBe(sha(expected));
          // the guest's writes did land on the source
          expect(sha(await f.srcMem.snapshot())).toBe(sha(model));
          expect(sha(model)).not.toBe(sha(expected));
          // the dirty bitmap as of job start, as qemu:dirty-bitmap:b0
          const dirty = new Set<number>();
          for (let off = 0; off < SIZE; ) {
            const st = await client.blockStatus(off, SIZE - off);
            const ext = st.get("qemu:dirty-bitmap:b0") ?? [];
            expect(ext.length).toBeGreaterThan(0);
            for (const e of ext) {
              if (e.flags & 1) for (let c = e.offset / C; c < (e.offset + e.length) / C; c++) dirty.add(c);
              off = Math.max(off, e.offset + e.length);
            }
          }
          expect([...dirty].sort((a, b) => a - b)).toEqual([...preDirty].sort((a, b) => a - b));
        } finally {
          await client.close();
        }
        await server.removeExport("fleece");
        f.job.cancel();
        expect(await f.job.outcome).toEqual({ status: "cancelled", consistent: false });
        // the filter is gone: the guest writes to the source again, which keeps the guest's data
        expect(f.guest.child).toBe(f.src);
        await f.guest.write(0, new Uint8Array(512).fill(1));
        model.fill(1, 0, 512);
        expect(sha(await f.srcMem.snapshot())).toBe(sha(model));
      } finally {
        await server.close();
        await f.dispose();
      }
      expect(f.graph.list().map((n) => n.nodeName)).toEqual(["src"]);
    });
  }

  it("an overlay read in flight holds back the copy of its cluster, and so the guest write", async () => {
    const data = initialData(1 * MiB, 7);
    const f = await fleece(data, async () => {});
    try {
      const reader = f.graph.attach(backendParent("reader"), f.overlay, {
        name: "root",
        perm: PERM.CONSISTENT_READ,
      });
      const X = 5 * C;
      const old = data.slice(X, X + C);
      let release!: () => void;
      const gate = new Promise<void>((resolve) => (release = resolve));
      let held = false;
      f.srcMem.hook = async (req) => {
        if (req.kind === "read" && req.offset === X && !held) {
          held = true;
          await gate;
        }
      };
      // The overlay read goes to the backing source and is held there, before it got the data.
      const read = reader.read(X, C);
      await settle();
      expect(held).toBe(true);
      let written = false;
      const write = f.guest.write(X, new Uint8Array(C).fill(0x5a)).then(() => {
        written = true;
      });
      // The copy of X (read from the source: not held) is a serialising write of the overlay: it waits
      // for the read, and the guest write waits for the copy.
      await waitFor(() =>
        f.overlay.tracker.requests().some((q) => q.serialising && q.waitingFor?.kind === "read"),
      );
      await settle();
      expect(written).toBe(false);
      expect((await f.srcMem.snapshot())[X + 1]).toBe(data[X + 1]);
      release();
      expect(sha(await read)).toBe(sha(old));
      await write;
      expect(sha(await reader.read(X, C))).toBe(sha(old));
      expect((await f.srcMem.snapshot())[X + 1]).toBe(0x5a);
      reader.detach();
    } finally {
      f.srcMem.hook = undefined;
      await f.dispose();
    }
  });
});
